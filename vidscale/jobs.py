"""Unattended batches: many videos upscaled one after another, each written atomically, skipped
when a sidecar beside its output says it is already done for the same input and settings, and a
report of what happened to each.

A job file (TOML):

    output_dir = "upscaled"            # relative to the job file; --output-dir replaces it
    template = "{stem}.x2.mkv"         # fields: {stem}, {name}, {parent} of each input
    segment_seconds = 120              # optional: segment length (resume, Ray); --segment-seconds wins
    ray = "auto"                       # optional: run on a Ray cluster (see distributed.py);
    ray_cpus = 8                       # optional: CPUs each segment claims there;
    ray_storage = "object-store"       # optional: inputs are not on shared storage;
                                       # --ray, --ray-cpus and --ray-storage win

    [defaults]                         # settings for every job; any key may also sit in a job
    model = "realesr-animevideov3"
    scale = 2
    codec = "libx265"
    crf = 20
    options = { "x265-params" = "log-level=error" }

    [[job]]
    inputs = ["season1/*.mkv", "extras/op.mkv", "season2"]   # globs, files or directories
    template = "{parent}/{stem}.x2.mkv"                      # per-job keys win over defaults
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import string
import time
import tomllib
import typing
from dataclasses import dataclass, replace
from pathlib import Path

from .config import RAY_STORAGES, UpscaleSettings, fits, parse_dedup
from .errors import MediaError, UsageError, VidscaleError
from .files import write_atomically
from .media import OUTPUT_FORMATS, EncoderSettings, check_readable
from .pipeline import upscale_video
from .report import BatchReport, JobResult
from .segments import DEFAULT_SEGMENT_SECONDS, WORK_SUFFIX, Resume, WorkInUse
from .tiling import parse_tile

DEFAULT_TEMPLATE = "{stem}.upscaled.mkv"
SIDECAR_SUFFIX = ".vidscale.json"
# What a directory given as input contributes: the files that look like videos.
VIDEO_SUFFIXES = frozenset(OUTPUT_FORMATS) | {".avi", ".mpg", ".mpeg", ".m2v", ".flv", ".wmv", ".ogv", ".3gp",
                                              ".vob"}
_FINGERPRINT_BYTES = 1 << 20
_RUN_KEYS = ("segment_seconds", "ray", "ray_cpus", "ray_storage")

_ENGINE_KEYS = {f.name for f in dataclasses.fields(UpscaleSettings)} - {"cache_dir"}
ENCODER_KEYS = {"codec", "crf", "preset", "pix_fmt", "format", "options"}
SETTING_KEYS = _ENGINE_KEYS | ENCODER_KEYS | {"strict"}
"""Keys a job file's [defaults] or a job may set; the CLI's batch options use the same names."""


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path
    settings: UpscaleSettings
    encoder: EncoderSettings
    strict: bool = False


# --- building jobs ------------------------------------------------------------------------------

def build_settings(values: dict, where: str, cache_dir: Path | None) -> tuple[UpscaleSettings, EncoderSettings, bool]:
    """Frozen settings from job-file style keys (see SETTING_KEYS); `where` names the source in errors."""
    values = checked_values(values, where)
    strict = values.pop("strict", False)
    engine = UpscaleSettings(cache_dir=cache_dir, **{k: v for k, v in values.items() if k in _ENGINE_KEYS})
    encoder = EncoderSettings(**{k: v for k, v in values.items() if k in ENCODER_KEYS})
    return engine, encoder, strict


def checked_values(values: dict, where: str) -> dict:
    """Settings (SETTING_KEYS) as a job file, the command line or the Python API gives them, parsed
    (tile and dedup as the command line spells them, options as a table) and checked against the
    settings' types; UsageError names what is wrong and where."""
    unknown = sorted(set(values) - SETTING_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown setting {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(SETTING_KEYS))}")
    values = dict(values)
    try:
        if "tile" in values:
            values["tile"] = parse_tile(values["tile"])
        if "dedup" in values:
            values["dedup"] = parse_dedup(values["dedup"])
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
    if isinstance(values.get("calibration"), str):
        values["calibration"] = Path(values["calibration"])
    if isinstance(values.get("model"), os.PathLike):
        values["model"] = os.fspath(values["model"])
    if "options" in values:
        if not isinstance(values["options"], dict):
            raise UsageError(f"{where}: options must be a table of encoder options, e.g. {{ tune = \"film\" }}")
        values["options"] = tuple((str(k), str(v)) for k, v in values["options"].items())
    hints = typing.get_type_hints(UpscaleSettings) | typing.get_type_hints(EncoderSettings) | {"strict": bool}
    for key, value in values.items():
        if key not in ("tile", "dedup", "options") and not fits(value, hints[key]):
            raise UsageError(f"{where}: {key} = {value!r} is not a valid value; see `vidscale upscale --help`")
    return values


def expand_inputs(pattern: str, base: Path) -> list[Path]:
    """A file, a directory (its video files, not recursive) or a glob, relative to `base`. A
    directory or glob leaves out vidscale's own outputs (those with a sidecar) and the segments of
    its stopped runs: with outputs written beside the inputs, each run would otherwise upscale the
    last one's outputs again.

    Brackets are how releases name their files ("[Group] Show - 01.mkv"): a path that exists is
    taken as it is, and a glob's brackets match themselves before they are a character class."""
    path = base / Path(pattern).expanduser()
    if glob.has_magic(pattern) and not _exists(path):
        found = (glob.glob(str(path).replace("[", "[[]"), recursive=True)
                 or glob.glob(str(path), recursive=True))
        if not found:
            raise UsageError(f"{pattern} matches no file; check the pattern")
        return [p for p in sorted(map(Path, found)) if p.is_file() and _not_ours(p)]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                      and _not_ours(p))
    # A missing or unreadable file is this job's failure, reported with the others.
    return [path]


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the system: the job's own check says so
        return False


def _not_ours(path: Path) -> bool:
    """Not an output of vidscale's with its record, a record, or a stopped run's segment."""
    return (not path.name.endswith(SIDECAR_SUFFIX) and not _exists(sidecar_path(path))
            and not any(part.endswith(WORK_SUFFIX) for part in path.parent.parts))


_TEMPLATE_FIELDS = ("stem", "name", "parent")


def output_for(source: Path, output_dir: Path, template: str) -> Path:
    """Where `source`'s output goes: `template` filled in, inside `output_dir`."""
    try:
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(template)
                  if field is not None]
    except ValueError as exc:
        raise UsageError(f"output template {template!r} is not valid ({exc}); "
                         f"use the fields {{stem}}, {{name}} and {{parent}}") from None
    for field, spec, conversion in fields:
        if field not in _TEMPLATE_FIELDS or spec or conversion:
            raise UsageError(f"output template {template!r} is not valid ({{{field}}}); "
                             f"use the fields {{stem}}, {{name}} and {{parent}} as they are")
    # absolute(): the parent of a bare relative name ("ep1.mkv") is the current folder, not "".
    name = Path(template.format(stem=source.stem, name=source.name, parent=source.absolute().parent.name))
    if name.is_absolute() or ".." in name.parts or not name.name:
        raise UsageError(f"output template {template!r} gives {name} for {source}, which is not a file "
                         f"inside the output directory; write a relative path without ..")
    return output_dir / name


def jobs_from_inputs(inputs: list[str], output_dir: Path, template: str | None, values: dict,
                     cache_dir: Path | None) -> list[Job]:
    template = template or DEFAULT_TEMPLATE
    settings, encoder, strict = build_settings(values, "the command line", cache_dir)
    jobs = [Job(source, output_for(source, output_dir, template), settings, encoder, strict)
            for pattern in inputs for source in expand_inputs(pattern, Path.cwd())]
    return _checked(jobs)


def jobs_from_file(path: Path, output_dir: Path | None, values: dict, cache_dir: Path | None,
                   template: str | None = None) -> list[Job]:
    """Jobs of a TOML job file; `values` (the command line's settings) replace its [defaults],
    `output_dir` and `template` (the command line's) its top-level ones; a job's own still win."""
    document = _read_job_file(path)
    base = path.parent
    checked_values(document.get("defaults", {}), f"{path} [defaults]")  # named as such, not as job 1
    defaults = {**document.get("defaults", {}), **values}
    top_dir = output_dir or (base / document["output_dir"] if "output_dir" in document else None)
    entries = document.get("job", [])
    if not entries:
        raise UsageError(f"{path} has no [[job]] entries; add one with inputs = [...]")
    jobs = []
    for number, entry in enumerate(entries, 1):
        where = f"{path} job {number}"
        entry = dict(entry)
        inputs = entry.pop("inputs", None)
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs or not all(isinstance(i, str) for i in inputs):
            raise UsageError(f"{where}: inputs must be a path, directory or glob, or a list of them")
        job_dir = base / entry.pop("output_dir") if "output_dir" in entry else top_dir
        if job_dir is None:
            raise UsageError(f"{where}: no output directory; set output_dir or pass --output-dir")
        job_template = entry.pop("template", template or document.get("template", DEFAULT_TEMPLATE))
        values = {**defaults, **entry}
        if isinstance(values.get("calibration"), str):  # a path in the file is relative to it
            values["calibration"] = base / Path(values["calibration"]).expanduser()
        settings, encoder, strict = build_settings(values, where, cache_dir)
        # [defaults] and the command line speak to jobs of every encoder; a job's own keys to its.
        offered = {key for key in ("crf", "preset") if key in values and key not in entry}
        if "options" not in entry:
            offered.update(key for key, _ in encoder.options)
        encoder = replace(encoder, offered=frozenset(offered))
        jobs += [Job(source, output_for(source, job_dir, job_template), settings, encoder, strict)
                 for pattern in inputs for source in expand_inputs(pattern, base)]
    return _checked(jobs)


@dataclass(frozen=True)
class RunOptions:
    """How a job file says its batch runs; None where it does not say."""

    segment_seconds: float | None = None
    ray: str | None = None
    """An address, "auto" or "local"."""
    ray_cpus: int | None = None
    ray_storage: str | None = None


def run_options(path: Path) -> RunOptions:
    document = _read_job_file(path)
    options = RunOptions(**{key: document.get(key) for key in _RUN_KEYS})
    seconds, address, cpus, storage = (options.segment_seconds, options.ray, options.ray_cpus,
                                       options.ray_storage)
    if seconds is not None and not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
                                    and seconds > 0):
        raise UsageError(f"{path}: segment_seconds = {seconds!r} is not valid; use a positive number")
    if address is not None and not (isinstance(address, str) and address):
        raise UsageError(f'{path}: ray = {address!r} is not valid; use "local", "auto" or "HOST:PORT"')
    if cpus is not None and not (isinstance(cpus, int) and not isinstance(cpus, bool) and cpus > 0):
        raise UsageError(f"{path}: ray_cpus = {cpus!r} is not valid; use a whole number of CPUs per segment")
    if storage is not None and storage not in RAY_STORAGES:
        raise UsageError(f'{path}: ray_storage = {storage!r} is not valid; use "shared" or "object-store"')
    return options


def _read_job_file(path: Path) -> dict:
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"job file {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"job file {path} cannot be read ({exc}); fix it and run again") from None
    unknown = sorted(set(document) - {"output_dir", "template", "defaults", "job", *_RUN_KEYS})
    if unknown:
        raise UsageError(f"{path}: unknown key {', '.join(unknown)}; "
                         f"use output_dir, template, {', '.join(_RUN_KEYS)}, [defaults] and [[job]]")
    _check_paths(document, str(path))
    if not isinstance(document.get("defaults", {}), dict):
        raise UsageError(f"{path}: defaults must be a table, [defaults], of settings for every job")
    entries = document.get("job", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise UsageError(f"{path}: job must be [[job]] entries (an array of tables), each with inputs = [...]")
    for number, entry in enumerate(entries, 1):
        _check_paths(entry, f"{path} job {number}")
    return document


def _check_paths(table: dict, where: str) -> None:
    for key in ("output_dir", "template"):
        if key in table and not isinstance(table[key], str):
            raise UsageError(f"{where}: {key} = {table[key]!r} is not valid; write it as a quoted path")


def _checked(jobs: list[Job]) -> list[Job]:
    """`jobs` with each input-output pair once: a file matched by two patterns, or named twice
    (`a/ep1.mkv`, `a/../a/ep1.mkv`, a link to it), is one job, not a conflict."""
    if not jobs:
        raise UsageError("the inputs name no video files; check the paths")
    seen: dict[str, Job] = {}
    unique = []
    for job in jobs:
        other = seen.setdefault(os.path.realpath(job.output), job)
        if other is job:
            unique.append(job)
        elif os.path.realpath(other.source) != os.path.realpath(job.source):
            raise UsageError(f"{job.source} and {other.source} would both be written to {job.output}; "
                             f"give a template whose fields tell them apart ({{stem}}, {{name}}, {{parent}})")
        elif replace(other, source=job.source, output=job.output) != job:
            raise UsageError(f"two jobs write {job.source} to {job.output} with different settings; "
                             f"give them different templates or output directories")
    inputs = {os.path.realpath(job.source): job for job in unique}
    for job in unique:
        # A job's own input as its output is that job's failure (media.check_output).
        other = inputs.get(os.path.realpath(job.output), job)
        if other is not job:
            raise UsageError(f"{job.output}, the output of {job.source}, is also an input of this batch; "
                             f"give an output directory or template that keeps outputs apart from inputs")
    return unique


# --- skip when done -----------------------------------------------------------------------------

def fingerprint(path: Path) -> dict:
    """Who a file is, cheaply: size, mtime and a hash of its first and last MiB (a full hash of
    hours of video would cost as much as a small job)."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(_FINGERPRINT_BYTES))
        if stat.st_size > _FINGERPRINT_BYTES:
            file.seek(max(stat.st_size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
            digest.update(file.read())
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_ends": digest.hexdigest()}


def content_digest(path: Path) -> str:
    """The SHA-256 of the whole file: seconds for an episode, read once when its job is done."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_FINGERPRINT_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _unchanged(recorded: dict, content_sha256: str | None, path: Path) -> bool:
    """Whether `path` is the file a record's fingerprint and whole-content hash were taken of. A
    changed mtime alone (a copy or a restore that did not keep it) is checked against the whole
    content, which a repaired middle (a re-checked download) or an edit in place (mkvpropedit)
    changes where size and ends do not."""
    now = fingerprint(path)
    if recorded == now:
        return True
    same_ends = all(recorded[key] == now[key] for key in ("size", "sha256_ends"))
    return same_ends and content_sha256 is not None and content_sha256 == content_digest(path)


def settings_digest(job: Job) -> str:
    """Everything that changes the output's content. A model or calibration given as a file counts
    by content, not by path (a Ray run names them by absolute path, a local one maybe not)."""
    settings = dataclasses.asdict(replace(job.settings, cache_dir=None))
    for key in ("model", "calibration"):
        path = getattr(job.settings, key)
        if path is not None and Path(path).is_file():
            settings[key] = fingerprint(Path(path))["sha256_ends"]
    # Whether unknown options are refused or ignored changes no output.
    encoder = dataclasses.asdict(job.encoder)
    del encoder["offered"]
    record = {"settings": settings, "encoder": encoder, "strict": job.strict}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def resume_for(job: Job, segment_seconds: float = DEFAULT_SEGMENT_SECONDS) -> Resume:
    """Segments kept for this job are reused only for the same input and the same settings."""
    return Resume({"input": fingerprint(job.source), "settings": settings_digest(job)}, segment_seconds)


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + SIDECAR_SUFFIX)


def output_mismatch(job: Job) -> str | None:
    """How `job`'s existing output differs from what the job would make, by its sidecar: "" it
    does not (the job is done: made from this very input with these settings), None when there
    is no readable sidecar (or no output) to tell."""
    try:
        state = json.loads(sidecar_path(job.output).read_text())
        if job.output.stat().st_size != state["output_size"] or ("output" in state and not _unchanged(
                state["output"], state.get("output_sha256"), job.output)):
            # (Records older than the output's fingerprint give its size alone.)
            return "was changed after vidscale made it"
        if state["settings"] != settings_digest(job):
            return "was made with other settings than this job's"
        if not _unchanged(state["input"], state.get("content_sha256"), job.source):
            return f"was made from an earlier {job.source}, which has changed since"
        return ""
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sidecar_writer(job: Job):
    """The on_commit (see VideoWriter) that writes `job`'s sidecar for its finished output file
    before the file is renamed into place: a stop between the two then leaves a record without
    its output (the job runs again), never an output without its record (refused for good
    without --overwrite)."""

    started = _identity(job.source)

    def write(finished: Path, frames: int) -> None:
        if _identity(job.source) != started:
            # The record would describe a file the output was not made from, and later runs
            # would skip the job for good.
            raise MediaError(f"{job.source} was replaced or written to while it was upscaled; "
                             f"the output was not kept, run the job again")
        state = {"input": fingerprint(job.source), "content_sha256": content_digest(job.source),
                 "settings": settings_digest(job), "frames": frames, "output_size": finished.stat().st_size,
                 "output": fingerprint(finished), "output_sha256": content_digest(finished),
                 "source": str(job.source)}
        write_atomically(sidecar_path(job.output), json.dumps(state, indent=2) + "\n")

    return write


def _identity(path: Path) -> tuple[int, ...]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


# --- running ------------------------------------------------------------------------------------

def run_jobs(jobs: list[Job], *, overwrite: bool = False, segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
             progress=lambda job: None, on_start=lambda job: None,
             on_result=lambda job, result: None) -> BatchReport:
    """Run `jobs` one after another (the engine already keeps every core busy).

    Every job is resumable: one longer than `segment_seconds` works in segments kept beside its
    output, and a job stopped in any way goes on from its last complete segment the next time.

    A job whose output is complete for the same input and settings is skipped, even with
    `overwrite`; an output without such a record is replaced only with `overwrite`. A failing job
    is reported and the next one runs. KeyboardInterrupt (Ctrl-C, or SIGTERM as the CLI maps it)
    stops the batch: the running job cleans up after itself and is reported as failed, and
    BatchInterrupted carries the report so far (the caller still writes it) and the original.
    """
    report = BatchReport([])
    started = time.monotonic()
    running: tuple[Job, float] | None = None
    try:
        for job in jobs:
            # Once per job: telling a changed input from a touched one may hash it whole.
            mismatch = output_mismatch(job)
            if mismatch == "":
                result = JobResult(str(job.source), str(job.output), "skipped")
            elif mismatch and not overwrite:
                on_start(job)
                result = stale_output_result(job, mismatch)
            else:
                on_start(job)
                running = job, time.monotonic()
                result = run_job(job, overwrite, segment_seconds, progress(job))
                running = None
            report.results.append(result)
            on_result(job, result)
    except KeyboardInterrupt as exc:
        # Every job in the report: the one stopped, and those the stop kept from starting.
        if running is not None:
            job, job_started = running
            result = interrupted_result(job, time.monotonic() - job_started)
            report.results.append(result)
            on_result(job, result)
        report.results += [not_run_result(later) for later in jobs[len(report.results):]]
        report.seconds, report.interrupted = time.monotonic() - started, True
        raise BatchInterrupted(report, exc) from exc
    report.seconds = time.monotonic() - started
    return report


class BatchInterrupted(KeyboardInterrupt):
    """The batch was stopped by a signal; `report` holds what ran until then."""

    def __init__(self, report: BatchReport, cause: KeyboardInterrupt):
        super().__init__(str(cause))
        self.report, self.cause = report, cause


def not_run_result(job: Job) -> JobResult:
    return JobResult(str(job.source), str(job.output), "failed", error="not run: the batch was stopped")


def interrupted_result(job: Job, seconds: float) -> JobResult:
    return JobResult(str(job.source), str(job.output), "failed", seconds=round(seconds, 3), error="interrupted")


def failure_message(job: Job, exc: Exception) -> str:
    """The report's one line for a job that failed with `exc`."""
    if isinstance(exc, VidscaleError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot write {exc.filename or job.output} ({exc.strerror}); check the output directory"
    return f"{type(exc).__name__}: {exc}"


def stale_output_result(job: Job, mismatch: str) -> JobResult:
    """A job refused without --overwrite: its output is vidscale's, but not of this input and
    these settings (`mismatch` says how). Its record is kept: true of the output it describes."""
    return failed_result(job, f"output {job.output} {mismatch}; pass --overwrite to replace it")


def failed_result(job: Job, exc: Exception | str, seconds: float = 0.0) -> JobResult:
    """`seconds`: how long the job ran before it failed (a night's budget went there too)."""
    error = exc if isinstance(exc, str) else failure_message(job, exc)
    return JobResult(str(job.source), str(job.output), "failed", seconds=round(seconds, 3), error=error)


def prepare_output(job: Job) -> None:
    """Before a job runs: its output folder made (a template may put outputs in folders of their
    own, {parent}/...), the input checked. An old output's sidecar stays: it is replaced just
    before a new output replaces the old one (sidecar_writer), and until then it is true of the
    old output, which a refused or failed run leaves as it was."""
    job.output.parent.mkdir(parents=True, exist_ok=True)
    check_readable(job.source)


def run_job(job: Job, overwrite: bool, segment_seconds: float, progress=None) -> JobResult:
    """One job, wherever it runs (here, or in a Ray worker). Every failure becomes a failed
    JobResult, never an exception, so that Ray does not retry what retrying cannot fix; only
    KeyboardInterrupt goes through (the job's temporary output is gone, its segments kept)."""
    started = time.monotonic()
    try:
        prepare_output(job)  # the input checked before resume_for fingerprints it
        result = upscale_video(job.source, job.output, job.settings, job.encoder, strict=job.strict,
                               overwrite=overwrite, progress=progress,
                               resume=resume_for(job, segment_seconds), on_commit=sidecar_writer(job))
    except WorkInUse as exc:
        # A batch overlapping an earlier one (a timer's runs, two shells): that run makes it.
        return JobResult(str(job.source), str(job.output), "skipped", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken job must not stop a night's batch
        return failed_result(job, exc, time.monotonic() - started)
    return JobResult(str(job.source), str(job.output), "done", frames=result.frames,
                     seconds=round(result.seconds, 3), fps=round(result.fps, 3),
                     corrupt_packets=result.corrupt_packets, lost_at_start=result.lost_at_start,
                     interlaced_frames=result.interlaced_frames,
                     retimed_frames=result.retimed_frames,
                     reused_frames=result.reused_frames, resumed_frames=result.resumed_frames)
