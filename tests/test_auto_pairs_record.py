"""``stitch.pairs: auto`` is chosen once per run: recorded in the run folder, reused by resume, generate and export."""
import json
from pathlib import Path

import pytest
from rich.console import Console

from soe.cli.stitch import run_training
from soe.errors import RecipeError
from soe.recipe.reading import load_recipe

TINY = Path(__file__).resolve().parent / "recipes" / "tiny.yaml"
AUTO = ["stitch.pairs=auto", "stitch.auto.connectors=2", "stitch.auto.clips=2", "stitch.auto.sigmas=[0.5]", "data.seconds=1.0",
        "data.num_clips=8", "data.batch_size=2", "sample.at_end=false", "trainer.checkpoint_every_n_steps=1"]
QUIET = Console(file=open("/dev/null", "w"))


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "run"
    result = run_training(TINY, [*AUTO, f"run_dir={run_dir}", "trainer.max_steps=1"], console=QUIET, progress=False)
    return run_dir, result["module"].stitcher.pairs


def _no_choosing(monkeypatch):
    import soe.data.auto_pairs as ap

    def refuse(*a, **k):
        raise AssertionError("the pairs were chosen again instead of read from the run's record")

    monkeypatch.setattr(ap, "choose_pairs", refuse)


def test_the_run_records_its_pairs_and_every_later_build_uses_them_even_when_the_data_changes(run, tmp_path, monkeypatch):
    from soe.interop.export import export_run
    from soe.sample.generate import load_run

    run_dir, pairs = run
    body = json.loads((run_dir / "auto_pairs.json").read_text())
    assert [tuple(p) for p in body["pairs"]] == pairs and len(pairs) == 2
    assert len(body["similarity"]) == 4 and body["experts"] == ["wan2.1", "ace-step-1.5"]
    _no_choosing(monkeypatch)
    changed = ["data.seconds=2.0", "data.num_clips=16"]  # other clips: choosing again could pick other pairs
    resumed = run_training(TINY, [*AUTO, *changed, f"run_dir={run_dir}", "trainer.max_steps=2", "resume=true"], console=QUIET,
                           progress=False, allow_changes=["data.seconds", "data.num_clips"])
    assert resumed["module"].stitcher.pairs == pairs and resumed["module"].global_step == 2
    cfg = load_recipe(TINY, [*AUTO, *changed, f"sample.ckpt={run_dir}"])
    stitcher, step, _ = load_run(cfg)
    assert stitcher.pairs == pairs and step == 2
    merged = export_run(run_dir, "merged", out=tmp_path / "merged")
    assert [tuple(p) for p in load_recipe(merged / "recipe.yaml").stitch.pairs] == pairs  # written out: loads anywhere
    from soe.interop.export import load_stitched

    assert load_stitched(merged).pairs == pairs


def test_a_changed_record_or_a_recipe_it_was_not_made_for_is_one_line(run, monkeypatch):
    from soe.sample.generate import load_run

    run_dir, pairs = run
    record = run_dir / "auto_pairs.json"
    _no_choosing(monkeypatch)
    other = load_recipe(TINY, [*AUTO, "stitch.auto.connectors=3", f"sample.ckpt={run_dir}"])
    with pytest.raises(RecipeError) as e:
        load_run(other)
    assert "holds pairs chosen for connectors 2, this recipe has 3" in str(e.value) and "\n" not in str(e.value)
    body = json.loads(record.read_text())
    body["pairs"][0] = [body["pairs"][0][0], body["pairs"][0][1] + 1]
    record.write_text(json.dumps(body))
    with pytest.raises(RecipeError) as e:
        load_run(load_recipe(TINY, [*AUTO, f"sample.ckpt={run_dir}"]))
    assert "was changed after the run chose its pairs" in str(e.value) and "\n" not in str(e.value)
    record.write_text("{not json")
    with pytest.raises(RecipeError) as e:
        load_run(load_recipe(TINY, [*AUTO, f"sample.ckpt={run_dir}"]))
    assert "is not a readable record" in str(e.value) and "\n" not in str(e.value)
