"""Bad checkpoint folders, latent caches, resume checkpoints and CLI arguments (recipe keys: test_recipes.py).

Each case: ``soe`` prints one line ``error: ...`` without a traceback, exits with status 2, and every
file that existed before is left byte for byte as it was.
"""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from soe import get_expert
from soe.builders import build_stitcher
from soe.cli import main
from soe.config import load_recipe
from soe.errors import CheckpointError
from soe.lora import apply_training_setup
from soe.train.checkpoint import export_trained, load_trained
from soe.train.data import PairedLatentDataModule, SyntheticAVDataModule
from soe.train.latent_cache import write_meta, write_shard

DEMO = str(Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml")  # tiny random experts: fast; recipes/demo.yaml is tested in test_first_run.py
BASE = ["data.num_clips=8", "data.batch_size=2", "data.seconds=1.0", "trainer.max_steps=1", "trainer.log_every_n_steps=1"]
ACE_V1 = ["experts.b.name=ace-step", "experts.b.options={sample_rate: 25600}"]


# ---- helpers -------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def fails_cleanly(argv, capsys, root: Path, message: str) -> str:
    """``soe argv`` exits 2 with one line containing ``message``; no file under ``root`` changed."""
    before = snapshot(root)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    after = snapshot(root)
    changed = [k for k, h in before.items() if after.get(k) != h]
    assert not changed, f"overwritten or removed: {changed}"
    assert not set(after) - set(before), f"written by a failed run: {sorted(set(after) - set(before))}"
    return err


def stitch(run_dir, *overrides):
    return ["stitch", DEMO, *BASE, f"run_dir={run_dir}", *overrides]


def weights_file(folder: Path) -> Path:
    return next(folder.rglob("*.safetensors"))


def rewrite(file: Path, change) -> None:
    state = load_file(file)
    change(state)
    save_file(state, file)


def first_matrix(state) -> str:
    return next(k for k in sorted(state) if k.endswith("weight") and state[k].dim() == 2)


CORRUPTIONS = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "missing-key": lambda f: rewrite(f, lambda s: s.pop(first_matrix(s))),
    "wrong-shape": lambda f: rewrite(f, lambda s: s.update({(k := first_matrix(s)): torch.zeros(s[k].shape[0] + 1, s[k].shape[1])})),
    "int-dtype": lambda f: rewrite(f, lambda s: s.update({(k := first_matrix(s)): s[k].to(torch.int32)})),
    "no-config": None,  # handled below: config.json removed
}


@pytest.fixture(scope="module")
def expert_folders(tmp_path_factory):
    """Tiny checkpoints of each family, in its official folder layout (written by ``Expert.save``)."""
    root = tmp_path_factory.mktemp("experts")
    for name in ("wan2.1", "ace-step-1.5", "ace-step"):
        get_expert(name).tiny().save(root / name)
    return root


# ---- expert checkpoint folders (experts.<side>.path) ---------------------------------------------
EXPERT_CASES = [
    ("wan2.1", "a", [], "truncated"),
    ("wan2.1", "a", [], "missing-key"),
    ("wan2.1", "a", [], "wrong-shape"),
    ("wan2.1", "a", [], "int-dtype"),
    ("wan2.1", "a", [], "no-config"),
    ("ace-step-1.5", "b", [], "truncated"),
    ("ace-step-1.5", "b", [], "missing-key"),
    ("ace-step-1.5", "b", [], "no-config"),
    ("ace-step", "b", ACE_V1, "truncated"),
    ("ace-step", "b", ACE_V1, "missing-key"),
    ("ace-step", "b", ACE_V1, "wrong-shape"),
    ("ace-step", "b", ACE_V1, "int-dtype"),
    ("ace-step", "b", ACE_V1, "no-config"),
]


@pytest.mark.parametrize("name, side, extra, corruption", EXPERT_CASES, ids=[f"{c[0]}-{c[3]}" for c in EXPERT_CASES])
def test_corrupt_expert_checkpoint(expert_folders, tmp_path, capsys, name, side, extra, corruption):
    folder = tmp_path / "ckpt"
    shutil.copytree(expert_folders / name, folder)
    if corruption == "no-config":
        next(folder.rglob("config.json")).unlink()
    else:
        CORRUPTIONS[corruption](weights_file(folder))
    fails_cleanly(stitch(tmp_path / "run", *extra, f"experts.{side}.path={folder}"), capsys, tmp_path, f"experts.{side}.path: cannot load")


def test_checkpoint_of_another_expert_family(expert_folders, tmp_path, capsys):
    """A diffusers folder of ACE-Step 1.5 given to the Wan expert: refused, not half-loaded with random weights."""
    err = fails_cleanly(stitch(tmp_path / "run", f"experts.a.path={expert_folders / 'ace-step-1.5'}"), capsys, expert_folders,
                        "experts.a.path: cannot load")
    assert "wan2.1" in err


def test_corrupt_config_json_without_preset(expert_folders, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(expert_folders / "wan2.1", folder)
    next(folder.rglob("config.json")).write_text("{not json")
    fails_cleanly(stitch(tmp_path / "run", f"experts.a.path={folder}", "experts.a.preset=null"), capsys, tmp_path, "is not valid JSON")


# ---- exported trained folders (load_trained) ------------------------------------------------------
@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    cfg = load_recipe(DEMO, ["stitch.connector.init=trunc_normal"])
    st = build_stitcher(cfg)
    apply_training_setup(st, cfg)
    folder = tmp_path_factory.mktemp("trained") / "trained"
    export_trained(st, folder, {"a": "lora", "b": "lora"})
    return cfg, folder


def _fresh(cfg):
    st = build_stitcher(cfg)
    apply_training_setup(st, cfg)
    return st


TRAINED_CASES = {
    "no-connectors": (lambda f: (f / "connectors.safetensors").unlink(), "holds no connectors.safetensors"),
    "truncated-connectors": (lambda f: CORRUPTIONS["truncated"](f / "connectors.safetensors"), "trained folder"),
    "connector-wrong-shape": (lambda f: CORRUPTIONS["wrong-shape"](f / "connectors.safetensors"), "size mismatch"),
    "connector-missing-key": (lambda f: CORRUPTIONS["missing-key"](f / "connectors.safetensors"), "Missing key"),
    "adapter-of-other-expert": (lambda f: (shutil.rmtree(f / "lora_b"), shutil.copytree(f / "lora_a", f / "lora_b")), "lora_b"),
    "adapter-missing-tensor": (lambda f: CORRUPTIONS["missing-key"](f / "lora_a" / "adapter_model.safetensors"), "LoRA layers without tensors"),
}


@pytest.mark.parametrize("case", list(TRAINED_CASES))
def test_bad_trained_folder(trained_folder, tmp_path, case):
    cfg, good = trained_folder
    folder = tmp_path / "trained"
    shutil.copytree(good, folder)
    corrupt, message = TRAINED_CASES[case]
    corrupt(folder)
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match="trained folder") as info:
        load_trained(_fresh(cfg), folder)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1, info.value
    assert snapshot(folder) == before


def test_good_trained_folder_loads(trained_folder):
    cfg, folder = trained_folder
    load_trained(_fresh(cfg), folder)  # the control: corruption, not the fixture, makes the cases fail


# ---- latent caches (data.kind=latents) ------------------------------------------------------------
@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory):
    """A valid cache of 4 one-second clips for the demo experts."""
    cfg = load_recipe(DEMO)
    st = build_stitcher(cfg)
    experts = {"a": st.a, "b": st.b}
    data = SyntheticAVDataModule(experts, seconds=1.0, num_clips=4)
    folder = tmp_path_factory.mktemp("cache") / "cache"
    write_meta(folder, {s: e.name for s, e in experts.items()})
    write_shard(folder, "shard-00000.safetensors", [{"id": f"clip{i}", "seconds": 1.0, **data.make_clip(i)} for i in range(4)])
    return experts, folder


def _lines(folder):
    return (folder / "index.jsonl").read_text().splitlines()


def _reshape_video(folder):
    f = folder / "shard-00000.safetensors"
    rewrite(f, lambda s: s.update({"clip0/a/latents": torch.zeros(3, 3, 3, 3)}))


CACHE_CASES = {
    "empty-folder": (lambda f: [p.unlink() for p in f.iterdir()], [], "missing 'meta.json'"),
    "missing-index": (lambda f: (f / "index.jsonl").unlink(), [], "missing 'index.jsonl'"),
    "corrupt-json": (lambda f: (f / "index.jsonl").write_text('{"id": "clip0", "shard": \n'), [], "corrupt JSON"),
    "index-without-shard-key": (lambda f: (f / "index.jsonl").write_text('{"id": "clip0", "seconds": 1.0}\n'), [], "lacks ['shard']"),
    "missing-shard": (lambda f: (f / "shard-00000.safetensors").rename(f / "elsewhere.safetensors"), [], "index names missing shard"),
    "truncated-shard": (lambda f: CORRUPTIONS["truncated"](f / "shard-00000.safetensors"), [], "is unreadable"),
    "wrong-latent-shape": (_reshape_video, [], "a/latents has shape [3, 3, 3, 3]"),
    "other-experts": (lambda f: (f / "meta.json").write_text(json.dumps({"format": 1, "experts": {"a": "wan2.1", "b": "ace-step"}})),
                      [], "holds latents of experts"),
    "other-format": (lambda f: (f / "meta.json").write_text(json.dumps({"format": 7, "experts": {}})), [], "format 7, expected 1"),
    "bucket-smaller-than-batch": (lambda f: None, ["data.batch_size=8"], "data.batch_size: no bucket holds"),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_bad_latent_cache(latent_cache, tmp_path, capsys, case):
    _, good = latent_cache
    folder = tmp_path / "cache"
    shutil.copytree(good, folder)
    corrupt, extra, message = CACHE_CASES[case]
    corrupt(folder)
    fails_cleanly(stitch(tmp_path / "run", "data.kind=latents", f"data.path={folder}", *extra), capsys, tmp_path, message)


def test_good_latent_cache_sets_up(latent_cache):
    experts, folder = latent_cache
    dm = PairedLatentDataModule(experts, folder, batch_size=2)
    dm.setup()
    assert len(dm.dataset) == 4


# ---- resume checkpoints ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    assert main(stitch(run, "trainer.checkpoint_every_n_steps=1")) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return run


RESUME_CASES = {
    "truncated-last-ckpt": (lambda r: CORRUPTIONS["truncated"](r / "checkpoints" / "last.ckpt"), [], "cannot be read safely"),
    "other-trainable-set": (lambda r: None, ["experts.b.train=frozen"], "does not match this recipe's trainable tensors"),
    "other-lora-rank": (lambda r: None, ["experts.a.lora.r=8"], "has shape"),
    "no-last-ckpt": (lambda r: (r / "checkpoints" / "last.ckpt").unlink(), [], "resume: no checkpoint to resume from"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_bad_resume_checkpoint(one_step_run, tmp_path, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    corrupt, extra, message = RESUME_CASES[case]
    corrupt(run)
    fails_cleanly(stitch(run, "resume=true", "trainer.max_steps=2", *extra), capsys, tmp_path, message)


# ---- command-line arguments -----------------------------------------------------------------------
CLI_CASES = [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: command"),
    (["stitch"], "the following arguments are required: recipe"),
    (["inspect", DEMO, "--colour"], "unrecognized arguments: --colour"),
    (["stitch", DEMO, "trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches: expected a positive integer"),
    (["stitch", DEMO, "trainer.checkpoint_every_n_steps=-1"], "trainer.checkpoint_every_n_steps: expected a positive integer"),
    (["stitch", DEMO, "optim.warmup_steps=-3"], "optim.warmup_steps: expected >= 0"),
    (["stitch", DEMO, "trainer.on_nonfinite=ignore"], "trainer.on_nonfinite: expected one of ['stop', 'skip']"),
    (["stitch", DEMO, *BASE, "trainer.strategy=bogus"], "trainer: You selected an invalid strategy name"),
    (["stitch", DEMO, *BASE, "trainer.precision=bogus"], "trainer: Precision 'bogus' is invalid"),
    (["stitch", DEMO, *BASE, "trainer.devices=0"], "trainer: `Trainer(devices=0)` value is not a valid input"),
]


@pytest.mark.parametrize("argv, message", CLI_CASES, ids=[" ".join(a[:1] + a[-1:]) or "nothing" for a, _ in CLI_CASES])
def test_bad_arguments(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # a run that wrongly started would write runs/ here, not into the repo
    fails_cleanly(argv, capsys, tmp_path, message)


def test_run_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "not_a_folder"
    f.write_text("keep me")
    fails_cleanly(stitch(f), capsys, tmp_path, f"run_dir: '{f}' is a file")
    fails_cleanly(stitch(f / "sub"), capsys, tmp_path, f"run_dir: '{f}' is a file")
    assert f.read_text() == "keep me"
