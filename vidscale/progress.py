"""Progress for people (a tqdm bar on stderr), for programs (JSON lines on stderr), and a JSON-lines
log file for unattended runs.

stdout may be carrying video, so nothing here ever writes to it.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

MODES = ("auto", "bar", "json", "none")
_JSON_INTERVAL = 1.0
# A log file keeps a record of long runs, not a live display: one progress line every so often.
LOG_INTERVAL = 30.0


class Progress:
    """Silent progress; the base of the others. `update` is told the number of frames written."""

    def start(self, total: int | None, label: str) -> None:
        pass

    def update(self, frames: int) -> None:
        pass

    def close(self) -> None:
        pass


class BarProgress(Progress):
    def __init__(self, stream: TextIO):
        self._stream = stream
        self._bar: tqdm | None = None

    def start(self, total: int | None, label: str) -> None:
        self._bar = tqdm(total=total, desc=label, unit="frame", file=self._stream, dynamic_ncols=True,
                         smoothing=0.1)

    def update(self, frames: int) -> None:
        self._bar.update(frames - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class JsonProgress(Progress):
    """One JSON object per line, at most once a second and once at the end, for wrappers."""

    def __init__(self, stream: TextIO | None, interval: float = _JSON_INTERVAL):
        self._stream = stream
        self._interval = interval
        self._total: int | None = None
        self._started = self._last = 0.0
        self._frames = 0

    def start(self, total: int | None, label: str) -> None:
        self._total = total
        self._started = time.monotonic()
        self._last = 0.0

    def update(self, frames: int) -> None:
        self._frames = frames
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._emit(now)

    def close(self) -> None:
        if self._started:
            self._emit(time.monotonic())

    def _emit(self, now: float) -> None:
        self._last = now
        elapsed = now - self._started
        fps = self._frames / elapsed if elapsed > 0 else 0.0
        eta = (self._total - self._frames) / fps if self._total and fps > 0 else None
        record = {"frame": self._frames, "total": self._total, "fps": round(fps, 3),
                  "eta": None if eta is None else round(eta, 1), "elapsed": round(elapsed, 1)}
        self._write(record)

    def _write(self, record: dict) -> None:
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()


class Both(Progress):
    """Tells two progress displays the same thing (the terminal's and the log file's)."""

    def __init__(self, first: Progress, second: Progress):
        self._all = (first, second)

    def start(self, total: int | None, label: str) -> None:
        for progress in self._all:
            progress.start(total, label)

    def update(self, frames: int) -> None:
        for progress in self._all:
            progress.update(frames)

    def close(self) -> None:
        for progress in self._all:
            progress.close()


class EventLog:
    """`--log-file`: one JSON object per line, appended, each with its UTC time and event name
    (start, end, warning, error, progress...), so a timer's runs can be followed and audited."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        self._broken = False

    def write(self, event: str, **fields) -> None:
        """Append one record. A log that cannot be written (its disk full) is not worth the run:
        the first failure is told on stderr, and the run goes on without the log."""
        if self._broken:
            return
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event,
                  **fields}
        try:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()
        except OSError as exc:
            self._broken = True
            print(f"vidscale: warning: cannot write the log file {self.path} ({exc.strerror}); "
                  f"going on without it", file=sys.stderr)

    def progress(self, **fields) -> Progress:
        """Periodic progress records (every LOG_INTERVAL seconds and at the end), with `fields`."""
        return _LoggedProgress(self, fields)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # what was left to write failed, and was told, in write()


class _LoggedProgress(JsonProgress):
    def __init__(self, log: EventLog, fields: dict):
        super().__init__(None, interval=LOG_INTERVAL)
        self._log, self._fields = log, fields

    def _write(self, record: dict) -> None:
        self._log.write("progress", **self._fields, **record)


def make_progress(mode: str, stream: TextIO | None = None) -> Progress:
    """`auto` shows a bar only when stderr is a terminal, so logs of unattended runs stay clean."""
    stream = stream or sys.stderr
    if mode == "auto":
        mode = "bar" if stream.isatty() else "none"
    if mode == "bar":
        return BarProgress(stream)
    if mode == "json":
        return JsonProgress(stream)
    return Progress()
