"""Resumable runs: a long video is upscaled in segments that start at keyframes of the source and
are kept in a work directory beside the output, so a run stopped by a crash, kill -9 or a power
cut continues from its last complete segment. When all are done, their video packets are joined
without re-encoding and every other stream is copied once from the source (media.join_segments).

The work directory, `<output>.vidscale-work/`:

    state.json          what it was made for: input fingerprint, settings digest, segment length;
                        a directory made for anything else is emptied and started afresh
    lock                held (flock) by the run using it, so two runs cannot mix their segments
    segment-00003.mkv   one segment's upscaled video, in the output's container (so its encoder
                        is set up exactly as the final output's)
    segment-00003.json  its record, written atomically after the segment file was complete and its
                        frame count matched: first pts, frames, exact packet timestamps, headers

A segment file without a record and temporary files are what a stopped run left: deleted, and
the segment is done again, as is one that holds fewer packets than its record says (damaged).
Segments start at keyframe packets of the source (the first, then the first at least
`segment_seconds` after the current segment's start; see segment_starts), read from the file
before decoding, so every run over the same input, and every machine upscaling one
segment of it on its own (distributed.py), cuts in the same places.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

from .config import DEFAULT_SEGMENT_SECONDS
from .errors import MediaError, UsageError
from .media import EncodedSegment, VideoFrame, VideoWriter, atomic_output, keyframe_pts, video_packet_count

WORK_SUFFIX = ".vidscale-work"
_STATE, _LOCK = "state.json", "lock"


class WorkInUse(UsageError):
    """Another run holds the work directory: it is making this output now."""


@dataclass(frozen=True)
class Resume:
    """Run in segments that survive the process. `key` says who the input and settings are (see
    jobs.resume_for); segments are kept only for the same key and segment length."""

    key: dict
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS


def work_dir_for(output: Path) -> Path:
    return output.with_name(output.name + WORK_SUFFIX)


def remove_abandoned_work(output: Path) -> None:
    """Delete the work directory a stopped resumable run left beside `output` (gigabytes, for an
    episode), now that another run has written `output` whole; one a live run holds stays."""
    path = work_dir_for(output)
    try:
        lock = open(path / _LOCK)
    except OSError:
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class SegmentRecord:
    index: int
    first_pts: int
    frames: int
    last: tuple[int, int]
    """(source pts, written pts) of its last frame: where the next segment's timestamps go on."""
    packets: list[tuple[int, int | None, int]]
    extradata: bytes

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "first_pts": self.first_pts, "frames": self.frames,
                           "last": self.last, "packets": self.packets, "extradata": self.extradata.hex()})

    @classmethod
    def from_json(cls, text: str) -> SegmentRecord:
        data = json.loads(text)
        return cls(index=data["index"], first_pts=data["first_pts"], frames=data["frames"],
                   last=tuple(data["last"]), packets=[tuple(p) for p in data["packets"]],
                   extradata=bytes.fromhex(data["extradata"]))


class WorkDir:
    """The work directory of one output, locked while open; a context manager."""

    def __init__(self, output: Path, resume: Resume):
        self.output = output
        self.path = work_dir_for(output)
        self.path.mkdir(exist_ok=True)
        self._lock = open(self.path / _LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise WorkInUse(f"another vidscale run is working on {output} (it holds {self.path}); "
                            f"wait for it to finish") from None
        # Through JSON and back, so the comparison with what a file holds is like for like.
        key = json.loads(json.dumps({**resume.key, "segment_seconds": resume.segment_seconds}))
        try:
            fresh = json.loads((self.path / _STATE).read_text()) != key
        except (OSError, ValueError):
            fresh = True
        if fresh:
            self._clear(keep=set())
            with atomic_output(self.path / _STATE) as tmp:
                tmp.write_text(json.dumps(key))
        self.records = self._load()

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *exc) -> None:
        self._lock.close()  # the flock goes with it; a killed process loses it the same way

    def segment_path(self, index: int) -> Path:
        return self.path / f"segment-{index:05d}{self.output.suffix}"

    def _record_path(self, index: int) -> Path:
        return self.path / f"segment-{index:05d}.json"

    def _load(self) -> dict[int, SegmentRecord]:
        records = {}
        for path in sorted(self.path.glob("segment-*.json")):
            try:
                record = SegmentRecord.from_json(path.read_text())
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: the segment is done again
            # A segment file that lost its end or cannot be read (a disk fault, a copy cut
            # short) is done again rather than failing the join on every run.
            if (self._record_path(record.index) == path
                    and video_packet_count(self.segment_path(record.index)) == len(record.packets)):
                records[record.index] = record
        keep = {_STATE, _LOCK} | {p.name for i in records
                                  for p in (self.segment_path(i), self._record_path(i))}
        self._clear(keep)
        return records

    def _clear(self, keep: set[str]) -> None:
        for path in self.path.iterdir():
            if path.name not in keep and path.name != _LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def complete(self, record: SegmentRecord) -> None:
        """Mark a segment whose file is in place as complete (the record is the mark)."""
        with atomic_output(self._record_path(record.index)) as tmp:
            tmp.write_text(record.to_json())
        self.records[record.index] = record

    def discard(self, index: int) -> None:
        """Forget a complete segment: it is done again."""
        self.records.pop(index, None)
        self._record_path(index).unlink(missing_ok=True)
        self.segment_path(index).unlink(missing_ok=True)

    def encoded(self, indices: list[int]) -> list[EncodedSegment]:
        return [EncodedSegment(self.segment_path(i), self.records[i].packets, self.records[i].extradata)
                for i in indices]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def segment_starts(path: Path, seconds: float, time_base: Fraction) -> list[int]:
    """The pts (video time base) each segment of `path` starts at: its first keyframe, then the
    first keyframe `seconds` or more after the start of the segment before."""
    # Through str: Fraction(0.2) is the binary float just above 0.2, which would pass over a
    # keyframe exactly 0.2 s on.
    ticks = Fraction(str(seconds)) / time_base
    starts: list[int] = []
    for pts in keyframe_pts(path):
        if not starts or pts - starts[-1] >= ticks:
            starts.append(pts)
    # A stream whose packets carry no keyframe flag is one segment, begun by its first frame.
    return starts or [0]


class Cutter:
    """Tells, frame by frame in presentation order, where the segments that start at `starts`
    (see segment_starts) begin: the first frame given begins segment `first`, a frame at or after
    a later segment's start begins that one. A segment no frame falls in is passed over."""

    def __init__(self, starts: list[int], records: dict[int, SegmentRecord], first: int = 0):
        self._starts = starts
        self._records = records
        self._first = first
        self.index = -1

    def cut(self, frame: VideoFrame) -> bool:
        """Whether `frame` starts a new segment (then numbered `index`)."""
        if self.index < 0:
            self.index = self._first
            return True
        following = self.index
        while following + 1 < len(self._starts) and frame.pts >= self._starts[following + 1]:
            following += 1
        if following == self.index:
            return False
        self.index = following
        return True

    def done(self, index: int) -> bool:
        return index in self._records


class LoneSegment:
    """Stands in for a WorkDir where one segment is upscaled on its own (a Ray task): the segment
    is written to `path` and its record kept here, for the caller to hand on."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[int, SegmentRecord] = {}

    def segment_path(self, index: int) -> Path:
        return self.path

    def complete(self, record: SegmentRecord) -> None:
        self.records[record.index] = record


class SegmentSink:
    """What the encode thread writes to in a resumable run, in place of one VideoWriter: frames
    go to the current segment's writer; frames of a segment an earlier run completed are only
    counted against its record. Other streams are not written here: they are copied once over
    the whole file when the segments are joined. A context manager: leaving it on an error
    discards the segment being written."""

    def __init__(self, work: WorkDir | LoneSegment, open_writer: Callable[[Path, tuple[int, int] | None], VideoWriter]):
        self.work = work
        self._open_writer = open_writer
        self.indices: list[int] = []
        self.frames_written = self.retimed_frames = self.resumed_frames = 0
        self._passed_frames = 0
        self._current: int | None = None
        self._writer: VideoWriter | None = None
        self._first_pts = 0
        self._segment_frames = 0
        self._last: tuple[int, int] | None = None

    def __enter__(self) -> SegmentSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is not None and exc is not None:
            self._writer.__exit__(exc_type, exc, tb)

    def abandon(self) -> None:
        if self._writer is not None:
            self._writer.abandon()

    def passed(self, indices: range) -> None:
        """Segments complete from an earlier run that decoding starts after (a seek past them)."""
        for index in indices:
            record = self.work.records[index]
            self.indices.append(index)
            self.frames_written += record.frames
            self.resumed_frames += record.frames
            self._passed_frames += record.frames
            self._last = record.last

    def start(self, index: int, first_pts: int, decoded_before: int) -> None:
        """Segment `index` starts with the frame at `first_pts`, after `decoded_before` frames."""
        self.finish(decoded_before)
        self._current = index
        self.indices.append(index)
        self._first_pts, self._segment_frames = first_pts, 0
        record = self.work.records.get(index)
        if record is None:
            self._writer = self._open_writer(self.work.segment_path(index), self._last)
        elif record.first_pts != first_pts:
            self._mismatch(index, f"starts at pts {first_pts}, its record at {record.first_pts}")

    def write_frame(self, rgb, pts: int, duration: int = 0) -> None:
        self._writer.write_frame(rgb, pts, duration)
        self._segment_frames += 1
        self.frames_written += 1

    def skip(self) -> None:
        """A frame of a segment complete from an earlier run."""
        self._segment_frames += 1
        self.frames_written += 1
        self.resumed_frames += 1

    def finish(self, decoded: int) -> None:
        """End the current segment, once `decoded` frames were decoded in all (by this run): a
        new one is marked complete only when every frame decoded for it was encoded into it."""
        if self._current is None:
            return
        index, written = self._current, self.frames_written - self._passed_frames
        if written != decoded:
            raise MediaError(f"segment {index} got {written} of {decoded} decoded frames; it was not kept")
        writer, self._writer = self._writer, None
        if writer is None:
            record = self.work.records[index]
            if record.frames != self._segment_frames:
                self._mismatch(index, f"has {self._segment_frames} frames, its record {record.frames}")
        else:
            writer.close()
            if len(writer.packets) != self._segment_frames:
                raise MediaError(f"segment {index}: the encoder gave {len(writer.packets)} packets for "
                                 f"{self._segment_frames} frames; it was not kept")
            record = SegmentRecord(index, self._first_pts, self._segment_frames, writer.last_pts,
                                   writer.packets, writer.extradata)
            self.work.complete(record)
            self.retimed_frames += writer.retimed_frames
        self._last = record.last

    def _mismatch(self, index: int, what: str):
        raise MediaError(f"segment {index} in {self.work.path} does not match the input ({what}); "
                         f"delete that directory and run again")
