"""Bare compiled-model throughput against PyTorch eager, per model, precision and tile shape.

The OpenVINO column is what benchmark_app reports for a static model: every request slot kept busy
for a fixed time, results counted. The PyTorch column runs the same weights the way Real-ESRGAN's
own inference script does (module(x) under no_grad, one tile at a time). Both measured in this run,
on this machine, so the ratio is fair whatever the machine.

    python bench/engine_bench.py [--seconds 10] [--models ...] [--shapes 128x128 ...]
        [--precisions f32 bf16 int8] [--calibration FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import multiply_adds_per_pixel
from vidscale.engine import Engine, EngineSettings
from vidscale.models import resolve
from vidscale.pipeline import calibration_frames

DEMO = Path(__file__).resolve().parents[2] / "shared" / "media" / "realesrgan_onepiece_demo.mp4"

DEFAULT_CASES = {
    "RealESRGAN_x4plus_anime_6B": ["128x128", "256x256"],
    "realesr-animevideov3": ["270x480", "480x640"],
}


def openvino_fps(engine: Engine, shape: tuple[int, int], seconds: float) -> tuple[float, int]:
    upscaler = engine.upscaler(shape)
    frame = np.random.default_rng(0).integers(0, 256, upscaler.input_shape, dtype=np.uint8)
    done = 0

    def count(_userdata, _output):
        nonlocal done
        done += 1

    queue = upscaler.queue(count)
    for _ in range(upscaler.requests):  # warm-up, also primes every request's memory
        queue.submit(frame, None)
    queue.wait_all()
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        queue.submit(frame, None)
    queue.wait_all()
    return done / (time.perf_counter() - started), upscaler.requests


def torch_fps(module: torch.nn.Module, shape: tuple[int, int], seconds: float) -> float:
    x = torch.rand(1, 3, *shape)
    with torch.no_grad():
        module(x)
        runs, started = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - started < seconds:
            module(x)
            runs += 1
    return runs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per cell")
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_CASES))
    parser.add_argument("--shapes", nargs="*", help="HxW tile shapes (default: per model)")
    parser.add_argument("--precisions", nargs="*", default=["f32", "bf16"])
    parser.add_argument("--cache-dir", type=Path, help="IR cache (default: a fresh temporary one)")
    parser.add_argument("--calibration", type=Path,
                        help="int8: video or picture to calibrate on (default: the One Piece demo)")
    args = parser.parse_args()

    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="vidscale-bench-"))
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__} threads {torch.get_num_threads()}; {args.seconds:.0f} s per cell")
    header = f"{'model':28} {'tile HxW':>9} {'precision':>9} {'req':>3} {'OpenVINO fps':>12} " \
             f"{'torch fps':>9} {'OV/torch':>8} {'Mpx/s out':>9} {'OV GFLOP/s':>10}"
    print(header)
    print("-" * len(header))
    for name in args.models:
        model = resolve(name)
        module = model.module()
        flops_per_pixel = 2 * multiply_adds_per_pixel(module)
        for text in args.shapes or DEFAULT_CASES.get(name, ["128x128"]):
            shape = tuple(int(v) for v in text.split("x"))
            eager = torch_fps(module, shape, args.seconds)
            for precision in args.precisions:
                frames = calibration_frames(args.calibration or DEMO) if precision == "int8" else None
                engine = Engine(model, EngineSettings(precision=precision, cache_dir=cache_dir), frames)
                fps, requests = openvino_fps(engine, shape, args.seconds)
                out_mpx = fps * shape[0] * shape[1] * model.spec.scale**2 / 1e6
                gflops = fps * shape[0] * shape[1] * flops_per_pixel / 1e9
                print(f"{name:28} {text:>9} {precision:>9} {requests:>3} {fps:12.3f} {eager:9.3f} "
                      f"{fps / eager:8.2f} {out_mpx:9.2f} {gflops:10.0f}", flush=True)


if __name__ == "__main__":
    main()
