"""Checkpoints are data, never code: safetensors or ``torch.load(weights_only=True)`` only."""
import pathlib
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from soe.cli import main
from soe.errors import CheckpointError
from soe.recipe.reading import load_recipe
from soe.train.checkpoint import AtomicCheckpointIO, read_checkpoint

ROOT = Path(__file__).parents[1]
DEMO = str(ROOT / "tests" / "recipes" / "tiny.yaml")  # tiny random experts: fast; recipes/demo.yaml is tested in test_first_run.py
SOURCE_DIRS = ("soe", "experts", "benchmarks", "examples")


class _Payload:
    """Unpickling this would write a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 1, "payload": _Payload(marker)}, path)
    return path


@pytest.mark.parametrize("lightning_asks", [None, False, True])
def test_checkpoint_io_refuses_a_pickle_that_runs_code(tmp_path, lightning_asks):
    marker = tmp_path / "pwned"
    ckpt = malicious_checkpoint(tmp_path / "last.ckpt", marker)
    with pytest.raises(CheckpointError, match="refused: it pickles more than tensors"):
        AtomicCheckpointIO().load_checkpoint(ckpt, weights_only=lightning_asks)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(ckpt)
    assert not marker.exists()


def test_resume_from_a_malicious_last_ckpt_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    malicious_checkpoint(run / "checkpoints" / "last.ckpt", marker)
    argv = ["stitch", DEMO, f"run_dir={run}", "resume=true", "data.num_clips=8", "data.batch_size=2", "trainer.max_steps=2"]
    OmegaConf.save(load_recipe(DEMO, argv[2:]), run / "recipe.yaml")  # the run's own recipe: the resume reaches the checkpoint
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "refused" in err and "last.ckpt" in err and len(err.splitlines()) == 1, err
    assert not marker.exists()


def _source_files():
    for d in SOURCE_DIRS:
        yield from sorted((ROOT / d).rglob("*.py")) if (ROOT / d).is_dir() else []


FORBIDDEN = {
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "eval(": re.compile(r"(?<![\w.])eval\("),
    "exec(": re.compile(r"(?<![\w.])exec\("),
    "pickle.load": re.compile(r"pickle\.loads?\("),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only=True)[^)]*\)"),
}


def test_source_tree_has_no_unsafe_loading():
    hits = []
    for f in _source_files():
        text = f.read_text()
        for what, rx in FORBIDDEN.items():
            for m in rx.finditer(text):
                hits.append(f"{f.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {what}")
    assert not hits, "\n".join(hits)


# Who may import modules by name: the registry (installed entry points), the plugin test kit (a developer
# names their own ``module:Class`` to check it) and `soe/__init__.py` (its fixed table of lazily imported
# public names). Never recipe code.
IMPORTERS = {"soe/plugin/registry.py", "soe/testing/__init__.py", "soe/__init__.py"}


def test_modules_are_imported_by_registered_names_only():
    users = {str(f.relative_to(ROOT)) for f in _source_files() if re.search(r"import_module\(|__import__\(", f.read_text())}
    assert users <= IMPORTERS, sorted(users - IMPORTERS)


@pytest.mark.parametrize("name", ["os:system", "subprocess.run", "experts.wan:WanExpert"])
def test_recipe_expert_names_are_registry_keys_not_import_paths(tmp_path, capsys, name):
    argv = ["stitch", DEMO, f"run_dir={tmp_path}/run", f"experts.a.name={name}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"experts.a.name: unknown expert '{name}'" in err and len(err.splitlines()) == 1, err
