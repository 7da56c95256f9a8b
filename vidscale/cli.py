"""Command line: argument parsing, exit statuses, and the only place that prints to a person."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .config import (DEFAULT_DEDUP, DEFAULT_IMAGE_MODEL, DEFAULT_SEGMENT_SECONDS, DEFAULT_VIDEO_MODEL, RAY_STORAGES,
                     UpscaleSettings, parse_dedup)
from .errors import EXIT_SOME_FAILED, MORE_MEMORY, MediaError, OutputClosedError, UsageError, VidscaleError
from .progress import MODES, Both, EventLog, make_progress
from .tiling import DEFAULT_OVERLAP, parse_tile

# Stopped by a signal, the exit status is 128 + its number, what a shell reports for a process
# the signal killed: 130 for SIGINT. These stop a run as SIGINT does: SIGTERM (systemd, kill) and
# SIGHUP (the terminal or ssh session went away).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """A stop signal, raised in the main thread; a KeyboardInterrupt so every stage stops as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def _tile(text: str) -> tuple[int, int] | None:
    """`0` (automatic), `N` (N x N) or `HxW`."""
    try:
        return parse_tile(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cache_dir(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("an empty path would put the cache in the working directory; "
                                         "give a directory")
    return Path(text)


def _output_file(text: str) -> str:
    # pathlib drops a trailing slash: "out.mkv/" would be written as the file out.mkv.
    if text != "-" and text.endswith("/"):
        raise argparse.ArgumentTypeError(f"{text} names a directory; give a file path, or - for stdout")
    return text


def _dedup(text: str) -> float | None:
    try:
        return parse_dedup(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--{exc}") from None


def _positive(convert, option: str, what: str):
    """An argparse type: `convert(text)`, which must come out above zero."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{option} {text!r} is not {what}")
        return value

    return parse


_seconds = _positive(float, "--segment-seconds", "a positive number")
_cpus = _positive(int, "--ray-cpus", "a whole number of CPUs")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"encoder option {text!r} is not KEY=VALUE")
    return key, value


def _engine_options(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("-m", "--model", default=default_model,
                        help=f"catalog name or a .pth/.safetensors file (default: {default_model})")
    parser.add_argument("-s", "--scale", type=int, help="output scale (default: the model's own)")
    parser.add_argument("-t", "--tile", type=_tile, default=None,
                        help="tile size in input pixels, N or HxW; 0 = automatic (default)")
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                        help=f"input pixels shared by neighbouring tiles (default: {DEFAULT_OVERLAP})")
    parser.add_argument("--precision", default="auto", choices=("auto", "f32", "bf16", "f16", "int8"),
                        help="inference precision (auto: bf16 where the device supports it; int8 needs "
                             "pip install 'vidscale[int8]')")
    parser.add_argument("--calibration", type=Path, metavar="FILE",
                        help="int8: video or picture to calibrate on (default: the input itself)")
    parser.add_argument("--device", default="CPU", help="OpenVINO device: CPU, GPU, NPU, AUTO... (default: CPU)")
    parser.add_argument("--tune", action="store_true",
                        help="with automatic tiles: time the candidate tile shapes and stream counts on this "
                             "device once per frame size, and use the fastest (cached)")


def _video_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c:v", "--codec", default="libx264",
                        help="video encoder: libx264 (default), libx265, libsvtav1, libvpx-vp9, ffv1")
    parser.add_argument("--crf", type=int, help="encoder quality (default: per encoder, see README)")
    parser.add_argument("--preset", help="encoder speed preset")
    parser.add_argument("--pix-fmt", help="output pixel format (default: yuv420p, or yuv420p10le for 10-bit input)")
    parser.add_argument("-x", "--encoder-option", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                        help="extra encoder option, repeatable (e.g. -x tune=animation)")
    parser.add_argument("-f", "--format", help="output container (default: from the extension; matroska for -)")
    parser.add_argument("--dedup", type=_dedup, default=DEFAULT_DEDUP, metavar="off|exact|THRESHOLD",
                        help="reuse the last upscaled frame for source frames that match it: off, exact "
                             f"(identical only) or the largest 8x8-block mean difference (default {DEFAULT_DEDUP})")
    parser.add_argument("--strict", action="store_true",
                        help="fail on corrupt input packets instead of concealing them")
    parser.add_argument("--progress", choices=MODES, default="auto",
                        help="bar (tqdm), json (JSON lines), none; auto = bar on a terminal")
    parser.add_argument("--log-file", type=Path,
                        help="append JSON lines here: start, end, warnings, errors, progress every 30 s")
    parser.add_argument("--segment-seconds", type=_seconds, default=DEFAULT_SEGMENT_SECONDS, metavar="S",
                        help="resumable runs work in segments of about S seconds, cut at keyframes "
                             f"(default {DEFAULT_SEGMENT_SECONDS:g})")


# Batch options that are settings of each job, by argparse dest (-x is `encoder_option`).
_BATCH_SETTINGS = {"model", "scale", "tile", "overlap", "precision", "device", "codec", "crf", "preset",
                   "pix_fmt", "encoder_option", "format", "strict", "dedup", "tune", "calibration"}


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line errors the rest of vidscale gives (argparse's own print the
    whole usage block first)."""

    def error(self, message: str):
        self.exit(UsageError.exit_status, f"vidscale: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vidscale", description="Real-ESRGAN upscaling on OpenVINO.")
    parser.add_argument("--cache-dir", type=_cache_dir, default=None,
                        help="where converted models are kept (default: $VIDSCALE_CACHE_DIR, "
                             "else $XDG_CACHE_HOME/vidscale)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("models", help="list the bundled models")

    video = commands.add_parser("upscale", help="upscale a video, keeping every other stream",
                                description="Upscale the first video stream of INPUT; audio, subtitles, "
                                            "fonts, chapters and metadata are copied unchanged.")
    video.add_argument("input", nargs="?", help="video file, or - for stdin")
    video.add_argument("-i", "--input", dest="input_option", metavar="INPUT", help="same as the positional INPUT")
    video.add_argument("-o", "--output", type=_output_file, required=True, help="file to write, or - for stdout")
    video.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    video.add_argument("--resume", action="store_true",
                       help="work in segments kept in OUTPUT.vidscale-work/, so that running the same "
                            "command again after a crash or kill goes on from the last complete one "
                            "(files only, not pipes)")
    _engine_options(video, DEFAULT_VIDEO_MODEL)
    _video_options(video)

    batch = commands.add_parser(
        "batch", help="upscale many videos one after another, skipping those already done",
        description="Upscale each INPUT (files, directories, globs) into --output-dir, or run the jobs of "
                    "one TOML job file. A job whose output is complete for the same input and settings "
                    "is skipped. Exit status 0 when every job is done or skipped, "
                    f"{EXIT_SOME_FAILED} when some failed.")
    batch.add_argument("inputs", nargs="+", metavar="INPUT", help="videos, directories or globs; or one JOBS.toml")
    batch.add_argument("--output-dir", type=Path, help="where outputs go (a job file may set output_dir)")
    batch.add_argument("--template", help="output name, with {stem}, {name}, {parent} of the input "
                                          "(default: {stem}.upscaled.mkv)")
    batch.add_argument("--report", type=Path, help="write a JSON report of every job here")
    batch.add_argument("--overwrite", action="store_true",
                       help="replace existing outputs not done for this input and settings (a done one is "
                            "skipped even so)")
    batch.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="run the segments of the jobs as Ray tasks: with no ADDRESS on a Ray instance "
                            "started here, with auto or HOST:PORT on a running cluster (needs pip install "
                            "'vidscale[ray]'; put a bare --ray after the inputs)")
    batch.add_argument("--ray-cpus", type=_cpus, metavar="N",
                       help="with --ray: CPUs each segment claims (default: all of the smallest machine's)")
    batch.add_argument("--ray-storage", choices=RAY_STORAGES,
                       help="with --ray: shared (default) when every machine sees the inputs and outputs "
                            "under the same paths; object-store to send them through Ray instead")
    _engine_options(batch, DEFAULT_VIDEO_MODEL)
    _video_options(batch)
    batch.set_defaults(segment_seconds=None)  # a job file's segment_seconds applies unless given
    # Settings given on the command line replace a job file's [defaults]; those not given must
    # not, so they stay out of the namespace.
    for action in batch._actions:
        if action.dest in _BATCH_SETTINGS:
            action.default = argparse.SUPPRESS

    image = commands.add_parser("image", help="upscale one still picture (PNG or JPEG)")
    image.add_argument("input", type=Path)
    image.add_argument("-o", "--output", type=Path, required=True, help="PNG or JPEG to write")
    image.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _engine_options(image, DEFAULT_IMAGE_MODEL)
    return parser


def settings_from(args: argparse.Namespace) -> UpscaleSettings:
    """`upscale`'s and `image`'s settings; an option that would be ignored is refused."""
    if args.tune and args.tile is not None:
        raise UsageError("--tune chooses the tile itself; drop --tile or --tune")
    if args.calibration is not None and args.precision != "int8":
        raise UsageError("--calibration only counts with --precision int8; add that or drop --calibration")
    return UpscaleSettings(model=args.model, scale=args.scale, tile=args.tile, overlap=args.overlap,
                           precision=args.precision, device=args.device, cache_dir=args.cache_dir, tune=args.tune,
                           calibration=args.calibration)


def run_models(args: argparse.Namespace) -> int:
    from .engine import EngineSettings, ir_path
    from .models import catalog_entries

    cache_dir = EngineSettings(cache_dir=args.cache_dir).resolved_cache_dir
    rows = [("name", "scale", "architecture", "parameters", "source", "converted")]
    for entry in catalog_entries():
        converted = "yes" if ir_path(entry.loaded(), cache_dir).is_file() else "no"
        rows.append((entry.name, f"x{entry.scale}", entry.architecture, f"{entry.parameters:,}",
                     entry.source, converted))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _warnings(result) -> list[str]:
    """What was wrong with a finished video's input and was handled (a VideoResult or JobResult)."""
    warnings = []
    if result.corrupt_packets:
        warnings.append(f"{result.corrupt_packets} corrupt packets concealed")
    if result.lost_at_start:
        warnings.append(f"the first {result.lost_at_start} video packets gave no picture "
                        f"(the input starts without a keyframe)")
    if result.retimed_frames:
        warnings.append(f"{result.retimed_frames} repeated timestamps moved one tick")
    if result.interlaced_frames:
        warnings.append(f"{result.interlaced_frames} frames are interlaced and were upscaled with their fields "
                        f"woven together (combing); deinterlace the input first, e.g. ffmpeg -vf bwdif")
    return warnings


def _notes(result) -> list[str]:
    """What a person should know about a finished video: the warnings, then what was saved."""
    notes = _warnings(result)
    if result.reused_frames:
        notes.append(f"{result.reused_frames} unchanged frames reused")
    if result.resumed_frames:
        notes.append(f"{result.resumed_frames} frames resumed from an earlier run")
    return notes


def _log_warnings(log: EventLog | None, result, **where) -> None:
    if log is not None:
        for warning in _warnings(result):
            log.write("warning", message=warning, **where)


def _progress(args: argparse.Namespace, log: EventLog | None, **where):
    shown = make_progress("none" if args.quiet else args.progress)
    return shown if log is None else Both(shown, log.progress(**where))


def run_upscale(args: argparse.Namespace, log: EventLog | None) -> int:
    from .media import EncoderSettings, check_readable
    from .pipeline import upscale_video

    if (args.input is None) == (args.input_option is None):
        raise UsageError("give the input once, as INPUT or -i INPUT (- for stdin)")
    source = args.input if args.input is not None else args.input_option
    if args.output == "-" and sys.stdout is not None and sys.stdout.isatty():
        raise UsageError("-o - would write the video to this terminal; redirect stdout (> file.mkv, | a "
                         "player) or give -o FILE")
    encoder = EncoderSettings(codec=args.codec, crf=args.crf, preset=args.preset, pix_fmt=args.pix_fmt,
                              options=tuple(args.encoder_option), format=args.format)
    where = {"input": source, "output": args.output}
    if log is not None:
        log.write("start", **where)
    settings = replace(settings_from(args), dedup=args.dedup)
    resume = None
    if args.resume:
        from .jobs import Job, resume_for

        if source == "-" or args.output == "-":
            raise UsageError("--resume needs a file input and a file output: a pipe cannot be read "
                             "again after a stop")
        check_readable(Path(source))
        resume = resume_for(Job(Path(source), Path(args.output), settings, encoder, args.strict),
                            args.segment_seconds)
    result = upscale_video(source, args.output, settings, encoder, strict=args.strict,
                           overwrite=args.overwrite, progress=_progress(args, log, **where), resume=resume)
    _log_warnings(log, result, **where)
    if log is not None:
        log.write("end", **where, status="done", frames=result.frames, seconds=round(result.seconds, 3),
                  fps=round(result.fps, 3), corrupt_packets=result.corrupt_packets,
                  lost_at_start=result.lost_at_start, interlaced_frames=result.interlaced_frames,
                  retimed_frames=result.retimed_frames, reused_frames=result.reused_frames,
                  resumed_frames=result.resumed_frames)
    if not args.quiet:
        print(f"{args.output}: {result.frames} frames in {result.seconds:.1f} s ({result.fps:.2f} fps)"
              + "".join(f"; {note}" for note in _notes(result)), file=sys.stderr)
    return 0


def _plan_batch(args: argparse.Namespace):
    """The batch's jobs and its job file's run options, its report path checked against them."""
    from .jobs import RunOptions, jobs_from_file, jobs_from_inputs, run_options

    values = {key: getattr(args, key) for key in _BATCH_SETTINGS if hasattr(args, key)}
    if "encoder_option" in values:
        values["options"] = dict(values.pop("encoder_option"))
    if args.ray is not None and Path(args.ray).exists():
        raise UsageError(f"--ray took {args.ray} for a cluster address; put a bare --ray after the inputs")
    in_file = RunOptions()
    if len(args.inputs) == 1 and args.inputs[0].endswith(".toml"):
        jobs = jobs_from_file(Path(args.inputs[0]), args.output_dir, values, args.cache_dir, args.template)
        in_file = run_options(Path(args.inputs[0]))
    else:
        if args.output_dir is None:
            raise UsageError("give --output-dir for the outputs (or run a TOML job file)")
        jobs = jobs_from_inputs(args.inputs, args.output_dir, args.template, values,
                                args.cache_dir)
    if args.report is not None:
        _refuse_claimed(args.report, "--report", "report", _batch_claims(jobs))
    return jobs, in_file


def _plan(args: argparse.Namespace):
    """_plan_batch's (jobs, run options) and None, or None and the error in them."""
    report_checked = False
    try:
        _check_report_path(args.report)
        report_checked = True
        return _plan_batch(args), None
    except VidscaleError as exc:
        return None, exc
    except KeyboardInterrupt:
        if report_checked and args.report is not None:
            # The last run's report would otherwise stand, read as this one's success.
            from .report import BatchReport

            with contextlib.suppress(OSError):
                BatchReport([], interrupted=True).write(args.report)
        raise


def _check_report_path(report: Path | None) -> None:
    """Before anything else: the report is written when the batch ends (perhaps hours later), or
    when it is stopped, even while the libraries load."""
    if report is None:
        return
    if report.is_dir() or not report.parent.is_dir():
        raise UsageError(f"--report {report} cannot be written (a directory, or in a folder that "
                         f"does not exist); give a file path in an existing folder")
    if report.exists() and not report.is_file():
        # The report is renamed into place, which would put a file where a device (/dev/full,
        # /dev/null, run as root) or a FIFO was.
        raise UsageError(f"--report {report} is not a regular file; give a file path")
    _refuse_unless_ours(report, "--report", "report", _REPORT_PEEK, lambda text: "jobs" in json.loads(text))


def _batch_claims(jobs) -> list[tuple[str, Path]]:
    """(what, path) of every file a batch reads or writes, for its report and log to keep clear of."""
    from .jobs import sidecar_path

    return [claim for job in jobs for claim in (
        (f"the input of the job for {job.source}", job.source),
        (f"the output of the job for {job.source}", job.output),
        (f"the record of the job for {job.source}", sidecar_path(job.output)))]


def _refuse_claimed(path: Path, option: str, what: str, claimed: list[tuple[str, str | os.PathLike | None]]) -> None:
    for role, other in claimed:
        if other not in (None, "-") and os.path.realpath(other) == os.path.realpath(path):
            raise UsageError(f"{option} {path} is also {role}; give the {what} a path of its own")


def run_batch(args: argparse.Namespace, log: EventLog | None, plan) -> int:
    from .jobs import BatchInterrupted, not_run_result, run_jobs
    from .report import BatchReport

    jobs, in_file = plan

    def on_start(job) -> None:
        if log is not None:
            log.write("job_start", input=str(job.source), output=str(job.output))

    def on_result(job, result) -> None:
        if log is not None:
            _log_warnings(log, result, input=result.input, output=result.output)
            log.write("job_end", **asdict(result))
        if args.quiet and result.status != "failed":
            return
        if result.status == "done":
            text = (f"{result.frames} frames in {result.seconds:.1f} s ({result.fps:.2f} fps) -> {result.output}"
                    + "".join(f"; {note}" for note in _notes(result)))
        elif result.status == "skipped":
            text = f"skipped, {result.error}" if result.error else f"skipped, {result.output} is already done"
        else:
            text = f"failed: {result.error}"
        print(f"{result.input}: {text}", file=sys.stderr)

    ray_address = args.ray or in_file.ray
    ray_cpus = args.ray_cpus or in_file.ray_cpus
    ray_storage = args.ray_storage or in_file.ray_storage
    segment_seconds = args.segment_seconds or in_file.segment_seconds or DEFAULT_SEGMENT_SECONDS
    if ray_address is None and (ray_cpus is not None or ray_storage is not None):
        raise UsageError("--ray-cpus and --ray-storage (ray_cpus, ray_storage) only count with --ray "
                         "(ray in a job file); add one or drop them")
    try:
        if ray_address is None:
            report = run_jobs(jobs, overwrite=args.overwrite, segment_seconds=segment_seconds,
                              on_start=on_start, on_result=on_result,
                              progress=lambda job: _progress(args, log, input=str(job.source)))
        else:
            # Segments run in Ray's worker processes: no progress bar here, one line per job as it ends.
            from .distributed import run_jobs_on_ray

            report = run_jobs_on_ray(jobs, address=ray_address, cpus=ray_cpus, overwrite=args.overwrite,
                                     segment_seconds=segment_seconds, storage=ray_storage or "shared",
                                     on_start=on_start, on_result=on_result)
    except BatchInterrupted as stopped:
        _finish_batch(args, stopped.report, log)
        raise stopped.cause from None
    except KeyboardInterrupt:  # before the first job: starting Ray, say
        _finish_batch(args, BatchReport([not_run_result(job) for job in jobs], interrupted=True), log)
        raise
    return _finish_batch(args, report, log)


def _finish_batch(args: argparse.Namespace, report, log: EventLog | None) -> int:
    if args.report is not None:
        try:
            report.write(args.report)
        except OSError as exc:
            # The jobs' outputs and records are in place; only the report is missing.
            raise MediaError(f"the batch ran ({report.summary()}) but its report {args.report} could not "
                             f"be written ({exc.strerror}); check that folder and free space") from None
    if log is not None:
        log.write("batch_end", summary=report.summary(), done=report.count("done"),
                  skipped=report.count("skipped"), failed=report.count("failed"))
    if not args.quiet or report.exit_status:
        print(f"vidscale batch: {report.summary()}", file=sys.stderr)
    return report.exit_status


def run_image(args: argparse.Namespace) -> int:
    from .media import Image, check_output, image_codec, read_image, write_image
    from .pipeline import FrameUpscaler, sample_type

    check_output(args.output, [args.input], args.overwrite)
    picture = read_image(args.input)
    image_codec(args.output, picture)
    started = time.monotonic()
    upscaler = FrameUpscaler(settings_from(args), calibration=None if args.calibration else [picture.rgb],
                             evaluation=[picture.rgb])
    rgb = upscaler(picture.rgb.copy())
    if picture.has_alpha:
        if (picture.alpha == picture.alpha.flat[0]).all():
            # Uniform (often fully opaque): the model would ripple it by a few levels.
            alpha = np.full((*rgb.shape[:2], 1), picture.alpha.flat[0], rgb.dtype)
        else:
            # Like Real-ESRGAN, alpha goes through the model too (as grey), so edges stay as sharp
            # as the colour they belong to.
            alpha = upscaler(np.repeat(picture.alpha[:, :, None], 3, axis=2))[:, :, :1]
        rgb = np.concatenate([rgb, alpha], axis=2)
    write_image(Image(rgb, grey=picture.grey), args.output)
    if not args.quiet:
        h, w = picture.pixels.shape[:2]
        precision = upscaler.engine.precision_for(sample_type(rgb.dtype))
        print(f"{args.output}: {w}x{h} -> {rgb.shape[1]}x{rgb.shape[0]} with {upscaler.model.name} "
              f"({precision}, {upscaler.engine.settings.device}) in {time.monotonic() - started:.1f} s",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """Run the command line `argv` (sys.argv's) and give its exit status. `exiting`: the process
    ends when this returns, so stop signals are left ignored rather than restored."""
    if sys.stderr is None:
        # Started with stderr closed (2>&-): print() would fall back to stdout, into the video.
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    parser = build_parser()
    args = parser.parse_args(argv)
    log = None
    # A stop signal stops a run like Ctrl-C does: raised in the main thread, where the pipeline
    # turns it into a clean stop (inference drained, temporary output removed).
    previous = {signum: signal.signal(signum, _terminate) for signum in _STOP_SIGNALS}
    try:
        # A batch's jobs first, so that the log keeps clear of their files; an error in them is
        # raised once the log is open, to be logged.
        plan, planning_error = _plan(args) if args.command == "batch" else (None, None)
        if getattr(args, "log_file", None) is not None:
            claimed = ([("the run's input", args.input or args.input_option), ("the run's output", args.output)]
                       if args.command == "upscale" else
                       [("the run's report", args.report), *_batch_claims(plan[0] if plan else [])])
            log = _open_log(args.log_file, claimed)
        if planning_error is not None:
            raise planning_error
        if args.command == "upscale":
            return run_upscale(args, log)
        if args.command == "batch":
            return run_batch(args, log, plan)
        return {"models": run_models, "image": run_image}[args.command](args)
    except OutputClosedError as exc:
        # The reader of our stdout went away (`| head`): nothing to tell it, and Python's own
        # flush of stdout at exit must not fail again with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exc.exit_status
    except VidscaleError as exc:
        print(f"vidscale: error: {exc}", file=sys.stderr)
        if log is not None:
            log.write("error", message=str(exc), exit_status=exc.exit_status)
        return exc.exit_status
    except MemoryError:
        # Python's own allocation failed (a ulimit, a container's limit): no traceback helps.
        message = f"out of memory; {MORE_MEMORY}"
        print(f"vidscale: error: {message}", file=sys.stderr)
        if log is not None:
            log.write("error", message=message, exit_status=1)
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        print(f"vidscale: {'interrupted' if signum == signal.SIGINT else 'terminated'}", file=sys.stderr)
        if log is not None:
            log.write("interrupted", signal=signal.Signals(signum).name)
        return 128 + signum
    finally:
        # Exiting, the outcome is decided and reported: a stop signal during the interpreter's
        # teardown (most of a second, releasing OpenVINO and torch) must not turn it into 128+N.
        if exiting:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if exiting else handler)
        if log is not None:
            log.close()


def _open_log(path: Path, claimed: list[tuple[str, str | os.PathLike | None]]) -> EventLog:
    """The log at `path`, which must not be one of the `claimed` (role, path) files of the run."""
    if str(path) == "-":
        raise UsageError("--log-file takes a file path (stderr carries progress: --progress json)")
    _refuse_claimed(path, "--log-file", "log", claimed)
    _refuse_unless_ours(path, "--log-file", "log", _LOG_PEEK,
                        lambda text: "event" in json.loads(text.partition("\n")[0]))
    try:
        return EventLog(path)
    except OSError as exc:
        raise UsageError(f"cannot open the log file {path} ({exc.strerror}); "
                         f"choose a path in a writable directory") from None


def _refuse_unless_ours(path: Path, option: str, what: str, peek: int, looks_ours) -> None:
    """Refuse to write a log or report over a file vidscale did not write as one (an input given
    where a path was meant, `--report ep01.mkv ep02.mkv`): it would be lost. `looks_ours(text)`
    tells by the file's first `peek` bytes; it may raise."""
    if not path.is_file():
        return  # absent, or a device or FIFO (/dev/full, a log reader's pipe): nothing to lose
    try:
        with open(path, "rb") as file:
            start = file.read(peek)
    except OSError:
        return  # not readable: writing it fails with its own message
    try:
        if not start or looks_ours(start.decode()):
            return
    except (UnicodeDecodeError, ValueError, TypeError):
        pass
    raise UsageError(f"{option} {path} is a file that is not a vidscale {what}, and writing it would lose "
                     f"it; give a new path or one an earlier {what} went to")


# Enough for a log's first line, and for a whole report of thousands of jobs.
_LOG_PEEK, _REPORT_PEEK = 1 << 16, 1 << 26


def entry() -> None:
    """The command: main(), then exit. A stage thread stuck in a blocking read or write (a quiet
    input pipe, a stdout reader that stopped reading) cannot be stopped, and the interpreter
    cannot shut down around it (it would wait on stdout's lock, or crash when the thread wakes):
    then the process ends at once, its message already written."""
    status = main(exiting=True)
    if any(t.name.startswith("vidscale-") and t.is_alive() for t in threading.enumerate()):
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
