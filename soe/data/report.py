"""What ``soe encode`` and ``soe annotate`` did: counts, skipped clips with reasons, hours; a rich table and a JSON
file; and their progress bars."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text


class _Skips:
    """The clips a run skipped: ``skipped`` rows of ``{"path", "reason", "detail"}``, counted by reason."""

    skipped: list[dict]

    def skip(self, path: str, reason: str, detail: str = "") -> None:
        self.skipped.append({"path": path, "reason": reason, "detail": detail})

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(Counter(s["reason"] for s in self.skipped))

    def _skipped_rows(self, t: Table) -> Table:
        for reason, n in sorted(self.by_reason.items()):
            files = ", ".join(s["path"] for s in self.skipped if s["reason"] == reason)
            t.add_row(f"skipped: {reason}", f"{n} ({files})")
        return t


class RateColumn(ProgressColumn):
    """Items per second of a task (``windows/s``)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s")


def progress_bars(console, enabled: bool = True, unit: str | None = None) -> Progress:
    """The progress bars of ``soe encode`` and ``soe annotate``: what, bar, done / total, elapsed, remaining
    (and items per second with a ``unit``)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, *([RateColumn(unit)] if unit else []), console=console, disable=not enabled)


def _table(title: str) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    return t


@dataclass
class EncodeReport(_Skips):
    clips: int = 0  # video files found
    clips_encoded: int = 0  # clips with at least one window in the cache after this run
    windows_new: int = 0  # encoded by this run
    windows_cached: int = 0  # already in the cache before this run (resume)
    seconds_new: float = 0.0
    seconds_cached: float = 0.0
    shards: int = 0  # written by this run
    elapsed: float = 0.0  # seconds
    merged: bool = True  # False: a --shard I/N part finished, other parts still to come
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason", "detail"}

    @property
    def windows_per_second(self) -> float:
        return self.windows_new / self.elapsed if self.elapsed else 0.0

    def table(self) -> Table:
        t = _table("soe encode")
        t.add_row("clips found / encoded", f"{self.clips} / {self.clips_encoded}")
        t.add_row("windows new / already cached", f"{self.windows_new} / {self.windows_cached}")
        t.add_row("audio-video encoded (hours)", f"{self.seconds_new / 3600:.4f} new, {(self.seconds_new + self.seconds_cached) / 3600:.4f} in cache")
        t.add_row("shards written", str(self.shards))
        t.add_row("throughput", f"{self.windows_per_second:.2f} windows/s, {self.seconds_new / max(self.elapsed, 1e-9):.1f} s of media/s")
        return self._skipped_rows(t)

    def write(self, path) -> Path:
        path = Path(path)
        data = {**asdict(self), "skipped_by_reason": self.by_reason, "hours_new": self.seconds_new / 3600}
        path.write_text(json.dumps(data, indent=1))
        return path


@dataclass
class AnnotateReport(_Skips):
    clips: int = 0  # video files of this part
    clips_annotated: int = 0  # with every window annotated
    windows: int = 0  # windows of those clips
    texts_new: int = 0  # captions and sound descriptions the omni model wrote in this run
    texts_cached: int = 0  # found in the folder (same clip, window, model and prompt)
    transcribed_new: int = 0  # clips Whisper transcribed in this run
    transcribed_cached: int = 0
    sidecar_transcripts: int = 0  # clips with their own transcript (clip.words.json, words in captions.jsonl)
    batches: dict = field(default_factory=dict)  # model calls of this run: {"asr", "language", "captioner": batches}
    merged: bool = False  # this part was the last to finish: it wrote the annotations file
    elapsed: float = 0.0  # seconds
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason", "detail"}

    def table(self) -> Table:
        t = _table("soe annotate")
        t.add_row("clips found / annotated", f"{self.clips} / {self.clips_annotated}")
        t.add_row("windows annotated", str(self.windows))
        t.add_row("captions + sound descriptions", f"{self.texts_new} new, {self.texts_cached} cached")
        t.add_row("transcripts", f"{self.transcribed_new} new, {self.transcribed_cached} cached (Whisper), "
                  f"{self.sidecar_transcripts} brought (clip.words.json, captions.jsonl)")
        t.add_row("model calls (batches)", ", ".join(f"{k} {n}" for k, n in self.batches.items()) or "-")
        t.add_row("time", f"{self.elapsed:.1f} s, {self.windows / max(self.elapsed, 1e-9):.2f} windows/s")
        return self._skipped_rows(t)

    def write(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({**asdict(self), "skipped_by_reason": self.by_reason}, indent=1))
        return path
