"""benchmarks/joint_audio.py --seeds: several seeds' --json files as one table, mean ± 95% t-interval per number."""
import json

import pytest

from conftest import load_benchmark


def _run(path, variants: dict) -> str:
    keys = ("sync", "frechet_video", "frechet_audio", "onsets", "loudness")
    path.write_text(json.dumps({"variants": {name: {k: [value + i, 0, 0] for i, k in enumerate(keys)}
                                             for name, value in variants.items()}}))
    return str(path)


def test_seeds_table_means_each_variant_over_seeds_whatever_its_step_and_joins_split_runs(tmp_path):
    ja = load_benchmark("joint_audio")
    s0 = _run(tmp_path / "s0.json", {"stitched (step 250)": 1.0}) + "+" + _run(tmp_path / "a0.json", {"experts alone (step 0)": 0.0})
    s1 = _run(tmp_path / "s1.json", {"experts alone (step 0)": 0.2, "stitched (step 250)": 2.0})
    s2 = _run(tmp_path / "s2.json", {"experts alone (step 0)": 0.4, "stitched (step 300)": 3.0})
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in ja.seeds_table([s0, s1, s2]).splitlines()[2:]}
    assert set(rows) == {"stitched", "experts alone"}
    assert rows["stitched"][1] == "3" and rows["stitched"][2].startswith("2.000 ± ")
    half = float(rows["stitched"][2].split("± ")[1])
    assert half == pytest.approx(4.303 * 1.0 / 3 ** 0.5, abs=1e-3)  # t(0.975, 2) * sd / sqrt(n)
    assert rows["experts alone"][4].startswith("2.200 ± ")  # frechet_audio = value + 2, mean of 0, 0.2, 0.4


def test_minus_alone_is_the_paired_difference_on_the_same_bootstrap_draws(tmp_path):
    import numpy as np

    from soe.evaluate.metrics import frechet_distance

    ja = load_benchmark("joint_audio")
    rng = np.random.default_rng(0)
    truth = {"video": rng.normal(size=(24, 3)), "audio": rng.normal(size=(24, 3))}
    alone = {"feats": {"video": truth["video"] + 1.0, "audio": rng.normal(size=(24, 3))}, "onsets": rng.integers(0, 5, 24)}
    assert all(v == (0.0, 0.0, 0.0) for v in ja.minus_alone(alone, alone, truth).values())  # itself: exactly 0 on every draw
    shifted = {"feats": {"video": truth["video"] + 0.5, "audio": alone["feats"]["audio"]}, "onsets": alone["onsets"] + 1}
    d = ja.minus_alone(shifted, alone, truth)
    expect = frechet_distance(shifted["feats"]["video"], truth["video"]) - frechet_distance(alone["feats"]["video"], truth["video"])
    assert d["frechet_video"][0] == pytest.approx(expect) and expect < 0  # closer to the truth: negative, and so is its interval
    assert d["frechet_video"][2] < 0
    assert d["onsets"] == pytest.approx((1.0, 1.0, 1.0)) and d["frechet_audio"] == (0.0, 0.0, 0.0)
