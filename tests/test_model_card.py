"""`soe export` writes a model card (huggingface_hub's ModelCard: base_model per expert, library, tags, license;
recipe, block pairs, steps, data, usage, the before/after sheet) and `--push-to-hub REPO` uploads exactly the
export's files in one commit (the HfApi calls are recorded, never sent: the Hub is unreachable here)."""
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from test_bad_inputs import fails_cleanly
from test_export import recipe
from test_hub import PRETRAINED, cache_repo, hf_home  # noqa: F401 -- the fixture

from soe import get_expert
from soe.cli import main
from soe.recipe.builders import build_stitcher
from soe.train.build import apply_training_setup
from soe.train.trained import export_trained

STEP = 7


@pytest.fixture
def hub_run(hf_home, tmp_path):  # noqa: F811
    """A run whose video expert came from a (cached) Hub repo and whose audio expert is ACE-Step v1:
    LoRA on both, the training step recorded, a before/after sheet in samples/."""
    from omegaconf import OmegaConf

    cache_repo(hf_home, "soe-test/video-expert", {".": PRETRAINED / "video_expert"})
    cfg = recipe(tmp_path, b="ace-step", **{"wan2.1": {"path": "soe-test/video-expert"}, "ace-step": {"options": {"sample_rate": 25600}}})
    st = build_stitcher(cfg)
    apply_training_setup(st, cfg)
    run = Path(cfg.run_dir)
    export_trained(st, run / "trained", {s: cfg.experts[s].train for s in ("a", "b")}, step=STEP)
    OmegaConf.save(cfg, run / "recipe.yaml", resolve=True)
    (run / "samples").mkdir()
    Image.new("RGB", (32, 16), (200, 40, 40)).save(run / "samples" / "before_after.png")
    return run, cfg, st


def test_export_writes_a_model_card_with_metadata_recipe_pairs_and_usage(hub_run):
    run, cfg, st = hub_run
    assert main(["export", str(run), "--format", "diffusers", "--out", str(run / "card")]) == 0
    card = ModelCard.load(run / "card" / "README.md")
    licenses = {get_expert(cfg.experts[s].name).license for s in ("a", "b")}
    assert card.data.base_model == ["soe-test/video-expert"]  # the repo the video expert came from; b is a preset
    assert card.data.library_name == "soe" and {"soe", "wan2.1", "ace-step", "lora"} <= set(card.data.tags)
    assert card.data.license == (licenses.pop() if len(licenses) == 1 and None not in licenses else None)
    text = card.text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [tuple(int(c) for c in r.split("|")[2:4]) for r in rows] == [tuple(p) for p in st.pairs]
    assert f"step {STEP}" in text and f"{cfg.data.num_clips} synthetic clips" in text
    assert "soe-test/video-expert" in text and "load_lora_weights" in text and "lora.init_from" in text
    assert "![" in text and (run / "card" / "before_after.png").read_bytes() == (run / "samples" / "before_after.png").read_bytes()

    assert main(["export", str(run), "--format", "comfyui", "--out", str(run / "comfy")]) == 0
    comfy = ModelCard.load(run / "comfy" / "README.md").text
    assert "ComfyUI/models/loras/" in comfy and "lora_a_wan2.1.safetensors" in comfy


def test_push_to_hub_uploads_every_exported_file_in_one_commit(hub_run, monkeypatch):
    run, _, _ = hub_run
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: calls.append(("create_commit", repo_id, operations)))
    assert main(["export", str(run), "--format", "merged", "--out", str(run / "merged"), "--push-to-hub", "me/my-stitch", "--private"]) == 0
    (_, repo, kw), (_, repo2, operations) = calls
    assert repo == repo2 == "me/my-stitch" and kw["private"] is True
    files = {p.relative_to(run / "merged").as_posix(): p for p in (run / "merged").rglob("*") if p.is_file()}
    assert {op.path_in_repo for op in operations} == set(files)
    assert {"README.md", "stitch.safetensors", "recipe.yaml", "before_after.png"} <= set(files)
    assert all(Path(op.path_or_fileobj).read_bytes() == files[op.path_in_repo].read_bytes() for op in operations)
    assert "soe generate" in ModelCard.load(run / "merged" / "README.md").text


def test_push_to_hub_needs_a_plain_repo_id_and_writes_nothing_otherwise(hub_run, tmp_path, capsys):
    run, _, _ = hub_run
    for bad in ("not-a-repo", "me/x@main", "/abs/folder"):
        fails_cleanly(["export", str(run), "--format", "diffusers", "--push-to-hub", bad], capsys, tmp_path,
                      "--push-to-hub: expected a Hub repo id 'org/name'")
