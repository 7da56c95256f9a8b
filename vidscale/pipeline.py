"""Where the engine meets the pictures: frames are tiled, run through compiled models, stitched."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import UpscaleSettings, check_settings
from .engine import Engine, EngineSettings, InferQueue, Upscaler, keep, recall
from .errors import MediaError, UsageError
from .media import (EncoderSettings, VideoFrame, VideoReader, VideoWriter, check_output, is_deep,
                    join_segments, output_pix_fmt, read_image)
from .models import LoadedModel, resolve
from .segments import (Cutter, LoneSegment, Resume, SegmentRecord, SegmentSink, WorkDir, remove_abandoned_work,
                       segment_starts)
from .tiling import TilePlan, choose_tile, plan_tiles, round_up, split, stitch
from .tuning import Choice, tuned

_SAMPLES = {np.dtype(np.uint8): "u8", np.dtype(np.uint16): "u16"}


def sample_type(dtype: np.dtype) -> str:
    """The engine's name for frames of this dtype."""
    sample = _SAMPLES.get(np.dtype(dtype))
    if sample is None:
        raise UsageError(f"frames must be uint8 or uint16 RGB arrays, not {np.dtype(dtype)}")
    return sample


# Frames decoded from a video to calibrate INT8 on, spread over the clip.
CALIBRATION_FRAMES = 8
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def calibration_frames(path: str | os.PathLike, count: int = CALIBRATION_FRAMES) -> list[np.ndarray]:
    """RGB frames of a picture, or `count` frames spread evenly over a video, for INT8 calibration.

    The video is decoded up to its last pick (no seeking: seeking lands on keyframes, which are not
    a fair sample, and not every input can seek).
    """
    if Path(path).suffix.lower() in _IMAGE_SUFFIXES:
        return [read_image(Path(path)).rgb]
    with VideoReader(path) as reader:
        step = max(1, (reader.expected_frames or count) // count)
        picked = []
        for event in reader.events():
            if isinstance(event, VideoFrame) and event.index % step == 0:
                picked.append(event.rgb)
                if len(picked) == count:
                    break
    return picked


class FrameUpscaler:
    """Upscales RGB frames held in numpy arrays: (H, W, 3) uint8 or uint16 in, (H*s, W*s, 3) out.

    Frames of any size may be mixed; each size gets its own tile plan and its own compiled model,
    so every request OpenVINO sees has exactly the shape it was compiled for. With precision
    "int8", `calibration` (RGB frames) or else `settings.calibration` (a file) is what the model is
    quantized on; with neither, a bundled synthetic set. The quality gate is measured on
    `evaluation` (frames like those to be upscaled) when given, else on the calibration.
    """

    def __init__(self, settings: UpscaleSettings = UpscaleSettings(), model: LoadedModel | None = None,
                 calibration: list[np.ndarray] | None = None, evaluation: list[np.ndarray] | None = None):
        check_settings(settings, "FrameUpscaler")
        if settings.overlap < 0:
            raise UsageError(f"overlap {settings.overlap} is negative; give --overlap 0 or more input pixels")
        self.model = model if model is not None else resolve(settings.model)
        native = self.model.spec.scale
        if settings.scale is None:
            settings = replace(settings, scale=native)
        self.settings = settings
        if settings.precision == "int8" and calibration is None and settings.calibration is not None:
            calibration = calibration_frames(settings.calibration)
        self.engine = Engine(self.model, EngineSettings(device=settings.device, precision=settings.precision,
                                                        cache_dir=settings.cache_dir), calibration, evaluation)
        self.engine.check_outscale(settings.scale)  # before any frame arrives
        self._plans: dict[tuple[int, int], TilePlan] = {}
        self._tuned: dict[tuple[int, int], Choice] = {}
        self._upscalers: OrderedDict[tuple[int, int, str], Upscaler] = OrderedDict()
        self._queues: OrderedDict[Upscaler, InferQueue] = OrderedDict()
        self._calls = threading.Lock()

    @property
    def scale(self) -> int:
        return self.settings.scale

    def plan(self, height: int, width: int, sample: str = "u8") -> TilePlan:
        """The tile plan for frames of this size and sample type (one tile shape, chosen once each:
        a deep frame may run at another precision, which needs another amount of memory)."""
        key = (height, width, sample)
        plan = self._plans.get(key)
        if plan is None:
            multiple = self.model.spec.size_multiple
            tile = self.settings.tile
            if tile is None:
                max_pixels = max(1, self.settings.memory_budget // self.engine.activation_bytes_per_pixel(sample))
                if self.settings.tune:
                    choice = tuned(self.engine, height, width, outscale=self.scale, overlap=self.settings.overlap,
                                   max_pixels=max_pixels, sample=sample)
                    self._tuned[key] = choice
                    tile = choice.tile
                else:
                    tile = choose_tile(height, width, max_pixels=max_pixels, multiple=multiple,
                                       overlap=self.settings.overlap)
            else:
                tile = tuple(round_up(t, multiple) for t in tile)
            try:
                plan = plan_tiles(height, width, tile, overlap=self.settings.overlap, scale=self.scale,
                                  multiple=multiple)
            except ValueError as exc:
                raise UsageError(f"cannot tile a {width}x{height} frame: {exc}; "
                                 f"use a larger --tile or a smaller --overlap") from exc
            self._plans[key] = plan
        return plan

    def upscaler_for(self, plan: TilePlan, sample: str) -> Upscaler:
        """The compiled model for this plan's tiles: with --tune, compiled and queued as measured
        fastest (streams, tiles per request, requests in flight)."""
        key = (plan.height, plan.width, sample)
        upscaler = recall(self._upscalers, key)
        if upscaler is None:
            choice = self._tuned.get(key)
            options = {} if choice is None else {"streams": choice.streams, "batch": choice.batch,
                                                 "requests": choice.requests}
            upscaler = keep(self._upscalers, key, self.engine.upscaler(plan.tile_shape, outscale=self.scale,
                                                                        sample=sample, **options))
        return upscaler

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """One frame upscaled. Calls from several threads run one at a time (each already keeps
        every core busy): they share the compiled models' requests."""
        if not isinstance(frame, np.ndarray):
            raise UsageError(f"frames must be numpy arrays, (height, width, 3) RGB; got {type(frame).__name__}")
        sample = sample_type(frame.dtype)
        if frame.ndim != 3 or frame.shape[2] != 3 or not frame.size:
            raise UsageError(f"frames must be (height, width, 3) RGB arrays, got shape {frame.shape}")
        with self._calls:
            return self._upscaled(frame, sample)

    def _upscaled(self, frame: np.ndarray, sample: str) -> np.ndarray:
        plan = self.plan(frame.shape[0], frame.shape[1], sample)
        upscaler = self.upscaler_for(plan, sample)
        tiles = split(plan, frame)
        if tiles.shape == upscaler.input_shape:
            return stitch(plan, upscaler(tiles))
        results = np.empty((len(plan), *upscaler.output_shape[1:]), upscaler.dtype)
        queue = self._queue(upscaler)
        submit_tiles(queue, tiles, results)
        queue.wait_all()
        return stitch(plan, results)

    def _queue(self, upscaler: Upscaler) -> InferQueue:
        queue = recall(self._queues, upscaler)
        if queue is None:
            queue = keep(self._queues, upscaler, upscaler.queue(_store_tile))
        return queue


def submit_tiles(queue: InferQueue, tiles: np.ndarray, target) -> None:
    """Submit a frame's tiles, as many per request as the model was compiled for; a short last
    request is filled up with copies of its last tile, whose outputs are dropped. The callback
    gets (target, index of the request's first tile)."""
    batch = queue.upscaler.input_shape[0]
    for first in range(0, len(tiles), batch):
        chunk = tiles[first : first + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        queue.submit(chunk, (target, first))


def _place(results: np.ndarray, first: int, output: np.ndarray) -> int:
    """Copy a request's outputs, tiles `first` on, into `results`; how many tiles it held.

    A copy rather than each request writing into the frame's buffer: a 2560x1920 frame copies in
    about 2 ms, 0.2% of the second its inference takes on two cores."""
    count = min(len(output), len(results) - first)
    results[first : first + count] = output[:count]
    return count


def _store_tile(target: tuple[np.ndarray, int], output: np.ndarray) -> None:
    _place(*target, output)


# Frames between the decoder and the encoder at any moment (decoded, in inference, awaiting
# encode). Enough to keep every inference request busy, small enough that memory does not grow
# with the length of the video.
MAX_FRAMES_IN_FLIGHT = 6
_DECODED_QUEUE = 4
_BLOCK = 8
_POLL = 0.1
_END = object()


@dataclass(frozen=True)
class VideoResult:
    """What one video run did; every count comes from the run itself."""

    output: str
    frames: int
    seconds: float
    corrupt_packets: int
    retimed_frames: int
    reused_frames: int
    """Frames that matched the last inferred frame and reused its output (see frames_match)."""
    resumed_frames: int = 0
    """Frames of segments an earlier, stopped run had completed, taken as they were."""
    setup_seconds: float = 0.0
    """Part of `seconds` spent before the first frame: loading, converting and compiling the model,
    opening input and output. Per run, not per frame, so a long video hides it."""
    lost_at_start: int = 0
    """Video packets at the start of the input that gave no picture (see VideoReader)."""
    interlaced_frames: int = 0
    """Frames flagged interlaced, upscaled as woven pictures (see VideoReader)."""

    @property
    def fps(self) -> float:
        """Frames this run made per second (those resumed from an earlier run cost it nothing)."""
        made = self.frames - self.resumed_frames
        return made / self.seconds if self.seconds > 0 else 0.0


# How long stage threads get to stop after a failure before they are left where they are.
_STUCK_SECONDS = 5.0


class _Run:
    """Shared state of one run: the first error wins and stops every stage."""

    def __init__(self):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def put(self, q: queue.Queue, item) -> bool:
        """Put into a bounded queue unless the run stops while waiting."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def get(self, q: queue.Queue):
        while not self.stop.is_set():
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue
        return _END

    def wait(self, event: threading.Event) -> bool:
        while not event.wait(_POLL):
            if self.stop.is_set():
                return False
        return True

    def acquire(self, semaphore: threading.Semaphore) -> bool:
        while not semaphore.acquire(timeout=_POLL):
            if self.stop.is_set():
                return False
        return True


def frames_match(frame: np.ndarray, reference: np.ndarray, threshold: float) -> bool:
    """Whether `frame` may reuse the upscaled `reference` instead of going through the model.

    threshold 0 means identical samples only. Otherwise the frame matches when no 8x8 block's
    mean absolute difference exceeds `threshold` 8-bit code values: compression noise on a held
    drawing stays under it, while a small moving detail (an eye, a mouth) fills a block with a
    large mean and is never lost in a whole-frame average.
    """
    if threshold == 0:
        return np.array_equal(frame, reference)
    difference = np.abs(frame.astype(np.int32) - reference).sum(axis=2)
    h, w = difference.shape
    rows, cols = np.arange(0, h, _BLOCK), np.arange(0, w, _BLOCK)
    block_sums = np.add.reduceat(np.add.reduceat(difference, rows, axis=0), cols, axis=1)
    block_sizes = np.outer(np.diff(np.append(rows, h)), np.diff(np.append(cols, w))) * frame.shape[2]
    peak = 65535 if frame.dtype == np.uint16 else 255
    return bool((block_sums / block_sizes).max() * (255 / peak) <= threshold)


class _ReusedFrame:
    """A frame that matched the last inferred one: the encoder writes that output again at this pts."""

    __slots__ = ("index", "pts", "duration")

    def __init__(self, index: int, pts: int, duration: int):
        self.index, self.pts, self.duration = index, pts, duration


class _Cut:
    """A segment starts with the next frame (see segments.Cutter)."""

    __slots__ = ("index", "pts", "decoded_before")

    def __init__(self, index: int, pts: int, decoded_before: int):
        self.index, self.pts, self.decoded_before = index, pts, decoded_before


_SKIPPED = object()  # a frame of a segment an earlier run completed


class _PendingFrame:
    """A frame whose tiles are in inference; the OpenVINO callbacks fill it, the encoder waits."""

    __slots__ = ("index", "pts", "duration", "results", "done", "_remaining", "_lock")

    def __init__(self, index: int, pts: int, duration: int, results: np.ndarray):
        self.index, self.pts, self.duration, self.results = index, pts, duration, results
        self.done = threading.Event()
        self._remaining = len(results)
        self._lock = threading.Lock()

    def store(self, first: int, output: np.ndarray) -> None:
        count = _place(self.results, first, output)
        with self._lock:
            self._remaining -= count
            finished = self._remaining == 0
        if finished:
            self.done.set()


def _store_pending(target: tuple[_PendingFrame, int], output: np.ndarray) -> None:
    pending, first = target
    pending.store(first, output)


def upscale_video(source, destination, settings: UpscaleSettings = UpscaleSettings(),
                  encoder: EncoderSettings = EncoderSettings(), *, strict: bool = False,
                  overwrite: bool = False, progress=None, resume: Resume | None = None,
                  on_commit: Callable[[Path, int], None] | None = None) -> VideoResult:
    """Upscale the first video stream of `source` into `destination`, copying every other stream.

    source/destination: paths, or "-" for stdin/stdout. Threads: a decoder feeding a bounded
    queue; this thread tiling frames into the AsyncInferQueue; an encoder writing frames strictly
    in order (and the other streams' packets where they were in the input). The first error in
    any of them stops all, in-flight requests are drained, the partial output is removed, and the
    error is raised here. Frames written must equal frames decoded, or the run fails.

    With `resume`, a file input longer than one segment is upscaled in segments kept beside the
    output (see segments.py): a run stopped in any way continues where it stopped when run again.
    `on_commit`: see VideoWriter.
    """
    from .progress import Progress

    progress = progress or Progress()
    started = time.monotonic()
    if resume is not None and not (_is_file(source) and destination != "-"):
        raise UsageError("only a file can be upscaled resumably (into a file): a pipe cannot be read "
                         "again after a stop; drop --resume or give file paths")
    if destination != "-":
        # stdin may be a file redirected in (< ep01.mkv), which the output would replace as it is read.
        inputs = [Path(source)] if _is_file(source) else [Path("/dev/stdin")] if source == "-" else []
        check_output(Path(destination), inputs, overwrite)
    calibration = evaluation = None
    if settings.precision == "int8" and _is_file(source):
        # The gate judges INT8 on the input itself, whatever it was calibrated on. A pipe cannot be
        # read twice: it gets the --calibration file or the bundled set, judged on itself.
        evaluation = calibration_frames(source)
        calibration = evaluation if settings.calibration is None else None
    # Model, device and INT8 gate problems surface before any output is opened.
    frame_upscaler = FrameUpscaler(settings, calibration=calibration, evaluation=evaluation)
    with VideoReader(source, strict=strict) as reader, ExitStack() as held:
        plan, model, encoder = _prepare(frame_upscaler, reader, encoder)
        out_h, out_w = plan.out_shape
        if resume is not None and _longer_than(reader, resume.segment_seconds):
            return _upscale_in_segments(reader, source, Path(destination), encoder, (out_w, out_h), plan,
                                        model, progress, settings.dedup, resume, started, strict, on_commit,
                                        overwrite)
        # In one piece, its work directory is still held as a segmented run holds it: a batch
        # overlapping this one (a timer's next run) then leaves the job to it instead of making
        # the same output and failing on it. Nothing is kept there: the directory goes however
        # the run ends, while the lock is still held.
        if resume is not None:
            held.callback(held.enter_context(WorkDir(Path(destination), resume)).remove)
        with VideoWriter(destination, reader, out_w, out_h, encoder, on_commit=on_commit,
                         replace=overwrite) as writer:
            progress.start(reader.expected_frames, reader.label)
            ready = time.monotonic()
            try:
                decoded, reused = _run_stages(reader, writer, plan, model, progress, settings.dedup)
            finally:
                progress.close()
            if writer.frames_written != decoded:
                raise MediaError(f"wrote {writer.frames_written} frames but decoded {decoded}; "
                                 f"the output is incomplete and was not kept")
        if resume is None and destination != "-":
            remove_abandoned_work(Path(destination))
        return VideoResult(output=str(destination), frames=decoded, seconds=time.monotonic() - started,
                           corrupt_packets=reader.corrupt_packets, retimed_frames=writer.retimed_frames,
                           reused_frames=reused, setup_seconds=ready - started,
                           lost_at_start=reader.lost_at_start, interlaced_frames=len(reader.interlaced_at))


def _prepare(frame_upscaler: FrameUpscaler, reader: VideoReader,
             encoder: EncoderSettings) -> tuple[TilePlan, Upscaler, EncoderSettings]:
    """The tile plan and compiled model for `reader`'s frames, and the encoder settings with the
    output pixel format settled (its depth decides the depth frames are decoded at)."""
    pix_fmt = output_pix_fmt(encoder.codec, encoder, reader.info)
    reader.deep = is_deep(pix_fmt)
    sample = "u16" if reader.deep else "u8"
    plan = frame_upscaler.plan(reader.info.height, reader.info.width, sample)
    model = frame_upscaler.upscaler_for(plan, sample)
    return plan, model, replace(encoder, pix_fmt=pix_fmt)


@dataclass(frozen=True)
class SegmentResult:
    """What upscale_segment did."""

    record: SegmentRecord | None
    """None when no frame of the source falls in the segment."""
    corrupt_packets: int
    retimed_frames: int
    reused_frames: int
    lost_at_start: int
    """Counted by the first segment only."""
    interlaced_frames: int


def upscale_segment(source: Path, target: Path, starts: list[int], index: int, frame_upscaler: FrameUpscaler,
                    encoder: EncoderSettings = EncoderSettings(), *, strict: bool = False,
                    after: tuple[int, int] | None = None) -> SegmentResult:
    """Upscale segment `index` alone, of the segments starting at `starts` (segments.segment_starts
    of `source`), into `target`, decoding from the keyframe it starts at: one piece of a long
    video upscaled on a machine of its own (distributed.py). The file and record are those the
    segmented upscale_video makes for this segment when `after` is what it is there, the
    (source pts, written pts) of the previous segment's last frame; None when unknown, which
    only matters when that frame's timestamp was moved as far as this segment's first.
    `frame_upscaler` may serve many segments (compiling a model for a shape takes seconds).
    """
    from .progress import Progress

    with VideoReader(source, strict=strict) as reader:
        plan, model, encoder = _prepare(frame_upscaler, reader, encoder)
        out_h, out_w = plan.out_shape
        window = _Window(reader, starts[index] if index else None,
                         starts[index + 1] if index + 1 < len(starts) else None)
        lone = LoneSegment(target)
        with SegmentSink(lone, lambda path, _: VideoWriter(path, reader, out_w, out_h, encoder, segment=True,
                                                           after=after)) as sink:
            decoded, reused = _run_stages(window, sink, plan, model, Progress(),
                                          frame_upscaler.settings.dedup, Cutter(starts, {}, first=index))
            sink.finish(decoded)
    # The decoder reads a few packets past both ends of the window (pictures out of order), so a
    # broken packet near an edge is seen by two segments.
    corrupt = sum(1 for pts in reader.corrupt_at if pts is None or window.holds(pts))
    interlaced = sum(1 for pts in reader.interlaced_at if pts is None or window.holds(pts))
    return SegmentResult(lone.records.get(index), corrupt, sink.retimed_frames, reused,
                         reader.lost_at_start if index == 0 else 0, interlaced)


class _Window:
    """The frames of a reader from pts `start` (None: the first) up to, not including, `end`
    (None: the last), for _run_stages; other streams are left to the join. The reader is sought
    to `start`, which must be a keyframe's pts."""

    def __init__(self, reader: VideoReader, start: int | None, end: int | None):
        self._reader, self._start, self._end = reader, start, end
        if start is not None:
            reader.seek(start)

    def abandon(self) -> None:
        self._reader.abandon()

    def holds(self, pts: int) -> bool:
        return (self._start is None or pts >= self._start) and (self._end is None or pts < self._end)

    def events(self):
        first = True
        for event in self._reader.events():
            if not isinstance(event, VideoFrame):
                continue
            if first and self._start is not None and event.pts > self._start:
                raise MediaError(f"{self._reader.label}: seeking to pts {self._start} landed at "
                                 f"{event.pts}, past it; remux it into .mkv, which has an index")
            first = False
            if self._end is not None and event.pts >= self._end:
                return
            if self.holds(event.pts):
                yield event


def _is_file(source) -> bool:
    """A named file rather than stdin ("-") or an open file object."""
    return isinstance(source, (str, os.PathLike)) and source != "-"


def _longer_than(reader: VideoReader, seconds: float) -> bool:
    """Whether the video may hold more than one segment (an unknown duration may)."""
    return reader.duration is None or reader.duration > seconds


def _upscale_in_segments(reader: VideoReader, source, destination: Path, encoder: EncoderSettings,
                         size: tuple[int, int], plan: TilePlan, model: Upscaler, progress,
                         dedup: float | None, resume: Resume, started: float, strict: bool,
                         on_commit: Callable[[Path, int], None] | None, overwrite: bool) -> VideoResult:
    """upscale_video in segments: those complete from an earlier run are kept, the others are
    upscaled, then all are joined into `destination` and the work directory is removed."""
    out_w, out_h = size
    with WorkDir(destination, resume) as work:
        starts = segment_starts(Path(source), resume.segment_seconds, reader.info.time_base)
        # The segments an earlier run completed from the start on are sought past, not decoded.
        first = next((i for i in range(len(starts)) if i not in work.records), len(starts))
        with SegmentSink(work, lambda path, after: VideoWriter(path, reader, out_w, out_h, encoder,
                                                               segment=True, after=after)) as sink:
            sink.passed(range(first))
            progress.start(reader.expected_frames, reader.label)
            ready = time.monotonic()
            decoded = reused = 0
            try:
                if first < len(starts):
                    events = _Window(reader, starts[first], None) if first > 0 else reader
                    decoded, reused = _run_stages(events, sink, plan, model, progress, dedup,
                                                  Cutter(starts, work.records, first))
            finally:
                progress.close()
            sink.finish(decoded)
        frames = sink.frames_written
        # A reader of its own: the other streams are copied from the start of the file.
        with VideoReader(source, strict=strict) as again:
            join_segments(destination, again, encoder, work.encoded(sink.indices), frames, on_commit,
                          replace=overwrite)
        # Under its lock: a run that took the directory in between would see it vanish mid-run.
        work.remove()
    return VideoResult(output=str(destination), frames=frames, seconds=time.monotonic() - started,
                       corrupt_packets=reader.corrupt_packets, retimed_frames=sink.retimed_frames,
                       reused_frames=reused, resumed_frames=sink.resumed_frames, setup_seconds=ready - started,
                       lost_at_start=reader.lost_at_start, interlaced_frames=len(reader.interlaced_at))


def _run_stages(reader: VideoReader | _Window, writer: VideoWriter | SegmentSink, plan: TilePlan, model: Upscaler,
                progress, dedup: float | None, cutter: Cutter | None = None) -> tuple[int, int]:
    """Run decode, inference and encode concurrently; returns (frames decoded, frames reused).

    With a `cutter`, `writer` is a SegmentSink: it is told where segments start, frames of
    segments already complete skip inference, and other streams' packets are left to the join.
    """
    run = _Run()
    decoded_queue: queue.Queue = queue.Queue(maxsize=_DECODED_QUEUE)
    ordered: queue.Queue = queue.Queue()  # bounded by the frame semaphore and demux interleaving
    slots = threading.Semaphore(MAX_FRAMES_IN_FLIGHT)
    inference = model.queue(_store_pending)
    result_shape = (len(plan), *model.output_shape[1:])

    def decode():
        try:
            for event in reader.events():
                if not run.put(decoded_queue, event):
                    return
            run.put(decoded_queue, _END)
        except BaseException as exc:  # noqa: BLE001 - handed to the owner
            run.fail(exc)

    def encode():
        upscaled = None
        try:
            while (item := run.get(ordered)) is not _END:
                if isinstance(item, _PendingFrame):
                    if not run.wait(item.done):
                        return
                    upscaled = stitch(plan, item.results)
                    writer.write_frame(upscaled, item.pts, item.duration)
                    slots.release()
                    progress.update(writer.frames_written)
                elif isinstance(item, _ReusedFrame):
                    # Frames are written in order, so the last one written is the reference.
                    writer.write_frame(upscaled, item.pts, item.duration)
                    progress.update(writer.frames_written)
                elif item is _SKIPPED:
                    writer.skip()
                    progress.update(writer.frames_written)
                elif isinstance(item, _Cut):
                    writer.start(item.index, item.pts, item.decoded_before)
                else:
                    writer.write_packet(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the owner
            run.fail(exc)

    threads = [threading.Thread(target=decode, name="vidscale-decode", daemon=True),
               threading.Thread(target=encode, name="vidscale-encode", daemon=True)]
    for thread in threads:
        thread.start()
    frames = reused = 0
    reference = None
    skipping = False
    try:
        while (event := run.get(decoded_queue)) is not _END:
            if not isinstance(event, VideoFrame):
                if cutter is None:
                    ordered.put(event)
                continue
            frames += 1
            if cutter is not None:
                if cutter.cut(event):
                    # A segment may be done again on its own, so it must not depend on frames
                    # of the one before: its first frame always goes through the model.
                    reference = None
                    skipping = cutter.done(cutter.index)
                    ordered.put(_Cut(cutter.index, event.pts, frames - 1))
                if skipping:
                    ordered.put(_SKIPPED)
                    continue
            # Compared with the last frame that went through the model, not the previous one,
            # so a slow fade cannot creep past the threshold one small step at a time.
            if dedup is not None and reference is not None and frames_match(event.rgb, reference, dedup):
                ordered.put(_ReusedFrame(event.index, event.pts, event.duration))
                reused += 1
                continue
            reference = event.rgb
            if not run.acquire(slots):
                break
            pending = _PendingFrame(event.index, event.pts, event.duration, np.empty(result_shape, model.dtype))
            submit_tiles(inference, split(plan, event.rgb), pending)
            ordered.put(pending)
        ordered.put(_END)
        inference.wait_all()
    except BaseException as exc:
        run.fail(exc)
    finally:
        if run.error is not None:
            run.stop.set()
            try:
                inference.wait_all()  # drain: requests still write into frames we own
            except BaseException:  # noqa: BLE001 - the first error is the one reported
                pass
        deadline = time.monotonic() + _STUCK_SECONDS
        for thread in threads:
            # After a failure the decoder may sit in a blocking read of a pipe that stays quiet,
            # the encoder in a blocking write to a reader that stopped reading; they are daemon
            # threads and must not keep the run from reporting the error.
            thread.join(timeout=None if run.error is None else max(deadline - time.monotonic(), 0))
        decoding, encoding = (thread.is_alive() for thread in threads)
        # Closing a container under a thread stuck in it would crash the process: it stays open,
        # and the CLI exits without waiting for the thread (cli.entry).
        if decoding:
            reader.abandon()
        if encoding:
            writer.abandon()
    if run.error is not None:
        raise run.error
    return frames, reused
