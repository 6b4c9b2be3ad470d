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
