import numpy as np
import pytest

from soe.evaluate.metrics import audio_onsets, av_align, frechet_distance, match_events, video_motion_events


def test_identical_event_times_score_one():
    t = [0.3, 0.9, 1.5]
    assert av_align(t, t, tolerance=0.05) == 1.0


def test_disjoint_event_times_score_zero():
    assert av_align([0.1, 0.5], [1.0, 1.6], tolerance=0.1) == 0.0


def test_partial_overlap_is_intersection_over_union():
    # 2 of 3 audio events have a video partner within 0.1 s; video has 3 events -> 2 / (3 + 3 - 2)
    assert av_align([0.1, 0.5, 1.0], [0.12, 0.55, 1.6], tolerance=0.1) == pytest.approx(0.5)
    assert match_events([0.1, 0.12], [0.11], tolerance=0.05) == 1  # one-to-one matching


def test_detectors_find_hand_made_events():
    rate = 25.0
    t = (np.arange(50) + 0.5) / rate
    env = np.zeros(50)
    for onset in (0.42, 1.22):  # decaying clicks
        env = np.maximum(env, np.where(t >= onset, np.exp(-(t - onset) / 0.08), 0))
    got = audio_onsets(env, rate)
    assert len(got) == 2 and np.allclose(got, [0.42, 1.22], atol=1 / rate)
    height = np.abs(np.sin(np.pi * (t - 0.42) / 0.8))  # floor contacts at 0.42 and 1.22 s
    assert np.allclose(video_motion_events(height, rate), [0.42, 1.22], atol=1 / rate)
    assert av_align(got, video_motion_events(height, rate), tolerance=1.5 / rate) == 1.0


def test_frechet_distance_zero_for_same_distribution_and_grows_with_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3))
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    d1, d2 = frechet_distance(x, x + 1.0), frechet_distance(x, x + 2.0)
    assert d1 == pytest.approx(3.0, rel=1e-3) and d2 == pytest.approx(12.0, rel=1e-3)
