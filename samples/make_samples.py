"""Regenerate the bundled samples: a small synthetic cartoon picture and clip, drawn with numpy.

    python samples/make_samples.py

Flat colours, dark outlines, a soft gradient, drawn "on twos" like most anime (each drawing held
for two frames), with a sine-tone audio track and an ASS subtitle: the kind of content vidscale is
for, made here so the repository carries no third-party media.
"""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vidscale.media import Image, write_image

HERE = Path(__file__).parent
ASS_HEADER = """[Script Info]
ScriptType: v4.00+
PlayResX: 128
PlayResY: 96

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, \
Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, \
Alignment, MarginL, MarginR, MarginV, Encoding
Style: Default,Arial,12,&H00FFFFFF,&H000000FF,&H00000000,&H00000000,0,0,0,0,100,100,0,0,1,1,0,2,4,4,4,1

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
"""


def cartoon(height: int, width: int, phase: float = 0.0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([120 + 60 * y / height, 170 + 50 * y / height, 250 - 30 * y / height], axis=2)
    picture = sky.copy()
    cy, cx, r = height * 0.55, width * (0.4 + 0.1 * np.sin(phase)), min(height, width) * 0.3
    distance = np.hypot(y - cy, x - cx)
    picture[distance < r] = (250, 215, 180)  # face
    picture[np.abs(distance - r) < 1.5] = (40, 30, 30)  # outline
    for ex in (cx - r * 0.35, cx + r * 0.35):
        picture[np.hypot(y - (cy - r * 0.15), x - ex) < r * 0.12] = (30, 60, 140)  # eyes
    mouth = (np.abs(np.hypot(y - cy, x - cx) - r * 0.5) < 1.2) & (y > cy + r * 0.2)
    picture[mouth] = (150, 40, 50)
    ground = y > height * 0.85 + 3 * np.sin(x / 7)
    picture[ground] = (90, 160, 80)
    return np.clip(picture + 0.5, 0, 255).astype(np.uint8)


def clip(path: Path, frames: int = 24, rate: int = 24) -> None:
    tick = Fraction(1, 1000)
    with av.open(str(path), "w") as out:
        out.metadata["title"] = "vidscale sample"
        video = out.add_stream("libx264", rate=rate, options={"crf": "20", "tune": "animation"})
        video.width, video.height, video.pix_fmt = 128, 96, "yuv420p"
        video.codec_context.colorspace, video.codec_context.color_range = 6, 1  # BT.601, limited
        audio = out.add_stream("aac", rate=48000)
        audio.metadata["language"] = "jpn"
        subtitle = out.add_stream("ass")
        subtitle.metadata["language"] = "eng"
        subtitle.codec_context.extradata = ASS_HEADER.encode()
        for index in range(frames):
            drawing = cartoon(96, 128, phase=(index // 2) * 0.5)  # on twos
            frame = av.VideoFrame.from_ndarray(drawing, format="rgb24").reformat(
                format="yuv420p", dst_colorspace="ITU601", dst_color_range="MPEG")
            frame.pts, frame.time_base = index, Fraction(1, rate)
            out.mux(video.encode(frame))
        out.mux(video.encode())
        samples = (0.2 * np.sin(2 * np.pi * 440 * np.arange(48000 * frames // rate) / 48000)).astype(np.float32)
        for start in range(0, len(samples), 1024):
            chunk = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 48000, start
            out.mux(audio.encode(chunk))
        out.mux(audio.encode())
        line = av.Packet(b"0,0,Default,,0,0,0,,Hello from vidscale")
        line.stream, line.time_base, line.pts, line.dts, line.duration = subtitle, tick, 0, 0, 900
        out.mux(line)


if __name__ == "__main__":
    write_image(Image(cartoon(96, 128)), HERE / "cartoon.png")
    clip(HERE / "cartoon.mkv")
