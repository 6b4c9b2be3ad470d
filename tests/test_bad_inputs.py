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
from soe.cli import main
from soe.data.datamodule import PairedLatentDataModule, SyntheticAVDataModule
from soe.data.latent_cache import write_meta, write_shard
from soe.errors import CheckpointError
from soe.recipe.builders import build_stitcher
from soe.recipe.reading import load_recipe
from soe.train.build import apply_training_setup
from soe.train.trained import export_trained, load_trained

DEMO = str(Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml")  # tiny random experts: fast; recipes/demo.yaml is tested in test_first_run.py
BASE = ["data.num_clips=8", "data.batch_size=2", "data.seconds=1.0", "trainer.max_steps=1", "trainer.log_every_n_steps=1"]
ACE_V1 = ["experts.b.name=ace-step", "experts.b.options={sample_rate: 25600}"]


# ---- helpers -------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every file (by content) and folder (an empty one left behind counts) under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


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
    # recipe changes accepted with --allow-changes: the checkpoint itself must still be refused
    "other-trainable-set": (lambda r: None, ["experts.b.train=frozen", "--allow-changes", "experts.b.train"],
                            "does not match this recipe's trainable tensors"),
    "other-lora-rank": (lambda r: None, ["experts.a.lora.r=8", "--allow-changes", "experts.a.lora.r"], "has shape"),
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
    (["stitch", DEMO, *BASE, "trainer.strategy=bogus"], "trainer.strategy: expected one of ['auto', 'ddp', 'fsdp2'], got 'bogus'"),
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


# ---- issue 15: inputs that used to end in a traceback, a silent no-op or an unclear message -------------
# Every case below: one line naming the key or file, exit status 2, nothing written or overwritten.
# Count (issue 15): this file collects 93 cases, 44 of them from here down, making 51 bad calls (some cases
# try one input through several commands); tests/test_run_folder.py tries 10 more (run folder in use, recipe
# changes on resume, sampling that cannot work, a full disk). `pytest --collect-only -q tests/test_bad_inputs.py`.
def _file(tmp_path, name="a_file.txt", text="not what was expected"):
    f = tmp_path / name
    f.write_text(text)
    return f


RECIPE_KEY_CASES = [
    (["optim.weight_decay=-1"], "optim.weight_decay: expected >= 0, got -1.0"),
    (["data.num_workers=-1"], "data.num_workers: expected >= 0 loader processes"),
    (["data.seconds=1000"], "data.seconds: 1000.0 s is longer than expert a ('wan2.1') can position (at most 163.8 s"),
    (["sample.seconds=1000"], "sample.seconds: 1000.0 s is longer than expert a ('wan2.1') can position"),
    (["experts.b.options.sample_rate=-5"], "experts.b.options.sample_rate: expected a positive number, got -5"),
    (["experts.a.options.fps=0"], "experts.a.options.fps: expected a positive number, got 0"),
    (["experts.a.options.height=-32"], "experts.a.options.height: expected a positive number, got -32"),
    (["experts.a.architecture.num_layers=0"], "experts.a.architecture.num_layers: expert 'wan2.1' would have 0 blocks; expected at least one"),
    (["experts.b.architecture.num_hidden_layers=0"], "experts.b.architecture.num_hidden_layers: expert 'ace-step-1.5' would have 0 blocks"),
    (["experts.a.lora.alpha=0"], "experts.a.lora.alpha: expected a positive scale, got 0.0 (alpha 0 makes the LoRA a no-op)"),
    (["experts.b.lora.alpha=-4"], "experts.b.lora.alpha: expected a positive scale, got -4.0"),
    (["experts.a.dtype=bfloat16"], "experts.b.dtype: 'float32' differs from experts.a.dtype 'bfloat16'"),
    (["experts.b.dtype=float16"], "experts.b.dtype: 'float16' differs from experts.a.dtype 'float32'"),
    (["experts.a.name=ace-step-1.5", "sample.at_end=true"], "generate: an mp4 with sound needs one video and one audio expert"),
    (["experts.b.name=wan2.1", "sample.every_n_steps=1"], "generate: an mp4 with sound needs one video and one audio expert"),
]


@pytest.mark.parametrize("overrides, message", RECIPE_KEY_CASES, ids=[" ".join(o) for o, _ in RECIPE_KEY_CASES])
def test_bad_recipe_values_of_issue_15(tmp_path, capsys, overrides, message):
    fails_cleanly(stitch(tmp_path / "run", *overrides), capsys, tmp_path, message)


def test_inspect_rejects_what_stitch_rejects(tmp_path, capsys):
    fails_cleanly(["inspect", DEMO, "experts.a.options.fps=0"], capsys, tmp_path, "experts.a.options.fps: expected a positive number")


@pytest.mark.parametrize("command", ["stitch", "generate"])
def test_conditions_file_that_is_not_safetensors(tmp_path, capsys, command):
    text = _file(tmp_path, "conditions.txt")
    argv = stitch(tmp_path / "run", "sample.at_end=true") if command == "stitch" else ["generate", DEMO, *BASE]
    fails_cleanly([*argv, f"sample.conditions={text}", f"sample.out={tmp_path / 'out'}"], capsys, tmp_path,
                  f"sample.conditions: '{text}' is not a safetensors file of a/<key> and b/<key> tensors")


@pytest.mark.parametrize("form", ["out={}", "sample.out={}", "out={}/sub"])
def test_generate_out_naming_an_existing_file(tmp_path, capsys, form):
    f = _file(tmp_path)
    fails_cleanly(["generate", DEMO, *BASE, form.format(f)], capsys, tmp_path, f"sample.out: '{f}' is a file, expected a folder")


def test_encode_out_naming_an_existing_file(tmp_path, capsys):
    f, src = _file(tmp_path), tmp_path / "clips"
    src.mkdir()
    fails_cleanly(["encode", DEMO, str(src), "--out", str(f)], capsys, tmp_path, f"soe encode --out: '{f}' is a file")


@pytest.mark.parametrize("text, message", [("[1, 2]\n", "must be a mapping of keys, got a ListConfig"),
                                           ("5\n", "must be a mapping of keys, got a single value")])
def test_recipe_that_is_a_list_or_a_scalar(tmp_path, capsys, text, message):
    recipe = _file(tmp_path, "recipe.yaml", text)
    for command in ("inspect", "stitch", "generate"):
        fails_cleanly([command, str(recipe)], capsys, tmp_path, f"recipe: '{recipe}' {message}")


@pytest.mark.parametrize("case", ["missing", "empty", "garbage-file", "garbage-in-folder"])
def test_convert_universe1_of_a_bad_source(tmp_path, capsys, case):
    src = tmp_path / "src"
    if case == "empty":
        src.mkdir()
    elif case == "garbage-file":
        src = _file(tmp_path, "model.safetensors", "not safetensors at all")
    elif case == "garbage-in-folder":
        src.mkdir()
        _file(src, "diffusion_pytorch_model.safetensors", "garbage")
    err = fails_cleanly(["convert", "universe1", str(src), str(tmp_path / "dst")], capsys, tmp_path, "convert: '")
    assert str(src) in err
    assert not (tmp_path / "dst").exists()


def test_generate_with_a_lora_run_missing_its_adapter(trained_folder, tmp_path, capsys):
    _, good = trained_folder
    folder = tmp_path / "trained"
    shutil.copytree(good, folder)
    shutil.rmtree(folder / "lora_a")
    fails_cleanly(["generate", DEMO, *BASE, f"ckpt={folder}", f"out={tmp_path / 'out'}"], capsys, tmp_path,
                  f"sample.ckpt: '{folder}' has no lora_a/ adapter folder, but experts.a.train is 'lora'")


def test_generate_with_another_runs_connector_size_is_not_cut_mid_word(trained_folder, tmp_path, capsys):
    _, good = trained_folder
    err = fails_cleanly(["generate", DEMO, *BASE, f"ckpt={good}", "stitch.connector.hidden=7", f"out={tmp_path / 'out'}"],
                        capsys, tmp_path, f"trained folder '{good}'")
    assert "size mismatch" in err and (err.endswith(" ...") or len(err) < 420), err
    assert not err.endswith("..") or err.endswith(" ..."), err  # cut at a word boundary, never mid-word


def test_latent_cache_of_other_clip_length(latent_cache, tmp_path, capsys):
    _, folder = latent_cache
    fails_cleanly(stitch(tmp_path / "run", "data.kind=latents", f"data.path={folder}", "data.seconds=4"), capsys, tmp_path,
                  f"data.seconds: 4.0 s, but the latent cache '{folder}' holds clips of 1 s")


# ---- the Python API: the same errors, all SoeErrors ----------------------------------------------------
def test_api_errors_are_soe_errors_with_the_cli_wording(tmp_path, capsys):
    from soe import get_expert as get
    from soe.errors import SoeError
    from soe.plugin.registry import UnknownExpertError
    from soe.stitch.align import DepthMapError, resolve_depth_map

    with pytest.raises(UnknownExpertError) as unknown:
        get("wan9")
    with pytest.raises(DepthMapError) as depth:
        resolve_depth_map([[0, 9]], 3, 3)  # the demo's depths
    for info in (unknown, depth):
        assert isinstance(info.value, SoeError) and len(str(info.value).splitlines()) == 1
    fails_cleanly(stitch(tmp_path / "run", "experts.a.name=wan9"), capsys, tmp_path, f"experts.a.name: {unknown.value}")
    fails_cleanly(stitch(tmp_path / "run", "stitch.pairs=[[0,9]]"), capsys, tmp_path, f"stitch.pairs: {depth.value}")


@pytest.fixture(scope="module")
def demo_stitcher():
    return build_stitcher(load_recipe(DEMO))


def _batches(st, n_a=2, n_b=2):
    g = torch.Generator().manual_seed(0)
    return st.a.dummy_batch(n_a, 1.0, g), st.b.dummy_batch(n_b, 1.0, g)


BATCH_CASES = {
    "bf16-latents": (lambda a, b: a.update(latents=a["latents"].bfloat16()), "batch_a['latents']: dtype torch.bfloat16, but expert 'wan2.1' computes in torch.float32"),
    "missing-timestep": (lambda a, b: b.pop("timestep"), "batch_b: missing ['timestep'] (expert 'ace-step-1.5' needs"),
    "missing-condition": (lambda a, b: a.pop("encoder_hidden_states"), "batch_a: missing ['encoder_hidden_states']"),
    "timestep-per-token": (lambda a, b: a.update(timestep=torch.rand(2, 5)), "batch_a['timestep']: expected shape (2,), one flow time per sample"),
    "height-not-multiple-of-patch": (lambda a, b: a.update(latents=a["latents"][..., :5, :]),
                                     "batch_a['latents']: shape [2, 4, 7, 5, 8], axis 3 must be a multiple of 2 (the patch size of expert 'wan2.1')"),
    "integer-latents": (lambda a, b: b.update(latents=b["latents"].long()), "batch_b['latents']: expected a floating-point tensor"),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_bad_batches_for_a_stitched_forward(demo_stitcher, case):
    from soe.stitch.batch_check import BatchError

    a, b = _batches(demo_stitcher)
    corrupt, message = BATCH_CASES[case]
    corrupt(a, b)
    with pytest.raises(BatchError) as info, torch.no_grad():
        demo_stitcher(a, b)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1, info.value


def test_batch_sizes_that_differ_between_the_experts(demo_stitcher):
    from soe.errors import SoeError

    a, b = _batches(demo_stitcher, 2, 3)
    with pytest.raises(SoeError, match="batch_a and batch_b: batch sizes 2 and 3"), torch.no_grad():
        demo_stitcher(a, b)


def test_experts_of_different_dtypes_in_one_stitch():
    from soe.errors import SoeError

    st = build_stitcher(load_recipe(DEMO))
    st.a.to(torch.bfloat16)
    a, b = _batches(st)
    a = {k: v.bfloat16() if v.is_floating_point() else v for k, v in a.items()}
    with pytest.raises(SoeError, match=r"experts: expert a \('wan2.1'\) is torch.bfloat16, expert b \('ace-step-1.5'\) is torch.float32"), torch.no_grad():
        st(a, b)


def test_config_json_that_does_not_match_the_weights(expert_folders, tmp_path, capsys):
    """Shapes from config.json differ from the weights: named, without diffusers' low_cpu_mem_usage advice."""
    folder = tmp_path / "ckpt"
    shutil.copytree(expert_folders / "wan2.1", folder)
    config = next(folder.rglob("config.json"))
    conf = json.loads(config.read_text())
    conf["ffn_dim"] = conf["ffn_dim"] * 2
    config.write_text(json.dumps(conf))
    err = fails_cleanly(stitch(tmp_path / "run", f"experts.a.path={folder}"), capsys, tmp_path, f"experts.a.path: cannot load '{folder}'")
    assert "low_cpu_mem_usage" not in err and "ignore_mismatched_sizes" not in err, err


@pytest.mark.parametrize("text", ["{not json", "[]", None], ids=["not-json", "a-list", "missing"])
def test_bad_adapter_config_names_the_file(trained_folder, tmp_path, text):
    cfg, good = trained_folder
    folder = tmp_path / "trained"
    shutil.copytree(good, folder)
    config = folder / "lora_a" / "adapter_config.json"
    config.write_text(text) if text is not None else config.unlink()
    with pytest.raises(CheckpointError) as info:
        load_trained(_fresh(cfg), folder)
    assert f"'{folder / 'lora_a' / 'adapter_config.json'}' is not a peft LoRA adapter config" in str(info.value), info.value


# ---- issue 15, second round: what else a demanding user tries (CLI) ------------------------------------
# Same contract as above: one line naming the key or file, exit status 2, nothing written or overwritten.
# Count (issue 15, second round): 68 more cases trying 73 inputs (the recipe-file cases go through inspect and
# stitch), so this file now collects 161 cases. 18 of the 73 were defects before: optim.lr=inf (trained, then a
# traceback in the mp4 encoder), optim.grad_clip=-1 and --allow-changes on a new run (silently accepted), two
# out-of-range seeds (numpy traceback), ckpt naming a file (blamed a missing lora_a/), and all 12 batch cases
# (raw torch errors deep in a layer, or integer timesteps silently taken as flow times).
MORE_RECIPE_CASES = [
    (["optim.lr=inf"], "optim.lr: expected a positive finite learning rate, got inf"),  # trained, then crashed in the mp4 encoder
    (["optim.lr=nan"], "optim.lr: expected a positive finite learning rate, got nan"),
    (["optim.lr=0"], "optim.lr: expected a positive finite learning rate, got 0.0"),
    (["optim.grad_clip=-1"], "optim.grad_clip: expected a gradient-norm limit >= 0 (0 = no clipping), got -1.0"),  # was silently off
    (["seed=-1"], "seed: expected an integer in [0, 2**32 - 1], got -1"),  # was numpy's ValueError traceback
    (["seed=1180591620717411303424"], "seed: expected an integer in [0, 2**32 - 1], got 1180591620717411303424"),
    (["seed=abc"], "seed: Value 'abc' of type 'str' could not be converted to Integer"),
    (["trainer.max_steps=0"], "trainer.max_steps: expected a positive number of steps, got 0"),
    (["trainer.max_steps=1.5"], "trainer.max_steps: Value '1.5' of type 'float' could not be converted to Integer"),
    (["trainer.max_step=3"], "trainer.max_step: Key 'max_step' not in"),
    (["trainer.max_steps"], "override 'trainer.max_steps': expected key=value"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps: expected a positive integer, got 0"),
    (["trainer.threads=0"], "trainer.threads: expected a positive number of CPU threads"),
    (["trainer.extra={bogus_arg: 1}"], "trainer: Trainer.__init__() got an unexpected keyword argument 'bogus_arg'"),
    (["resume=maybe"], "resume: Value 'maybe' is not a valid bool"),
    (["seed=${nope}"], "seed: Interpolation key 'nope' not found"),
    (["name=${oc.env:SOE_SURELY_UNSET_VARIABLE}"], "Environment variable 'SOE_SURELY_UNSET_VARIABLE' not found"),
    (["data.batch_size=0"], "data.batch_size: expected a positive integer, got 0"),
    (["data.seconds=nan"], "data.seconds: expected a positive clip length in seconds, got nan"),
    (["data.kind=latents"], "data.path: 'latents' data needs the folder of a latent cache"),
    (["optim.betas=[0.9]"], "optim.betas: expected two values in [0, 1), got [0.9]"),
    (["optim.schedule=linear"], "optim.schedule: expected one of ['constant', 'cosine'], got 'linear'"),
    (["experts.a.lora.r=0"], "experts.a.lora.r: expected a positive rank, got 0"),
    (["experts.a.lora.dropout=1.5"], "experts.a.lora.dropout: expected a value in [0, 1), got 1.5"),
    (["experts.a.lora.targets=[nomatch]"], "experts.a.lora.targets: 'nomatch' matches no Linear/Conv module"),
    (["experts.a.preset=huge"], "experts.a.preset: expert 'wan2.1' has no preset 'huge'"),
    (["experts.a.flow_shift=0"], "experts.a.flow_shift: expected a positive shift, got 0.0"),
    (["stitch.connector.hidden=0"], "stitch.connector.hidden: expected a positive integer or null"),
    (["stitch.pairs=[]"], "stitch.pairs: depth map: the explicit pair list is empty"),
    (["stitch.pairs=[[0,0],[0,0]]"], "stitch.pairs: depth map pair #1 [0, 0]: pairs must be strictly increasing"),
    (["stitch.pairs=[[0]]"], "stitch.pairs: depth map pair #0: expected [i, j] with two integers, got [0]"),
    (["flow.balance_momentum=2"], "flow.balance_momentum: expected a value in (0, 1), got 2.0"),
    (["flow.tasks={teleport: 1.0}"], "flow.tasks.teleport: unknown task"),
    (["flow.tasks={joint: 0.0}"], "flow.tasks: the weights sum to 0"),
]


@pytest.mark.parametrize("overrides, message", MORE_RECIPE_CASES, ids=[" ".join(o) for o, _ in MORE_RECIPE_CASES])
def test_more_bad_recipe_values(tmp_path, capsys, overrides, message):
    fails_cleanly(stitch(tmp_path / "run", *overrides), capsys, tmp_path, message)


@pytest.mark.parametrize("case", ["a-folder", "empty", "bad-yaml", "binary", "duplicate-key"])
def test_recipe_files_that_are_not_recipes(tmp_path, capsys, case):
    recipe = tmp_path / "recipe.yaml"
    if case == "a-folder":
        recipe.mkdir()
    else:
        recipe.write_bytes({"empty": b"", "bad-yaml": b"a: [1, 2\n", "binary": b"\x00\xff\xfe\x00garbage",
                            "duplicate-key": b"seed: 5\nseed: 6\n"}[case])
    message = {"a-folder": "recipe: file not found", "empty": "experts.a.name: Missing mandatory value",
               "bad-yaml": "is not valid YAML", "binary": "is not valid YAML", "duplicate-key": "is not valid YAML"}[case]
    for command in ("inspect", "stitch"):
        fails_cleanly([command, str(recipe), f"run_dir={tmp_path / 'run'}"], capsys, tmp_path, message)


def test_recipe_with_a_utf8_byte_order_mark_is_read(tmp_path, capsys):
    """Editors on Windows save one; it is not an error."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"\xef\xbb\xbf" + Path(DEMO).read_bytes())
    assert main(["inspect", str(recipe)]) == 0


def test_allow_changes_on_a_new_run(tmp_path, capsys):
    fails_cleanly([*stitch(tmp_path / "run"), "--allow-changes", "optim.lr"], capsys, tmp_path,
                  "--allow-changes optim.lr: only a resume (resume=true) compares the recipe with the run's recipe.yaml")


GENERATE_CASES = {
    "ckpt-is-a-file": (lambda t: [f"ckpt={_file(t)}"], "sample.ckpt: '{t}/a_file.txt' is a file, expected a run folder"),
    "ckpt-missing": (lambda t: [f"ckpt={t / 'none'}"], "sample.ckpt: not found: '{t}/none'"),
    "ckpt-empty-folder": (lambda t: [f"ckpt={(t / 'empty').mkdir() or t / 'empty'}"], "sample.ckpt: '{t}/empty' has no lora_a/ adapter folder"),
    "seconds=0": (lambda t: ["seconds=0"], "sample.seconds: expected a positive duration in seconds, got 0.0"),
    "steps=-3": (lambda t: ["steps=-3"], "sample.steps: expected a positive integer, got -3"),
    "num_samples=0": (lambda t: ["num_samples=0"], "sample.num_samples: expected a positive integer, got 0"),
    "scheduler=bogus": (lambda t: ["scheduler=bogus"], "sample.scheduler: expected one of ['unipc', 'euler'], got 'bogus'"),
    "image-missing": (lambda t: [f"image={t / 'none.png'}"], "sample.image: not found: '{t}/none.png'"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_more_bad_generate_arguments(tmp_path, capsys, case):
    extra, message = GENERATE_CASES[case]
    fails_cleanly(["generate", DEMO, *BASE, *extra(tmp_path), f"out={tmp_path / 'out'}"], capsys, tmp_path,
                  message.format(t=tmp_path))


OTHER_COMMAND_CASES = [
    (["experts", "check", "nope"], "unknown expert 'nope'; known experts:"),
    (["export"], "soe export: the following arguments are required: run_dir, --format"),
    (["encode", DEMO, "{t}/none", "--out", "{t}/enc"], "soe encode: source folder not found: '{t}/none'"),
    (["encode", DEMO, "{t}", "--out", "{t}/enc", "--shard", "3/2"], "soe encode: --shard expects I/N with 0 <= I < N"),
    (["encode", DEMO, "{t}", "--out", "{t}/enc", "--shard", "x"], "soe encode: --shard expects I/N with 0 <= I < N"),
    (["convert", "bogus", "{t}", "{t}/d"], "soe convert: argument model: invalid choice: 'bogus'"),
]


@pytest.mark.parametrize("argv, message", OTHER_COMMAND_CASES, ids=[" ".join(a[:2] + a[-1:]) for a, _ in OTHER_COMMAND_CASES])
def test_more_bad_command_lines(tmp_path, capsys, argv, message):
    fails_cleanly([a.format(t=tmp_path) for a in argv], capsys, tmp_path, message.format(t=tmp_path))


# ---- issue 15, second round: the Python API ------------------------------------------------------------
def _meta(batch):
    return {k: v.to("meta") if k == "latents" else v for k, v in batch.items()}


MORE_BATCH_CASES = {
    "not-a-dict": (lambda a, b: torch.zeros(2), None, "batch_a: expected a dict of tensors (latents, timestep, conditioning), got Tensor"),
    "no-sample": (lambda a, b: {**a, "latents": a["latents"][:0], "timestep": a["timestep"][:0]}, None,
                  "batch_a['latents']: shape [0, 4, 7, 8, 8] holds no sample"),
    "integer-timesteps": (lambda a, b: {**a, "timestep": torch.tensor([500, 900])}, None,
                          "batch_a['timestep']: dtype torch.int64; expected floating-point flow times in [0, 1]"),
    "other-device": (lambda a, b: _meta(a), None, "batch_a['latents']: on meta, but expert 'wan2.1' is on cpu"),
    "video-channels": (lambda a, b: {**a, "latents": a["latents"][:, :3]}, None,
                       "batch_a['latents']: shape [2, 3, 7, 8, 8], expert 'wan2.1' expects (batch, channels=4, frames, height, width)"),
    "video-without-time-axis": (lambda a, b: {**a, "latents": a["latents"][:, :, 0]}, None,
                                "batch_a['latents']: shape [2, 4, 8, 8], expert 'wan2.1' expects (batch, channels=4, frames, height, width)"),
    "video-text-width": (lambda a, b: {**a, "encoder_hidden_states": a["encoder_hidden_states"][..., :5]}, None,
                         "batch_a['encoder_hidden_states']: shape [2, 8, 5], expert 'wan2.1' expects (batch, tokens, width=32)"),
    "audio-channels": (None, lambda a, b: {**b, "latents": b["latents"][..., :3]},
                       "batch_b['latents']: shape [2, 25, 3], expert 'ace-step-1.5' expects (batch, frames, channels=4)"),
    "audio-extra-axis": (None, lambda a, b: {**b, "latents": b["latents"][:, None]},
                         "batch_b['latents']: shape [2, 1, 25, 4], expert 'ace-step-1.5' expects (batch, frames, channels=4)"),
    "audio-context-frames": (None, lambda a, b: {**b, "context_latents": b["context_latents"][:, :5]},
                             "batch_b['context_latents']: shape [2, 5, 8], expert 'ace-step-1.5' expects (batch, frames=25, channels=8)"),
    "audio-context-channels": (None, lambda a, b: {**b, "context_latents": b["context_latents"][..., :3]},
                               "batch_b['context_latents']: shape [2, 25, 3], expert 'ace-step-1.5' expects (batch, frames=25, channels=8)"),
    "audio-text-width": (None, lambda a, b: {**b, "encoder_hidden_states": b["encoder_hidden_states"][..., :3]},
                         "batch_b['encoder_hidden_states']: shape [2, 8, 3], expert 'ace-step-1.5' expects (batch, tokens, width=32)"),
}


@pytest.mark.parametrize("case", list(MORE_BATCH_CASES))
def test_more_bad_batches_for_a_stitched_forward(demo_stitcher, case):
    """Each used to end in a raw torch error deep in a layer (or, for the device, in a kernel)."""
    from soe.stitch.batch_check import BatchError

    a, b = _batches(demo_stitcher)
    change_a, change_b, message = MORE_BATCH_CASES[case]
    a, b = (change_a(a, b) if change_a else a), (change_b(a, b) if change_b else b)
    with pytest.raises(BatchError) as info, torch.no_grad():
        demo_stitcher(a, b)
    assert str(info.value) == message or (message in str(info.value) and len(str(info.value).splitlines()) == 1), info.value


def test_ace_step_15_frames_need_not_be_a_multiple_of_its_patch(demo_stitcher):
    """ACE-Step 1.5 pads the last patch and crops it off (as diffusers' own forward does), so an odd number
    of frames (1 s = 25) is valid input, not an error: the prediction has the input's shape and, for the
    expert alone, equals the model's own forward."""
    a, b = _batches(demo_stitcher)
    b = {**b, "latents": b["latents"][:, :5], "context_latents": b["context_latents"][:, :5]}
    with torch.no_grad():
        _, pred_b = demo_stitcher(a, b)
        native = demo_stitcher.b(b)
    assert pred_b.shape == b["latents"].shape == native.shape == (2, 5, 4)
    torch.testing.assert_close(pred_b, native)  # zero-initialised connectors: stitched = the expert alone


@pytest.mark.parametrize("case", ["same-expert-twice", "plain-module", "none"])
def test_stitcher_refuses_what_is_not_two_experts_with_one_soe_error(demo_stitcher, case):
    from soe import Stitcher
    from soe.errors import SoeError

    a = demo_stitcher.a
    args, expected = {
        "same-expert-twice": ((a, a), "Stitcher: experts a and b are the same model ('wan2.1')"),
        "plain-module": ((torch.nn.Linear(2, 2), a), "Stitcher: expert a is a Linear; expected a soe.Expert"),
        "none": ((a, None), "Stitcher: expert b is a NoneType; expected a soe.Expert"),
    }[case]
    before = {n: p.clone() for n, p in a.model.state_dict().items()}
    with pytest.raises(SoeError) as info:
        Stitcher(*args)
    assert str(info.value).startswith(expected) and len(str(info.value).splitlines()) == 1
    assert all(torch.equal(before[n], p) for n, p in a.model.state_dict().items())  # nothing was hooked or changed


# ---- issue 33: the newer commands (export, generate with given media, encode, convert), recipes, resume ------
# Same contract: exit 2, one line naming the key or file, no traceback, the file tree (files and folders) before ==
# after. Count (issue 33): 56 more bad inputs in 56 cases (EXPORT 8, CONVERT 9 + 1 with --force, ENCODE 6, GENERATE 7,
# OUTPUT_PLACE 8, RECIPE 14 each through inspect and stitch, the plots extra x2, a moved run), plus one control case
# of 3 good inputs; this file now collects 221 cases. On the code before issue 33, 53 of these 57 cases failed
# (measured by running this file against that code): tracebacks (export/convert/encode/generate output places,
# devices, convert's --every 0, JSONDecodeError, KeyError, UnicodeDecodeError, DecompressionBombError), silent
# acceptance (data.path with synthetic data, tasks a one-way stitch cannot serve, seed -1, seconds under one latent
# frame, inf guidance/shift/extend, an expert option that is a model key, an --allow-changes typo, a resume without
# recipe.yaml, a run into a folder holding trained/), files or folders left behind (RUN/export/, an encode cache
# folder), results overwritten (convert into an earlier conversion or trained/, encode into a run, a moved run
# training the same steps twice) and unclear messages (expert-key typos named the section, not the key, with no
# suggestion; --every/--audio-blocks without the option's name).
import errno  # noqa: E402
import tempfile  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402


class _Tmp(type(Path())):
    """tmp_path that also carries a case's helpers (``t.ro``, ``t.clips``, ...) for the tables' lambdas."""


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)`` makes ``folder`` refuse new files: mode 0o555 for a normal user and, since root ignores
    modes, the file system's EROFS for every file soe's output check creates under it (as a read-only mount does)."""
    folders, real = [], tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        where = Path(dir or ".").resolve()
        if any(where == f or f in where.parents for f in folders):
            raise OSError(errno.EROFS, "Read-only file system", str(where))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder.resolve())
        folder.chmod(0o555)
        return folder

    yield make
    for f in folders:
        f.chmod(0o755)


@pytest.fixture
def run_folder(trained_folder, tmp_path):
    """A run folder as `soe stitch` leaves it (recipe.yaml + trained/), without training."""
    cfg, good = trained_folder
    run = tmp_path / "run"
    shutil.copytree(good, run / "trained")
    OmegaConf.save(cfg, run / "recipe.yaml")
    return run


def _recipe_change(run: Path, key: str, value) -> None:
    cfg = OmegaConf.load(run / "recipe.yaml")
    OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.save(cfg, run / "recipe.yaml")


def _then(*effects) -> list:
    """No extra arguments: the case is made by ``effects`` (evaluated as the call's arguments)."""
    return []


EXPORT_CASES = {  # (prepare(run, tmp) -> extra argv, message)
    "out-under-a-file": (lambda r, t: ["--out", f"{_file(t)}/sub"], "--out: '{t}/a_file.txt' is a file"),
    "out-inside-trained": (lambda r, t: ["--out", f"{r}/trained/x"], "--out: '{r}/trained/x' is inside '{r}/trained'"),
    "out-read-only": (lambda r, t: ["--out", f"{t.ro(t / 'ro')}/x"], "--out: cannot write to '{t}/ro' (read-only file system)"),
    "run-read-only": (lambda r, t: _then(t.ro(r)), "--out: cannot write to '{r}' (read-only file system)"),
    "no-lora-trained": (lambda r, t: _then(_recipe_change(r, "experts.a.train", "frozen"), _recipe_change(r, "experts.b.train", "frozen")),
                        "no expert of this run trained a LoRA"),
    "truncated-adapter": (lambda r, t: _then(CORRUPTIONS["truncated"](r / "trained" / "lora_a" / "adapter_model.safetensors")),
                          "lora_a"),
    "moved-expert-path": (lambda r, t: ["--format", "merged", *_then(_recipe_change(r, "experts.a.path", str(t / "moved")))],
                          "experts.a.path"),
    "not-a-run-folder": (lambda r, t: _then(shutil.rmtree(r / "trained")), "is not a run folder of `soe stitch`"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_that_cannot_work_leaves_nothing(run_folder, read_only, tmp_path, capsys, case):
    """Each was a traceback (FileExistsError, OSError) or left an empty RUN/export/ behind."""
    prepare, message = EXPORT_CASES[case]
    tmp_path = _Tmp(tmp_path)
    tmp_path.ro = read_only
    extra = prepare(run_folder, tmp_path)
    fmt = [] if "--format" in extra else ["--format", "diffusers"]
    fails_cleanly(["export", str(run_folder), *fmt, *extra], capsys, tmp_path, message.format(t=tmp_path, r=run_folder))


def _release(folder: Path, config: str | None = '{"num_layers": 1}', keys=("blocks.0.mel_attn.to_q.weight", "blocks.0.attn1.to_q.weight")):
    """A (partial) UniVerse-1 release: a few fused-block tensors, optionally a config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(2, 2) for k in keys}, folder / "diffusion_pytorch_model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(config)
    return folder


def _earlier_conversion(dst: Path) -> list:
    dst.mkdir()
    (dst / "universe1.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, dst / "connectors.safetensors")
    return []


CONVERT_CASES = {  # (prepare(src, dst, tmp) -> (src, dst, extra argv), message)
    "every-0": (lambda s, d, t: (s, d, ["--every", "0"]), "convert --every: expected a positive integer"),
    "every-negative": (lambda s, d, t: (s, d, ["--every", "-2"]), "convert --every: expected a positive integer"),
    "audio-blocks-0": (lambda s, d, t: (s, d, ["--audio-blocks", "0"]), "convert --audio-blocks: expected a positive integer"),
    "config-not-json": (lambda s, d, t: (_release(s, config="{not json"), d, []), "convert: '{t}/src/config.json' is not valid JSON"),
    "only-some-fused-keys": (lambda s, d, t: (s, d, []), "lacks tensor 'speaker_embedder.weight'"),
    "dst-is-a-file": (lambda s, d, t: (s, _file(t, "dst"), []), "convert DST: '{t}/dst' is a file"),
    "dst-inside-src": (lambda s, d, t: (s, s / "out", []), "convert DST: '{t}/src/out' is inside '{t}/src'"),
    "dst-holds-a-conversion": (lambda s, d, t: (s, d, _earlier_conversion(d)), "already holds earlier results (connectors.safetensors, universe1.json)"),
    "dst-is-a-runs-trained": (lambda s, d, t: (s, t.trained, []), "already holds earlier results (connectors.safetensors, lora_a, lora_b"),
}


@pytest.mark.parametrize("case", list(CONVERT_CASES))
def test_convert_universe1_bad_arguments(trained_folder, tmp_path, capsys, case):
    """Each was a traceback (ZeroDivisionError, JSONDecodeError, KeyError, FileExistsError) or overwrote results."""
    tmp_path = _Tmp(tmp_path)
    tmp_path.trained = shutil.copytree(trained_folder[1], tmp_path / "run" / "trained")
    src, dst, extra = CONVERT_CASES[case][0](_release(tmp_path / "src"), tmp_path / "dst", tmp_path)
    fails_cleanly(["convert", "universe1", str(src), str(dst), *extra], capsys, tmp_path, CONVERT_CASES[case][1].format(t=tmp_path))


def test_convert_force_replaces_an_earlier_conversion_and_refuses_nothing_else(tmp_path, capsys):
    """The control of the case above: with --force an earlier conversion is replaced (here the partial release
    then fails, and the earlier files stay as they were: a failed conversion removes only what it made)."""
    dst = tmp_path / "dst"
    _earlier_conversion(dst)
    fails_cleanly(["convert", "universe1", str(_release(tmp_path / "src")), str(dst), "--force"], capsys, tmp_path,
                  "lacks tensor 'speaker_embedder.weight'")


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory):
    from test_encode import make_clip

    src = tmp_path_factory.mktemp("one_clip")
    make_clip(src / "a.mp4", seconds=1.2)
    (src / "a.txt").write_text("a white square")
    return src


def _clips_with(src: Path, t: Path, name: str, data: bytes) -> Path:
    clips = shutil.copytree(src, t / "clips")
    (clips / name).write_bytes(data)
    return clips


ENCODE_CASES = {  # (prepare(src, tmp) -> (src, out, overrides), message)
    "device-tpu": (lambda s, t: (s, t / "enc", ["encode.device=tpu"]), "encode.device: expected cpu, cuda, cuda:N or mps, got 'tpu'"),
    "device-cuda-3": (lambda s, t: (s, t / "enc", ["encode.device=cuda:3"]), "encode.device: 'cuda:3', but this machine has"),
    "annotator-missing": (lambda s, t: (_clips_with(s, t, "b.mp4", s.joinpath("a.mp4").read_bytes()), t / "enc",
                                        [f"encode.annotator={t / 'no_model'}"]), "{t}/no_model"),
    "captions-jsonl-latin1": (lambda s, t: (_clips_with(s, t, "captions.jsonl", '{"path": "a.mp4", "caption": "été"}\n'.encode("latin-1")),
                                            t / "enc", []), "{t}/clips/captions.jsonl: not UTF-8 text"),
    "sidecar-latin1": (lambda s, t: (_clips_with(s, t, "a.txt", "été".encode("latin-1")), t / "enc", []), "{t}/clips/a.txt: not UTF-8 text"),
    "out-in-a-run-folder": (lambda s, t: (s, t.run, []), "soe encode --out: '{t}/run' is a run folder of `soe stitch` (holds trained)"),
}


@pytest.mark.parametrize("case", list(ENCODE_CASES))
def test_encode_bad_settings_and_places(one_clip, run_folder, tmp_path, capsys, case):
    """Each was a traceback (torch RuntimeError, UnicodeDecodeError), left its output folder, or wrote into a run."""
    tmp_path = _Tmp(tmp_path)
    tmp_path.run = run_folder
    src, out, overrides = ENCODE_CASES[case][0](one_clip, tmp_path)
    fails_cleanly(["encode", DEMO, str(src), "--out", str(out), *overrides], capsys, tmp_path, ENCODE_CASES[case][1].format(t=tmp_path))


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb), with no pixel data to speak of."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))
    return path


GENERATE_33_CASES = {  # (overrides(tmp), message)
    "device-cuda": (lambda t: ["sample.device=cuda"], "sample.device: 'cuda', but this machine has no CUDA GPU"),
    "device-tpu": (lambda t: ["sample.device=tpu"], "sample.device: expected cpu, cuda, cuda:N or mps, got 'tpu'"),
    "seed-negative": (lambda t: ["seed=-1"], "sample.seed: expected an integer in [0, 2**32 - 1], got -1"),
    "seconds-under-one-latent-frame": (lambda t: ["seconds=0.001"], "sample.seconds: 0.001 s is shorter than one latent frame"),
    "guidance-inf": (lambda t: ["sample.guidance.a=inf"], "sample.guidance.a: expected a positive finite number, got inf"),
    "image-decompression-bomb": (lambda t: [f"image={_png_claiming(t / 'bomb.png', 30000, 30000)}"],
                                 "sample.image: '{t}/bomb.png' is not a usable image"),
    "out-read-only": (lambda t: [f"out={t.ro(t / 'ro')}/samples"], "sample.out: cannot write to '{t}/ro' (read-only file system)"),
}


@pytest.mark.parametrize("case", list(GENERATE_33_CASES))
def test_generate_bad_values_and_given_media(read_only, tmp_path, capsys, case):
    tmp_path = _Tmp(tmp_path)
    tmp_path.ro = read_only
    overrides, message = GENERATE_33_CASES[case]
    extra = overrides(tmp_path)
    out = [] if any(o.startswith("out=") for o in extra) else [f"out={tmp_path / 'out'}"]
    fails_cleanly(["generate", DEMO, *BASE, *extra, *out], capsys, tmp_path, message.format(t=tmp_path))


OUTPUT_PLACE_CASES = {  # argv(tmp) for commands whose output folder cannot be written, message
    "stitch-run-dir-read-only": (lambda t: stitch(t.ro(t / "ro") / "run"), "run_dir: cannot write to '{t}/ro' (read-only file system)"),
    "encode-out-read-only": (lambda t: ["encode", DEMO, str(t.clips), "--out", str(t.ro(t / "ro") / "c")],
                             "soe encode --out: cannot write to '{t}/ro'"),
    "encode-out-inside-src": (lambda t: ["encode", DEMO, str(t.clips), "--out", str(t.clips / "cache")],
                              "soe encode --out: '{t}/clips/cache' is inside '{t}/clips'"),
    "convert-dst-read-only": (lambda t: ["convert", "universe1", str(_release(t / "src")), str(t.ro(t / "ro") / "d")],
                              "convert DST: cannot write to '{t}/ro'"),
    "stitch-into-a-folder-with-trained": (lambda t: stitch((t / "old" / "trained").mkdir(parents=True) or t / "old"),
                                          "run_dir: '{t}/old' already holds trained/ of an earlier run"),
    "resume-without-recipe-yaml": (lambda t: stitch(t.resumable(recipe=False), "resume=true", "optim.lr=0.5"),
                                   "resume: '{t}/r/recipe.yaml' is missing"),
    "allow-changes-unknown-key": (lambda t: [*stitch(t.resumable(), "resume=true"), "--allow-changes", "optim.lrr"],
                                  "--allow-changes optim.lrr: not a key of the recipe (did you mean 'optim.lr'?)"),
    "stitch-run-dir-under-a-file": (lambda t: stitch(_file(t) / "run"), "run_dir: '{t}/a_file.txt' is a file"),
}


@pytest.mark.parametrize("case", list(OUTPUT_PLACE_CASES))
def test_output_places_and_resume_guards(one_clip, read_only, tmp_path, capsys, case):
    tmp_path = _Tmp(tmp_path)
    tmp_path.ro, tmp_path.clips = read_only, shutil.copytree(one_clip, tmp_path / "clips")

    def resumable(recipe=True):  # what a resume checks before it reads the checkpoint: a last.ckpt and the recipe
        run = tmp_path / "r"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"not read: refused before")
        if recipe:
            OmegaConf.save(load_recipe(DEMO, BASE), run / "recipe.yaml")
        return run
    tmp_path.resumable = resumable
    argv, message = OUTPUT_PLACE_CASES[case]
    fails_cleanly(argv(tmp_path), capsys, tmp_path, message.format(t=tmp_path))


RECIPE_33_CASES = [
    (["experts.b.architecture.num_layer=2"], "experts.b.architecture.num_layer: not a model-config key of expert 'ace-step-1.5' "
                                             "(did you mean 'num_hidden_layers'?)"),
    (["experts.a.architecture.num_layer=2"], "experts.a.architecture.num_layer: not a model-config key of expert 'wan2.1' "
                                             "(did you mean 'num_layers'?)"),
    (["experts.a.options.fsp=25"], "experts.a.options.fsp: not an option of expert 'wan2.1' (did you mean 'fps'?)"),
    (["experts.b.options.sample_rte=48000"], "experts.b.options.sample_rte: not an option of expert 'ace-step-1.5' "
                                             "(did you mean 'sample_rate'?)"),
    (["experts.a.options.num_layers=2"], "experts.a.options.num_layers: not an option of expert 'wan2.1'"),
    ([*ACE_V1, "experts.b.options.speaker_tokn=false"], "experts.b.options.speaker_tokn: not an option of expert 'ace-step' "
                                                        "(did you mean 'speaker_token'?)"),
    (["stitch.conector.hidden=8"], "stitch.conector: Key 'conector' not in"),
    (["data.path=/somewhere"], "data.path: '/somewhere' has no effect with data.kind 'synthetic'"),
    (["stitch.direction=a_to_b", "flow.tasks={a2v: 1.0}"], "flow.tasks.a2v: the audio is given and the video generated, but "
                                                           "stitch.direction 'a_to_b' only carries video to audio"),
    (["stitch.direction=b_to_a", "flow.tasks={joint: 1.0, v2a: 1.0}"], "flow.tasks.v2a: the video is given and the audio generated"),
    (["data.seconds=0.01"], "data.seconds: 0.01 s is shorter than one latent frame of expert a ('wan2.1')"),
    (["sample.shift.a=inf"], "sample.shift.a: expected a positive finite number, got inf"),
    (["sample.seed=4294967296"], "sample.seed: expected an integer in [0, 2**32 - 1]"),
    (["sample.extend_seconds=inf"], "sample.extend_seconds: expected a positive number of seconds, got inf"),
]


@pytest.mark.parametrize("overrides, message", RECIPE_33_CASES, ids=[" ".join(o) for o, _ in RECIPE_33_CASES])
def test_recipe_keys_refused_at_every_depth(tmp_path, capsys, overrides, message):
    """Typos in free-form sections (checked against the expert's constructor and model config, with the closest
    key), keys with no effect in the chosen mode and numbers out of their domain: refused by inspect and stitch."""
    for command in ("inspect", "stitch"):
        argv = [command, DEMO, *overrides] if command == "inspect" else stitch(tmp_path / "run", *overrides)
        fails_cleanly(argv, capsys, tmp_path, message)


def test_tasks_with_weight_zero_and_two_way_stitches_are_not_refused(tmp_path, capsys):
    """The controls: a task a one-way stitch cannot serve is fine at weight 0 (never drawn) or with direction both."""
    assert main(["inspect", DEMO, "stitch.direction=a_to_b", "flow.tasks={joint: 1.0, a2v: 0.0}"]) == 0
    assert main(["inspect", DEMO, "stitch.direction=both", "flow.tasks={a2v: 1.0}"]) == 0
    assert main(["inspect", DEMO, "stitch.direction=a_to_b", "flow.tasks={v2a: 1.0}"]) == 0


@pytest.mark.parametrize("command", ["generate", "stitch"])
def test_a_missing_plots_extra_fails_before_anything_is_written(tmp_path, capsys, monkeypatch, command):
    """Without matplotlib, generate used to write sample_00.mp4 and then fail on the contact sheet, and stitch to
    train to the end and then fail on its end-of-run samples."""
    import soe.extras

    real = soe.extras.find_spec
    monkeypatch.setattr(soe.extras, "find_spec", lambda m: None if m == "matplotlib" else real(m))
    argv = (["generate", DEMO, *BASE, f"out={tmp_path / 'out'}"] if command == "generate"
            else stitch(tmp_path / "run", "sample.at_end=true"))
    fails_cleanly(argv, capsys, tmp_path, "contact sheets (PNG) of the samples: not available without matplotlib")


@pytest.mark.slow
def test_a_moved_run_folder_resumes_into_its_own_last_checkpoint(one_step_run, tmp_path, capsys):
    """Lightning's checkpoint callback keeps the run's old absolute path: a moved run wrote last-v1.ckpt and left
    last.ckpt at the old step, so the next resume trained the same steps again. Resume follows the folder."""
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(one_step_run, moved)  # as `mv` leaves it: the same files at another path
    assert main(stitch(moved, "resume=true", "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1")) == 0
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert not [n for n in names if n.startswith("last-v")], names
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


# ---- issue 33, third round: eval, annotate, inspect, trainer devices, trained runs under another recipe ----------
@pytest.fixture(scope="module")
def eval_clips(tmp_path_factory):
    from test_eval import make_clip

    clips = tmp_path_factory.mktemp("eval_clips")
    make_clip(clips, "sync")
    return clips


def _no_gpu(monkeypatch):
    """The device checks decide as on a machine without a GPU (also where the suite runs on one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


THIRD_ROUND_CASES = {
    # soe eval: its results file is checked like every other output place; --device against this machine
    "eval-out-under-a-file": (["eval", "{c}", "--out", "{t}/f.txt/eval.json"], "--out: '{t}/f.txt' is a file, expected a folder"),
    "eval-out-a-folder": (["eval", "{c}", "--out", "{t}/sub", "--force"], "--out {t}/sub: expected a .json results file, got a folder"),
    "eval-out-one-of-its-clips": (["eval", "{c}", "--out", "{c}/sync.mp4", "--force"], "--out {c}/sync.mp4: expected a .json results file"),
    "eval-out-read-only": (["eval", "{c}", "--out", "{t}/ro/eval.json"], "--out: cannot write to '{t}/ro' (read-only file system)"),
    "eval-device-gpu": (["eval", "{c}", "--device", "cuda"], "--device: 'cuda', but this machine has no CUDA GPU (use cpu)"),
    "eval-device-tpu": (["eval", "{c}", "--device", "tpu"], "--device: expected cpu, cuda, cuda:N or mps, got 'tpu'"),
    # soe annotate: --device through the same check as sample.device / encode.device
    "annotate-device-gpu": (["annotate", DEMO, "{c}", "--out", "{t}/a.jsonl", "--device", "cuda:1"],
                            "annotate.device: 'cuda:1', but this machine has no CUDA GPU (use cpu)"),
    "annotate-device-tpu": (["annotate", DEMO, "{c}", "--out", "{t}/a.jsonl", "--device", "tpu"],
                            "annotate.device: expected cpu, cuda, cuda:N or mps, got 'tpu'"),
    # soe experts check --partner: a typo was reported as a failed contract property (exit 1), not as bad input
    "partner-typo": (["experts", "check", "wan2.1", "--partner", "ace-stp"], "--partner: unknown expert 'ace-stp'; known experts:"),
    # soe inspect --heatmap: checked before the experts run; without pairs: auto it would be ignored
    "heatmap-under-a-file": (["inspect", DEMO, "stitch.pairs=auto", "--heatmap", "{t}/f.txt/x.png"],
                             "--heatmap: '{t}/f.txt' is a file, expected a folder"),
    "heatmap-not-png": (["inspect", DEMO, "stitch.pairs=auto", "--heatmap", "{t}/x.jpg"], "--heatmap {t}/x.jpg: expected a .png file"),
    "heatmap-without-auto-pairs": (["inspect", DEMO, "--heatmap", "{t}/x.png"],
                                   "--heatmap: only stitch.pairs: auto measures the block similarity it draws"),
    # trainer.accelerator against this machine (Lightning's own errors named no key; tpu was a traceback)
    "accelerator-tpu": (stitch("{t}/run", "trainer.accelerator=tpu"), "trainer.accelerator: expected one of auto, cpu, gpu, cuda, mps, got 'tpu'"),
    "accelerator-gpu": (stitch("{t}/run", "trainer.accelerator=gpu"), "trainer.accelerator: 'gpu', but this machine has no CUDA GPU (use cpu)"),
    "accelerator-typo": (stitch("{t}/run", "trainer.accelerator=cpuu"), "trainer.accelerator: expected one of auto, cpu, gpu, cuda, mps, got 'cpuu'"),
    # every rank's batch is checked before the run folder is written (it was checked per rank after the launch, so
    # the folder with recipe.yaml, logs/ and the lock stayed behind while the spawned ranks failed one by one)
    "devices-without-a-full-batch": (stitch("{t}/run", "trainer.devices=5"), "data.batch_size: no bucket holds batch_size x devices = 10 clips"),
}


@pytest.mark.parametrize("case", list(THIRD_ROUND_CASES))
def test_third_round_of_bad_inputs(eval_clips, read_only, tmp_path, capsys, monkeypatch, case):
    _no_gpu(monkeypatch)
    (tmp_path / "f.txt").write_text("a file")
    (tmp_path / "sub").mkdir()
    read_only(tmp_path / "ro")
    argv, message = THIRD_ROUND_CASES[case]
    fill = {"t": tmp_path, "c": eval_clips}
    before = snapshot(eval_clips)
    fails_cleanly([a.format(**fill) for a in argv], capsys, tmp_path, message.format(**fill))
    assert snapshot(eval_clips) == before


@pytest.fixture(scope="module")
def fully_trained_b(tmp_path_factory):
    """trained/ of a run with experts.b.train=full (expert_b/ holds the whole trained expert)."""
    cfg = load_recipe(DEMO, ["experts.b.train=full"])
    st = build_stitcher(cfg)
    apply_training_setup(st, cfg)
    name = first_matrix(st.b.model.state_dict())
    with torch.no_grad():  # as if trained: not the base expert's weights
        st.b.model.state_dict()[name].add_(1.0)
    folder = tmp_path_factory.mktemp("full_b") / "trained"
    export_trained(st, folder, {"a": "lora", "b": "full"})
    return folder, name, st.b.model.state_dict()[name].clone()


def test_a_fully_trained_run_under_a_lora_recipe_is_refused(fully_trained_b, tmp_path, capsys):
    """Its expert_b/ loaded silently over the LoRA recipe's expert: the recipe described a model the run never trained."""
    fully_trained_b = fully_trained_b[0]
    fails_cleanly(["generate", DEMO, *BASE, f"ckpt={fully_trained_b}", f"out={tmp_path / 'out'}"], capsys, tmp_path,
                  f"sample.ckpt: '{fully_trained_b}' holds a fully trained expert_b/ (its run had experts.b.train=full), but "
                  f"experts.b.train is 'lora'; sample it with experts.b.train=full")


def test_a_fully_trained_run_loads_under_its_own_train_mode(fully_trained_b):
    from soe.sample.generate import load_run

    folder, name, trained = fully_trained_b
    cfg = load_recipe(DEMO, [*BASE, f"sample.ckpt={folder}", "experts.b.train=full"])
    stitcher, _, loaded_from = load_run(cfg)
    assert torch.equal(stitcher.b.model.state_dict()[name], trained)  # the run's expert, not the recipe's base expert
    assert loaded_from == folder


def test_options_may_follow_the_overrides(tmp_path, capsys):
    """`soe inspect R k=v --no-cache` was 'unrecognized arguments' (argparse stops a nargs='*' list at an option)."""
    assert main(["inspect", DEMO, "stitch.connector.hidden=48", "--no-cache", "trainer.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "32 -> 48 -> 32" in out
    fails_cleanly(["inspect", DEMO, "trainer.max_steps=3", "--bogus"], capsys, tmp_path,
                  "soe inspect: unrecognized arguments: --bogus")
