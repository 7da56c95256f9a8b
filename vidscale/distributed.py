"""A batch on Ray (`vidscale batch --ray [ADDRESS]`): each job is one Ray task that runs the very
code a local batch runs for it (jobs.run_job: atomic output, frame-count check, segments kept for
resume, sidecar), and this driver turns the tasks' results into the same report and exit status.

Ray is optional (`pip install 'vidscale[ray]'`) and imported only here, only with --ray.

Paths, not bytes, travel: every machine must see the inputs, the outputs (with their work
directories) and a model file under the same absolute paths (one NFS/SMB mount at the same place
everywhere). Each machine converts a catalog model into its own cache once.

Faults: a task whose worker process or machine is lost is run again by Ray (MAX_RETRIES); being
resumable, the new attempt goes on from the job's last complete segment. A job that fails for a
reason of its own (bad input, a full disk) comes back as a failed result, not as an exception, so
it fails once and is never retried.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

from .errors import UsageError
from .jobs import BatchInterrupted, BatchReport, Job, JobResult, interrupted_result, is_done, run_job
from .segments import DEFAULT_SEGMENT_SECONDS

# Attempts after the first for a job whose worker was lost (process killed, machine gone).
MAX_RETRIES = 3
# Each job's task is named this and its input's file name.
TASK_PREFIX = "vidscale-job "
# How long a stopped batch waits for its cancelled tasks to end.
_CANCEL_SECONDS = 30.0
_POLL_SECONDS = 0.2


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray, which is not installed: pip install 'vidscale[ray]'") from None
    return ray


def run_jobs_on_ray(jobs: list[Job], *, address: str = "local", cpus: int | None = None,
                    overwrite: bool = False, segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
                    on_start=lambda job: None, on_result=lambda job, result: None) -> BatchReport:
    """Like jobs.run_jobs, with the jobs run as Ray tasks, as many at once as the cluster has
    room for. `address`: "local" starts a Ray instance on this machine (stopped at the end);
    "auto" or HOST:PORT joins a running cluster. A process already connected to Ray (ray.init
    called) keeps its connection. `cpus`: CPUs each job claims; by default all of the smallest
    machine's, so one job runs per machine at a time as in a local batch (OpenVINO uses every
    core of the machine it runs on).
    """
    ray = _import_ray()
    started_ray = _connect(ray, address)
    try:
        remote = ray.remote(run_job)
        per_job = _cpus_per_job(ray, cpus)

        def task(job: Job):
            # Named after the input, for `ray list tasks`, the dashboard and the worker's process title.
            return remote.options(name=f"{TASK_PREFIX}{job.source.name}", num_cpus=per_job,
                                  max_retries=MAX_RETRIES, retry_exceptions=False)

        return _collect(ray, jobs, task, overwrite, segment_seconds, on_start, on_result)
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
        raise UsageError(f"cannot join the Ray cluster at {address} ({_first_line(exc)}); start it with "
                         f"`ray start --head` or check the address") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return True


def _cpus_per_job(ray, cpus: int | None) -> int:
    machines = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
    machines = [n for n in machines if n > 0]
    if not machines:
        raise UsageError("the Ray cluster has no machine with CPUs; start workers with `ray start --address=...`")
    if cpus is None:
        return min(machines)
    if cpus > max(machines):
        # Ray would keep such tasks waiting for ever.
        raise UsageError(f"--ray-cpus {cpus} is more than any machine of the Ray cluster has "
                         f"(at most {max(machines)}); ask for fewer")
    return cpus


def _collect(ray, jobs: list[Job], task, overwrite: bool, segment_seconds: float, on_start,
             on_result) -> BatchReport:
    started = time.monotonic()
    results: list[JobResult | None] = [None] * len(jobs)
    pending = {}
    for number, job in enumerate(jobs):
        remote = absolute(job)
        if is_done(remote):
            results[number] = JobResult(str(job.source), str(job.output), "skipped")
            on_result(job, results[number])
            continue
        on_start(job)
        pending[task(job).remote(remote, overwrite, segment_seconds)] = number
    try:
        while pending:
            # Wait here, not inside ray.wait: a signal that arrives in Ray's own wait comes out as a
            # plain KeyboardInterrupt, and SIGTERM would be reported as Ctrl-C.
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            if not ready:
                time.sleep(_POLL_SECONDS)
            for ref in ready:
                number = pending.pop(ref)
                results[number] = _result(ray, ref, jobs[number])
                on_result(jobs[number], results[number])
    except KeyboardInterrupt as exc:
        # Ray's gentle cancel (a KeyboardInterrupt in the task) did not stop a running job in
        # Ray 2.60, and a job's worker dies with this driver anyway: kill them now, as kill -9
        # would. Complete segments are kept for the next run; nothing is at any output path.
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.wait(list(pending), num_returns=len(pending), timeout=_CANCEL_SECONDS)
        for number in pending.values():
            results[number] = interrupted_result(jobs[number])
        report = BatchReport([r for r in results if r is not None], time.monotonic() - started, interrupted=True)
        raise BatchInterrupted(report, exc) from exc
    return BatchReport(results, time.monotonic() - started)


def absolute(job: Job) -> Job:
    """The job with every path absolute: a worker's working directory is not the driver's."""
    settings = job.settings
    model = Path(settings.model)
    settings = replace(settings,
                       model=str(model.absolute()) if model.is_file() else settings.model,
                       cache_dir=settings.cache_dir and settings.cache_dir.absolute(),
                       calibration=settings.calibration and settings.calibration.absolute())
    return replace(job, source=job.source.absolute(), output=job.output.absolute(), settings=settings)


def _result(ray, ref, job: Job) -> JobResult:
    """The task's result, named by the paths the user gave; a task Ray gave up on is a failed job."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as exc:
        return JobResult(str(job.source), str(job.output), "failed",
                         error=f"lost on Ray ({_first_line(exc)}); run the batch again to go on from "
                               f"its last complete segment")
    return replace(result, input=str(job.source), output=str(job.output))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
