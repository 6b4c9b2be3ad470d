"""The sync experiment's --quick mode runs end to end and computes its metrics (no value asserted)."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "sync_experiment.py"


@pytest.mark.slow
def test_sync_experiment_quick_runs_and_scores(tmp_path):
    spec = importlib.util.spec_from_file_location("sync_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", str(tmp_path)])
    assert set(result["sync"]) == {"ground truth", "independent experts", "stitched"}
    assert all(0.0 <= s <= 1.0 for s in result["sync"].values())
    assert set(result["frechet"]) == {"independent experts", "stitched"}
    assert all(v >= 0 for f in result["frechet"].values() for v in f.values())
    assert json.loads((tmp_path / "sync_results.json").read_text())["size"] == "quick"
    # both experts were saved in their official formats and reloaded from there
    assert (tmp_path / "video_expert" / "transformer" / "config.json").is_file()
    assert (tmp_path / "audio_expert" / "transformer" / "config.json").is_file()
