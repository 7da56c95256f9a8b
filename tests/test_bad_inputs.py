"""The bad-input matrix, end to end through `vidscale upscale`: every case gets one line on stderr
naming the thing and the fix, a non-zero exit status, an untouched input, and no output (nor a
temporary .partial file) left behind.

A reader closing stdout early is pinned in test_pipeline.py
(test_a_reader_closing_the_pipe_early_ends_the_run_quietly).
"""

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from torch import nn

from clips import bad_inputs, corrupt_clip, make_clip, resolution_change
from conftest import RunsShellOnLoad
from vidscale import pipeline
from vidscale.cli import main
from vidscale.engine import default_cache_dir
from vidscale.media import VideoWriter

FAST = ["-c:v", "libx264", "--preset", "ultrafast"]


@pytest.fixture
def outputs(tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    return folder


@pytest.fixture
def refused(cache_dir, identity_x2, capsys, outputs):
    """Run `vidscale upscale SOURCE -o OUTPUT ...`, check the refusal, return its stderr line."""

    def refused(source, status, message, *extra, output=None, model=None):
        source = source if isinstance(source, str) else str(source)
        before = open(source, "rb").read() if os.path.isfile(source) else None
        output = output or outputs / "out.mkv"
        present = sorted(outputs.iterdir())
        got = main(["--cache-dir", str(cache_dir), "upscale", source, "-o", str(output),
                    "-m", model or str(identity_x2), *FAST, *extra])
        err = capsys.readouterr().err
        assert got == status, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vidscale: error: "), err
        assert message in lines[0], err
        if before is not None:
            assert open(source, "rb").read() == before
        assert sorted(outputs.iterdir()) == present
        return lines[0]

    return refused


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "noise", "truncated", "audio only",
                                  "still image", "unknown codec"])
def test_unusable_input(tmp_path, refused, case):
    source, pattern = bad_inputs(tmp_path)[case]
    line = refused(source, 5, str(source))
    assert re.search(pattern, line), line


def test_output_inside_a_regular_file(tmp_path, refused, outputs):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    blocker = outputs / "somefile"
    blocker.write_bytes(b"not a directory")
    refused(source, 5, "outputs/somefile is a file, not a directory; choose another output path",
            output=blocker / "out.mkv")
    assert blocker.read_bytes() == b"not a directory"


@pytest.mark.parametrize("args, message", [
    (["-s", "1.5"], "argument -s/--scale: invalid int value: '1.5'; see vidscale upscale --help"),
    (["--dedup", "banana"], "--dedup 'banana' is not off, exact or a number"),
])
def test_a_bad_option_value_is_one_line_too(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stopped:
        main(["upscale", str(tmp_path / "in.mkv"), "-o", str(tmp_path / "out.mkv"), *args])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.startswith("vidscale: error: ") and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_an_output_that_is_not_a_regular_file_is_never_replaced(tmp_path, refused, outputs, kind):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    output = outputs / "out.mkv"
    kept = tmp_path / "kept.mkv"
    kept.write_bytes(b"old")
    if kind == "directory":
        output.mkdir()
    elif kind == "fifo":
        os.mkfifo(output)
    else:
        output.symlink_to(kept)
    message = "is a symbolic link; give the path it points to" if kind == "symlink" else "is not a regular file"
    refused(source, 2, message, "--overwrite", output=output)
    assert {"directory": output.is_dir, "fifo": output.is_fifo, "symlink": output.is_symlink}[kind]()
    assert kept.read_bytes() == b"old"


@pytest.mark.parametrize("extra, message", [
    (["-s", "1"], "libx264 cannot write the 65x49 output in yuv420p, which stores colour at half size, "
                  "with an odd side; use --pix-fmt yuv444p"),
    (["--preset", "bogus"], "encoder libx264 refused its settings (invalid preset 'bogus'); check --preset"),
    (["-x", "cfr=40"], "encoder libx264 does not take cfr; drop it (--crf, --preset, -x or the job file's key), "
                       "or check the spelling"),
    (["-c:v", "ffv1", "--crf", "18", "--preset", "slow"], "encoder ffv1 does not take crf, preset; drop them"),
])
def test_settings_the_encoder_refuses_fail_before_any_frame(tmp_path, refused, monkeypatch, extra, message):
    source = make_clip(tmp_path / "in.mkv", frames=2, size=(65, 49), codec="ffv1")
    monkeypatch.setattr(VideoWriter, "write_frame", lambda *_: pytest.fail("a frame reached the encoder"))
    refused(source, 2, message, *extra)


@pytest.mark.parametrize("codec, extra, reason", [
    ("libx264", ["--preset", "bogus"], "invalid preset 'bogus'"),
    ("libx265", ["--crf", "99"], "Valid quality based range: -qpBDOffsetY to 51"),
])
def test_an_encoder_s_own_reason_is_in_the_one_line(tmp_path, cache_dir, identity_x2, capfd, codec, extra, reason):
    # x264 and x265 write why they refuse a setting straight onto stderr, past FFmpeg's log.
    source = make_clip(tmp_path / "in.mkv", frames=2)
    status = main(["--cache-dir", str(cache_dir), "upscale", str(source), "-o", str(tmp_path / "out.mkv"),
                   "-m", str(identity_x2), "-c:v", codec, *extra])
    assert status == 2
    assert capfd.readouterr().err == (f"vidscale: error: encoder {codec} refused its settings ({reason}); check "
                                      f"--preset, --crf, -x and --pix-fmt\n")


class _FailingMux:
    """Stands in for the output container: its mux raises `error` once `after` calls went through."""

    def __init__(self, container, error: OSError, after: int):
        self._container, self._error, self._left = container, error, after

    def mux(self, packets):
        if self._left == 0:
            raise self._error
        self._left -= 1
        return self._container.mux(packets)

    def __getattr__(self, name):
        return getattr(self._container, name)


def _fail_writes(monkeypatch, error: OSError, after: int) -> None:
    original = VideoWriter._open

    def _open(self, destination, settings):
        original(self, destination, settings)
        self.container = _FailingMux(self.container, error, after)

    monkeypatch.setattr(VideoWriter, "_open", _open)


def test_unwritable_output_directory(tmp_path, refused, monkeypatch):
    # Tests run as root, which may write anywhere: FFmpeg's EACCES at its first write (when it
    # opens the file) is injected instead.
    source = make_clip(tmp_path / "in.mkv", frames=4)
    _fail_writes(monkeypatch, av.error.PermissionError(errno.EACCES, "Permission denied"), after=0)
    refused(source, 5, "out.mkv (Permission denied); choose an output in a writable directory")


def test_disk_full_while_writing(tmp_path, refused, monkeypatch):
    source = make_clip(tmp_path / "in.mkv", frames=20)
    _fail_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), after=3)
    refused(source, 5, "no space left on the device writing")


@pytest.mark.parametrize("length", [240, 300])
def test_an_output_name_too_long_for_what_goes_beside_it_is_refused(tmp_path, refused, outputs, length):
    # 240 bytes is a valid name, but its temporary file's name (.NAME.PID.partial) is not.
    source = make_clip(tmp_path / "in.mkv", frames=2)
    refused(source, 2, f"is {length} bytes; at most 224 fit beside the temporary and record files vidscale "
                       f"writes next to it; choose a shorter name", output=outputs / ("x" * (length - 4) + ".mkv"))


def test_an_output_path_too_long_for_the_system_is_refused(tmp_path, refused, outputs):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    refused(source, 2, "cannot be used (File name too long); choose another output path",
            output=outputs.joinpath(*["d" * 200] * 25, "out.mkv"))


def test_running_out_of_memory_is_one_line(tmp_path, refused, monkeypatch):
    # Under a ulimit the allocation that fails may be Python's own, anywhere in the run.
    def no_memory(*_, **__):
        raise MemoryError

    monkeypatch.setattr(pipeline, "upscale_video", no_memory)
    refused(make_clip(tmp_path / "in.mkv", frames=2), 1,
            "out of memory; give the process more (ulimit -v, a container's limit) or use a smaller --tile")


@pytest.mark.parametrize("args, message", [
    (["--cache-dir", "", "models"], "argument --cache-dir: an empty path would put the cache in the working directory"),
    (["upscale", "in.mkv", "-o", "out.mkv/"], "argument -o/--output: out.mkv/ names a directory; give a file path"),
])
def test_paths_that_mean_other_than_they_seem_are_refused(capsys, args, message):
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_a_relative_xdg_cache_home_is_ignored_as_the_spec_says(monkeypatch):
    monkeypatch.delenv("VIDSCALE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert default_cache_dir() == Path.home() / ".cache" / "vidscale"
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    assert default_cache_dir() == Path("/srv/cache/vidscale")


@pytest.mark.parametrize("extra, message", [
    (["--tune", "-t", "32"], "--tune chooses the tile itself; drop --tile or --tune"),
    (["--calibration", "in.mkv"], "--calibration only counts with --precision int8; add that or drop --calibration"),
])
def test_an_option_that_would_be_ignored_is_refused(tmp_path, refused, extra, message):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    refused(source, 2, message, *extra)


def test_output_is_the_input(tmp_path, refused):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    refused(source, 2, "is the input file; choose another output path", "--overwrite", output=source)


def test_output_is_the_file_on_stdin(tmp_path, cache_dir, identity_x2):
    # `vidscale upscale - -o ep1.mkv --overwrite < ep1.mkv`: by path, the same is refused.
    source = make_clip(tmp_path / "ep1.mkv", frames=2)
    before = source.read_bytes()
    with open(source, "rb") as stdin:
        done = subprocess.run([sys.executable, "-m", "vidscale", "--cache-dir", str(cache_dir), "upscale", "-",
                               "-o", str(source), "--overwrite", "-m", str(identity_x2), *FAST],
                              stdin=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr == f"vidscale: error: output {source} is the input file; choose another output path\n"
    assert source.read_bytes() == before and sorted(tmp_path.iterdir()) == [source]


def test_stdin_closed_early(tmp_path, cache_dir, identity_x2, outputs):
    data = make_clip(tmp_path / "in.mkv", frames=30).read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "vidscale", "--cache-dir", str(cache_dir), "upscale", "-",
         "-o", str(outputs / "out.mkv"), "-m", str(identity_x2), *FAST],
        input=data[: len(data) // 2], capture_output=True, timeout=300)
    err = done.stderr.decode()
    assert done.returncode == 5, err
    assert err.count("\n") == 1
    assert "stdin stops at" in err and "truncated or its pipe closed early; give the complete file" in err
    assert list(outputs.iterdir()) == []


def test_corrupt_packets_are_concealed_and_counted(tmp_path, cache_dir, identity_x2, capsys, outputs):
    source = corrupt_clip(tmp_path)
    status = main(["--cache-dir", str(cache_dir), "upscale", str(source), "-o", str(outputs / "out.mkv"),
                   "-m", str(identity_x2), "-c:v", "ffv1"])
    err = capsys.readouterr().err
    assert status == 0, err
    # One summary line: every frame the decoder could give, and the concealment counted.
    assert err.count("\n") == 1 and ": 5 frames in " in err and "; 1 corrupt packets concealed" in err
    assert len(list(outputs.iterdir())) == 1


def test_corrupt_packets_fail_under_strict(tmp_path, refused):
    refused(corrupt_clip(tmp_path), 5, "corrupt video data near 0.120 s (pts 120)", "--strict")


def test_resolution_change_mid_stream(tmp_path, refused):
    refused(resolution_change(tmp_path), 5,
            "frame 3 changes size from 64x48 to 96x64; videos that change resolution are not supported")


def test_unknown_model_name(tmp_path, refused):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    refused(source, 3, "unknown model 'no-such-model'; known models:", model="no-such-model")


def test_weights_of_an_unsupported_architecture(tmp_path, refused):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    weights = tmp_path / "linear.pth"
    torch.save(nn.Linear(3, 4).state_dict(), weights)
    refused(source, 3, "linear.pth is not a supported architecture", model=str(weights))


def test_malicious_pickle_is_refused_and_never_run(tmp_path, refused):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    torch.save({"conv_first.weight": torch.zeros(1), "payload": RunsShellOnLoad(f"touch {marker}")}, weights)
    refused(source, 3, "contains code or objects that are not plain weights", model=str(weights))
    assert not marker.exists()
