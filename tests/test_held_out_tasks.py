"""The demo's per-task report: held-out clips sampled as joint / v2a / a2v, alone and stitched, scored on
latents and (through `soe eval`) on decoded mp4s, tabled and plotted."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

from soe.cli.stitch import run_training
from soe.recipe.reading import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"
SHORT = ["data.num_clips=8", "data.batch_size=2", "data.seconds=1.0", "sample.steps=2", "sample.at_end=false",
         "sample.seconds=1.0"]
TASKS = ["sample.sync_tasks=[joint,v2a,a2v]", "sample.sync_media=true", "sample.sync_clips=2"]


def test_two_step_run_reports_each_task_alone_and_stitched_with_soe_eval_on_the_mp4s(tmp_path):
    from soe.evaluate import sync_eval
    from soe.evaluate.run import evaluate, plan
    from soe.recipe.builders import build_sampler, build_stitcher
    from soe.sample.sampler import sample

    run = tmp_path / "run"
    overrides = [*SHORT, *TASKS, "trainer.max_steps=2", f"run_dir={run}", "sample.at_start=true", "sample.at_end=true"]
    run_training(TINY, overrides, console=Console(file=open(tmp_path / "screen.txt", "w"), width=200), progress=False)
    report = json.loads((run / "sync.json").read_text())
    for label, step in (("experts alone", 0), ("stitched", 2)):
        r = report[label]
        assert r["step"] == step and set(r["tasks"]) == {"joint", "v2a", "a2v"}
        assert r["sync"] == r["tasks"]["joint"]["sync"]  # the joint task is the top-level score, as before
        assert set(r["tasks"]["v2a"]["frechet"]) == {"audio"} and set(r["tasks"]["a2v"]["frechet"]) == {"video"}
        for task, t in r["tasks"].items():
            folder = run / "samples" / "held_out" / f"{label.replace(' ', '_')}-step-{step:06d}" / task
            assert sorted(p.name for p in folder.glob("*.mp4")) == ["clip_00.mp4", "clip_01.mp4"]
            assert sorted(p.name for p in folder.glob("*.wav")) == ["clip_00.wav", "clip_01.wav"]
            again = evaluate(plan(folder, metrics="av_align", out=tmp_path / "again.json", force=True), device="cpu")
            assert t["av_align"] == pytest.approx(again["mean"]["av_align"])  # what `soe eval FOLDER` says
            assert json.loads((folder / "eval.json").read_text())["mean"]["av_align"] == pytest.approx(t["av_align"])
    assert "av_align" in report["truth"] and report["truth"]["sync"] == pytest.approx(1.0, abs=0.1)
    # step 0 joint is the experts sampled alone; v2a at step 0 is the audio expert alone, whatever the video
    cfg = load_recipe(TINY, overrides)
    torch.manual_seed(cfg.seed)
    st = build_stitcher(cfg)
    experts = {"a": st.a.eval(), "b": st.b.eval()}
    cond, _ = sync_eval.held_out(experts, 1.0, 2, cfg.seed)
    with torch.no_grad():
        alone = sample(experts, cond, 1.0, build_sampler(cfg))
    assert report["experts alone"]["sync"] == pytest.approx(sync_eval.sync_score(alone, experts, 1.0))
    screen = (tmp_path / "screen.txt").read_text()
    for needle in ("v2a (the true video)", "a2v (the true audio)", "AV-Align", "ground truth"):
        assert needle in screen
    # the task sheet is before_after.png; the joint contact sheets stack beside it
    sheet = Image.open(run / "samples" / "before_after.png")
    assert sheet.size[1] > sheet.size[0] / 3  # three rows of panels
    assert (run / "samples" / "joint_before_after.png").is_file()


def test_v2a_keeps_the_true_video_and_a2v_the_true_audio(tmp_path):
    from soe.recipe.builders import build_stitcher
    from soe.sample import held_out_tasks as hot

    cfg = load_recipe(TINY, [*SHORT, *TASKS])
    torch.manual_seed(cfg.seed)
    st = build_stitcher(cfg)
    cond, truth, seconds = hot.held_out_clips(st, cfg, 2)
    v2a = hot.sample_task(st, cfg, "v2a", cond, truth, seconds)
    a2v = hot.sample_task(st, cfg, "a2v", cond, truth, seconds)
    assert torch.equal(v2a["a"], truth["a"].float()) and not torch.equal(v2a["b"], truth["b"].float())
    assert torch.equal(a2v["b"], truth["b"].float()) and not torch.equal(a2v["a"], truth["a"].float())


@pytest.mark.parametrize("tasks", ["[joint,joint]", "[t2v]", "[]"])
def test_bad_sync_tasks_fail_with_one_line_naming_the_key(tasks):
    from soe.errors import RecipeError
    from soe.recipe.validate import validate_recipe

    with pytest.raises(RecipeError, match=r"sample\.sync_tasks"):
        validate_recipe(load_recipe(TINY, [f"sample.sync_tasks={tasks}"]), check_paths=False)
