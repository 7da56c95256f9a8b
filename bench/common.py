"""What the benchmark scripts share: the demo clip, cutting it short, and measuring in fresh processes.

Every measurement runs in a process of its own, one after another, so that each reports its own
peak RSS and none inherits another's caches or threads.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vidscale.progress import Progress

DEFAULT_CLIP = Path(__file__).resolve().parents[2] / "shared" / "media" / "realesrgan_onepiece_demo.mp4"


def cut(clip: Path, frames: int, target: Path) -> Path:
    """The first `frames` frames of `clip` (lossless ffv1) with the audio of the same span copied."""
    with av.open(str(clip)) as src, av.open(str(target), "w") as dst:
        video_in = src.streams.video[0]
        video = dst.add_stream("ffv1", rate=video_in.average_rate)
        video.width, video.height, video.pix_fmt = video_in.width, video_in.height, "yuv420p"
        video.time_base = video.codec_context.time_base = video_in.time_base
        audio_in = src.streams.audio[0] if src.streams.audio else None
        audio = dst.add_stream_from_template(audio_in) if audio_in else None
        written, end = 0, None
        for packet in src.demux():
            if packet.stream is audio_in:
                if packet.size and packet.pts is not None and (end is None or packet.pts * packet.time_base < end):
                    packet.stream = audio
                    dst.mux(packet)
                continue
            for frame in packet.decode():
                if written < frames:
                    dst.mux(video.encode(frame))
                    written += 1
                    if written == frames:
                        end = (frame.pts + 1) * frame.time_base
        dst.mux(video.encode())
    return target


def synthetic_clip(path: Path, frames: int, *, height: int, width: int, hold: int = 1,
                   codec: str = "libx264") -> Path:
    """A cel-style clip with audio: vidscale's bundled calibration drawing (flat fills, ink lines, a
    gradient, grain) panning 3 pixels per drawing, each drawing held for `hold` frames (anime is
    mostly drawn on twos and threes), 24 fps."""
    from vidscale.quantize import synthetic_frames

    drawing = synthetic_frames(count=1, size=(height, width))[0]
    rate = 24
    with av.open(str(path), "w") as out:
        options = {"preset": "ultrafast"} if codec == "libx264" else {}
        video = out.add_stream(codec, rate=rate, options=options)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream("aac", rate=48000)
        for index in range(frames):
            picture = np.roll(drawing, 3 * (index // hold), axis=1)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, rate)
            out.mux(video.encode(frame))
        out.mux(video.encode())
        tone = (0.1 * np.sin(np.arange(48000 * frames // rate) / 20)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            chunk = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 48000, start
            out.mux(audio.encode(chunk))
        out.mux(audio.encode())
    return path


WARM_UP = 2
"""Frames every contender writes before its clock starts: one per OpenVINO stream, since the first
inference of each allocates its memory (about a second here), a once-per-run cost like compiling."""


class FrameClock(Progress):
    """When a run's first WARM_UP frames were written, so that every contender's fps is counted the
    same way: from then to the end of the run, the encoder's flush included. vidscale is given it as
    its progress; the per-frame loops tell it each frame they write."""

    def __init__(self):
        self.frames = 0
        self.warm: float | None = None

    def update(self, frames: int) -> None:
        self.frames = frames
        if self.warm is None and frames >= WARM_UP:
            self.warm = time.perf_counter()

    def fps(self) -> float:
        """fps of the frames after the first WARM_UP, the run having just ended."""
        if self.warm is None or self.frames <= WARM_UP:
            raise ValueError(f"{self.frames} frames written; a run needs more than {WARM_UP} to be timed")
        return (self.frames - WARM_UP) / (time.perf_counter() - self.warm)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, job: dict) -> dict:
    """Run `script --child JOB` in a fresh Python and return the JSON its last line printed."""
    done = subprocess.run([sys.executable, script, "--child", json.dumps(job)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_child(job: str, child) -> None:
    """The child side of run_child: call `child` with the job's fields and print its result."""
    print(json.dumps(child(**json.loads(job))))


def best_of(script: str, rounds: int, jobs: list[dict]) -> list[dict]:
    """Each job run by `script` in a fresh process `rounds` times, interleaved, the fastest run of
    each: other load on a shared host only ever slows a run down, so the fastest of a few is the
    least disturbed."""
    best: list[dict | None] = [None] * len(jobs)
    for _ in range(rounds):
        for index, job in enumerate(jobs):
            run = run_child(script, job)
            if best[index] is None or run["fps"] > best[index]["fps"]:
                best[index] = run
    return best


def multiply_adds_per_pixel(module) -> float:
    """Multiply-adds per input pixel of the convolutions in `module` (a model's torch network),
    counted by forward hooks on a small input. Times the pixels a compiled model takes per second,
    it is the arithmetic rate the model sustains, to set beside the machine's peak: how much any
    better scheduling could still gain."""
    import torch

    side = 32
    total = 0

    def count(layer, _inputs, output) -> None:
        nonlocal total
        total += output.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]

    hooks = [layer.register_forward_hook(count) for layer in module.modules() if isinstance(layer, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, side, side))
    finally:
        for hook in hooks:
            hook.remove()
    return total / side**2


def bare_seconds(compiled, requests: int) -> float:
    """Seconds the compiled model (a vidscale Upscaler) takes for `requests` requests with every
    request slot kept busy, as benchmark_app measures, after one round that is not timed: the
    first inferences allocate."""
    batch = np.random.default_rng(0).integers(0, 256, compiled.input_shape, dtype=np.uint8)
    queue = compiled.queue(lambda *_: None)
    for _ in range(compiled.requests):
        queue.submit(batch, None)
    queue.wait_all()
    started = time.perf_counter()
    for _ in range(requests):
        queue.submit(batch, None)
    queue.wait_all()
    return time.perf_counter() - started
