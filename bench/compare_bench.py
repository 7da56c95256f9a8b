"""vidscale against the ways these models are usually run, on the same clip, in one run.

For each model, in fresh processes one after another:
  (a) bare    the compiled OpenVINO model kept busy with the clip's tiles (the limit)
  (b) vidscale end to end (decode, infer, encode ffv1, mux with audio), reuse off and on
  (c) torch   a PyTorch eager per-frame loop with the same weights, as Real-ESRGAN's video script
              runs (decode, tensor, model, clamp/round, encode ffv1)
  (d) ncnn    the `ncnn` package on the CPU with the original .param/.bin (the engine under
              realesrgan-ncnn-vulkan and video2x), per frame, same decode/encode
fps, ratios to vidscale (reuse off), peak RSS of each process, vidscale's reuse rate, and the fps of
the PyTorch and ncnn loops' model call alone (to set beside the bare model's). Every fps is counted
the same way, after the first two frames (common.FrameClock) to the end of the run: loading a model,
compiling it and its first inferences are once-per-run costs, which an episode's tens of thousands
of frames hide; the bare model is timed after one untimed request per slot.

Clips: the first frames of the One Piece demo, and a synthetic 640x480 one (a panning cel drawing
held on twos, ffv1, with audio); or any file given. With --precision int8 a clip whose INT8 model
fails vidscale's quality gate is reported as refused for the OpenVINO columns.

    python bench/compare_bench.py [--clips PATH|synthetic ...] [--frames 24] [--models ...] [--precision bf16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np

from common import (DEFAULT_CLIP, WARM_UP, FrameClock, bare_seconds, best_of, cut, multiply_adds_per_pixel, peak_rss_mb,
                    serve_child, synthetic_clip)

MODELS = ["realesr-animevideov3", "RealESRGAN_x4plus_anime_6B"]
SYNTHETIC = "synthetic"


def frames_of(clip: str):
    with av.open(clip) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


class _Ffv1:
    """The encode side shared by the per-frame loops, so they pay what vidscale's ffv1 run pays."""

    def __init__(self, path: Path, height: int, width: int):
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream("ffv1", rate=24)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"

    def write(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


def child(kind: str, model: str, clip: str, precision: str, cache: str) -> dict:
    from vidscale.errors import EngineError

    try:
        return _run(kind, model, clip, precision, cache)
    except EngineError as exc:  # the INT8 quality gate refusing the clip
        return {"fps": 0.0, "refused": str(exc), "frames": 0, "reused": 0, "rss_mb": peak_rss_mb()}


def _run(kind: str, model: str, clip: str, precision: str, cache: str) -> dict:
    from vidscale.models import resolve

    reused, gflops = 0, None
    clock, engine = FrameClock(), _EngineClock()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.mkv"
        if kind in ("vidscale", "vidscale+reuse"):
            from vidscale.config import DEFAULT_DEDUP, UpscaleSettings
            from vidscale.media import EncoderSettings
            from vidscale.pipeline import upscale_video

            settings = UpscaleSettings(model=model, precision=precision, cache_dir=Path(cache),
                                       dedup=DEFAULT_DEDUP if kind == "vidscale+reuse" else None)
            result = upscale_video(clip, out, settings, EncoderSettings(codec="ffv1"), progress=clock)
            frames, reused = result.frames, result.reused_frames
            fps = clock.fps()
        elif kind == "bare":
            from vidscale.config import UpscaleSettings
            from vidscale.pipeline import FrameUpscaler, calibration_frames

            first = next(frames_of(clip))
            total = sum(1 for _ in frames_of(clip))
            # INT8 calibrated and judged on the clip, as vidscale's own run does it (same cached model).
            own = calibration_frames(clip) if precision == "int8" else None
            upscaler = FrameUpscaler(UpscaleSettings(model=model, precision=precision, cache_dir=Path(cache)),
                                     calibration=own, evaluation=own)
            plan = upscaler.plan(*first.shape[:2])
            compiled = upscaler.upscaler_for(plan, "u8")
            frames = total
            seconds = bare_seconds(compiled, total * len(plan))
            fps = total / seconds
            pixels = total * len(plan) * np.prod(compiled.input_shape[:3])
            gflops = pixels * 2 * multiply_adds_per_pixel(resolve(model).module()) / seconds / 1e9
        elif kind == "torch":
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            module = resolve(model).module()

            def upscale(rgb: np.ndarray, index: int) -> np.ndarray:
                x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
                with engine.timing(index):
                    y = module(x)
                return (y.clamp(0, 1) * 255).round().byte()[0].permute(1, 2, 0).numpy()

            with torch.no_grad():
                frames = _per_frame_loop(clip, out, clock, upscale)
            fps = clock.fps()
        else:
            import ncnn

            from vidscale.models.catalog import ncnn_files

            param, weights = ncnn_files(model)
            net = ncnn.Net()
            net.opt.num_threads = os.cpu_count() or 1
            net.opt.use_vulkan_compute = False
            net.load_param(str(param))
            net.load_model(str(weights))

            def upscale(rgb: np.ndarray, index: int) -> np.ndarray:
                extractor = net.create_extractor()
                chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255
                extractor.input("data", ncnn.Mat(chw))
                with engine.timing(index):
                    _, out_mat = extractor.extract("output")
                return (np.clip(np.array(out_mat), 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)

            frames = _per_frame_loop(clip, out, clock, upscale)
            fps = clock.fps()
    return {"fps": fps, "engine_fps": engine.fps(), "frames": frames, "reused": reused, "rss_mb": peak_rss_mb(),
            "gflops": gflops}


def _per_frame_loop(clip: str, out: Path, clock: FrameClock, upscale) -> int:
    """Decode, upscale (`upscale(rgb, index)`) and encode ffv1 one frame after another, as those
    scripts do; the number of frames written."""
    writer, frames = None, 0
    for rgb in frames_of(clip):
        upscaled = upscale(rgb, frames)
        writer = writer or _Ffv1(out, *upscaled.shape[:2])
        writer.write(np.ascontiguousarray(upscaled))
        frames += 1
        clock.update(frames)
    writer.close()
    return frames


class _EngineClock:
    """Seconds a per-frame loop spends in the model call alone, past the first WARM_UP frames: the
    engine's own speed, beside its loop's (conversions and encode, one after another)."""

    def __init__(self):
        self.frames = 0
        self.seconds = 0.0

    @contextmanager
    def timing(self, index: int):
        started = time.perf_counter()
        yield
        if index >= WARM_UP:
            self.frames += 1
            self.seconds += time.perf_counter() - started

    def fps(self) -> float | None:
        return self.frames / self.seconds if self.seconds else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", nargs="*", default=[str(DEFAULT_CLIP), SYNTHETIC],
                        help=f"video files, or {SYNTHETIC!r} for the generated clip")
    parser.add_argument("--frames", type=int, default=24, help="frames taken from the start of the clip")
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every measurement; the best counts")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, child)
        return
    if args.frames <= WARM_UP:
        parser.error(f"--frames must be more than {WARM_UP}: the first {WARM_UP} are not timed")

    cache = args.cache_dir or tempfile.mkdtemp(prefix="vidscale-bench-")
    kinds = ["bare", "vidscale", "vidscale+reuse", "torch", "ncnn"]
    print(f"first {args.frames} frames of each clip; OpenVINO precision {args.precision}; "
          f"{os.cpu_count()} cores; best of {args.rounds} rounds")
    print(f"{'clip':24} {'model':27} " + " ".join(f"{k + ' fps':>19}" for k in kinds) + "   RSS MB per run, reuse")
    with tempfile.TemporaryDirectory() as tmp:
        for source in args.clips:
            if source == SYNTHETIC:
                clip = synthetic_clip(Path(tmp) / "synthetic.mkv", args.frames, height=480, width=640, hold=2,
                                      codec="ffv1")
            else:
                clip = cut(Path(source), args.frames, Path(tmp) / f"{Path(source).stem}.mkv")
            for model in args.models:
                jobs = [{"kind": kind, "model": model, "clip": str(clip), "precision": args.precision,
                         "cache": cache} for kind in kinds]
                results = dict(zip(kinds, best_of(__file__, args.rounds, jobs)))
                print(f"{Path(source).stem[:24]:24} {model:27} {_cells(results, kinds)}", flush=True)
    print("ratios are to vidscale end to end with reuse off")


def _cells(results: dict, kinds: list[str]) -> str:
    refused = next((r["refused"] for r in results.values() if "refused" in r), None)
    if refused:
        others = ", ".join(f"{k} {results[k]['fps']:.3f} fps" for k in kinds if "refused" not in results[k])
        return f"OpenVINO refused ({refused}); {others}"
    base = results["vidscale"]["fps"]
    cells = " ".join(f"{results[k]['fps']:8.3f} ({results[k]['fps'] / base:5.2f}x)" for k in kinds)
    rss = "/".join(f"{results[k]['rss_mb']:.0f}" for k in kinds)
    reuse = results["vidscale+reuse"]
    engines = ", ".join(f"{k} {results[k]['engine_fps']:.3f}" for k in kinds if results[k].get("engine_fps"))
    return (f"{cells}   {rss}, reused {reuse['reused']}/{reuse['frames']}; model call alone: {engines} fps; "
            f"bare model {results['bare']['gflops']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
