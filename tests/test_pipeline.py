"""The whole video path with real PyAV and real OpenVINO: `vidscale upscale` and vidscale.upscale().

Most runs use a real SRVGGNetCompact whose residual branch is zeroed (an exact nearest x2), so
frames can be checked against their sources; one runs the real realesr-animevideov3 weights.
"""

import io
import json
import os
import pty
import resource
import subprocess
import sys
import threading
from fractions import Fraction

import av
import numpy as np
import pytest

import vidscale
from clips import COLOUR_CASES, demux_all, make_clip, pattern, stream_tags
from conftest import media
from vidscale import pipeline
from vidscale.cli import main
from vidscale.media import VideoFrame, VideoReader

FAST = ["-c:v", "libx264", "--preset", "ultrafast"]


@pytest.fixture
def run(cache_dir, identity_x2, capsys):
    def run(*args: str, model: str | None = None) -> tuple[int, str]:
        status = main(["--cache-dir", str(cache_dir), "upscale", *args, "-m", model or str(identity_x2)])
        return status, capsys.readouterr().err

    return run


def decoded(path, deep: bool = False) -> list[VideoFrame]:
    with VideoReader(path, deep=deep) as reader:
        return [e for e in reader.events() if isinstance(e, VideoFrame)]


def test_frames_timestamps_and_every_other_stream_survive(tmp_path, run):
    source = make_clip(tmp_path / "in.mkv", frames=12, subtitles=True, attachment=True, chapters=True,
                       sar=Fraction(4, 3))
    status, err = run(str(source), "-o", str(tmp_path / "out.mkv"), *FAST, "--progress", "none")
    assert status == 0, err
    assert "12 frames" in err
    in_pts, in_packets = demux_all(source)
    out_pts, out_packets = demux_all(tmp_path / "out.mkv")
    assert out_pts == in_pts and len(out_pts) == 12
    assert sorted(out_packets) == sorted(in_packets)
    assert stream_tags(tmp_path / "out.mkv")[:2] == stream_tags(source)[:2]
    with av.open(str(tmp_path / "out.mkv")) as out:
        assert [(a.name, a.mimetype) for a in out.streams.attachments] == [("ZenMaru.ttf", "font/ttf")]
        assert out.streams.video[0].sample_aspect_ratio == Fraction(4, 3)
    # Each output frame is its own source frame upscaled (the pattern moves every frame, so a
    # frame out of order or repeated would not match).
    for before, after in zip(decoded(source), decoded(tmp_path / "out.mkv"), strict=True):
        assert after.rgb.shape == (96, 128, 3)
        assert np.abs(after.rgb[::2, ::2].astype(int) - before.rgb).mean() < 4


@pytest.mark.parametrize("case", COLOUR_CASES)
def test_known_colours_survive_decode_model_encode_within_two_code_values(tmp_path, run, case):
    tag, matrix, _ = COLOUR_CASES[case]
    source = make_clip(tmp_path / "in.mkv", frames=2, codec="ffv1", pix_fmt="yuv444p", colour=tag, audio=False)
    assert run(str(source), "-o", str(tmp_path / "out.mkv"), "-c:v", "ffv1", "--pix-fmt", "yuv444p")[0] == 0
    with VideoReader(tmp_path / "out.mkv") as out:
        assert (out.info.colorspace, out.info.color_range) == (matrix, "tv")
        assert not out.info.colorspace_guessed and not out.info.color_range_guessed
    for index, frame in enumerate(decoded(tmp_path / "out.mkv")):
        assert np.abs(frame.rgb[::2, ::2].astype(int) - pattern(48, 64, index)).max() <= 2


@pytest.mark.parametrize("output", ["out.mkv", "out.mp4"])
def test_variable_frame_rate_keeps_every_timestamp_and_duration(tmp_path, run, output):
    # The last frame is held for 2 s, as an end card is; x264's default preset reorders frames.
    stamps = [0, 40, 50, 130, 135, 300, 301, 420, 700, 710]
    durations = [40, 10, 80, 5, 165, 1, 119, 280, 10, 2000]
    source = make_clip(tmp_path / "vfr.mkv", frames=len(stamps), pts=stamps, durations=durations, audio=False)
    assert run(str(source), "-o", str(tmp_path / output), "-c:v", "libx264", "--dedup", "off")[0] == 0
    assert demux_all(tmp_path / output)[0] == [Fraction(p, 1000) for p in stamps]
    with av.open(str(tmp_path / output)) as out:
        video = out.streams.video[0]
        assert out.duration / 10**6 == pytest.approx(2.71, abs=0.001)
        if output.endswith(".mkv"):  # an MP4 sample lasts until the next one's decode time
            packets = sorted((p.pts, p.duration) for p in out.demux(video) if p.size)
            assert [d * video.time_base * 1000 for _, d in packets] == durations


@pytest.mark.parametrize("output", ["out.mp4", "out.mov", "out.mkv"])
def test_mp4_chapter_and_timecode_tracks_are_made_again_not_copied(tmp_path, run, output):
    # The MP4 muxer writes chapters as a chapter track and a timecode tag as a tmcd track; read
    # back, both are data streams that no muxer takes as such.
    source = make_clip(tmp_path / "in.mp4", frames=4, chapters=True, timecode="01:02:03:04", audio="aac")
    with av.open(str(source)) as made:
        assert [s.type for s in made.streams] == ["video", "audio", "data", "data"]
    status, err = run(str(source), "-o", str(tmp_path / output), *FAST)
    assert status == 0, err
    with av.open(str(source)) as before, av.open(str(tmp_path / output)) as after:
        def chapters(container):
            return [(c["start"] * c["time_base"], c["end"] * c["time_base"], c["metadata"]) for c in container.chapters()]

        assert len(chapters(before)) == 2 and chapters(after) == chapters(before)
        tags = {k.lower(): v for k, v in after.streams.video[0].metadata.items()}
        assert tags["timecode"] == "01:02:03:04"
        data = [s for s in after.streams if s.type == "data"]
        if output.endswith(".mkv"):
            assert data == []
        else:  # the timecode track and the chapter track, made by the muxer
            assert len(data) == 2 and [s.metadata.get("timecode") for s in data] == [None, "01:02:03:04"]


def _png(height: int, width: int) -> bytes:
    with av.open(buffer := io.BytesIO(), "w", format="image2pipe") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(pattern(height, width), format="rgb24")))
    return buffer.getvalue()


def _pictures(path) -> list[tuple[str | None, str | None, bytes]]:
    with av.open(str(path)) as container:
        pictures = {s.index: (s.metadata.get("filename"), s.metadata.get("mimetype")) for s in container.streams
                    if s.type == "video" and s.disposition & av.stream.Disposition.attached_pic}
        return sorted((*pictures[p.stream.index], bytes(p)) for p in container.demux()
                      if p.stream.index in pictures and p.size)


@pytest.mark.parametrize("source_format", ["mkv", "mp4"])
def test_attached_pictures_go_to_matroska_as_attachments(tmp_path, run, source_format):
    # FFmpeg shows a Matroska picture attachment, and MP4 cover art, as a one-frame video stream;
    # copied as such it became a video track (or was refused) instead of the attachment it was.
    png = _png(6, 8)
    source = make_clip(tmp_path / f"in.{source_format}", frames=3, audio="aac", attachment=source_format == "mkv",
                       picture=png)
    assert run(str(source), "-o", str(tmp_path / "out.mkv"), *FAST)[0] == 0
    with av.open(str(tmp_path / "out.mkv")) as out:
        assert [s.type for s in out.streams if s.type != "attachment"] == ["video", "audio", "video"]
        assert [s.codec_context.name for s in out.streams.video] == ["h264", "png"]
    name = "cover.png" if source_format == "mkv" else None
    assert _pictures(source) == [(name, "image/png" if name else None, png)]
    assert _pictures(tmp_path / "out.mkv") == [("cover.png", "image/png", png)]
    assert b"V_PNG" not in (tmp_path / "out.mkv").read_bytes()


def test_several_audio_and_subtitle_tracks_and_chapters(tmp_path, run):
    source = media("derived_multi_audio_multi_sub_chapters.mkv")
    assert run(str(source), "-o", str(tmp_path / "out.mkv"), *FAST)[0] == 0
    in_pts, in_packets = demux_all(source)
    out_pts, out_packets = demux_all(tmp_path / "out.mkv")
    assert len(out_pts) == len(in_pts) == 150 and out_pts == in_pts
    assert sorted(out_packets) == sorted(in_packets)
    assert stream_tags(tmp_path / "out.mkv")[:2] == stream_tags(source)[:2]


def test_ten_bit_vp9_stays_ten_bit_through_the_model(tmp_path, run):
    source = media("androidx_roadtrip-vp92-10bit.webm")
    assert run(str(source), "-o", str(tmp_path / "out.mkv"), "-c:v", "ffv1")[0] == 0
    with VideoReader(tmp_path / "out.mkv") as out:
        assert out.info.pix_fmt == "yuv420p10le"
    before, after = decoded(source, deep=True), decoded(tmp_path / "out.mkv", deep=True)
    assert len(before) == len(after) == 72
    # Lossless output of an exact x2 model: what is left is colour conversion error. Rounding to
    # 8 bits anywhere on the way would add about a quarter of an 8-bit step (64 in 16-bit units).
    error = np.abs(after[10].rgb[::2, ::2].astype(int) - before[10].rgb).mean()
    assert error < 24


@pytest.mark.parametrize("clip, frames", [("androidx_bear-vp9-odd-dimensions.webm", 30),
                                          ("mediabunny_no-initial-keyframe.ts", 15)])
def test_odd_dimensions_and_a_stream_without_a_keyframe_at_the_start(tmp_path, run, clip, frames):
    status, err = run(str(media(clip)), "-o", str(tmp_path / "out.mkv"), *FAST)
    assert status == 0
    assert len(decoded(tmp_path / "out.mkv")) == frames
    lost = "the first 63 video packets gave no picture (the input starts without a keyframe)"
    assert (lost in err) == clip.endswith(".ts"), err


def test_through_real_os_pipes(tmp_path, cache_dir, identity_x2):
    source = make_clip(tmp_path / "in.mkv", frames=20)
    command = (f"cat {source} | {sys.executable} -m vidscale -q --cache-dir {cache_dir} upscale - -o - "
               f"-m {identity_x2} -c:v libx264 --preset ultrafast | {sys.executable} -c "
               "\"import av, sys; c = av.open(sys.stdin.buffer); "
               "print(sum(1 for _ in c.decode(video=0)), c.format.name)\"")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["20", "matroska,webm"]
    assert done.stderr == ""


def test_stdout_cut_short_by_a_file_size_limit_fails_the_run(tmp_path, cache_dir, identity_x2):
    # A write the limit cut short once came back as success: bytes missing mid-file, exit 0.
    source = make_clip(tmp_path / "in.mkv", frames=40, size=(160, 120), audio=False)
    # The model converted into the cache first: under the limit, that would fail on its own.
    assert main(["--cache-dir", str(cache_dir), "upscale", str(source), "-o", str(tmp_path / "whole.mkv"),
                 "-m", str(identity_x2), "-c:v", "ffv1", "--progress", "none"]) == 0
    with open(tmp_path / "out.mkv", "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "vidscale", "--cache-dir", str(cache_dir), "upscale", str(source), "-o", "-",
             "-m", str(identity_x2), "-c:v", "ffv1", "--progress", "none"], stdout=out, stderr=subprocess.PIPE,
            text=True, timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)))
    assert done.returncode == 5
    assert done.stderr == ("vidscale: error: stdout grew past the largest file allowed here (File too large); "
                           "raise the limit (ulimit -f) or write where larger files fit\n")


def test_a_model_cache_that_cannot_take_the_model_is_one_line_and_left_clean(tmp_path, identity_x2):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    done = subprocess.run(
        [sys.executable, "-m", "vidscale", "--cache-dir", str(tmp_path / "cache"), "upscale", str(source), "-o",
         str(tmp_path / "out.mkv"), "-m", str(identity_x2)], capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)))
    assert done.returncode == 4
    assert done.stderr.startswith(f"vidscale: error: cannot write to the model cache {tmp_path / 'cache' / 'ir'} (")
    assert done.stderr.endswith("free space there, or give another --cache-dir (or VIDSCALE_CACHE_DIR)\n")
    assert len(done.stderr.splitlines()) == 1
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "in.mkv"]


def test_video_is_never_written_to_a_terminal(tmp_path, cache_dir, identity_x2):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    terminal, other_end = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "vidscale", "--cache-dir", str(cache_dir), "upscale", str(source),
                               "-o", "-", "-m", str(identity_x2)], stdout=other_end, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    finally:
        os.close(terminal)
        os.close(other_end)
    assert (done.returncode, done.stderr) == (2, "vidscale: error: -o - would write the video to this terminal; "
                                                 "redirect stdout (> file.mkv, | a player) or give -o FILE\n")


def test_a_closed_stderr_puts_nothing_into_the_video_on_stdout(tmp_path, cache_dir, identity_x2):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    command = (f"{sys.executable} -m vidscale --cache-dir {cache_dir} upscale {source} -o - -m {identity_x2} "
               f"-c:v ffv1 2>&- > {tmp_path / 'out.mkv'}")
    assert subprocess.run(["bash", "-c", command], timeout=300).returncode == 0
    assert len(decoded(tmp_path / "out.mkv")) == 2  # the summary line went nowhere, not into the file
    assert (tmp_path / "out.mkv").read_bytes()[:4] == b"\x1aE\xdf\xa3"


def test_a_closed_stdout_is_a_usage_error(tmp_path, cache_dir, identity_x2):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    command = f"{sys.executable} -m vidscale --cache-dir {cache_dir} upscale {source} -o - -m {identity_x2} >&-"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (2, "vidscale: error: stdout is closed, so -o - has nowhere to "
                                                 "write; give a file or a pipe\n")


def test_a_reader_closing_the_pipe_early_ends_the_run_quietly(tmp_path, cache_dir, identity_x2):
    source = make_clip(tmp_path / "in.mkv", frames=60, size=(128, 96))
    command = (f"{sys.executable} -m vidscale --cache-dir {cache_dir} upscale {source} -o - -m {identity_x2} "
               f"-c:v ffv1 2>{tmp_path / 'err.txt'} | head -c 1000 >/dev/null; echo ${{PIPESTATUS[0]}}")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "141"
    assert (tmp_path / "err.txt").read_text() == ""


def test_the_anime_clip_with_realesr_animevideov3_at_a_reduced_size(tmp_path, run):
    # The real model on the real clip, shrunk to 160x120 first so the test stays quick.
    small = tmp_path / "onepiece_small.mkv"
    with av.open(str(media("realesrgan_onepiece_demo.mp4"))) as src, av.open(str(small), "w") as dst:
        audio_in, video_in = src.streams.audio[0], src.streams.video[0]
        video = dst.add_stream("ffv1", rate=video_in.average_rate)
        video.width, video.height, video.pix_fmt = 160, 120, "yuv420p"
        video.time_base = video.codec_context.time_base = video_in.time_base
        audio = dst.add_stream_from_template(audio_in)
        for packet in src.demux():
            if packet.stream is audio_in:
                if packet.size:
                    packet.stream = audio
                    dst.mux(packet)
                continue
            for frame in packet.decode():  # the empty packet at the end flushes the decoder
                small_frame = frame.reformat(160, 120, "yuv420p")
                small_frame.pts, small_frame.time_base = frame.pts, frame.time_base
                dst.mux(video.encode(small_frame))
        dst.mux(video.encode())
    status, err = run(str(small), "-o", str(tmp_path / "out.mkv"), "-s", "2", *FAST, model="realesr-animevideov3")
    assert status == 0, err
    before, after = decoded(small), decoded(tmp_path / "out.mkv")
    assert len(before) == len(after) == 181
    assert demux_all(tmp_path / "out.mkv") == demux_all(small)
    for source_frame, upscaled in zip(before[::30], after[::30]):
        assert upscaled.rgb.shape == (240, 320, 3)
        shrunk = upscaled.rgb.reshape(120, 2, 160, 2, 3).mean(axis=(1, 3))
        assert np.abs(shrunk - source_frame.rgb).mean() < 6


def test_json_progress_for_wrappers(tmp_path, run):
    source = make_clip(tmp_path / "in.mkv", frames=8)
    status, err = run(str(source), "-o", str(tmp_path / "out.mkv"), *FAST, "--progress", "json")
    assert status == 0
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records and set(records[-1]) == {"frame", "total", "fps", "eta", "elapsed"}
    assert records[-1]["frame"] == 8
    # Matroska stores no frame count: the total is estimated from duration and frame rate.
    assert isinstance(records[-1]["total"], int) and records[-1]["total"] >= 8


def test_a_failing_stage_stops_everything_and_leaves_no_output(tmp_path, cache_dir, identity_x2, monkeypatch):
    source = make_clip(tmp_path / "in.mkv", frames=30)
    original = vidscale.media.VideoWriter.write_frame

    def write_frame(self, *args):
        if self.frames_written == 5:
            raise vidscale.MediaError("disk on fire")
        original(self, *args)

    monkeypatch.setattr(vidscale.media.VideoWriter, "write_frame", write_frame)
    with pytest.raises(vidscale.MediaError, match="disk on fire"):
        vidscale.upscale(source, tmp_path / "out.mkv", model=str(identity_x2), cache_dir=cache_dir)
    assert os.listdir(tmp_path) == ["in.mkv"]
    assert not [t for t in threading.enumerate() if t.name.startswith("vidscale-")]


@pytest.mark.parametrize("resume", [[], ["--resume", "--segment-seconds", "0.2"]])
def test_an_output_another_run_wrote_meanwhile_is_kept(tmp_path, run, monkeypatch, resume):
    source = make_clip(tmp_path / "in.mkv", frames=20, gop=5)
    output = tmp_path / "out.mkv"
    original = vidscale.media.VideoWriter.write_frame

    def write_frame(self, *args):
        if not output.exists():
            output.write_bytes(b"the other run's episode")
        original(self, *args)

    monkeypatch.setattr(vidscale.media.VideoWriter, "write_frame", write_frame)
    status, err = run(str(source), "-o", str(output), *FAST, *resume)
    assert status == 2
    assert err == (f"vidscale: error: {output} appeared while this run worked (another run wrote it); it is "
                   f"kept, pass --overwrite to replace it\n")
    assert output.read_bytes() == b"the other run's episode"
    # A resumable run keeps its segments: with --overwrite, the next run only joins them.
    kept = ["out.mkv.vidscale-work"] if resume else []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mkv", "out.mkv", *kept]


def test_an_error_in_an_inference_callback_surfaces_instead_of_aborting(tmp_path, cache_dir, identity_x2,
                                                                        monkeypatch):
    source = make_clip(tmp_path / "in.mkv", frames=20)

    def store(self, tile, output):
        raise RuntimeError(f"callback broke on frame {self.index}")

    monkeypatch.setattr(pipeline._PendingFrame, "store", store)
    with pytest.raises(RuntimeError, match="callback broke on frame"):
        vidscale.upscale(source, tmp_path / "out.mkv", model=str(identity_x2), cache_dir=cache_dir)
    assert os.listdir(tmp_path) == ["in.mkv"]


def test_frames_in_flight_stay_bounded(tmp_path, cache_dir, identity_x2, monkeypatch):
    source = make_clip(tmp_path / "in.mkv", frames=40, audio=False)
    live, peak = set(), [0]
    original_init, original_store = pipeline._PendingFrame.__init__, pipeline.VideoWriter.write_frame

    def init(self, *args):
        original_init(self, *args)
        live.add(self.index)
        peak[0] = max(peak[0], len(live))

    def write_frame(self, *args):
        original_store(self, *args)
        live.discard(self.frames_written - 1)

    monkeypatch.setattr(pipeline._PendingFrame, "__init__", init)
    monkeypatch.setattr(pipeline.VideoWriter, "write_frame", write_frame)
    result = vidscale.upscale(source, tmp_path / "out.mkv", model=str(identity_x2), cache_dir=cache_dir,
                              preset="ultrafast")
    assert result.frames == 40
    assert 1 < peak[0] <= pipeline.MAX_FRAMES_IN_FLIGHT


@pytest.mark.parametrize("change, message", [
    ({"scale": "2"}, "scale = '2' is not a valid value"),
    ({"dedup": "sometimes"}, "dedup 'sometimes' is not off, exact or a number"),
    ({"speed": 3}, "unknown setting speed"),
    ({"strict": "no"}, "strict and overwrite are True or False"),
    ({"progress": "none"}, "progress = 'none' is not a vidscale.progress.Progress"),
    # Frozen settings built by a program are checked too: these failed deep in the run as an
    # AttributeError, a TypeError and a numpy error.
    ({"settings": vidscale.UpscaleSettings(cache_dir="/srv/cache")}, r"cache_dir = '/srv/cache' is not a valid value; "
                                                                     r"give a Path \| None"),
    ({"settings": vidscale.UpscaleSettings(tile="32")}, "tile = '32' is not a valid value"),
    ({"settings": vidscale.UpscaleSettings(tile=(32,))}, r"tile = \(32,\) is not a valid value"),
    ({"settings": vidscale.UpscaleSettings(dedup="off")}, "dedup = 'off' is not a valid value; give a float"),
    # In range as well as of the right type: these were taken, or a ValueError deep in the run.
    ({"settings": vidscale.UpscaleSettings(dedup=-3.0)}, "dedup threshold -3.0 must be at least 0 and below 255"),
    ({"settings": vidscale.UpscaleSettings(memory_budget=0)}, "memory_budget = 0 is not valid; give the bytes"),
    ({"memory_budget": -1}, "memory_budget = -1 is not valid"),
])
def test_python_api_checks_its_settings_before_any_work(tmp_path, change, message):
    with pytest.raises(vidscale.UsageError, match=message):
        vidscale.upscale(tmp_path / "missing.mkv", tmp_path / "out.mkv", **change)


@pytest.mark.parametrize("frame, message", [
    (None, "frames must be numpy arrays, .height, width, 3. RGB; got NoneType"),
    ([[[0, 0, 0]]], "frames must be numpy arrays, .height, width, 3. RGB; got list"),
    (np.zeros((0, 10, 3), np.uint8), r"frames must be \(height, width, 3\) RGB arrays, got shape \(0, 10, 3\)"),
])
def test_a_frame_upscaler_refuses_what_is_not_a_frame(cache_dir, identity_x2, frame, message):
    upscaler = vidscale.FrameUpscaler(vidscale.UpscaleSettings(model=str(identity_x2), cache_dir=cache_dir))
    with pytest.raises(vidscale.UsageError, match=message):
        upscaler(frame)


def test_a_frame_upscaler_checks_settings_a_program_built(cache_dir, identity_x2):
    with pytest.raises(vidscale.UsageError, match=r"FrameUpscaler: UpscaleSettings scale = 2.5 is not a valid value"):
        vidscale.FrameUpscaler(vidscale.UpscaleSettings(model=str(identity_x2), cache_dir=cache_dir, scale=2.5))


def test_python_api_takes_settings_as_a_job_file_spells_them(tmp_path, cache_dir, identity_x2):
    source = make_clip(tmp_path / "in.mkv", frames=3)
    result = vidscale.upscale(source, tmp_path / "out.mkv", model=identity_x2, cache_dir=str(cache_dir),
                              tile="40x64", dedup="off", codec="libx264", options={"preset": "ultrafast"})
    assert result.frames == 3 and result.reused_frames == 0


def test_python_api_refuses_to_overwrite_and_writes_with_overwrite(tmp_path, cache_dir, identity_x2):
    source = make_clip(tmp_path / "in.mkv", frames=4)
    target = tmp_path / "out.mkv"
    target.write_bytes(b"old")
    with pytest.raises(vidscale.UsageError, match="already exists; pass --overwrite"):
        vidscale.upscale(source, target, model=str(identity_x2), cache_dir=cache_dir)
    assert target.read_bytes() == b"old"
    result = vidscale.upscale(source, target, model=str(identity_x2), cache_dir=cache_dir, codec="ffv1",
                              overwrite=True)
    assert result.frames == 4 and len(decoded(target)) == 4
