"""What a batch did, job by job: the report `vidscale batch --report` writes. Apart from the
running of jobs, so that a batch stopped while the libraries load still replaces the last
run's report (which would otherwise read as this run's success)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import EXIT_SOME_FAILED
from .files import write_atomically


@dataclass(frozen=True)
class JobResult:
    """One line of the report. status: done, skipped (done already, or `error` says which run is
    making it now) or failed."""

    input: str
    output: str
    status: str
    frames: int = 0
    seconds: float = 0.0
    fps: float = 0.0
    corrupt_packets: int = 0
    lost_at_start: int = 0
    interlaced_frames: int = 0
    retimed_frames: int = 0
    reused_frames: int = 0
    resumed_frames: int = 0
    error: str | None = None


@dataclass
class BatchReport:
    results: list[JobResult]
    seconds: float = 0.0
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def exit_status(self) -> int:
        return EXIT_SOME_FAILED if self.count("failed") else 0

    def summary(self) -> str:
        text = (f"{len(self.results)} jobs: {self.count('done')} done, {self.count('skipped')} skipped, "
                f"{self.count('failed')} failed in {self.seconds:.1f} s")
        return text + ("; interrupted" if self.interrupted else "")

    def write(self, path: Path) -> None:
        record = {"jobs": [dataclasses.asdict(r) for r in self.results],
                  "done": self.count("done"), "skipped": self.count("skipped"),
                  "failed": self.count("failed"), "seconds": round(self.seconds, 3),
                  "interrupted": self.interrupted}
        write_atomically(path, json.dumps(record, indent=2) + "\n")
