"""A batch on Ray (`vidscale batch --ray [ADDRESS]`): every segment of every job (segments.py:
pieces of about --segment-seconds that start at source keyframes) is one Ray task, upscaled by
pipeline.upscale_segment wherever the cluster has room, and this driver assembles each output
as a local run does. Segments are kept in the work directory beside the output as they come in
(so a stopped batch, this driver included, resumes from them), then joined with every other
stream copied once, the frame count checked, the output renamed into place and its sidecar
written; the report and exit status are those of a local batch.

Ray is optional (`pip install 'vidscale[ray]'`) and imported only here, only with --ray.

Storage:
- "shared" (the default): every machine sees the inputs, the outputs' work directories and a
  model file given as a file under the same absolute paths (one NFS/SMB mount at the same place
  everywhere). Tasks read the input and write their segment into the work directory.
- "object-store": only this machine sees them. Each input (and a model file) goes into Ray's
  object store once, each machine writes it to its temporary directory once for its tasks, and
  segments come back to this machine as task results.
Each machine converts a catalog model into its own cache once.

Faults: a task whose worker process or machine is lost is run again by Ray (MAX_RETRIES); only
that segment is upscaled again. A segment that fails for a reason of its own (bad input, a full
disk) comes back as an error, not as an exception, so it is never retried: its job fails once,
and that job's other tasks are cancelled.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import UsageError, first_line
from .config import RAY_STORAGES
from .jobs import (BatchInterrupted, BatchReport, Job, JobResult, failed_result, failure_message,
                   interrupted_result, output_mismatch, prepare_output, resume_for, sidecar_writer,
                   stale_output_result)
from .media import VideoReader, atomic_output, check_output, join_segments
from .pipeline import FrameUpscaler, SegmentResult, calibration_frames, upscale_segment
from .segments import DEFAULT_SEGMENT_SECONDS, WorkDir, segment_starts

# Attempts after the first for a segment whose worker was lost (process killed, machine gone).
MAX_RETRIES = 3
# Each task is named this, its input's file name and its segment: for `ray list tasks`, the
# dashboard and the worker's process title.
TASK_PREFIX = "vidscale "
# How long a stopped batch waits for its cancelled tasks to end.
_CANCEL_SECONDS = 30.0
_POLL_SECONDS = 0.2
# Where a machine keeps the inputs of an object-store batch, under its temporary directory.
_STAGING = "vidscale-ray"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray, which is not installed: pip install 'vidscale[ray]'") from None
    return ray


def run_jobs_on_ray(jobs: list[Job], *, address: str = "local", cpus: int | None = None,
                    overwrite: bool = False, segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
                    storage: str = "shared", on_start=lambda job: None,
                    on_result=lambda job, result: None) -> BatchReport:
    """Like jobs.run_jobs, with the segments of the jobs run as Ray tasks, as many at once as
    the cluster has room for. `address`: "local" starts a Ray instance on this machine (stopped
    at the end); "auto" or HOST:PORT joins a running cluster. A process already connected to Ray
    (ray.init called) keeps its connection. `cpus`: CPUs each task claims; by default all of the
    smallest machine's, so each machine upscales one segment at a time (OpenVINO uses every core
    of the machine it runs on). `storage`: see the module's docstring.
    """
    if storage not in RAY_STORAGES:
        raise UsageError(f"Ray storage {storage!r} is not known; use {' or '.join(RAY_STORAGES)}")
    ray = _import_ray()
    started_ray = _connect(ray, address)
    try:
        return _Driver(ray, _cpus_per_task(ray, cpus), storage, overwrite, segment_seconds,
                       on_start, on_result).run(jobs)
    finally:
        if started_ray:
            ray.shutdown()


def _connect(ray, address: str) -> bool:
    """Connect this process to Ray; whether it started Ray (and so must stop it)."""
    if ray.is_initialized():
        return False
    # ray.init puts in a SIGTERM handler that exits at once; ours must stay, so that SIGTERM stops
    # a batch as Ctrl-C does (its jobs stopped, the report written, exit status 143).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    # Workers' own output stays in Ray's logs (/tmp/ray/session_latest/logs on each machine): people
    # read one line per job here, and a job's failure comes back in its result.
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (OSError, RuntimeError, ValueError) as exc:  # ConnectionError, TimeoutError among them
        raise UsageError(f"cannot join the Ray cluster at {address} ({first_line(exc)}); start it with "
                         f"`ray start --head` or check the address") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return True


def _machines(ray) -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0]


def _cpus_per_task(ray, cpus: int | None) -> int:
    machines = [int(node["Resources"]["CPU"]) for node in _machines(ray)]
    if not machines:
        raise UsageError("the Ray cluster has no machine with CPUs; start workers with `ray start --address=...`")
    if cpus is None:
        return min(machines)
    if cpus > max(machines):
        # Ray would keep such tasks waiting for ever.
        raise UsageError(f"--ray-cpus {cpus} is more than any machine of the Ray cluster has "
                         f"(at most {max(machines)}); ask for fewer")
    return cpus


def absolute(job: Job) -> Job:
    """The job with every path absolute: a worker's working directory is not the driver's."""
    settings = job.settings
    model = Path(settings.model)
    settings = replace(settings,
                       model=str(model.absolute()) if model.is_file() else settings.model,
                       cache_dir=settings.cache_dir and settings.cache_dir.absolute(),
                       calibration=settings.calibration and settings.calibration.absolute())
    return replace(job, source=job.source.absolute(), output=job.output.absolute(), settings=settings)


# --- in the workers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Staged:
    """The files of one job of an object-store batch, each a (file name, ObjectRef of its bytes):
    a task writes them into its machine's folder for the batch before it starts."""

    batch: str
    source: tuple[str, object]
    model: tuple[str, object] | None = None


def _staging_folder(batch: str) -> Path:
    return Path(tempfile.gettempdir()) / _STAGING / batch


# The model a worker process compiled for its last segment, kept for the next one of the same
# settings (compiling takes seconds, an x3-from-x4 graph even from OpenVINO's cache). INT8 is
# judged on each job's own frames, so it is not kept.
_last_upscaler: dict[object, FrameUpscaler] = {}


def _frame_upscaler(job: Job, calibration, evaluation) -> FrameUpscaler:
    if job.settings.precision == "int8":
        return FrameUpscaler(job.settings, calibration=calibration, evaluation=evaluation)
    upscaler = _last_upscaler.get(job.settings)
    if upscaler is None:
        _last_upscaler.clear()
        upscaler = _last_upscaler[job.settings] = FrameUpscaler(job.settings)
    return upscaler


def _segment_task(job: Job, starts: list[int], index: int, after: tuple[int, int] | None,
                  target: Path, staged: _Staged | None, calibration, evaluation):
    """One segment, in a Ray worker: (SegmentResult, the segment's bytes when they must travel
    back, else None), or the job's failure message. Failures are returned, not raised, so Ray
    retries only lost workers; KeyboardInterrupt (a cancelled task) goes through."""
    given = job
    try:
        if staged is not None:
            job, target = _unstage(job, index, staged)
        result = upscale_segment(job.source, target, starts, index,
                                 _frame_upscaler(job, calibration, evaluation), job.encoder,
                                 strict=job.strict, after=after)
        if staged is None or result.record is None:
            return result, None
        try:
            return result, target.read_bytes()
        finally:
            target.unlink()
    except Exception as exc:  # noqa: BLE001 - reported as the job's failure, never retried
        # Named by the input's own path, not by its copy on this machine.
        return failure_message(job, exc).replace(str(job.source), str(given.source))


def _unstage(job: Job, index: int, staged: _Staged) -> tuple[Job, Path]:
    """The job with its input (and model file) on this machine, and where its segment goes."""
    import ray

    folder = _staging_folder(staged.batch)
    folder.mkdir(parents=True, exist_ok=True)

    def local(name: str, ref) -> Path:
        path = folder / name
        if not path.exists():  # another task of this batch on this machine may have written it
            with atomic_output(path) as tmp:
                ray.get(ref).tofile(tmp)
        return path

    job = replace(job, source=local(*staged.source))
    if staged.model is not None:
        job = replace(job, settings=replace(job.settings, model=str(local(*staged.model))))
    return job, folder / f"{uuid.uuid4().hex}-{index}{job.output.suffix}"


def _clean_staging(batch: str) -> None:
    shutil.rmtree(_staging_folder(batch), ignore_errors=True)


# --- on the driver -------------------------------------------------------------------------------

@dataclass
class _JobRun:
    """A job whose segments are on Ray."""

    number: int
    job: Job
    """As the user gave it (the report names its paths)."""
    remote: Job
    """With absolute paths, as tasks get it."""
    work: WorkDir
    starts: list[int]
    started: float
    staged: _Staged | None
    calibration: list[np.ndarray] | None
    evaluation: list[np.ndarray] | None
    resumed_frames: int
    pending: dict = field(default_factory=dict)
    """{ObjectRef: segment index} of its tasks not yet collected."""
    done: dict[int, SegmentResult] = field(default_factory=dict)
    """What each segment's task did (the last attempt, if one was done again)."""


class _Driver:
    def __init__(self, ray, cpus: int, storage: str, overwrite: bool, segment_seconds: float,
                 on_start, on_result):
        self.ray, self.cpus, self.storage = ray, cpus, storage
        self.overwrite, self.segment_seconds = overwrite, segment_seconds
        self.on_start, self.on_result = on_start, on_result
        self.task = ray.remote(_segment_task)
        self.batch = uuid.uuid4().hex
        self.runs: dict[int, _JobRun] = {}
        self.results: list[JobResult | None] = []

    def run(self, jobs: list[Job]) -> BatchReport:
        started = time.monotonic()
        self.results = [None] * len(jobs)
        waiting = list(enumerate(jobs))
        # Jobs are opened (input read, segments submitted) only while the cluster is short of
        # work, so that a season does not sit in the object store, or in open work directories,
        # all at once.
        slots = sum(int(node["Resources"]["CPU"]) // self.cpus for node in _machines(self.ray))
        try:
            while waiting or self.runs:
                while waiting and self._queued() < 2 * max(1, slots):
                    self._open(*waiting.pop(0))
                refs = [ref for run in self.runs.values() for ref in run.pending]
                # Wait here, not inside ray.wait: a signal that arrives in Ray's own wait comes
                # out as a plain KeyboardInterrupt, and SIGTERM would be reported as Ctrl-C.
                ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
                if not ready:
                    time.sleep(_POLL_SECONDS)
                for ref in ready:
                    self._collect(ref)
        except KeyboardInterrupt as exc:
            self._stop_all()
            report = BatchReport([r for r in self.results if r is not None], time.monotonic() - started,
                                 interrupted=True)
            raise BatchInterrupted(report, exc) from exc
        finally:
            for run in self.runs.values():
                run.work.__exit__(None, None, None)
            if self.storage == "object-store":
                self._clean_machines()
        return BatchReport(self.results, time.monotonic() - started)

    def _queued(self) -> int:
        return sum(len(run.pending) for run in self.runs.values())

    def _finish(self, number: int, job: Job, result: JobResult) -> None:
        run = self.runs.pop(number, None)
        if run is not None:
            run.work.__exit__(None, None, None)
        self.results[number] = result
        self.on_result(job, result)

    def _open(self, number: int, job: Job) -> None:
        remote = absolute(job)
        mismatch = output_mismatch(remote)
        if mismatch == "":
            self._finish(number, job, JobResult(str(job.source), str(job.output), "skipped"))
            return
        self.on_start(job)
        if mismatch and not self.overwrite:
            self._finish(number, job, stale_output_result(job, mismatch))
            return
        try:
            run = self._prepare(number, job, remote)
        except Exception as exc:  # noqa: BLE001 - one broken job must not stop a night's batch
            self._finish(number, job, failed_result(job, exc))
            return
        self.runs[number] = run
        try:
            for index in range(len(run.starts)):
                if index not in run.work.records:
                    self._submit(run, index, self._after(run, index))
            if not run.pending:  # every segment was complete from an earlier run
                self._assemble(run)
        except Exception as exc:  # noqa: BLE001
            self._fail(run, failure_message(job, exc))

    def _prepare(self, number: int, job: Job, remote: Job) -> _JobRun:
        """What a local run does before its first frame: the output checked, the input opened
        (an unreadable one fails here, as it does locally), its segments planned, the work
        directory taken, INT8 calibration frames read."""
        started = time.monotonic()
        prepare_output(remote)
        check_output(remote.output, [remote.source], self.overwrite)
        with VideoReader(remote.source, strict=remote.strict) as reader:
            time_base = reader.info.time_base
        starts = segment_starts(remote.source, self.segment_seconds, time_base)
        calibration = evaluation = None
        if remote.settings.precision == "int8":
            # Read here once, not by every task: the gate judges INT8 on the input's own frames.
            evaluation = calibration_frames(remote.source)
            calibration = (evaluation if remote.settings.calibration is None
                           else calibration_frames(remote.settings.calibration))
        work = WorkDir(remote.output, resume_for(remote, self.segment_seconds))
        try:
            staged = self._stage(number, remote) if self.storage == "object-store" else None
        except BaseException:
            work.__exit__(None, None, None)
            raise
        return _JobRun(number, job, remote, work, starts, started, staged, calibration, evaluation,
                       resumed_frames=sum(r.frames for r in work.records.values()))

    def _stage(self, number: int, remote: Job) -> _Staged:
        def put(name: str, path: Path) -> tuple[str, object]:
            # Named by job: two jobs may read inputs of one name from different folders.
            return f"{number}-{name}", self.ray.put(np.fromfile(path, dtype=np.uint8))

        model = Path(remote.settings.model)
        return _Staged(self.batch, put(remote.source.name, remote.source),
                       put(model.name, model) if model.is_file() else None)

    def _after(self, run: _JobRun, index: int) -> tuple[int, int] | None:
        previous = run.work.records.get(index - 1)
        return previous.last if previous is not None else None

    def _submit(self, run: _JobRun, index: int, after: tuple[int, int] | None) -> None:
        name = f"{TASK_PREFIX}{run.job.source.name} segment {index + 1}/{len(run.starts)}"
        ref = self.task.options(name=name, num_cpus=self.cpus, max_retries=MAX_RETRIES,
                                retry_exceptions=False).remote(
            run.remote, run.starts, index, after, run.work.segment_path(index), run.staged,
            run.calibration, run.evaluation)
        run.pending[ref] = index

    def _collect(self, ref) -> None:
        run = next((run for run in self.runs.values() if ref in run.pending), None)
        if run is None:
            return  # a task of a job that failed meanwhile; cancelled then
        index = run.pending.pop(ref)
        try:
            outcome = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            outcome = (f"segment {index + 1} was lost on Ray ({first_line(exc)}); run the batch again "
                       f"to go on from its complete segments")
        if isinstance(outcome, str):
            self._fail(run, outcome)
            return
        result, data = outcome
        try:
            self._keep(run, index, result, data)
            if not run.pending:
                self._assemble(run)
        except Exception as exc:  # noqa: BLE001 - one broken job must not stop a night's batch
            self._fail(run, failure_message(run.job, exc))

    def _keep(self, run: _JobRun, index: int, result: SegmentResult, data: bytes | None) -> None:
        run.done[index] = result
        if result.record is None:
            return  # no frame falls in it: the join passes over it as a local run does
        if data is not None:
            with atomic_output(run.work.segment_path(index)) as tmp:
                tmp.write_bytes(data)
        run.work.complete(result.record)

    def _assemble(self, run: _JobRun) -> None:
        """Join a job whose segments are all in, or first do again the one whose timestamps were
        made without knowing the previous segment's (see upscale_segment)."""
        records = run.work.records
        indices = sorted(records)
        for previous, index in zip(indices, indices[1:]):
            record, last_written = records[index], records[previous].last[1]
            first = record.first_pts if last_written < record.first_pts else last_written + 1
            if min(pts for pts, _, _ in record.packets) != first:
                run.work.discard(index)
                self._submit(run, index, records[previous].last)
                return
        frames = sum(records[i].frames for i in indices)
        with VideoReader(run.remote.source, strict=run.remote.strict) as reader:
            join_segments(run.remote.output, reader, run.remote.encoder, run.work.encoded(indices), frames,
                          sidecar_writer(run.remote), replace=self.overwrite)
        run.work.remove()
        seconds = time.monotonic() - run.started
        self._finish(run.number, run.job, JobResult(
            str(run.job.source), str(run.job.output), "done", frames=frames, seconds=round(seconds, 3),
            fps=round((frames - run.resumed_frames) / seconds, 3) if seconds > 0 else 0.0,
            corrupt_packets=sum(r.corrupt_packets for r in run.done.values()),
            lost_at_start=sum(r.lost_at_start for r in run.done.values()),
            interlaced_frames=sum(r.interlaced_frames for r in run.done.values()),
            retimed_frames=sum(r.retimed_frames for r in run.done.values()),
            reused_frames=sum(r.reused_frames for r in run.done.values()),
            resumed_frames=run.resumed_frames))

    def _fail(self, run: _JobRun, error: str) -> None:
        """The job fails once: its other tasks are stopped, its complete segments kept."""
        self._cancel(list(run.pending))
        if not run.work.records:
            run.work.remove()
        self._finish(run.number, run.job, failed_result(run.job, error, time.monotonic() - run.started))

    def _cancel(self, refs: list) -> None:
        # Ray's gentle cancel (a KeyboardInterrupt in the task) did not stop a running segment in
        # Ray 2.60: kill them, as kill -9 would. Nothing is at any output path then.
        for ref in refs:
            self.ray.cancel(ref, force=True)
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=_CANCEL_SECONDS)

    def _stop_all(self) -> None:
        self._cancel([ref for run in self.runs.values() for ref in run.pending])
        for number, run in self.runs.items():
            run.work.__exit__(None, None, None)
            self.results[number] = interrupted_result(run.job, time.monotonic() - run.started)
        self.runs.clear()

    def _clean_machines(self) -> None:
        """Remove the staged inputs from every machine (those that left keep theirs in their
        temporary directory)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        clean = self.ray.remote(_clean_staging)
        refs = [clean.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                    node["NodeID"], soft=False)).remote(self.batch) for node in _machines(self.ray)]
        self.ray.wait(refs, num_returns=len(refs), timeout=_CANCEL_SECONDS)
