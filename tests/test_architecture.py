"""The package shows its architecture and installs as a wheel: subpackages by concern with docstrings,
the import-linter layer contracts hold (and catch a violation), the public API is unchanged, the docs site
builds strictly, and a wheel installed outside the checkout runs the demo."""
import ast
import dataclasses
import inspect
import os
import shutil
import subprocess
import sys
import typing
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import soe
import soe.errors
import soe.schema
from soe.schema import Recipe

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUBPACKAGES = ["cli", "data", "evaluate", "flow", "interop", "lora", "plugin", "recipe", "sample", "schema", "stitch",
               "testing", "train"]


# ---- the tree --------------------------------------------------------------------------------------
def test_subpackages_by_concern_each_says_what_it_owns_and_may_import():
    found = sorted(p.name for p in (ROOT / "soe").iterdir() if (p / "__init__.py").is_file())
    assert found == SUBPACKAGES
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / "soe" / name / "__init__.py").read_text()))
        assert doc and len(doc) > 200, f"soe/{name}/__init__.py: a paragraph on what it owns"
        assert "import" in doc.lower(), f"soe/{name}/__init__.py: say what it may import"
    loose = sorted(p.name for p in (ROOT / "soe").glob("*.py"))
    assert len(loose) <= 12, loose


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_import_contracts_hold():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("soe is layered", "the built-in expert plugins use only the plugin contract",
                 "no import cycle between the modules of a package"):
        assert f"{name}" in proc.stdout
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, message", [
    # a lower layer reaching up, inside a function (the imports that made the old cycles)
    ("soe/stitch/align.py", "def _upward():\n    from soe.cli.commands import main\n", "soe.stitch is not allowed to import soe.cli"),
    # two modules of one package importing each other
    ("soe/data/stream_format.py", "def _cycle():\n    from soe.data.stream_writer import PartWriter\n", "soe.data"),
    # a built-in plugin using more than the plugin contract
    ("experts/wan.py", "def _reach():\n    from soe.train.build import build_trainer\n", "experts.wan -> soe.train.build"),
])
def test_import_contracts_catch_a_violation(tmp_path, module, line, message):
    for part in ("soe", "experts", "recipes"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write("\n\n" + line)
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout, proc.stdout + proc.stderr
    assert message in proc.stdout, proc.stdout


# ---- the public API --------------------------------------------------------------------------------
PUBLIC = ["BlockListExpert", "BlockState", "Connector", "ConnectorConfig", "DiffusersExpert", "Expert", "Stitcher",
          "TokenLayout", "get_expert", "linear_pairs", "list_experts", "load_stitched", "register_expert",
          "resolve_depth_map", "stitch_into"]
ERRORS = ["CheckpointError", "CheckpointNotFoundError", "DataError", "DiskFullError", "NonFiniteLossError", "RecipeError",
          "SoeError", "TrainingInterrupted", "UnstitchedError", "UsageError"]
ENTRY_POINTS = {"ace-step": "soe.experts.ace_step:AceStepV1Expert", "ace-step-1.5": "soe.experts.ace_step_15:AceStep15Expert",
                "stable-audio-open": "soe.experts.stable_audio:StableAudioExpert", "wan2.1": "soe.experts.wan:WanExpert",
                "wan2.2-ti2v": "soe.experts.wan22:Wan22TI2VExpert"}
_SIDE = ["name", "preset", "path", "dtype", "options", "architecture", "train", "lora.r", "lora.alpha", "lora.dropout",
         "lora.targets", "lora.init_from", "lora.tasks", "lora.preserve", "lora.lr_scale", "lora.off_tasks", "gradient_checkpointing", "flow_shift", "loss_weight", "codec_path",
         "text_encoder_path", "storage_dtype"]
RECIPE_KEYS = [
    "name", "seed", "run_dir", "resume", *(f"experts.{s}.{k}" for s in "ab" for k in _SIDE),
    "stitch.pairs", "stitch.direction", "stitch.detach_source", "stitch.engine", "stitch.connector.mlp",
    "stitch.connector.hidden", "stitch.connector.act", "stitch.connector.init", "stitch.connector.resample",
    "stitch.connector.input_norm", "stitch.connector.pool", "stitch.depth.mode", "stitch.depth.every", "stitch.inject",
    "stitch.auto.connectors", "stitch.auto.clips", "stitch.auto.sigmas",
    "flow.timesteps", "flow.density", "flow.balance", "flow.balance_momentum", "flow.tasks", "flow.extend_seconds", "flow.source_dropout",
    "data.kind", "data.path", "data.seconds", "data.batch_size", "data.num_clips", "data.num_workers",
    "data.shuffle_chunks", "data.cache_dir",
    "optim.lr", "optim.weight_decay", "optim.betas", "optim.warmup_steps", "optim.schedule", "optim.grad_clip",
    "trainer.max_steps", "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.precision", "trainer.accumulate_grad_batches", "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps", "trainer.threads", "trainer.on_nonfinite", "trainer.extra",
    "sample.steps", "sample.scheduler", "sample.guidance", "sample.shift", "sample.seed", "sample.cfg_batched",
    "sample.guidance_interval", "sample.lora_off", "sample.cross_guidance", "sample.memory",
    "sample.storage_dtype", "sample.compile", "sample.attention_backend", "sample.cache", "sample.cache_threshold",
    "sample.ckpt", "sample.prompt", "sample.prompts", "sample.negative_prompt", "sample.conditions", "sample.seconds",
    "sample.num_samples", "sample.out", "sample.every_n_steps", "sample.at_end", "sample.at_start", "sample.eval", "sample.sync_clips",
    "sample.sync_tasks", "sample.sync_media",
    "sample.decode", "sample.device", "sample.image", "sample.video", "sample.audio", "sample.extend",
    "sample.extend_seconds", "sample.given_uncond", "parallel.context", "parallel.cfg"]


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    return [k for f in dataclasses.fields(cls) for k in
            (_keys(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name]) else [prefix + f.name])]


def test_public_api_is_unchanged():
    assert soe.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(soe, name).__name__ == name
    assert soe.Stitcher.__module__ == "soe.stitch.stitcher" and soe.get_expert("wan2.1").__name__ == "WanExpert"
    assert issubclass(soe.DiffusersExpert, soe.Expert)
    errors = sorted(n for n, v in vars(soe.errors).items()
                    if inspect.isclass(v) and issubclass(v, BaseException) and v.__module__ == "soe.errors")
    assert errors == ERRORS
    assert soe.schema.RecipeError is soe.errors.RecipeError  # one class, importable from either place
    assert {e.name: e.value for e in entry_points(group="soe.experts")}.items() >= ENTRY_POINTS.items()
    assert _keys(Recipe) == RECIPE_KEYS
    from soe.cli import main
    from soe.testing import ExpertContractTests, assert_expert_contract, check_expert  # noqa: F401  (plugin authors' API)

    assert callable(main)


# ---- the docs site ---------------------------------------------------------------------------------
def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "-f", str(config), "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_docs_site_builds_strictly(tmp_path):
    proc = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("Stitcher", "unstitch", "get_expert", "DiffusersExpert", "load_stitched", "ExpertContractTests"):
        assert name in api, name  # generated from the docstrings
    assert "GPU measurements" in (tmp_path / "site" / "speed" / "index.html").read_text()  # benchmarks/README.md included
    assert not (ROOT / "site").exists()


@pytest.mark.parametrize("broken, message", [
    ("[the old page](how_it_works.md)", "how_it_works.md"),
    ("::: soe.stitcher.Stitcher", "soe.stitcher.Stitcher"),  # a moved module
])
def test_docs_build_fails_on_a_broken_link_or_a_moved_name(tmp_path, broken, message):
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    with open(docs / "api.md", "a") as f:
        f.write(f"\n\n{broken}\n")
    config = (ROOT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs}")
    (tmp_path / "mkdocs.yml").write_text(config.replace('paths: ["."]', f'paths: ["{ROOT}"]'))
    proc = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 8192
    assert text.count("```bash") == 2 and "## Two commands" in text and "## Library in five lines" in text
    for link in {part.split(")")[0] for part in text.split("](")[1:]}:
        assert (ROOT / link).exists(), link


# ---- the wheel -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_runs_the_demo(tmp_path):
    dist, target, elsewhere, source = (tmp_path / d for d in ("dist", "site", "elsewhere", "source"))
    elsewhere.mkdir()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in tracked:  # what a clean clone holds (a build writes build/ and *.egg-info next to its sources)
        if f.split("/")[0] in ("soe", "experts", "recipes") or f in ("pyproject.toml", "setup.py", "README.md"):
            (source / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, source / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)], check=True,
                   capture_output=True, timeout=300, cwd=tmp_path)
    wheel = next(dist.glob("soe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    expected = {("soe/experts/" + f[len("experts/"):]) if f.startswith("experts/") else f for f in tracked
                if f.endswith(".py") and f.split("/")[0] in ("soe", "experts")}
    assert expected <= set(names), sorted(expected - set(names))[:5]
    assert "soe/recipes/demo.yaml" in names
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True,
                   timeout=300, cwd=tmp_path)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "SOE_CACHE_DIR": str(tmp_path / "cache")}
    # one interpreter for `soe inspect demo` and where what it imported came from (each start pays torch's import)
    inspect_ = subprocess.run([sys.executable, "-c", "import sys, soe, soe.recipe.reading as r\nfrom soe.cli import main\n"
                               "code = main(['inspect', 'demo'])\n"
                               "print(soe.__file__, sys.modules['soe.experts.wan'].__file__, r.shipped_recipes()['demo'])\n"
                               "sys.exit(code)"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert inspect_.returncode == 0 and "connector" in inspect_.stdout.lower(), inspect_.stdout + inspect_.stderr
    where = inspect_.stdout.splitlines()[-1].split()
    assert len(where) == 3 and all(p.startswith(str(target)) for p in where), where
    run = elsewhere / "run"
    train = subprocess.run([sys.executable, "-m", "soe", "stitch", "demo", "trainer.max_steps=1", "data.num_clips=8",
                            "data.batch_size=2", "sample.steps=2", "sample.at_end=false", "sample.at_start=false",
                            "sample.sync_clips=0", f"run_dir={run}"], cwd=elsewhere, env=env, capture_output=True,
                           text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "trained" / "connectors.safetensors").is_file()
