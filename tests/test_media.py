"""Video side of vidscale.media: real PyAV decodes and encodes, a numpy stand-in for the model."""

import os
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import media, nearest
from vidscale.errors import MediaError
from vidscale.media import (
    ENCODER_DEFAULTS, EncoderSettings, OutputClosedError, VideoFrame, VideoReader, VideoWriter,
)

FAST = EncoderSettings(preset="ultrafast")
ASS_HEADER = b"[Script Info]\nScriptType: v4.00+\n\n[Events]\nFormat: ReadOrder, Layer, Style, " \
             b"Name, MarginL, MarginR, MarginV, Effect, Text\n"


def pattern(height: int, width: int, shift: int = 0) -> np.ndarray:
    """Blocks of saturated and mid colours (so a wrong matrix shows), moving with `shift`."""
    colours = np.array([(235, 20, 20), (20, 200, 40), (30, 40, 220), (200, 200, 30),
                        (128, 128, 128), (250, 250, 250), (10, 10, 10), (90, 30, 160)], np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    return colours[((y // 16) * 4 + x // 16 + shift) % len(colours)]


def make_clip(path, *, frames=6, size=(64, 48), pts=None, time_base=Fraction(1, 1000),
              codec="libx264", pix_fmt="yuv420p", fmt=None, colour=None, audio=True,
              subtitles=False, attachment=False, chapters=False, rotation=0, sar=None):
    """A small clip made here: `colour` is (sws matrix name, range, AVCOL colorspace code) or
    None for an untagged BT.601 limited picture."""
    width, height = size
    pts = list(range(0, frames * 40, 40)) if pts is None else pts
    with av.open(str(path), "w", format=fmt) as out:
        video = out.add_stream(codec, rate=25, options={"preset": "ultrafast"}
                               if codec == "libx264" else {})
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        video.time_base = video.codec_context.time_base = time_base
        matrix, colour_range = "ITU601", "MPEG"
        if colour is not None:
            matrix, colour_range, code = colour
            video.codec_context.colorspace = code
            video.codec_context.color_range = 1 if colour_range == "MPEG" else 2
        if sar:
            video.codec_context.sample_aspect_ratio = sar
        if rotation:
            video.set_display_rotation(rotation)
        video.metadata["language"] = "jpn"
        video.metadata["title"] = "picture"
        if audio:
            sound = out.add_stream("aac", rate=8000)
            sound.metadata.update(language="eng", title="Commentary")
            sound.disposition = av.stream.Disposition.forced
            second = out.add_stream("flac", rate=8000)
            second.metadata["language"] = "fre"
        if subtitles:
            srt = out.add_mux_stream("subrip")
            srt.metadata.update(language="ger", title="Signs")
            srt.disposition = av.stream.Disposition.default | av.stream.Disposition.forced
            ass = out.add_mux_stream("ass")
            ass.metadata["language"] = "jpn"
        if attachment:
            out.add_attachment("ZenMaru.ttf", "font/ttf", b"\x00\x01\x00\x00FAKEFONT" * 50)
        if chapters:
            out.set_chapters([
                {"id": 1, "start": 0, "end": 100, "time_base": Fraction(1, 1000),
                 "metadata": {"title": "Opening"}},
                {"id": 2, "start": 100, "end": 240, "time_base": Fraction(1, 1000),
                 "metadata": {"title": "Part A"}}])
        out.metadata["title"] = "made by test_media"
        for i, stamp in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(pattern(height, width, i), format="rgb24")
            frame = frame.reformat(format=pix_fmt, dst_colorspace=matrix,
                                   dst_color_range=colour_range)
            frame.pts, frame.time_base = stamp, time_base
            out.mux(video.encode(frame))
            if subtitles and i < 2:
                for stream, text in ((srt, b"Hello %d" % i), (ass, b"%d,0,Default,,0,0,0,,Hi" % i)):
                    packet = av.Packet(text)
                    packet.stream, packet.time_base = stream, Fraction(1, 1000)
                    packet.pts = packet.dts = stamp
                    packet.duration = 40
                    out.mux(packet)
        out.mux(video.encode())
        if audio:
            for stream in (sound, second):
                samples = (np.sin(np.arange(2048) / 5) * 8000).astype(np.int16)[None]
                fmt_name = "fltp" if stream.codec_context.name == "aac" else "s16"
                data = samples.astype(np.float32) / 32768 if fmt_name == "fltp" else samples
                for start in (0, 1024):
                    sound_frame = av.AudioFrame.from_ndarray(
                        np.ascontiguousarray(data[:, start:start + 1024]), format=fmt_name,
                        layout="mono")
                    sound_frame.sample_rate, sound_frame.pts = 8000, start
                    out.mux(stream.encode(sound_frame))
                out.mux(stream.encode())
    return Path(path)


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


def demux_all(path):
    """(video pts rescaled to seconds as Fractions, non-video packets, container)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        video_pts, packets = [], []
        for packet in container.demux():
            if packet.size == 0 or packet.stream.type == "attachment":
                continue
            if packet.stream is video:
                video_pts.append(packet.pts * packet.time_base)
            else:
                packets.append((packet.stream.index, bytes(packet)))
    return sorted(video_pts), packets


def stream_tags(path):
    with av.open(str(path)) as container:
        return ([(s.type, s.language, s.metadata.get("title"), int(s.disposition))
                 for s in container.streams if s.type != "attachment"],
                container.chapters(), dict(container.metadata))


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


# --- colour --------------------------------------------------------------------------------

COLOUR_CASES = {
    "bt601-limited": (("ITU601", "MPEG", 6), "smpte170m", "tv"),
    "bt709-limited": (("ITU709", "MPEG", 1), "bt709", "tv"),
    "bt709-full": (("ITU709", "JPEG", 1), "bt709", "pc"),
}


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


# --- encoders ------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", sorted(ENCODER_DEFAULTS))
def test_each_encoder_writes_a_readable_stream(tmp_path, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    source = make_clip(tmp_path / "in.mkv", frames=4, audio=False)
    settings = EncoderSettings(codec=codec, preset={"libx264": "ultrafast",
                                                    "libx265": "ultrafast"}.get(codec))
    _, pts, _ = upscale(source, tmp_path / "out.mkv", settings=settings)
    out_pts, _ = demux_all(tmp_path / "out.mkv")
    assert out_pts == [Fraction(p, 1000) for p in pts]


def test_unknown_encoder_and_pixel_format_are_refused(tmp_path):
    source = make_clip(tmp_path / "in.mkv", frames=1, audio=False)
    with VideoReader(source) as reader:
        with pytest.raises(MediaError, match="no video encoder named 'libnope'.*libx264"):
            VideoWriter(tmp_path / "a.mkv", reader, 64, 48, EncoderSettings(codec="libnope"))
        with pytest.raises(MediaError, match="libx264 cannot write pixel format rgb565"):
            VideoWriter(tmp_path / "b.mkv", reader, 64, 48, EncoderSettings(pix_fmt="rgb565"))
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


def test_stream_the_container_cannot_carry_is_refused_not_dropped(tmp_path):
    source = make_clip(tmp_path / "in.mkv", frames=1, subtitles=True, audio=False)
    with VideoReader(source) as reader:
        with pytest.raises(MediaError, match="mp4 container cannot carry stream 1 .subtitle, srt."):
            VideoWriter(tmp_path / "out.mp4", reader, 128, 96, FAST)
    assert not (tmp_path / "out.mp4").exists()


# --- pipes ---------------------------------------------------------------------------------

class _Stdout:
    def __init__(self, buffer):
        self.buffer = buffer


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

def _bad_inputs(tmp_path):
    (tmp_path / "folder.mkv").mkdir()
    (tmp_path / "empty.mkv").write_bytes(b"")
    (tmp_path / "noise.mkv").write_bytes(np.random.default_rng(0).bytes(20000))
    with av.open(str(tmp_path / "audio.mka"), "w") as out:
        stream = out.add_stream("flac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    clip = make_clip(tmp_path / "clip.mkv", frames=1, audio=False).read_bytes()
    (tmp_path / "alien.mkv").write_bytes(clip.replace(b"V_MPEG4/ISO/AVC", b"V_MPEG4/ISO/XYZ"))
    return {
        "missing": (tmp_path / "missing.mkv", "does not exist"),
        "directory": (tmp_path / "folder.mkv", "is a directory"),
        "empty": (tmp_path / "empty.mkv", "is empty"),
        "noise": (tmp_path / "noise.mkv", "not a video file"),
        "truncated": (media("pymediainfo_sample_truncated.mkv"), "truncated"),
        "audio only": (tmp_path / "audio.mka", "no video stream"),
        "still image": (media("realesrgan_comic_lq.png"), "still image.*vidscale image"),
        "unknown codec": (tmp_path / "alien.mkv", "cannot decode its video codec"),
    }


def test_bad_inputs_give_one_line_media_errors(tmp_path):
    for name, (path, message) in _bad_inputs(tmp_path).items():
        with pytest.raises(MediaError, match=message) as caught:
            VideoReader(path)
        text = str(caught.value)
        assert str(path) in text and "\n" not in text, name


def test_resolution_change_mid_stream_is_refused(tmp_path):
    first = make_clip(tmp_path / "a.ts", frames=3, fmt="mpegts", audio=False)
    second = make_clip(tmp_path / "b.ts", frames=3, size=(96, 64), fmt="mpegts", audio=False)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    with VideoReader(joined) as reader:
        with pytest.raises(MediaError, match="frame 3 changes size from 64x48 to 96x64"):
            list(reader.events())


def test_corrupt_packet_is_concealed_and_counted_or_refused_when_strict(tmp_path):
    clip = make_clip(tmp_path / "in.mkv", codec="ffv1", audio=False)
    with av.open(str(clip)) as container:
        fourth = [bytes(p) for p in container.demux(video=0) if p.size][3]
    data = bytearray(clip.read_bytes())
    start = data.find(fourth[:64]) + 100
    data[start:start + len(fourth) - 200] = np.random.default_rng(1).bytes(len(fourth) - 200)
    broken = tmp_path / "broken.mkv"
    broken.write_bytes(data)
    with VideoReader(broken) as reader:
        frames = sum(isinstance(e, VideoFrame) for e in reader.events())
    assert reader.corrupt_packets == 1 and frames == 5
    with VideoReader(broken, strict=True) as reader:
        with pytest.raises(MediaError, match="corrupt video data near pts"):
            list(reader.events())
