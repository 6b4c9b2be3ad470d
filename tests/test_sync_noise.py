"""benchmarks/sync_noise.py: per-group scores are the demo's scores of exactly those clips."""
import numpy as np
import pytest
from conftest import load_benchmark

from soe.evaluate.metrics import frechet_distance


def load():
    return load_benchmark("sync_noise")


def test_group_scores_use_only_the_group_and_worse_reads_each_direction():
    m = load()
    rng = np.random.default_rng(0)
    feats = {k: {mod: rng.normal(size=(16, 6)) + (k == "stitched") for mod in ("video", "audio")} for k in m.MODELS}
    truth = {mod: rng.normal(size=(16, 6)) for mod in ("video", "audio")}
    sync = {"alone": np.linspace(0, 1, 16), "stitched": np.linspace(1, 0, 16)}
    g = m.group_scores(feats, sync, truth, slice(8, 16))
    assert g["alone"]["audio"] == pytest.approx(frechet_distance(feats["alone"]["audio"][8:], truth["audio"][8:]))
    assert g["stitched"]["sync"] == pytest.approx(np.mean(sync["stitched"][8:]))
    assert g["alone"]["sync"] > g["stitched"]["sync"]  # the second half: alone's sync is the higher one
    w = m.worse(g)
    assert w["sync"] and w["video"] == (g["stitched"]["video"] > g["alone"]["video"])
    flipped = m.worse({"alone": g["stitched"], "stitched": g["alone"]})
    assert {k: not v for k, v in w.items()} == flipped  # no ties here: swapping the models flips every verdict
