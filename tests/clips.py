"""Small clips made by the tests themselves (good and broken), and readers for what a run wrote."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from conftest import media

# name: (make_clip's `colour` tag, the matrix and range a reader must report)
COLOUR_CASES = {
    "bt601-limited": (("ITU601", "MPEG", 6), "smpte170m", "tv"),
    "bt709-limited": (("ITU709", "MPEG", 1), "bt709", "tv"),
    "bt709-full": (("ITU709", "JPEG", 1), "bt709", "pc"),
}


def pattern(height: int, width: int, shift: int = 0) -> np.ndarray:
    """Blocks of saturated and mid colours (so a wrong matrix shows), moving with `shift`."""
    colours = np.array([(235, 20, 20), (20, 200, 40), (30, 40, 220), (200, 200, 30),
                        (128, 128, 128), (250, 250, 250), (10, 10, 10), (90, 30, 160)], np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    return colours[((y // 16) * 4 + x // 16 + shift) % len(colours)]


def make_clip(path, *, frames=6, size=(64, 48), pts=None, durations=None, time_base=Fraction(1, 1000),
              codec="libx264", pix_fmt="yuv420p", fmt=None, colour=None, audio=True,
              subtitles=False, attachment=False, chapters=False, rotation=0, sar=None, gop=None,
              options=None, timecode=None, picture=None):
    """A small clip made here: `colour` is (sws matrix name, range, AVCOL colorspace code) or
    None for an untagged BT.601 limited picture; `gop`: the keyframe interval; `options`: more
    encoder options (libx264's preset is ultrafast: no B-frames); `audio`: an AAC and a FLAC
    track, or a codec's name ("aac", "pcm_s16le": s16 or fltp samples) for one track of it
    alone; `durations`: each frame's (else the muxer's 1/25 s); `picture`: an 8x6 PNG's bytes,
    attached (Matroska) or as cover art."""
    width, height = size
    pts = list(range(0, frames * 40, 40)) if pts is None else pts
    with av.open(str(path), "w", format=fmt) as out:
        options = {**({"preset": "ultrafast"} if codec == "libx264" else {}), **(options or {})}
        if gop:
            options["g"] = str(gop)
        video = out.add_stream(codec, rate=25, options=options)
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
        if timecode:  # MP4/MOV write it as a timecode (tmcd) track as well
            video.metadata["timecode"] = timecode
        if audio:
            sound = out.add_stream("aac" if audio is True else audio, rate=8000)
            sound.metadata.update(language="eng", title="Commentary")
            sound.disposition = av.stream.Disposition.forced
            tracks = [sound]
            if audio is True:
                second = out.add_stream("flac", rate=8000)
                second.metadata["language"] = "fre"
                tracks.append(second)
        if subtitles:
            srt = out.add_mux_stream("subrip")
            srt.metadata.update(language="ger", title="Signs")
            srt.disposition = av.stream.Disposition.default | av.stream.Disposition.forced
            ass = out.add_mux_stream("ass")
            ass.metadata["language"] = "jpn"
        if attachment:
            out.add_attachment("ZenMaru.ttf", "font/ttf", b"\x00\x01\x00\x00FAKEFONT" * 50)
        if picture and out.format.name == "matroska":
            out.add_attachment("cover.png", "image/png", picture)
        elif picture:  # cover art
            cover = out.add_mux_stream("png", width=8, height=6)
            cover.disposition = av.stream.Disposition.attached_pic
            packet = av.Packet(picture)
            packet.stream, packet.pts, packet.dts, packet.is_keyframe = cover, 0, 0, True
            out.mux(packet)
        if chapters:
            out.set_chapters([
                {"id": 1, "start": 0, "end": 100, "time_base": Fraction(1, 1000),
                 "metadata": {"title": "Opening"}},
                {"id": 2, "start": 100, "end": 240, "time_base": Fraction(1, 1000),
                 "metadata": {"title": "Part A"}}])
        out.metadata["title"] = "made by test_media"
        wanted = dict(zip(pts, durations or []))

        def mux_video(packets):
            for packet in packets:
                packet.duration = wanted.get(packet.pts, packet.duration)
            out.mux(packets)

        for i, stamp in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(pattern(height, width, i), format="rgb24")
            frame = frame.reformat(format=pix_fmt, dst_colorspace=matrix,
                                   dst_color_range=colour_range)
            frame.pts, frame.time_base = stamp, time_base
            mux_video(video.encode(frame))
            if subtitles and i < 2:
                for stream, text in ((srt, b"Hello %d" % i), (ass, b"%d,0,Default,,0,0,0,,Hi" % i)):
                    packet = av.Packet(text)
                    packet.stream, packet.time_base = stream, Fraction(1, 1000)
                    packet.pts = packet.dts = stamp
                    packet.duration = 40
                    out.mux(packet)
        mux_video(video.encode())
        if audio:
            for stream in tracks:
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


def bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Inputs that are not usable videos, each with words its one-line error must contain."""
    folder = Path(folder)
    (folder / "folder.mkv").mkdir()
    (folder / "empty.mkv").write_bytes(b"")
    (folder / "noise.mkv").write_bytes(np.random.default_rng(0).bytes(20000))
    with av.open(str(folder / "audio.mka"), "w") as out:
        stream = out.add_stream("flac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    clip = make_clip(folder / "clip.mkv", frames=1, audio=False).read_bytes()
    (folder / "clip.mkv").unlink()
    # A codec id no FFmpeg knows, so the decoder check fails as it would for a codec left out
    # of the build.
    (folder / "alien.mkv").write_bytes(clip.replace(b"V_MPEG4/ISO/AVC", b"V_MPEG4/ISO/XYZ"))
    return {
        "missing": (folder / "missing.mkv", "does not exist"),
        "directory": (folder / "folder.mkv", "is a directory"),
        "empty": (folder / "empty.mkv", "is empty"),
        "noise": (folder / "noise.mkv", "not a video file"),
        "truncated": (media("pymediainfo_sample_truncated.mkv"), "truncated"),
        "audio only": (folder / "audio.mka", "no video stream"),
        "still image": (media("realesrgan_comic_lq.png"), "still image.*vidscale image"),
        "unknown codec": (folder / "alien.mkv", "cannot decode its video codec"),
    }


def corrupt_clip(folder: Path, broken: int = 3, gop: int | None = None) -> Path:
    """A 6-frame FFV1 clip, 40 ms a frame, whose packet `broken` is overwritten with noise (the
    decoder rejects it unless it is a keyframe, which it conceals)."""
    clip = make_clip(Path(folder) / "clean.mkv", codec="ffv1", audio=False, gop=gop)
    with av.open(str(clip)) as container:
        packet = [bytes(p) for p in container.demux(video=0) if p.size][broken]
    data = bytearray(clip.read_bytes())
    clip.unlink()
    # The whole packet: keyframes all begin with the same header bytes.
    start = data.find(packet) + 100
    data[start:start + len(packet) - 200] = np.random.default_rng(1).bytes(len(packet) - 200)
    broken = Path(folder) / "broken.mkv"
    broken.write_bytes(data)
    return broken


def resolution_change(folder: Path) -> Path:
    """Two MPEG-TS clips joined: 3 frames of 64x48, then 3 of 96x64."""
    first = make_clip(Path(folder) / "a.ts", frames=3, fmt="mpegts", audio=False)
    second = make_clip(Path(folder) / "b.ts", frames=3, size=(96, 64), fmt="mpegts", audio=False)
    joined = Path(folder) / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    first.unlink()
    second.unlink()
    return joined
