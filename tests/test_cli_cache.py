"""`soe experts` / `soe inspect` start fast: LoRA counted from shapes, tables cached (soe/cli/cache.py)."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from soe.cli import cache as cli_cache
from soe.cli import main
from soe.cli.tables import hooks_table, num_params, recipe_tables, stitch_tables
from soe.recipe.builders import build_stitcher
from soe.recipe.reading import load_recipe
from soe.recipe.validate import validate_recipe
from soe.train.build import apply_training_setup, count_training_setup

ROOT = Path(__file__).parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"
UNIVERSE1 = ROOT / "recipes" / "universe1.yaml"


def text(tables) -> str:
    console = Console(width=250, record=True, file=io.StringIO())
    for t in tables:
        console.print(t)
    return console.export_text()


def with_peft(cfg):
    """What `soe inspect` printed before: peft's LoRA layers injected on the meta device."""
    validate_recipe(cfg, check_paths=False)
    with torch.device("meta"):
        st = build_stitcher(cfg, device="meta", load_weights=False)
        apply_training_setup(st, cfg)
    return st


CASES = {
    "wan+ace-step-1.5": [],
    "wan+ace-step-v1, depth expansion, r=5": ["experts.b.name=ace-step", "experts.b.lora.r=5", "stitch.pairs=identity",
                                              "stitch.depth.mode=insert_interpolated", "stitch.depth.every=1"],
    "wan2.2+stable-audio, custom targets": ["experts.a.name=wan2.2-ti2v", "experts.b.name=stable-audio-open",
                                            "experts.a.lora.targets=[attn1.to_q,'blocks\\.0\\.ffn\\.net\\.2']"],
    "one side trains fully, one frozen": ["experts.a.train=full", "experts.b.train=frozen"],
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_counted_lora_equals_peft_injected(overrides):
    cfg = load_recipe(TINY, overrides)
    st = with_peft(cfg)
    with torch.device("meta"):
        counted = build_stitcher(cfg, device="meta", load_weights=False)
        lora = count_training_setup(counted, cfg)
    assert not any("lora_" in n for n, _ in counted.named_parameters())  # counted, not injected
    for side in "ab":
        real, est = getattr(st, side), getattr(counted, side)
        assert num_params(real) == num_params(est) + lora[side]
        assert num_params(real, trainable_only=True) == num_params(est, trainable_only=True) + lora[side]
        injected = sum(p.numel() for n, p in real.named_parameters() if "lora_" in n)
        assert injected == lora[side] and (injected > 0) == (cfg.experts[side].train == "lora")
    assert text(recipe_tables(cfg)) == text([*stitch_tables(st), hooks_table(st)])  # what `soe inspect` prints is unchanged


@pytest.mark.slow
def test_universe1_counted_lora_equals_peft_injected():
    """The full-size recipe (540 LoRA layers, inserted blocks, k/v projections), on the meta device."""
    cfg = load_recipe(UNIVERSE1)
    out = text(recipe_tables(cfg))
    st = with_peft(cfg)
    assert out == text([*stitch_tables(st), hooks_table(st)])
    row = next(line for line in out.splitlines() if "wan2.1" in line and "video" in line)
    assert "1.506B" in row and "87.49M" in row  # 30 blocks x 10 Linear layers x r 64 x (in + out)


def test_repeated_listings_read_the_cache_and_import_no_torch(capsys):
    assert main(["experts"]) == 0 and main(["inspect", str(TINY)]) == 0  # first runs: computed, then stored
    first = capsys.readouterr().out
    assert len(list((Path(os.environ["SOE_CACHE_DIR"]) / "cli").glob("*.json"))) == 2
    code = ("import sys\nfrom soe.cli import main\n"
            f"assert main(['experts']) == 0 and main(['inspect', {str(TINY)!r}]) == 0\n"
            "print('imported:', sorted(m for m in ('torch', 'diffusers', 'peft', 'timm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    *again, last = proc.stdout.rstrip("\n").split("\n")
    assert proc.returncode == 0 and last == "imported: []", proc.stderr
    assert "\n".join(again) == first.rstrip("\n")


def test_no_cache_computes_the_tables(capsys):
    assert main(["inspect", str(TINY)]) == 0
    expected = capsys.readouterr().out
    (entry,) = (Path(os.environ["SOE_CACHE_DIR"]) / "cli").glob("*.json")
    data = json.loads(entry.read_text())
    data["tables"][0]["rows"][0][1] = "stale"
    entry.write_text(json.dumps(data))
    assert main(["inspect", str(TINY)]) == 0 and "stale" in capsys.readouterr().out  # the cache is what a repeat prints
    assert main(["inspect", str(TINY), "--no-cache"]) == 0
    assert capsys.readouterr().out == expected


def test_the_key_follows_the_recipe_and_the_code(tmp_path, monkeypatch):
    cfg = load_recipe(TINY)
    key = cli_cache.recipe_key(cfg)
    assert key == cli_cache.recipe_key(load_recipe(TINY)) and key is not None
    assert cli_cache.recipe_key(load_recipe(TINY, ["experts.a.lora.r=8"])) != key
    assert cli_cache.recipe_key(load_recipe(TINY, ["experts.a.lora.init_from=x.safetensors"])) is None  # the file decides
    plugin = tmp_path / "myplugin"
    plugin.mkdir()
    (plugin / "__init__.py").write_text("")
    (plugin / "model.py").write_text("WIDTH = 64\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = cli_cache.code_fingerprint(["myplugin.model"])
    assert cli_cache.code_fingerprint(["myplugin.model"]) == before
    (plugin / "model.py").write_text("WIDTH = 128\n")  # same size, new content
    assert cli_cache.code_fingerprint(["myplugin.model"])["source"] != before["source"]
    monkeypatch.setattr(cli_cache, "_versions", lambda names: {n: "0.0" for n in names})
    assert cli_cache.code_fingerprint(["myplugin.model"])["libraries"] != before["libraries"]


def test_experts_registered_at_run_time_are_not_cached():
    from soe.plugin.registry import _REGISTRY

    assert cli_cache.experts_key() is not None
    _REGISTRY["runtime-only"] = type("RuntimeExpert", (), {})  # e.g. @register_expert in a notebook: no source to key on
    try:
        assert cli_cache.experts_key() is None
    finally:
        del _REGISTRY["runtime-only"]


def test_a_damaged_or_unwritable_cache_only_means_computing(tmp_path, monkeypatch, capsys):
    assert main(["inspect", str(TINY)]) == 0
    expected = capsys.readouterr().out
    (entry,) = (Path(os.environ["SOE_CACHE_DIR"]) / "cli").glob("*.json")
    entry.write_text("{not json")
    assert main(["inspect", str(TINY)]) == 0
    assert capsys.readouterr().out == expected and json.loads(entry.read_text())["format"] == cli_cache.FORMAT
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SOE_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    assert main(["inspect", str(TINY)]) == 0
    assert capsys.readouterr().out == expected


def test_old_entries_are_pruned(monkeypatch):
    monkeypatch.setattr(cli_cache, "KEEP", 3)
    folder = Path(os.environ["SOE_CACHE_DIR"]) / "cli"
    tables = recipe_tables(load_recipe(TINY))
    for i in range(5):
        cli_cache.save(f"k{i}", tables)
        os.utime(folder / f"k{i}.json", (i, i))  # written in this order
    assert sorted(f.stem for f in folder.glob("*.json")) == ["k2", "k3", "k4"]
    assert text(cli_cache.load("k4")) == text(tables)
