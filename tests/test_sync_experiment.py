"""The sync experiment's --quick mode runs end to end in every mode and its report collects it (no value asserted)."""
import json
import sys

import pytest
from conftest import load_benchmark


def load():
    return load_benchmark("sync_experiment")


@pytest.mark.slow
def test_sync_experiment_quick_runs_every_mode_and_reports(tmp_path):
    module = load()
    result = module.main(["--quick", "--out", str(tmp_path)])
    scores = result["scores"]
    assert set(scores) == {"ground truth", "independent", "joint", "v2a", "a2v", "image"}
    assert all(0.0 <= s["sync"] <= 1.0 for s in scores.values())
    # a given modality is the truth: no Frechet distance for it; every generated one has one
    assert scores["v2a"]["frechet_video"] is None and scores["a2v"]["frechet_audio"] is None
    assert all(v >= 0 for s in scores.values() for v in (s["frechet_video"], s["frechet_audio"]) if v is not None)
    assert [p["step"] for p in result["curve"]] == [0, 6]  # step 0 (experts alone) and the checkpoint
    assert json.loads((tmp_path / "sync_results.json").read_text())["size"] == "quick"
    assert (tmp_path / "video_expert" / "transformer" / "config.json").is_file()  # official formats, reloaded from there
    assert (tmp_path / "audio_expert" / "transformer" / "config.json").is_file()
    assert (tmp_path / "stitch" / "previews" / "v2a_00.png").is_file()
    # scoring the run folder afterwards (its last checkpoint) gives the same numbers as scoring in the run
    again = module.main(["--eval-run", str(tmp_path / "stitch"), "--size", "quick", "--out", str(tmp_path)])
    assert again["stitch_steps"] == 6
    assert all(again["scores"][m]["sync"] == pytest.approx(scores[m]["sync"]) for m in scores)
    results = module.main(["--out", str(tmp_path), "--report", str(tmp_path / "report")])
    assert set(results) == {"base"}
    assert "| base |" in (tmp_path / "report" / "sync_table.md").read_text()
    assert (tmp_path / "report" / "sync_vs_steps_base.png").is_file()


def test_every_ablation_is_a_valid_recipe_change():
    from soe.recipe.reading import load_recipe
    from soe.recipe.validate import validate_recipe

    module = load()
    for name, overrides in module.ABLATIONS.items():
        cfg = load_recipe(module.ROOT / "recipes" / "sync_stitch.yaml", ["experts.a.path=null", "experts.b.path=null", *overrides])
        validate_recipe(cfg, check_paths=False)
    sys.modules.pop("sync_eval", None)


def test_sync_seeds_averages_runs_over_seed_folders_with_a_t_interval(tmp_path):
    import numpy as np
    from scipy import stats

    module = load_benchmark("sync_seeds")
    joint = [0.4, 0.5, 0.6]
    for s, j in enumerate(joint):
        run = tmp_path / f"s{s}" / "ablations" / "auto_2_pairs"
        run.mkdir(parents=True)
        scores = {m: {"sync": j, "frechet_audio": 2 * j, "frechet_video": 0.1} for m in ("independent", "joint", "v2a", "a2v", "image")}
        (run / "sync_results.json").write_text(json.dumps({"scores": scores}))
    text = module.main([str(tmp_path / f"s{s}") for s in range(3)] + ["--runs", "auto_2_pairs", "missing"])
    same = module.paired([tmp_path / f"s{s}" for s in range(3)], "auto_2_pairs", "auto_2_pairs")
    assert same.startswith("| auto_2_pairs - auto_2_pairs | 3 | +0.000 ± 0.000")  # a run minus itself, seed by seed
    half = stats.t.ppf(0.975, 2) * np.std(joint, ddof=1) / np.sqrt(3)
    assert f"| auto_2_pairs | 3 | 0.500 ± {half:.3f}" in text and "missing" not in text
    assert module.interval([0.7]) == (0.7, 0.0)
