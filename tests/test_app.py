"""`soe app`: the Gradio app served on localhost with the tiny recipe and a trained run, driven end to end
through gradio_client (the app's own HTTP API): progress streams, the result equals `soe generate`'s with the
same settings, bad input gets the CLI's one-line message, and requests run one at a time."""
import time
from pathlib import Path

import av
import pytest
import torch
from conftest import live_trainable
from gradio_client import Client
from omegaconf import OmegaConf
from safetensors.torch import load_file

from soe.cli import main

TINY = str(Path(__file__).parent / "recipes" / "tiny.yaml")
SETTINGS = ["data.seconds=1.0", "sample.seconds=1.0", "sample.steps=3"]


def trained_tiny_run(run: Path) -> Path:
    """recipe.yaml + trained/ of the tiny recipe, with non-zero LoRA and connector weights (no training loop)."""
    from soe.recipe.builders import build_stitcher
    from soe.recipe.reading import load_recipe
    from soe.train.build import apply_training_setup
    from soe.train.trained import export_trained

    cfg = load_recipe(TINY, [*SETTINGS, f"run_dir={run}"])
    torch.manual_seed(cfg.seed)
    st = build_stitcher(cfg)
    apply_training_setup(st, cfg)
    live_trainable(st, seed=1)
    export_trained(st, run / "trained", {s: cfg.experts[s].train for s in ("a", "b")}, step=5)
    OmegaConf.save(cfg, run / "recipe.yaml", resolve=True)
    return run


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app of `soe app TINY ckpt=RUN` on a free localhost port, in this process (torch work stays on this
    machine's 2 cores); yields (url, run folder, recorded render intervals)."""
    from soe.cli.app import launch

    run = trained_tiny_run(tmp_path_factory.mktemp("app") / "run")
    app, url = launch(TINY, [*SETTINGS, f"sample.ckpt={run}"], host="127.0.0.1", port=None, block=False)
    session, intervals = app.soe_session, []
    render = session.render

    def recorded(request, progress=None):
        start = time.monotonic()
        try:
            return render(request, progress)
        finally:
            intervals.append((start, time.monotonic()))

    session.render = recorded
    yield url, run, intervals
    app.close()


def args(**kw):
    values = dict(prompt="a square bouncing", negative="", seconds=1.0, steps=3, seed=0, guidance_a=1.0, guidance_b=1.0,
                  image=None, video=None, audio=None, memory="none")
    values.update(kw)
    return list(values.values())


def test_app_streams_progress_and_returns_what_soe_generate_writes(served, tmp_path):
    url, run, _ = served
    client = Client(url, verbose=False)
    job = client.submit(*args(seed=3), api_name="/generate")
    status, mp4, png = job.result(timeout=300)
    statuses = [out[0] for out in job.outputs()]
    assert [s for s in statuses if s.startswith("sampling")] == [f"sampling: step {i}/3" for i in range(1, 4)]
    assert status.startswith("done:")
    with av.open(mp4) as f:
        assert {s.type for s in f.streams} == {"video", "audio"}  # the mp4 has sound
    served_folder = Path(status.removeprefix("done: ")).parent
    assert main(["generate", TINY, *SETTINGS, f"ckpt={run}", "prompt=a square bouncing", "seed=3", f"out={tmp_path / 'cli'}"]) == 0
    ours, cli = load_file(served_folder / "latents.safetensors"), load_file(tmp_path / "cli" / "latents.safetensors")
    assert ours.keys() == cli.keys() and all(torch.equal(ours[k], cli[k]) for k in cli)
    from PIL import Image, ImageStat

    assert max(ImageStat.Stat(Image.open(png).convert("L")).stddev) > 5  # a drawn contact sheet, not a blank image


@pytest.mark.parametrize("field, value, cli", [("seconds", -1.0, "seconds=-1.0"), ("steps", 0, "steps=0"),
                                               ("guidance_a", -1.0, "sample.guidance.a=-1.0")])
def test_app_refuses_bad_input_with_the_cli_message(served, capsys, field, value, cli):
    url, run, _ = served
    assert main(["generate", TINY, *SETTINGS, f"ckpt={run}", cli]) == 2
    message = capsys.readouterr().err.strip().removeprefix("error: ")
    with pytest.raises(Exception) as err:
        Client(url, verbose=False).predict(*args(**{field: value}), api_name="/generate")
    assert message in str(err.value) and len(message.splitlines()) == 1


def test_app_runs_one_generation_at_a_time(served):
    url, _, intervals = served
    client, before = Client(url, verbose=False), len(intervals)
    jobs = [client.submit(*args(seed=s), api_name="/generate") for s in (10, 11)]
    assert all(j.result(timeout=300)[0].startswith("done:") for j in jobs)
    (s1, e1), (s2, e2) = sorted(intervals[before:])
    assert e1 <= s2  # queued: the second sampling starts after the first one ended


def test_without_the_app_extra_soe_app_is_one_line(monkeypatch, capsys, tmp_path):
    import soe.extras

    real = soe.extras.find_spec
    monkeypatch.setattr(soe.extras, "find_spec", lambda name: None if name == "gradio" else real(name))
    assert main(["app", TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: soe app: not available without gradio (pip install 'soe[app]')"
    assert not any(tmp_path.iterdir())  # nothing written
