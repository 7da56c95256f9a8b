"""`vidscale batch` as a nightly timer runs it: job files, skip-when-done, reports, exit statuses."""

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import termios
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from clips import corrupt_clip, make_clip
from vidscale import jobs as jobs_module
from vidscale import segments
from vidscale.cli import main
from vidscale.errors import EXIT_SOME_FAILED, UsageError
from vidscale.jobs import (BatchInterrupted, BatchReport, JobResult, jobs_from_file, jobs_from_inputs, run_jobs,
                           settings_digest)

FAST = ["-c:v", "libx264", "--preset", "ultrafast", "--progress", "none"]


@pytest.fixture
def batch(cache_dir, identity_x2, capsys):
    def batch(*args: str) -> tuple[int, str]:
        status = main(["--cache-dir", str(cache_dir), "batch", *args])
        return status, capsys.readouterr().err

    return batch


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_a_second_run_skips_every_job_already_done(tmp_path, batch, identity_x2):
    sources = [make_clip(tmp_path / f"ep{n}.mkv", frames=4) for n in (1, 2)]
    out, report = tmp_path / "out", tmp_path / "report.json"
    out.mkdir()
    args = [*map(str, sources), "--output-dir", str(out), "--template", "{stem}.x2.mkv", "-m", str(identity_x2),
            *FAST, "--report", str(report)]
    status, err = batch(*args)
    assert status == 0, err
    first = json.loads(report.read_text())
    assert [(j["status"], j["frames"], j["output"]) for j in first["jobs"]] == [
        ("done", 4, str(out / "ep1.x2.mkv")), ("done", 4, str(out / "ep2.x2.mkv"))]
    assert all(j["seconds"] > 0 and j["fps"] > 0 and j["error"] is None for j in first["jobs"])
    assert err.splitlines()[-1].startswith("vidscale batch: 2 jobs: 2 done, 0 skipped, 0 failed in ")
    written = snapshot(out)
    assert sorted(written) == ["ep1.x2.mkv", "ep1.x2.mkv.vidscale.json", "ep2.x2.mkv", "ep2.x2.mkv.vidscale.json"]

    status, err = batch(*args)
    assert status == 0, err
    second = json.loads(report.read_text())
    assert [j["status"] for j in second["jobs"]] == ["skipped", "skipped"]
    assert (second["done"], second["skipped"], second["failed"]) == (0, 2, 0)
    assert "2 jobs: 0 done, 2 skipped, 0 failed" in err
    assert snapshot(out) == written


def test_an_input_touched_but_unchanged_is_skipped_one_repaired_in_the_middle_is_not(tmp_path, batch, identity_x2):
    # Larger than the first and last MiB the cheap fingerprint hashes: noise does not compress.
    source = tmp_path / "ep1.mkv"
    rng = np.random.default_rng(5)
    with av.open(str(source), "w") as clip:
        video = clip.add_stream("ffv1", rate=25)
        video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
        for index in range(30):
            noise = av.VideoFrame.from_ndarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), format="rgb24")
            frame = noise.reformat(format="yuv420p")
            frame.pts = index
            clip.mux(video.encode(frame))
        clip.mux(video.encode())
    assert source.stat().st_size > 3 * 2**20, "the middle must lie outside the hashed ends"
    out = tmp_path / "out"
    args = [str(source), "--output-dir", str(out), "-m", str(identity_x2), "-c:v", "ffv1", "--progress", "none"]
    assert batch(*args)[0] == 0
    os.utime(source, ns=(10**18, 10**18))  # copied or restored without its mtime
    status, err = batch(*args)
    assert status == 0 and "1 jobs: 0 done, 1 skipped" in err, err
    data = bytearray(source.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF  # a re-checked download repaired a byte: same size, same ends
    source.write_bytes(bytes(data))
    status, err = batch(*args)
    assert status == EXIT_SOME_FAILED, err
    assert f"was made from an earlier {source}, which has changed since; pass --overwrite to replace it" in err


def test_an_input_replaced_while_it_was_upscaled_gives_no_output_and_no_record(tmp_path, batch, identity_x2,
                                                                            monkeypatch):
    source = make_clip(tmp_path / "ep1.mkv", frames=6)
    other = make_clip(tmp_path / "other.mkv", frames=3)
    upscale_video = jobs_module.upscale_video

    def replaced_meanwhile(*args, on_commit, **kwargs):
        def commit(*commit_args):
            os.replace(other, source)  # a download finishing, a sync tool
            on_commit(*commit_args)
        return upscale_video(*args, on_commit=commit, **kwargs)

    monkeypatch.setattr(jobs_module, "upscale_video", replaced_meanwhile)
    out = tmp_path / "out"
    status, err = batch(str(source), "--output-dir", str(out), "-m", str(identity_x2), *FAST)
    assert status == EXIT_SOME_FAILED
    assert (f"{source} was replaced or written to while it was upscaled; the output was not kept, run the "
            f"job again") in err
    assert list(out.iterdir()) == []  # the next run makes it from what the path holds then


def test_a_changed_input_is_not_skipped_and_its_old_output_is_kept_without_overwrite(tmp_path, batch, identity_x2):
    source = make_clip(tmp_path / "ep1.mkv", frames=4)
    out = tmp_path / "out"
    out.mkdir()
    args = [str(source), "--output-dir", str(out), "-m", str(identity_x2), *FAST]
    assert batch(*args)[0] == 0
    kept = (out / "ep1.upscaled.mkv").read_bytes()
    make_clip(source, frames=5)  # the episode was replaced by a longer cut
    status, err = batch(*args)
    assert status == EXIT_SOME_FAILED
    assert (f"output {out / 'ep1.upscaled.mkv'} was made from an earlier {source}, which has changed since; "
            f"pass --overwrite to replace it") in err
    assert (out / "ep1.upscaled.mkv").read_bytes() == kept
    status, err = batch(*args, "--overwrite")
    assert status == 0, err
    assert "5 frames" in err


def test_a_refused_run_keeps_the_record_of_the_output_it_did_not_replace(tmp_path, batch, identity_x2):
    source = make_clip(tmp_path / "ep1.mkv", frames=3)
    args = [str(source), "--output-dir", str(tmp_path / "out"), "-m", str(identity_x2), *FAST]
    assert batch(*args)[0] == 0
    status, err = batch(*args, "--crf", "30")  # another setting, no --overwrite: refused
    assert status == EXIT_SOME_FAILED
    assert "ep1.upscaled.mkv was made with other settings than this job's; pass --overwrite to replace it" in err
    status, err = batch(*args)  # the nightly command as it was
    assert status == 0 and "skipped" in err, err
    with open(tmp_path / "out" / "ep1.upscaled.mkv", "ab") as output:
        output.write(b"\0")
    status, err = batch(*args)
    assert status == EXIT_SOME_FAILED
    assert "ep1.upscaled.mkv was changed after vidscale made it; pass --overwrite to replace it" in err


@pytest.mark.parametrize("edit", ["in place", "copied without its mtime"])
def test_an_output_edited_in_place_is_not_taken_for_done(tmp_path, batch, identity_x2, edit):
    # Its size alone was compared: mkvpropedit (which edits in place) or bit rot went unnoticed,
    # while a copy that only lost the mtime must still count as done.
    source = make_clip(tmp_path / "ep1.mkv", frames=3)
    args = [str(source), "--output-dir", str(tmp_path / "out"), "-m", str(identity_x2), *FAST]
    assert batch(*args)[0] == 0
    output = tmp_path / "out" / "ep1.upscaled.mkv"
    data = output.read_bytes()
    if edit == "in place":
        middle = len(data) // 2
        output.write_bytes(data[:middle] + bytes([(data[middle] + 1) % 256]) + data[middle + 1:])
        status, err = batch(*args)
        assert status == EXIT_SOME_FAILED
        assert "ep1.upscaled.mkv was changed after vidscale made it; pass --overwrite to replace it" in err
    else:
        output.unlink()
        output.write_bytes(data)
        status, err = batch(*args)
        assert status == 0 and "skipped" in err, err


def test_job_file_with_defaults_per_job_settings_and_a_failing_job(tmp_path, batch, identity_x2):
    season = tmp_path / "season"
    season.mkdir()
    for n in (1, 2):
        make_clip(season / f"ep{n}.mkv", frames=3)
    (season / "notes.txt").write_text("not a video")
    (tmp_path / "broken.mkv").write_bytes(b"\x1a\x45\xdf\xa3 not really matroska" * 10)
    jobs = tmp_path / "season.toml"
    jobs.write_text(f'''
output_dir = "out"
template = "{{parent}}/{{stem}}.x2.mkv"

[defaults]
model = "{identity_x2}"
codec = "libx264"
preset = "ultrafast"
tile = [40, 48]
overlap = 8
options = {{ tune = "animation" }}

[[job]]
inputs = "season"

[[job]]
inputs = ["broken.mkv", "season/ep1.*"]
template = "extra-{{stem}}.mkv"
codec = "ffv1"
''')
    (tmp_path / "out").mkdir()
    status, err = batch(str(jobs), "--report", str(tmp_path / "report.json"), "--progress", "none")
    assert status == EXIT_SOME_FAILED, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(j["input"], j["status"]) for j in report["jobs"]] == [
        (str(season / "ep1.mkv"), "done"), (str(season / "ep2.mkv"), "done"),
        (str(tmp_path / "broken.mkv"), "failed"), (str(season / "ep1.mkv"), "done")]
    assert "broken.mkv" in report["jobs"][2]["error"] and "\n" not in report["jobs"][2]["error"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mkv")) == ["extra-ep1.mkv"]
    # {parent} made a folder per season
    assert sorted(p.name for p in (tmp_path / "out" / "season").iterdir()) == [
        "ep1.x2.mkv", "ep1.x2.mkv.vidscale.json", "ep2.x2.mkv", "ep2.x2.mkv.vidscale.json"]
    assert "4 jobs: 3 done, 0 skipped, 1 failed" in err.splitlines()[-1]


@pytest.mark.parametrize("content, message", [
    ('[[job]]\ninputs = "a.mkv"\ncrf = "high"\n', "crf = 'high' is not a valid value"),
    ('[[job]]\ninputs = "a.mkv"\nspeed = 3\n', "unknown setting speed"),
    ('[defaults]\nspeed = 3\n[[job]]\ninputs = "a.mkv"\n', "jobs.toml [defaults]: unknown setting speed"),
    ('output_dir = "out"\n', "has no [[job]] entries"),
    ('[[job]\n', "cannot be read"),
    ('segment_seconds = 0\n[[job]]\ninputs = "a.mkv"\n', "segment_seconds = 0 is not valid"),
    ('ray = "auto"\nray_storage = "nfs"\n[[job]]\ninputs = "a.mkv"\n', "ray_storage = 'nfs' is not valid"),
    ('ray_storage = "object-store"\n[[job]]\ninputs = "a.mkv"\n', "only count with --ray"),
    ('[[job]]\ninputs = "a.mkv"\ndedup = 255\n', "dedup threshold 255 must be at least 0 and below 255 (at 255"),
    ('[[job]]\ninputs = "a.mkv"\ndedup = "often"\n', "dedup 'often' is not off, exact or a number"),
    ('[[job]]\ninputs = "a.mkv"\ntemplate = "../{stem}.mkv"\n', "which is not a file inside the output"),
    ('[[job]]\ninputs = "a.mkv"\ntemplate = "/srv/{stem}.mkv"\n', "which is not a file inside the output"),
    ('[[job]]\ninputs = "a.mkv"\ntemplate = "{stem.real}.mkv"\n', "is not valid ({stem.real})"),
    ('[[job]]\ninputs = "a.mkv"\ntemplate = "{stem:>99999999}.mkv"\n', "is not valid ({stem})"),
    ('[[job]]\ninputs = "a.mkv"\n[[job]]\ninputs = "a.mkv"\ncrf = 30\n', "two jobs write"),
])
def test_a_bad_job_file_is_refused_before_any_work(tmp_path, batch, content, message):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(content)
    status, err = batch(str(jobs), "--output-dir", str(tmp_path))
    assert status == 2
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.toml"]


def test_two_inputs_for_one_output_are_refused(tmp_path, batch):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        make_clip(tmp_path / folder / "ep1.mkv", frames=2)
    status, err = batch(str(tmp_path / "a" / "ep1.mkv"), str(tmp_path / "b" / "ep1.mkv"),
                        "--output-dir", str(tmp_path))
    assert status == 2
    assert "would both be written to" in err and "{parent}" in err


def test_one_input_named_twice_is_one_job(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ep1.mkv").write_bytes(b"")
    os.symlink(tmp_path / "a" / "ep1.mkv", tmp_path / "link.mkv")
    jobs = jobs_from_inputs([str(tmp_path / "a" / "ep1.mkv"), str(tmp_path / "a" / ".." / "a" / "ep1.mkv"),
                             str(tmp_path / "a" / "*.mkv")], tmp_path / "out", None, {}, None)
    assert [job.source for job in jobs] == [tmp_path / "a" / "ep1.mkv"]
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('output_dir = "out"\ntemplate = "ep1.mkv"\n[[job]]\ninputs = ["a/ep1.mkv", "link.mkv"]\n')
    assert len(jobs_from_file(jobs, None, {}, None)) == 1


@pytest.mark.parametrize("segment_seconds", ["60", "0.1"])
def test_the_record_is_written_before_the_output_appears(tmp_path, batch, identity_x2, monkeypatch,
                                                        segment_seconds):
    # A stop between the two must not leave an output without its record: the batch would
    # refuse to replace it, night after night.
    source = make_clip(tmp_path / "ep1.mkv", frames=12, gop=3)
    output = tmp_path / "out" / "ep1.upscaled.mkv"
    record_there = []

    def watching(rename):
        def watched(src, dst):
            if Path(dst) == output:
                record_there.append(Path(f"{output}.vidscale.json").is_file())
            rename(src, dst)
        return watched

    # Without --overwrite the output is linked into place, with it renamed.
    monkeypatch.setattr(os, "replace", watching(os.replace))
    monkeypatch.setattr(os, "link", watching(os.link))
    status, err = batch(str(source), "--output-dir", str(tmp_path / "out"), "-m", str(identity_x2), *FAST,
                        "--segment-seconds", segment_seconds)
    assert status == 0, err
    assert record_there == [True]
    assert batch(str(source), "--output-dir", str(tmp_path / "out"), "-m", str(identity_x2), *FAST,
                 "--segment-seconds", segment_seconds)[1].count("skipped") == 2  # the job line and the summary


def test_job_file_settings_take_what_the_command_line_takes(tmp_path):
    (tmp_path / "cal.png").write_bytes(b"")
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('output_dir = "out"\n[[job]]\ninputs = "a.mkv"\ndedup = "off"\ncalibration = "cal.png"\n'
                    '[[job]]\ninputs = "b.mkv"\ndedup = "exact"\n[[job]]\ninputs = "c.mkv"\ndedup = 3\n')
    off, exact, three = jobs_from_file(jobs, None, {}, None)
    assert (off.settings.dedup, exact.settings.dedup, three.settings.dedup) == (None, 0.0, 3.0)
    assert off.settings.calibration == tmp_path / "cal.png"  # relative to the job file, like inputs


def test_encoder_settings_of_the_defaults_are_offered_a_job_s_own_must_be_known(tmp_path):
    # [defaults] may carry x264 options into an FFV1 job, which ignores them; a misspelt option of
    # the job's own is refused when its encoder opens.
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('output_dir = "out"\n[defaults]\ncrf = 20\n[[job]]\ninputs = "a.mkv"\ncodec = "ffv1"\n'
                    '[[job]]\ninputs = "b.mkv"\noptions = { tnue = "film" }\n')
    inherited, own = jobs_from_file(jobs, None, {}, None)
    assert (inherited.encoder.offered, own.encoder.offered) == ({"crf"}, {"crf"})
    from_command_line, own = jobs_from_file(jobs, None, {"options": {"tune": "film"}}, None)
    assert (from_command_line.encoder.offered, own.encoder.offered) == ({"crf", "tune"}, {"crf"})
    # Whether an ignored option is refused changes no output: the record of a finished job stays valid.
    assert settings_digest(inherited) == settings_digest(replace(inherited, encoder=replace(inherited.encoder,
                                                                                            offered=frozenset())))


def test_the_command_line_template_replaces_the_job_file_s_own(tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('output_dir = "out"\ntemplate = "{stem}.file.mkv"\n[[job]]\ninputs = "a.mkv"\n'
                    '[[job]]\ninputs = "b.mkv"\ntemplate = "{stem}.job.mkv"\n')
    a, b = jobs_from_file(jobs, None, {}, None, "{stem}.cli.mkv")
    assert (a.output.name, b.output.name) == ("a.cli.mkv", "b.job.mkv")  # as --output-dir and output_dir


def test_parent_is_the_input_folder_even_for_a_bare_name(tmp_path, monkeypatch):
    (tmp_path / "season1").mkdir()
    monkeypatch.chdir(tmp_path / "season1")
    [job] = jobs_from_inputs(["ep1.mkv"], tmp_path / "out", "{parent}/{stem}.x2.mkv", {}, None)
    assert job.output == tmp_path / "out" / "season1" / "ep1.x2.mkv"


def test_a_folder_or_glob_leaves_out_outputs_written_beside_the_inputs(tmp_path, batch, identity_x2):
    make_clip(tmp_path / "ep1.mkv", frames=2)
    args = ["--output-dir", str(tmp_path), "--template", "{stem}.x2.mkv", "-m", str(identity_x2), *FAST]
    assert batch(str(tmp_path), *args)[0] == 0
    for inputs in (str(tmp_path), str(tmp_path / "*")):
        status, err = batch(inputs, *args)
        assert status == 0 and "1 jobs: 0 done, 1 skipped" in err, err
    assert sorted(p.name for p in tmp_path.glob("*.mkv")) == ["ep1.mkv", "ep1.x2.mkv"]


def test_a_report_path_that_cannot_be_written_is_refused_before_any_job(tmp_path, batch):
    source = make_clip(tmp_path / "ep1.mkv", frames=2)
    status, err = batch(str(source), "--output-dir", str(tmp_path / "out"), "--report",
                        str(tmp_path / "missing" / "report.json"))
    assert status == 2 and "--report" in err and "cannot be written" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_report_path_that_is_not_a_regular_file_is_refused_not_replaced(tmp_path, batch):
    source = make_clip(tmp_path / "ep1.mkv", frames=2)
    os.mkfifo(tmp_path / "report.fifo")  # as a device such as /dev/full would be: renamed over
    status, err = batch(str(source), "--output-dir", str(tmp_path / "out"), "--report", str(tmp_path / "report.fifo"))
    assert (status, err) == (2, f"vidscale: error: --report {tmp_path / 'report.fifo'} is not a regular file; "
                                f"give a file path\n")
    assert (tmp_path / "report.fifo").is_fifo()


def test_a_report_that_cannot_be_written_at_the_end_is_one_line_after_the_jobs(tmp_path, batch, identity_x2,
                                                                               monkeypatch):
    source = make_clip(tmp_path / "ep1.mkv", frames=2)

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(BatchReport, "write", full)
    status, err = batch(str(source), "--output-dir", str(tmp_path / "out"), "-m", str(identity_x2), *FAST,
                        "--report", str(tmp_path / "report.json"))
    assert status == 5  # an output that could not be written, not a usage error
    last = err.splitlines()[-1]
    assert last.startswith("vidscale: error: the batch ran (1 jobs: 1 done, 0 skipped, 0 failed in ")
    assert last.endswith(f"but its report {tmp_path / 'report.json'} could not be written (No space left on "
                         f"device); check that folder and free space")
    assert (tmp_path / "out" / "ep1.upscaled.mkv").is_file()


# --- signals ------------------------------------------------------------------------------------

def _started(cache_dir, model, *args: str, **popen) -> subprocess.Popen:
    """`vidscale --cache-dir CACHE_DIR ARGS -m MODEL` as a process of its own, stderr read as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "vidscale", "--cache-dir", str(cache_dir), *args, "-m", str(model)],
        # A shell's background job ignores SIGINT, and so would its children: the suite may run as one.
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


@pytest.mark.parametrize("command, signum, status", [
    ("upscale", signal.SIGTERM, 143),
    ("upscale", signal.SIGINT, 130),
    ("upscale", signal.SIGHUP, 129),
    ("batch", signal.SIGTERM, 143),
])
def test_a_signal_stops_the_run_cleanly_and_leaves_nothing(tmp_path, cache_dir, identity_x2, command, signum, status):
    source = make_clip(tmp_path / "long.mkv", frames=600, size=(128, 96), audio=False)
    out = tmp_path / "out"
    out.mkdir()
    where = ["-o", str(out / "long.x2.mkv")] if command == "upscale" else [
        "--output-dir", str(out), "--report", str(tmp_path / "report.json")]
    process = _started(cache_dir, identity_x2, command, str(source), *where, "-c:v", "libx264", "--progress", "json")
    try:
        first = json.loads(process.stderr.readline())  # frames are flowing: stop mid-run
        process.send_signal(signum)
        err = process.stderr.read()
        assert process.wait(timeout=120) == status, err
    finally:
        process.kill()
    assert first["frame"] < 600
    assert err.splitlines()[-1] == ("vidscale: interrupted" if signum == signal.SIGINT else "vidscale: terminated")
    assert "Traceback" not in err
    assert list(out.iterdir()) == []  # no output, no .partial, no sidecar
    if command == "batch":
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["interrupted"] is True
        assert [(j["status"], j["error"]) for j in report["jobs"]] == [("failed", "interrupted")]
        assert report["jobs"][0]["seconds"] > 0  # the time it ran before the stop, spent all the same


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_the_run_reported_success_leaves_its_exit_status_0(tmp_path, cache_dir, identity_x2, signum):
    # The interpreter's teardown after the summary line takes most of a second, long enough for
    # a scheduler's stop to land in it; the output is complete by then and must be called so.
    source = make_clip(tmp_path / "in.mkv", frames=4, size=(64, 48), audio=False)
    process = _started(cache_dir, identity_x2, "upscale", str(source), "-o", str(tmp_path / "out.mkv"),
                       "--progress", "none")
    try:
        summary = process.stderr.readline()
        assert "4 frames in" in summary
        time.sleep(0.05)
        process.send_signal(signum)
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        process.kill()
    assert process.stderr.read() == ""
    assert (tmp_path / "out.mkv").is_file()


@pytest.mark.parametrize("command", ["upscale", "batch"])
def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path, cache_dir, identity_x2, command):
    # PyAV, OpenVINO and torch take over a second to import: a Ctrl-C then was a traceback.
    source = make_clip(tmp_path / "in.mkv", frames=4, size=(64, 48), audio=False)
    # A batch's report of the last run, which would otherwise stand, read as this one's success.
    report = tmp_path / "report.json"
    BatchReport([JobResult(str(source), str(tmp_path / "in.upscaled.mkv"), "done", frames=4)]).write(report)
    where = ["-o", str(tmp_path / "out.mkv")] if command == "upscale" else [
        "--output-dir", str(tmp_path), "--report", str(report)]
    # Python reports each import as it ends: the signal goes once the command has loaded PyAV,
    # with torch and OpenVINO still to load (a fixed delay landed before main() in a fresh clone,
    # still compiling its bytecode).
    process = _started(cache_dir, identity_x2, command, str(source), *where,
                       "--progress", "none", env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    try:
        for line in process.stderr:
            if line.split("|")[-1].strip() == "vidscale.media":
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        process.kill()
    said = [line for line in process.stderr.read().splitlines() if not line.startswith("import time:")]
    assert said == ["vidscale: interrupted"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mkv", "report.json"]
    if command == "batch":
        assert json.loads(report.read_text()) == {"jobs": [], "done": 0, "skipped": 0, "failed": 0, "seconds": 0.0,
                                                  "interrupted": True}


def _terminate_once_frames_flow(process: subprocess.Popen) -> None:
    """SIGTERM a run with --progress json once its first progress line shows frames flowing; it
    must stop as a terminated run does."""
    json.loads(process.stderr.readline())
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert process.stderr.read().splitlines()[-1] == "vidscale: terminated"


def test_a_signal_stops_a_run_whose_stdout_reader_stopped_reading(tmp_path, cache_dir, identity_x2):
    # The encoder thread then sits in a blocking write that nothing can end; the run must still
    # stop, and not crash when the reader wakes up.
    source = make_clip(tmp_path / "long.mkv", frames=200, size=(128, 96), audio=False)
    process = _started(cache_dir, identity_x2, "upscale", str(source), "-o", "-", "-c:v", "ffv1", "--progress", "json",
                       stdout=subprocess.PIPE)
    try:
        _terminate_once_frames_flow(process)  # into a pipe nobody reads
    finally:
        process.kill()


def test_a_signal_stops_a_run_still_opening_a_quiet_stdin(tmp_path, cache_dir, identity_x2):
    source = make_clip(tmp_path / "long.mkv", frames=200, size=(128, 96), audio=False)
    read_end, write_end = os.pipe()
    process = _started(cache_dir, identity_x2, "upscale", "-", "-o", str(tmp_path / "out.mkv"), stdin=read_end)
    try:
        os.write(write_end, source.read_bytes()[:4000])  # a header, then the producer goes quiet
        while int.from_bytes(fcntl.ioctl(read_end, termios.FIONREAD, b"\0" * 4), "little"):
            time.sleep(0.1)  # until vidscale has read it: it is opening the input
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143
        assert process.stderr.read() == "vidscale: terminated\n"
    finally:
        process.kill()
        os.close(write_end)
        os.close(read_end)
    assert list(tmp_path.iterdir()) == [source]


def test_a_signal_while_stdin_stalls_mid_run_leaves_no_temporary_output(tmp_path, cache_dir, identity_x2):
    # The decoder sits in a read nothing can end; the output, which no thread is inside, still
    # goes as a stopped run's does.
    # Long enough that half of it is past what FFmpeg reads (5 s) to open the input.
    source = make_clip(tmp_path / "long.mkv", frames=600, size=(128, 96), audio=False)
    out = tmp_path / "out"
    out.mkdir()
    read_end, write_end = os.pipe()
    process = _started(cache_dir, identity_x2, "upscale", "-", "-o", str(out / "o.mkv"), "-c:v", "ffv1",
                       "--progress", "json", stdin=read_end)
    try:
        data = source.read_bytes()
        os.write(write_end, data[:len(data) // 2])  # then the producer goes quiet
        _terminate_once_frames_flow(process)
    finally:
        process.kill()
        os.close(write_end)
        os.close(read_end)
    assert list(out.iterdir()) == []


def test_interlaced_frames_are_told_in_the_summary_report_and_log(tmp_path, batch, identity_x2):
    # They were upscaled as woven pictures without a word, and the field order tag was gone.
    source = make_clip(tmp_path / "ep1.mkv", frames=4, options={"x264-params": "interlaced=1:tff=1"})
    log, report = tmp_path / "log.jsonl", tmp_path / "report.json"
    status, err = batch(str(source), "--output-dir", str(tmp_path / "out"), "-m", str(identity_x2), *FAST,
                        "--report", str(report), "--log-file", str(log))
    assert status == 0, err
    told = ("4 frames are interlaced and were upscaled with their fields woven together (combing); "
            "deinterlace the input first, e.g. ffmpeg -vf bwdif")
    assert err.splitlines()[0].endswith(f"; {told}")
    assert json.loads(report.read_text())["jobs"][0]["interlaced_frames"] == 4
    assert [r["message"] for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "warning"] == [told]


def test_log_file_records_jobs_warnings_and_errors(tmp_path, batch, identity_x2):
    broken = corrupt_clip(tmp_path)
    (tmp_path / "noise.mkv").write_bytes(b"\x00" * 4000)
    out, log = tmp_path / "out", tmp_path / "vidscale.jsonl"
    out.mkdir()
    status, _ = batch(str(broken), str(tmp_path / "noise.mkv"), "--output-dir", str(out), "-m", str(identity_x2),
                      "-c:v", "ffv1", "--progress", "none", "--log-file", str(log))
    assert status == EXIT_SOME_FAILED
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(r["time"].endswith("+00:00") for r in records)
    events = [(r["event"], Path(r.get("input", "")).name) for r in records if r["event"] != "progress"]
    assert events == [("job_start", "broken.mkv"), ("warning", "broken.mkv"), ("job_end", "broken.mkv"),
                      ("job_start", "noise.mkv"), ("job_end", "noise.mkv"), ("batch_end", "")]
    by_event = {r["event"]: r for r in records}
    assert by_event["warning"]["message"] == "1 corrupt packets concealed"
    assert records[-2]["status"] == "failed" and "noise.mkv is not a video file" in records[-2]["error"]
    assert by_event["progress"]["frame"] == 5 and Path(by_event["progress"]["input"]).name == "broken.mkv"
    assert by_event["batch_end"]["failed"] == 1


def test_log_file_of_a_failing_upscale(tmp_path, cache_dir, capsys):
    log = tmp_path / "vidscale.jsonl"
    status = main(["--cache-dir", str(cache_dir), "upscale", str(tmp_path / "gone.mkv"), "-o",
                   str(tmp_path / "out.mkv"), "--log-file", str(log)])
    assert status == 5
    assert "gone.mkv does not exist" in capsys.readouterr().err
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "error"]
    assert records[1]["exit_status"] == 5 and "gone.mkv does not exist" in records[1]["message"]


def test_a_report_or_log_never_goes_over_a_file_that_is_not_one(tmp_path, batch, identity_x2, capsys, cache_dir):
    # `--report` taken for a switch: the next argument, an episode, was replaced by the report.
    episodes = [make_clip(tmp_path / f"ep0{n}.mkv", frames=2) for n in (1, 2)]
    kept = [e.read_bytes() for e in episodes]
    out = tmp_path / "out"
    for option in ("--report", "--log-file"):
        status, err = batch(option, *map(str, episodes), "--output-dir", str(out), "-m", str(identity_x2))
        assert status == 2
        assert err.strip().endswith(f"{option} {episodes[0]} is a file that is not a vidscale "
                                    f"{'report' if option == '--report' else 'log'}, and writing it would lose it; "
                                    f"give a new path or one an earlier "
                                    f"{'report' if option == '--report' else 'log'} went to")
    assert [e.read_bytes() for e in episodes] == kept and not out.exists()
    target = tmp_path / "o.mkv"
    status = main(["--cache-dir", str(cache_dir), "upscale", str(episodes[0]), "-o", str(target),
                   "-m", str(identity_x2), "--log-file", str(target)])
    assert status == 2 and "is also the run's output; give the log a path of its own" in capsys.readouterr().err
    assert not target.exists()
    # Earlier ones are written again: a report replaced, a log appended to.
    report, log = tmp_path / "report.json", tmp_path / "log.jsonl"
    for _ in range(2):
        status, err = batch(*map(str, episodes), "--output-dir", str(out), "-m", str(identity_x2),
                            "--report", str(report), "--log-file", str(log))
        assert status == 0, err
    assert json.loads(report.read_text())["skipped"] == 2
    assert [json.loads(line)["event"] for line in log.read_text().splitlines()].count("batch_end") == 2


@pytest.mark.parametrize("option, path", [
    ("--report", "out/ep1.upscaled.mkv"), ("--report", "out/ep1.upscaled.mkv.vidscale.json"),
    ("--log-file", "out/ep1.upscaled.mkv"), ("--log-file", "out/ep1.upscaled.mkv.vidscale.json")])
def test_a_report_or_log_where_a_job_writes_is_refused_before_any_work(tmp_path, batch, identity_x2, option, path,
                                                                       monkeypatch):
    # It would have replaced the finished episode (or its record) with JSON, and exited 0.
    monkeypatch.chdir(tmp_path)
    make_clip(tmp_path / "ep1.mkv", frames=2)
    (tmp_path / "out").mkdir()
    status, err = batch("ep1.mkv", "--output-dir", "out", "-m", str(identity_x2), *FAST, option, path)
    assert status == 2
    what = "output" if path.endswith(".mkv") else "record"
    assert err == (f"vidscale: error: {option} {path} is also the {what} of the job for {tmp_path / 'ep1.mkv'}; "
                   f"give the {'report' if option == '--report' else 'log'} a path of its own\n")
    assert list((tmp_path / "out").iterdir()) == []


def test_an_output_that_is_another_jobs_input_is_refused_before_any_work(tmp_path, batch, identity_x2):
    # --overwrite is for outputs: it replaced the user's ep1.x2.mkv, then upscaled the replacement.
    folder = tmp_path / "season"
    folder.mkdir()
    make_clip(folder / "ep1.mkv", frames=2)
    make_clip(folder / "ep1.x2.mkv", frames=3)
    before = snapshot(folder)
    status, err = batch(str(folder), "--output-dir", str(folder), "--template", "{stem}.x2.mkv", "-m",
                        str(identity_x2), *FAST, "--overwrite")
    assert status == 2
    assert err == (f"vidscale: error: {folder / 'ep1.x2.mkv'}, the output of {folder / 'ep1.mkv'}, is also an input "
                   f"of this batch; give an output directory or template that keeps outputs apart from inputs\n")
    assert snapshot(folder) == before


def test_inputs_named_as_releases_are_with_brackets_are_files_not_patterns(tmp_path):
    show = tmp_path / "[Group] Show"
    show.mkdir()
    episodes = [show / f"[Group] Show - 0{n}.mkv" for n in (1, 2)]
    for episode in episodes:
        episode.write_bytes(b"")
    assert jobs_module.expand_inputs(str(episodes[0]), tmp_path) == [episodes[0]]
    assert jobs_module.expand_inputs("[Group] Show/*.mkv", tmp_path) == episodes
    for n in (1, 2, 3):
        (tmp_path / f"ep{n}.mkv").write_bytes(b"")
    assert jobs_module.expand_inputs("ep[12].mkv", tmp_path) == [tmp_path / "ep1.mkv", tmp_path / "ep2.mkv"]


def test_a_glob_leaves_out_the_segments_of_a_stopped_run(tmp_path):
    (tmp_path / "s1" / f"e1.x2.mkv{segments.WORK_SUFFIX}").mkdir(parents=True)
    (tmp_path / "s1" / "e1.mkv").write_bytes(b"")
    (tmp_path / "s1" / f"e1.x2.mkv{segments.WORK_SUFFIX}" / "segment-00001.mkv").write_bytes(b"")
    assert jobs_module.expand_inputs("**/*.mkv", tmp_path) == [tmp_path / "s1" / "e1.mkv"]


def test_a_name_too_long_in_a_folder_fails_its_job_alone(tmp_path, batch, identity_x2):
    folder = tmp_path / "season"
    folder.mkdir()
    long_name = make_clip(folder / ("L" * 240 + ".mkv"), frames=2)
    make_clip(folder / "ok.mkv", frames=2)
    for inputs in (str(folder), str(folder / "*.mkv")):
        status, err = batch(inputs, "--output-dir", str(tmp_path / "out"), "-m", str(identity_x2), *FAST)
        assert status == EXIT_SOME_FAILED, err
        assert f"{long_name}: failed: output file name LLLL" in err and "Traceback" not in err
        assert (tmp_path / "out" / "ok.upscaled.mkv").exists()


@pytest.mark.parametrize("text, message", [
    ("output_dir = 5\n[[job]]\ninputs = ['a.mkv']\n", "output_dir = 5 is not valid; write it as a quoted path"),
    ("template = 5\n[[job]]\ninputs = ['a.mkv']\n", "template = 5 is not valid; write it as a quoted path"),
    ("[[job]]\ninputs = ['a.mkv']\noutput_dir = 7\n", "job 1: output_dir = 7 is not valid"),
    ("defaults = 5\n[[job]]\ninputs = ['a.mkv']\n", "defaults must be a table"),
    ("[job]\ninputs = ['a.mkv']\n", "job must be [[job]] entries"),
    ("job = [1, 2]\n", "job must be [[job]] entries"),
])
def test_a_job_file_with_a_wrongly_typed_key_is_one_line(tmp_path, text, message):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        jobs_from_file(jobs, None, {}, None)


@pytest.mark.parametrize("command", ["upscale", "batch"])
def test_a_log_file_that_cannot_be_written_is_told_once_and_the_work_goes_on(tmp_path, cache_dir, capsys, identity_x2,
                                                                            command):
    source = make_clip(tmp_path / "ep1.mkv", frames=2)
    where = ["-o", str(tmp_path / "out.mkv")] if command == "upscale" else ["--output-dir", str(tmp_path / "out")]
    status = main(["--cache-dir", str(cache_dir), command, str(source), *where, "-m", str(identity_x2), *FAST,
                   "--log-file", "/dev/full"])
    assert status == 0
    err = capsys.readouterr().err
    assert err.count("vidscale: warning: cannot write the log file /dev/full (No space left on device); "
                     "going on without it\n") == 1
    assert "Traceback" not in err
    assert len(list(tmp_path.rglob("*.upscaled.mkv" if command == "batch" else "out.mkv"))) == 1


@pytest.mark.parametrize("segment_seconds", ["0.2", "60"])  # in segments, in one piece
def test_a_job_another_run_is_making_is_skipped_not_failed(tmp_path, batch, identity_x2, segment_seconds):
    # Two batches of one job file (a timer overlapping its last run): the one that finds a job's
    # work directory held leaves the job to the run holding it.
    source = make_clip(tmp_path / "ep1.mkv", frames=20, gop=5)
    output = tmp_path / "out" / "ep1.upscaled.mkv"
    output.parent.mkdir()
    with segments.WorkDir(output, segments.Resume({"input": "held"})):
        status, err = batch(str(source), "--output-dir", str(tmp_path / "out"), "-m", str(identity_x2), *FAST,
                            "--segment-seconds", segment_seconds)
    assert status == 0, err
    assert f"skipped, another vidscale run is working on {output}" in err
    assert "1 jobs: 0 done, 1 skipped, 0 failed" in err
    assert not output.exists()


def test_a_log_file_must_be_a_file(tmp_path, cache_dir, capsys):
    status = main(["--cache-dir", str(cache_dir), "upscale", str(tmp_path / "in.mkv"), "-o", str(tmp_path / "out.mkv"),
                   "--log-file", "-"])
    assert status == 2
    assert capsys.readouterr().err == ("vidscale: error: --log-file takes a file path (stderr carries progress: "
                                       "--progress json)\n")
    assert not (tmp_path / "-").exists() and not os.path.exists("-")


def test_a_stopped_batch_reports_the_jobs_it_did_not_start(tmp_path, monkeypatch):
    jobs = jobs_from_inputs([str(make_clip(tmp_path / f"ep{n}.mkv", frames=2)) for n in (1, 2, 3)],
                            tmp_path / "out", None, {}, None)

    def stopped_at_the_second(job, *_):
        if job.source.name == "ep2.mkv":
            raise KeyboardInterrupt
        return JobResult(str(job.source), str(job.output), "done")

    monkeypatch.setattr(jobs_module, "run_job", stopped_at_the_second)
    ended = []
    with pytest.raises(BatchInterrupted) as stop:
        run_jobs(jobs, on_result=lambda job, result: ended.append((job.source.name, result.status)))
    assert [(Path(r.input).name, r.status, r.error) for r in stop.value.report.results] == [
        ("ep1.mkv", "done", None), ("ep2.mkv", "failed", "interrupted"),
        ("ep3.mkv", "failed", "not run: the batch was stopped")]
    assert ended == [("ep1.mkv", "done"), ("ep2.mkv", "failed")]  # the log's job_end of the stopped job too


def test_a_batch_stopped_between_jobs_reports_every_one(tmp_path, monkeypatch):
    # Hashing a touched input whole, before a job starts, may take a while: a stop then was no
    # BatchInterrupted, and the batch wrote no report.
    jobs = jobs_from_inputs([str(make_clip(tmp_path / f"ep{n}.mkv", frames=2)) for n in (1, 2)],
                            tmp_path / "out", None, {}, None)

    def stopped_while_comparing(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs_module, "output_mismatch", stopped_while_comparing)
    with pytest.raises(BatchInterrupted) as stop:
        run_jobs(jobs)
    assert [(Path(r.input).name, r.status, r.error) for r in stop.value.report.results] == [
        ("ep1.mkv", "failed", "not run: the batch was stopped"),
        ("ep2.mkv", "failed", "not run: the batch was stopped")]
    assert stop.value.report.interrupted
