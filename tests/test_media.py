"""Video side of vidscale.media: real PyAV decodes and encodes, a numpy stand-in for the model."""

import os
import subprocess
import sys
import threading
from fractions import Fraction

import av
import numpy as np
import pytest

from clips import (COLOUR_CASES, bad_inputs, corrupt_clip, demux_all, make_clip, pattern, resolution_change,
                   stream_tags)
from conftest import media, nearest
from vidscale.errors import MediaError, UsageError
from vidscale.media import (
    ENCODER_DEFAULTS, EncoderSettings, Image, OutputClosedError, VideoFrame, VideoReader, VideoWriter, write_image,
)

FAST = EncoderSettings(preset="ultrafast")


def upscale(source, destination, *, scale=2, deep=False, settings=FAST, strict=False):
    """reader -> nearest-neighbour "model" -> writer; returns (info, frame pts, packets)."""
    seen_pts, packets = [], []
    with VideoReader(source, deep=deep, strict=strict) as reader:
        info = reader.info
        with VideoWriter(destination, reader, info.width * scale, info.height * scale,
                         settings) as writer:
            for event in reader.events():
                if isinstance(event, VideoFrame):
                    assert event.index == len(seen_pts)
                    writer.write_frame(nearest(event.rgb, scale), event.pts)
                    seen_pts.append(event.pts)
                else:
                    packets.append((event.stream.index, event.pts, bytes(event)))
                    writer.write_packet(event)
        assert writer.frames_written == len(seen_pts)
    return info, seen_pts, packets


def rounded(pts, time_base, out_time_base):
    return [round(p * time_base / out_time_base) * out_time_base for p in pts]


# --- round trips ---------------------------------------------------------------------------

def test_cfr_clip_keeps_frames_timestamps_streams_and_tags(tmp_path):
    source = make_clip(tmp_path / "in.mkv", subtitles=True, attachment=True, chapters=True,
                       sar=Fraction(4, 3))
    info, pts, packets = upscale(source, tmp_path / "out.mkv")
    assert (info.width, info.height, info.sample_aspect_ratio) == (64, 48, Fraction(4, 3))
    out_pts, out_packets = demux_all(tmp_path / "out.mkv")
    assert out_pts == [p * info.time_base for p in pts]
    assert len(out_pts) == 6
    assert sorted(out_packets) == sorted((index, data) for index, _, data in packets)
    assert {index for index, _ in out_packets} == {1, 2, 3, 4}
    assert stream_tags(tmp_path / "out.mkv") == stream_tags(source)
    with av.open(str(tmp_path / "out.mkv")) as out:
        video = out.streams.video[0]
        assert (video.width, video.height) == (128, 96)
        assert video.sample_aspect_ratio == Fraction(4, 3)
        fonts = out.streams.attachments
        assert [(f.name, f.mimetype, f.data) for f in fonts] == [
            ("ZenMaru.ttf", "font/ttf", b"\x00\x01\x00\x00FAKEFONT" * 50)]


def test_vfr_timestamps_survive_exactly(tmp_path):
    irregular = [0, 33, 50, 150, 151, 400, 420, 1000]
    source = make_clip(tmp_path / "vfr.mkv", frames=len(irregular), pts=irregular, audio=False)
    info, pts, _ = upscale(source, tmp_path / "out.mkv")
    assert pts == irregular
    out_pts, _ = demux_all(tmp_path / "out.mkv")
    assert out_pts == [Fraction(p, 1000) for p in irregular]


def test_vfr_mp4_with_duplicate_timestamps_keeps_every_frame(tmp_path):
    """anime4k_web_input.mp4 repeats timestamps (114 of 319 frames); writing them as they are
    made the MP4 muxer fail with EINVAL. Every frame is kept, a repeat moves one tick later."""
    source = media("anime4k_web_input.mp4")
    with VideoReader(source) as reader:
        pts = [e.pts for e in reader.events() if isinstance(e, VideoFrame)]
        time_base = reader.info.time_base
    assert len(pts) == 319
    # Only the first 40 frames are upscaled, to keep the test fast.
    cut = tmp_path / "cut.mp4"
    with VideoReader(source) as reader, VideoWriter(cut, reader, 640, 348, FAST) as writer:
        for event in reader.events():
            if isinstance(event, VideoFrame) and event.index < 40:
                writer.write_frame(event.rgb, event.pts)
    expected = []
    for stamp in pts[:40]:
        expected.append(max(stamp, expected[-1] + 1) if expected else stamp)
    assert writer.retimed_frames == sum(a != b for a, b in zip(expected, pts)) > 0
    out_pts, _ = demux_all(cut)
    with av.open(str(cut)) as out:
        out_tb = out.streams.video[0].time_base
    assert out_pts == rounded(expected, time_base, out_tb)


@pytest.mark.parametrize("output", ["out.mp4", "out.mov", "out.mkv"])
def test_the_track_titles_of_an_mp4_are_kept(tmp_path, output):
    # FFmpeg reads an MP4 track's title as "name" and writes "title" as one: MP4 to MP4 lost it.
    source = make_clip(tmp_path / "in.mp4", audio="aac")
    upscale(source, tmp_path / output)
    with av.open(str(tmp_path / output)) as out:
        titles = [s.metadata.get("title", s.metadata.get("name")) for s in out.streams]
    assert titles == ["picture", "Commentary"]


def test_multi_audio_multi_subtitle_chapters_copied_bit_exact(tmp_path):
    source = media("derived_multi_audio_multi_sub_chapters.mkv")
    info, pts, packets = upscale(source, tmp_path / "out.mkv")
    assert len(pts) == 150
    out_pts, out_packets = demux_all(tmp_path / "out.mkv")
    assert out_pts == [p * info.time_base for p in pts]
    in_pts, in_packets = demux_all(source)
    assert out_packets == in_packets
    assert {index for index, _ in out_packets} == {1, 2, 3, 4, 5}
    (in_streams, in_chapters, _), (out_streams, out_chapters, _) = (
        stream_tags(source), stream_tags(tmp_path / "out.mkv"))
    assert out_chapters == in_chapters and len(in_chapters) == 2
    assert out_streams == in_streams


def test_ass_subtitles_and_ac3_copied(tmp_path):
    source = media("androidx_sample_with_ass_subtitles.mkv")
    _, pts, _ = upscale(source, tmp_path / "out.mkv", scale=1)
    assert len(pts) == 30
    assert demux_all(tmp_path / "out.mkv")[1] == demux_all(source)[1]
    with av.open(str(tmp_path / "out.mkv")) as out:
        assert [s.codec_context.name for s in out.streams] == ["h264", "ac3", "ssa"]


def test_rotation_and_sample_aspect_ratio_kept(tmp_path):
    source = make_clip(tmp_path / "in.mp4", rotation=90, sar=Fraction(8, 9), audio=False)
    info, _, _ = upscale(source, tmp_path / "out.mp4")
    assert info.rotation == 90
    with VideoReader(tmp_path / "out.mp4") as out:
        assert out.info.rotation == 90
        assert out.info.sample_aspect_ratio == Fraction(8, 9)
        assert (out.info.width, out.info.height) == (128, 96)


@pytest.mark.parametrize("rotation, hflip", [(0, True), (90, True), (270, False)])
@pytest.mark.parametrize("output", ["out.mp4", "out.mkv"])
def test_a_mirrored_picture_stays_mirrored(tmp_path, rotation, hflip, output):
    # Only the rotation was kept: a mirror came out turned 180 degrees, a turned mirror unmirrored.
    source = tmp_path / "in.mp4"
    with av.open(str(source), "w") as clip:
        video = clip.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.set_display_rotation(rotation, hflip=hflip)
        for index in range(2):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            frame.pts = index
            clip.mux(video.encode(frame))
        clip.mux(video.encode())
    upscale(source, tmp_path / output)
    with VideoReader(source) as before, VideoReader(tmp_path / output) as after:
        matrix = before.info.display_matrix
        assert (matrix[0] * matrix[4] - matrix[1] * matrix[3] < 0) == hflip  # the source mirrors, or not
        assert after.info.display_matrix == matrix


def test_frames_with_side_data_pyav_does_not_know_are_read(tmp_path):
    # MJPEG frames with EXIF (a camera's): reading the frame's side data raised ValueError in PyAV.
    write_image(Image(np.zeros((48, 64, 3), np.uint8)), tmp_path / "frame.jpg")
    tiff = b"II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00\x00\x00\x00\x00"
    exif = b"Exif\x00\x00" + tiff  # orientation 6
    data = (tmp_path / "frame.jpg").read_bytes()
    data = data[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + data[2:]
    source = tmp_path / "camera.mkv"
    with av.open(str(source), "w") as clip:
        video = clip.add_stream("mjpeg", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuvj444p"
        for index in range(3):
            packet = av.Packet(data)
            packet.stream, packet.time_base, packet.is_keyframe = video, Fraction(1, 25), True
            packet.pts = packet.dts = index
            clip.mux(packet)
    info, pts, _ = upscale(source, tmp_path / "out.mkv")
    assert (info.width, info.height, len(pts)) == (64, 48, 3)


# --- colour --------------------------------------------------------------------------------
# --- colour --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", COLOUR_CASES)
def test_colour_round_trip_within_two_code_values(tmp_path, case):
    tag, matrix, colour_range = COLOUR_CASES[case]
    source = make_clip(tmp_path / "in.mkv", frames=2, codec="ffv1", pix_fmt="yuv444p",
                       colour=tag, audio=False)
    with VideoReader(source) as reader:
        assert (reader.info.colorspace, reader.info.color_range) == (matrix, colour_range)
        first = next(e for e in reader.events() if isinstance(e, VideoFrame))
    assert np.abs(first.rgb.astype(int) - pattern(48, 64)).max() <= 2
    upscale(source, tmp_path / "out.mkv", scale=1,
            settings=EncoderSettings(codec="ffv1", pix_fmt="yuv444p"))
    with VideoReader(tmp_path / "out.mkv") as out:
        # The output is limited range whatever the source, and keeps a tagged matrix.
        assert (out.info.colorspace, out.info.color_range) == (matrix, "tv")
        assert not out.info.colorspace_guessed and not out.info.color_range_guessed
        frame = next(e for e in out.events() if isinstance(e, VideoFrame))
    assert np.abs(frame.rgb.astype(int) - pattern(48, 64)).max() <= 2


def test_untagged_sd_read_as_bt601_and_upscaled_to_hd_written_as_bt709(tmp_path):
    source = make_clip(tmp_path / "in.mkv", frames=1, codec="ffv1", pix_fmt="yuv444p",
                       audio=False)
    with VideoReader(source) as reader:
        assert reader.info.colorspace_guessed
        assert (reader.info.colorspace, reader.info.color_range) == ("smpte170m", "tv")
        first = next(e for e in reader.events() if isinstance(e, VideoFrame))
    assert np.abs(first.rgb.astype(int) - pattern(48, 64)).max() <= 2
    upscale(source, tmp_path / "out.mkv", scale=16,
            settings=EncoderSettings(codec="ffv1", pix_fmt="yuv444p"))
    with VideoReader(tmp_path / "out.mkv") as out:
        assert (out.info.width, out.info.height) == (1024, 768)
        assert (out.info.colorspace, out.info.color_range) == ("bt709", "tv")
        assert (out.info.color_primaries, out.info.color_trc) == ("bt709", "bt709")
        frame = next(e for e in out.events() if isinstance(e, VideoFrame))
    assert np.abs(frame.rgb.astype(int) - nearest(pattern(48, 64), 16)).max() <= 2


def test_ten_bit_bt2020_read_deep_and_written_ten_bit(tmp_path):
    source = media("androidx_roadtrip-vp92-10bit.webm")
    info, pts, _ = upscale(source, tmp_path / "out.mkv", deep=True)
    assert info.deep and info.bit_depth == 10 and info.colorspace == "bt2020nc"
    with VideoReader(tmp_path / "out.mkv", deep=True) as out:
        assert out.info.pix_fmt == "yuv420p10le" and out.info.bit_depth == 10
        assert (out.info.colorspace, out.info.color_range) == ("bt2020nc", "tv")
        frames = [e for e in out.events() if isinstance(e, VideoFrame)]
    assert len(frames) == len(pts) == 72
    assert frames[0].rgb.dtype == np.uint16 and frames[0].rgb.shape == (480, 852, 3)


def test_deep_decode_clips_out_of_range_yuv_instead_of_wrapping(tmp_path):
    # Regression: swscale's full-chroma YUV->rgb48 path wrapped out-of-range samples (bright
    # pixels became black or green on frame 40 of the BT.2020 clip once re-encoded).
    rng = np.random.default_rng(9)
    path = tmp_path / "extreme.mkv"
    with av.open(str(path), "w") as out:
        video = out.add_stream("ffv1", rate=25)
        video.width, video.height, video.pix_fmt = 32, 16, "yuv420p10le"
        frame = av.VideoFrame(32, 16, "yuv420p10le")
        # Luma over the whole 10-bit scale, chroma flat (so chroma interpolation cannot differ)
        # but far outside the nominal 64-960 range.
        for plane, low, high in zip(frame.planes, (0, 10, 1000), (1024, 11, 1001)):
            samples = np.frombuffer(plane, np.uint16).reshape(plane.height, plane.line_size // 2)
            samples[:, : plane.width] = rng.integers(low, high, (plane.height, plane.width))
        frame.pts = 0
        out.mux(video.encode(frame))
        out.mux(video.encode())
    with VideoReader(path, deep=True) as deep, VideoReader(path) as shallow:
        wide = next(e for e in deep.events() if isinstance(e, VideoFrame)).rgb.astype(int)
        narrow = next(e for e in shallow.events() if isinstance(e, VideoFrame)).rgb.astype(int) * 257
    # The 8-bit decode clips correctly; a wrap would be a jump across the whole scale.
    assert np.abs(wide - narrow).max() < 2 * 257


def test_odd_dimensions(tmp_path):
    info, pts, _ = upscale(media("androidx_bear-vp9-odd-dimensions.webm"), tmp_path / "out.mkv")
    assert (info.width, info.height) == (161, 121)
    with VideoReader(tmp_path / "out.mkv") as out:
        assert (out.info.width, out.info.height) == (322, 242)
        assert sum(isinstance(e, VideoFrame) for e in out.events()) == len(pts) == 30


def test_stream_without_initial_keyframe(tmp_path):
    """The first 63 packets reference pictures before the cut: the decoder yields the 15 it can."""
    info, pts, packets = upscale(media("mediabunny_no-initial-keyframe.ts"),
                                 tmp_path / "out.mkv", scale=1)
    assert len(pts) == 15 and packets
    with VideoReader(tmp_path / "out.mkv") as out:
        assert sum(isinstance(e, VideoFrame) for e in out.events()) == 15


def test_packets_that_give_no_picture_at_the_start_are_counted_or_refused(tmp_path):
    with VideoReader(media("mediabunny_no-initial-keyframe.ts")) as reader:
        assert reader.lost_at_start == 63  # what ffmpeg reports as 63 "no frame!"
    with pytest.raises(MediaError, match="the first 63 video packets give no picture .the stream starts "
                                         "without a keyframe.; drop --strict"):
        VideoReader(media("mediabunny_no-initial-keyframe.ts"), strict=True)
    # Pictures reordered (B-frames) are not lost ones.
    reordered = make_clip(tmp_path / "b.mkv", frames=12, options={"preset": "medium"}, audio=False)
    with VideoReader(reordered, strict=True) as reader:
        assert reader.stream.codec_context.has_b_frames
        assert sum(isinstance(e, VideoFrame) for e in reader.events()) == 12 and reader.lost_at_start == 0


# --- encoders ------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", sorted(ENCODER_DEFAULTS))
def test_each_encoder_writes_a_readable_stream_and_nothing_on_stderr(tmp_path, capfd, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    source = make_clip(tmp_path / "in.mkv", frames=4, audio=False)
    settings = EncoderSettings(codec=codec, preset={"libx264": "ultrafast",
                                                    "libx265": "ultrafast"}.get(codec))
    _, pts, _ = upscale(source, tmp_path / "out.mkv", settings=settings)
    out_pts, _ = demux_all(tmp_path / "out.mkv")
    assert out_pts == [Fraction(p, 1000) for p in pts]
    assert capfd.readouterr().err == ""  # an unattended job's log shows its errors, not encoder banners


def test_unknown_encoder_and_pixel_format_are_refused(tmp_path):
    source = make_clip(tmp_path / "in.mkv", frames=1, audio=False)
    with VideoReader(source) as reader:
        with pytest.raises(UsageError, match="no video encoder named 'libnope'.*libx264"):
            VideoWriter(tmp_path / "a.mkv", reader, 64, 48, EncoderSettings(codec="libnope"))
        with pytest.raises(UsageError, match="libx264 cannot write pixel format rgb565"):
            VideoWriter(tmp_path / "b.mkv", reader, 64, 48, EncoderSettings(pix_fmt="rgb565"))
        # An 8000x8000 source at x2: the encoder's "Function not implemented" is about the size.
        with pytest.raises(UsageError, match=r"refused its settings \(Function not implemented\); check --preset, "
                                             r"--crf, -x and --pix-fmt, or the 16000x16000 frame size"):
            VideoWriter(tmp_path / "c.mkv", reader, 16000, 16000, EncoderSettings(codec="ffv1"))
    assert list(tmp_path.iterdir()) == [source]


def test_failed_run_leaves_no_output(tmp_path):
    source = make_clip(tmp_path / "in.mkv", audio=False)
    with pytest.raises(RuntimeError):
        with VideoReader(source) as reader, VideoWriter(tmp_path / "out.mkv", reader, 128, 96,
                                                        FAST) as writer:
            for event in reader.events():
                writer.write_frame(nearest(event.rgb, 2), event.pts)
                raise RuntimeError("model failed")
    assert list(tmp_path.iterdir()) == [source]


def test_a_temporary_output_left_by_a_killed_run_is_removed_by_the_next(tmp_path):
    source = make_clip(tmp_path / "in.mkv", frames=1, audio=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale, running = tmp_path / f".out.mkv.{gone}.partial", tmp_path / f".out.mkv.{os.getppid()}.partial"
    for leftover in (stale, running):
        leftover.write_bytes(b"half an episode")
    with VideoReader(source) as reader, VideoWriter(tmp_path / "out.mkv", reader, 128, 96, FAST) as writer:
        for event in reader.events():
            writer.write_frame(nearest(event.rgb, 2), event.pts)
    assert not stale.exists() and running.exists()  # another run's, still going


def test_an_output_is_on_disk_before_its_name_and_its_name_before_done(tmp_path, monkeypatch):
    # So a power cut cannot leave a complete-looking output, record or segment holding garbage.
    source = make_clip(tmp_path / "in.mkv", frames=1, audio=False)
    steps = []
    sync, rename = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: steps.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))) or sync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: steps.append(("rename", str(b))) or rename(a, b))
    with VideoReader(source) as reader, VideoWriter(tmp_path / "out.mkv", reader, 128, 96, FAST) as writer:
        for event in reader.events():
            writer.write_frame(nearest(event.rgb, 2), event.pts)
    assert steps == [("sync", str(tmp_path / f".out.mkv.{os.getpid()}.partial")), ("rename", str(tmp_path / "out.mkv")),
                     ("sync", str(tmp_path))]


@pytest.mark.parametrize("output, contents, codec, message", [
    ("out.mp4", {"subtitles": True}, "libx264", "mp4 container cannot carry stream 1 .subtitle, srt."),
    # MPEG-TS and AVI take these and write them as untyped data, or drop them.
    ("out.ts", {"subtitles": True}, "libx264", "mpegts container cannot carry stream 1 .subtitle, srt."),
    ("out.ts", {"audio": True}, "libx264", "mpegts container cannot carry stream 2 .audio, flac."),
    # Taken when added, refused when the header or the index is written: after all the work.
    ("out.mov", {"audio": True}, "libx264", "mov container cannot carry stream 2 .audio, flac."),
    ("out.mov", {"audio": "libopus"}, "libx264", "mov container cannot carry stream 1 .audio, opus."),
    ("out.mp4", {"audio": "pcm_s16le"}, "libx264", "mp4 container cannot carry stream 1 .audio, pcm_s16le."),
    ("out.ts", {"chapters": True}, "libx264", "mpegts container cannot carry chapters"),
    ("out.ts", {}, "ffv1", "mpegts container cannot hold ffv1 video"),
    ("out.mp4", {"attachment": True}, "libx264", "mp4 container cannot carry attachments .ZenMaru.ttf."),
])
def test_what_the_container_cannot_carry_is_refused_not_dropped(tmp_path, output, contents, codec, message):
    source = make_clip(tmp_path / "in.mkv", frames=1, **{"audio": False, **contents})
    with VideoReader(source) as reader:
        with pytest.raises(MediaError, match=message):
            VideoWriter(tmp_path / output, reader, 128, 96, EncoderSettings(codec=codec))
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize("fmt", ["rawvideo", "yuv4mpegpipe"])
def test_formats_that_hold_the_video_alone_are_refused(tmp_path, fmt):
    source = make_clip(tmp_path / "in.mkv", frames=1)  # its audio would be lost
    with VideoReader(source) as reader:
        with pytest.raises(UsageError, match=f"-f {fmt} is not a container vidscale writes; use one of matroska"):
            VideoWriter(tmp_path / "out.mkv", reader, 128, 96, EncoderSettings(codec="ffv1", format=fmt))
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize("output, fmt", [("out.avi", None), ("out.mkv", "avi")])
def test_avi_is_refused_for_it_would_mistime_frames(tmp_path, output, fmt):
    source = make_clip(tmp_path / "in.mkv", frames=1, audio=False)
    with VideoReader(source) as reader:
        with pytest.raises(UsageError, match="avi cannot store each frame's timestamp .variable frame rate and "
                                             "B-frames come out mistimed.; write .mkv or .mp4 instead"):
            VideoWriter(tmp_path / output, reader, 128, 96, EncoderSettings(codec="ffv1", format=fmt))
    assert list(tmp_path.iterdir()) == [source]


def test_what_matroska_cannot_carry_is_refused_with_a_fix_that_is_not_matroska(tmp_path):
    source = make_clip(tmp_path / "in.mp4", frames=1, audio=False)
    with av.open(str(source)) as clip, av.open(str(tmp_path / "subs.mp4"), "w") as out:
        video = out.add_stream_from_template(clip.streams.video[0])
        text = out.add_mux_stream("mov_text", time_base=Fraction(1, 1000))
        for packet in clip.demux(video=0):
            if packet.size:
                packet.stream = video
                out.mux(packet)
        line = av.Packet(b"\x00\x02Hi")
        line.stream, line.pts, line.dts, line.duration, line.time_base = text, 0, 0, 40, Fraction(1, 1000)
        out.mux(line)
    with VideoReader(tmp_path / "subs.mp4") as reader:
        with pytest.raises(MediaError, match="matroska container cannot carry stream 1 .subtitle, mov_text.; "
                                             "remux the input without that stream, or with it converted, first"):
            VideoWriter(tmp_path / "out.mkv", reader, 128, 96, FAST)


def test_mpeg_ts_output_keeps_its_audio(tmp_path):
    source = make_clip(tmp_path / "in.mkv", frames=2, audio="aac")
    with VideoReader(source) as reader, VideoWriter(tmp_path / "out.ts", reader, 128, 96, FAST) as writer:
        for event in reader.events():
            if isinstance(event, VideoFrame):
                writer.write_frame(nearest(event.rgb, 2), event.pts)
            else:
                writer.write_packet(event)
    with av.open(str(tmp_path / "out.ts")) as result:
        assert [s.codec_context.name for s in result.streams] == ["h264", "aac"]


# --- pipes ---------------------------------------------------------------------------------

class _Stdout:
    def __init__(self, buffer):
        self.buffer = buffer

    def fileno(self) -> int:
        return self.buffer.fileno()


def _drain(fd, sink):
    with os.fdopen(fd, "rb") as pipe:
        sink.append(pipe.read())


@pytest.mark.parametrize("fmt", ["matroska", "mp4"])
def test_read_from_pipe_and_write_to_stdout_pipe(tmp_path, monkeypatch, fmt):
    source = make_clip(tmp_path / "in.mkv")
    data = source.read_bytes()
    read_end, write_end = os.pipe()
    feeder = threading.Thread(target=lambda: os.fdopen(write_end, "wb").write(data))
    out_read, out_write = os.pipe()
    received = []
    drainer = threading.Thread(target=_drain, args=(out_read, received))
    feeder.start()
    drainer.start()
    with os.fdopen(read_end, "rb") as stdin, os.fdopen(out_write, "wb") as stdout:
        monkeypatch.setattr(sys, "stdin", _Stdout(stdin))
        monkeypatch.setattr(sys, "stdout", _Stdout(stdout))
        with VideoReader("-") as reader:
            assert reader.label == "stdin"
            with VideoWriter("-", reader, 128, 96, EncoderSettings(
                    preset="ultrafast", format=fmt)) as writer:
                for event in reader.events():
                    if isinstance(event, VideoFrame):
                        writer.write_frame(nearest(event.rgb, 2), event.pts)
                    elif event.stream.type == "audio":
                        writer.write_packet(event)
    feeder.join()
    drainer.join()
    (tmp_path / "out").write_bytes(received[0])
    out_pts, out_packets = demux_all(tmp_path / "out")
    assert out_pts == [Fraction(p, 1000) for p in range(0, 240, 40)]
    assert sorted(out_packets) == sorted(demux_all(source)[1])
    if fmt == "mp4":
        assert b"moof" in received[0]


@pytest.mark.parametrize("output", ["out.mkv", "out.mp4"])
def test_an_mp4s_chapter_track_on_stdin_stays_chapters(tmp_path, monkeypatch, output):
    # From a pipe it showed as a subtitle track of the chapter names: refused by MKV, and in MP4
    # a visible default subtitle track.
    data = make_clip(tmp_path / "in.mp4", audio="aac", chapters=True).read_bytes()
    read_end, write_end = os.pipe()
    feeder = threading.Thread(target=lambda: os.fdopen(write_end, "wb").write(data))
    feeder.start()
    with os.fdopen(read_end, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", _Stdout(stdin))
        with VideoReader("-") as reader, VideoWriter(tmp_path / output, reader, 128, 96, FAST) as writer:
            for event in reader.events():
                if isinstance(event, VideoFrame):
                    writer.write_frame(nearest(event.rgb, 2), event.pts)
                else:
                    writer.write_packet(event)
    feeder.join()
    with av.open(str(tmp_path / output)) as out:
        # An MP4 output's own chapter track reads back as a data stream, as the input's did.
        assert [s.type for s in out.streams if s.type != "data"] == ["video", "audio"]
        assert [c["metadata"]["title"] for c in out.chapters()] == ["Opening", "Part A"]


def test_an_mp4_with_its_index_last_on_stdin_is_refused_with_the_cause(tmp_path, monkeypatch):
    # Larger than the buffer the demuxer could seek back in.
    data = make_clip(tmp_path / "in.mp4", frames=12, size=(640, 480), audio=False).read_bytes()
    assert data.index(b"moov") > data.index(b"mdat")  # as most MP4 muxers write it
    read_end, write_end = os.pipe()
    feeder = threading.Thread(target=lambda: os.fdopen(write_end, "wb").write(data))
    feeder.start()
    with os.fdopen(read_end, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", _Stdout(stdin))
        with pytest.raises(MediaError, match=r"only with its index first \(ffmpeg -movflags \+faststart\)"):
            with VideoReader("-"):
                pass
        stdin.read()  # let the feeder finish
    feeder.join()


def test_reader_closing_stdout_is_a_distinct_error(tmp_path, monkeypatch):
    source = make_clip(tmp_path / "in.mkv", frames=30, size=(256, 192), audio=False)
    read_end, write_end = os.pipe()
    os.close(read_end)
    # Unbuffered, so closing the file does not raise BrokenPipeError again on flush.
    with os.fdopen(write_end, "wb", buffering=0) as stdout:
        monkeypatch.setattr(sys, "stdout", _Stdout(stdout))
        with pytest.raises(OutputClosedError, match="stdout was closed"):
            with VideoReader(source) as reader, VideoWriter("-", reader, 512, 384, FAST) as writer:
                for event in reader.events():
                    writer.write_frame(nearest(event.rgb, 2), event.pts)


# --- bad inputs ----------------------------------------------------------------------------

def test_bad_inputs_give_one_line_media_errors(tmp_path):
    for name, (path, message) in bad_inputs(tmp_path).items():
        with pytest.raises(MediaError, match=message) as caught:
            VideoReader(path)
        text = str(caught.value)
        assert str(path) in text and "\n" not in text, name


def test_resolution_change_mid_stream_is_refused(tmp_path):
    joined = resolution_change(tmp_path)
    with VideoReader(joined) as reader:
        with pytest.raises(MediaError, match="frame 3 changes size from 64x48 to 96x64"):
            list(reader.events())


def test_a_whole_mp4_ending_on_a_repeated_one_tick_timestamp_is_not_called_truncated(tmp_path):
    # anime4k's clip repeats timestamps, the repeat 1 tick long: cut after 16 packets, the frame
    # decoded last is such a repeat, and ended 1 tick after its pts the file looked truncated.
    cut = tmp_path / "cut.mp4"
    with av.open(str(media("anime4k_web_input.mp4"))) as source, av.open(str(cut), "w") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in list(p for p in source.demux(video=0) if p.size)[:16]:
            packet.stream = stream
            out.mux(packet)
    with VideoReader(cut) as reader:
        assert sum(isinstance(e, VideoFrame) for e in reader.events()) == 16


@pytest.mark.parametrize("broken", [3, 4, 5])
def test_corrupt_packet_is_concealed_and_counted_or_refused_when_strict(tmp_path, broken):
    # Near the end too: the decoder drains its last frames after the broken one, and a file whose
    # last packet is broken is complete, not truncated.
    source = corrupt_clip(tmp_path, broken=broken)
    with VideoReader(source) as reader:
        pts = [e.pts for e in reader.events() if isinstance(e, VideoFrame)]
    assert reader.corrupt_at == [40 * broken] and pts == [p for p in range(0, 240, 40) if p != 40 * broken]
    with VideoReader(source, strict=True) as reader:
        with pytest.raises(MediaError, match=rf"corrupt video data near {0.04 * broken:.3f} s \(pts {40 * broken}\)"):
            list(reader.events())
