"""PyAV decoding for `soe encode` and `soe annotate`: each target time gets the frame decoded for it."""
from fractions import Fraction
from types import SimpleNamespace

import numpy as np

from soe.data.media_io import read_video


class _Frame:
    """A decoded frame already at the target size (``_to_target`` only crops it, a no-op here)."""

    __slots__ = ("pts", "time", "value")

    def __init__(self, pts, value):
        self.pts, self.time, self.value = pts, None, value

    def to_ndarray(self, format):
        return np.full((4, 4, 3), self.value, np.uint8)


class _Container:
    """``fps`` frames a second, frame i filled with i; each frame freed once the reader lets go of it, as PyAV's are."""

    def __init__(self, n, fps):
        rate = Fraction(fps)
        self.streams = SimpleNamespace(video=[SimpleNamespace(start_time=0, time_base=1 / rate, average_rate=rate, guessed_rate=rate)])
        self.n, self.ids = n, []

    def decode(self, stream):
        for i in range(self.n):
            frame = _Frame(i, i)
            self.ids.append(id(frame))
            yield frame
            del frame


def test_every_target_gets_its_own_frame_when_python_reuses_a_freed_frames_id():
    container = _Container(30, fps=30)
    targets = np.array([0.0, 0.5, 0.9])  # frames 0, 15, 27
    frames = read_video(container, targets, (4, 4))
    assert len(set(container.ids)) < len(container.ids)  # the premise: a later frame took a freed frame's id
    assert [int(f[0, 0, 0]) for f in frames] == [0, 15, 27]


def test_ordered_map_in_processes_keeps_items_that_are_none():
    """The refill loop took a None item for the end of the input and dropped everything after it."""
    from soe.data.media_io import ordered_map

    items = [1, None, 0, "", 5, None, 7]
    assert list(ordered_map(repr, items, workers=1)) == [(x, repr(x)) for x in items]
