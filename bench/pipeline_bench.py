"""End-to-end fps of `vidscale upscale` against the bare compiled model, and what reuse adds.

Efficiency: for each model and precision, fresh processes run one after another in this one
benchmark run: the bare compiled model kept busy with every tile of N frames (the limit), then the
whole pipeline (decode, tile, infer, stitch, encode, mux with audio) with a fast encoder (libx264
ultrafast), a lossless one (ffv1, which costs about three times as much per 2560x1920 frame) and
the default encoder (libx264 crf 18 preset slow), all with duplicate-frame reuse off, so that
ratio = pipeline fps / bare fps is the pipeline's efficiency. N is what the bare model does in
about --seconds.

Reuse: the pipeline (the fast encoder) with reuse off and at each of --thresholds (default: the
default threshold) on the first --reuse-frames frames, ratio = fps with reuse / fps without. How
many frames reuse finds depends on the stretch of the clip (a few frames may all be one drawing,
or all new ones), so this stretch is fixed and long rather than sized by speed: the default 96
frames of the One Piece demo reuse as often as the whole clip does.

Each process reports its own peak RSS. Pipeline fps is counted after the first two frames to the
end of the run (common.FrameClock), as the bare model's is after one untimed request per slot:
loading, compiling and the first inferences are once per run; loading and compiling are reported
apart, as "setup".

    python bench/pipeline_bench.py [--clip ../shared/media/realesrgan_onepiece_demo.mp4] [--seconds 30]
    python bench/pipeline_bench.py --measure reuse --models realesr-animevideov3 --precisions bf16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import av

from common import DEFAULT_CLIP, FrameClock, bare_seconds, best_of, cut, peak_rss_mb, run_child, serve_child
from vidscale.config import DEFAULT_DEDUP

MODELS = ["realesr-animevideov3", "RealESRGAN_x4plus_anime_6B"]
# (column, encoder settings): efficiency is measured with reuse off, so that the pipeline does
# exactly the bare model's work.
FAST_ENCODER = {"codec": "libx264", "preset": "ultrafast"}
RUNS = [("x264 fast", FAST_ENCODER), ("ffv1", {"codec": "ffv1"}), ("x264 default", {"codec": "libx264"})]
REUSE_ENCODER = FAST_ENCODER
REUSE_FRAMES = 96


def child_bare(model: str, precision: str, height: int, width: int, frames: int, cache: str) -> dict:
    from vidscale.config import UpscaleSettings
    from vidscale.pipeline import FrameUpscaler

    upscaler = FrameUpscaler(UpscaleSettings(model=model, precision=precision, cache_dir=Path(cache)))
    plan = upscaler.plan(height, width)
    compiled = upscaler.upscaler_for(plan, "u8")
    seconds = bare_seconds(compiled, frames * len(plan))
    return {"fps": frames / seconds, "tiles": len(plan), "tile": list(plan.tile_shape),
            "requests": compiled.requests, "rss_mb": peak_rss_mb()}


def child_pipeline(model: str, precision: str, clip: str, encoder: dict, cache: str, dedup: float | None) -> dict:
    from vidscale.config import UpscaleSettings
    from vidscale.media import EncoderSettings
    from vidscale.pipeline import upscale_video

    settings = UpscaleSettings(model=model, precision=precision, cache_dir=Path(cache), dedup=dedup)
    with tempfile.TemporaryDirectory() as tmp:
        clock = FrameClock()
        result = upscale_video(clip, Path(tmp) / "out.mkv", settings, EncoderSettings(**encoder), progress=clock)
        fps = clock.fps()
    return {"fps": fps, "frames": result.frames, "reused": result.reused_frames,
            "setup": result.setup_seconds, "rss_mb": peak_rss_mb()}


def in_child(kind: str, **kwargs) -> dict:
    return run_child(__file__, {"kind": kind, **kwargs})


def efficiency(args, cache: str, tmp: Path, height: int, width: int, total: int) -> None:
    header = (f"{'model':27} {'prec':>4} {'tiles':>5} {'bare fps':>8} | "
              + " | ".join(f"{name + ' fps':>16} {'ratio':>5} {'RSS MB':>6}" for name, _ in RUNS))
    print(header)
    print("-" * len(header))
    for model in args.models:
        for precision in args.precisions:
            probe = in_child("bare", model=model, precision=precision, height=height, width=width,
                             frames=2, cache=cache)
            frames = int(min(total, max(8, probe["fps"] * args.seconds)))
            clip = cut(args.clip, frames, tmp / f"cut{frames}.mkv")
            bare, *runs = best_of(__file__, args.rounds, [
                dict(kind="bare", model=model, precision=precision, height=height, width=width, frames=frames,
                     cache=cache),
                *(dict(kind="pipeline", model=model, precision=precision, clip=str(clip), encoder=encoder,
                       cache=cache, dedup=None) for _, encoder in RUNS)])
            cells = [f"{run['fps']:16.3f} {run['fps'] / bare['fps']:5.2f} {run['rss_mb']:6.0f}" for run in runs]
            setup = "/".join(f"{run['setup']:.1f}" for run in runs)
            print(f"{model:27} {precision:>4} {bare['tiles']:>5} {bare['fps']:8.3f} | " + " | ".join(cells)
                  + f"   ({frames} frames, tile {bare['tile'][0]}x{bare['tile'][1]}, {bare['requests']} requests, "
                    f"bare RSS {bare['rss_mb']:.0f} MB, setup {setup} s)", flush=True)


def reuse(args, cache: str, tmp: Path, total: int) -> None:
    frames = min(total, args.reuse_frames)
    clip = cut(args.clip, frames, tmp / f"cut{frames}.mkv")
    print(f"reuse: first {frames} frames, libx264 ultrafast; ratio = fps with reuse / fps with --dedup off")
    header = (f"{'model':27} {'prec':>4} {'off fps':>8} | "
              + " | ".join(f"{f'{t:g} fps':>8} {'ratio':>5} {'reused':>6}" for t in args.thresholds))
    print(header)
    print("-" * len(header))
    for model in args.models:
        for precision in args.precisions:
            off, *on = best_of(__file__, args.rounds, [
                dict(kind="pipeline", model=model, precision=precision, clip=str(clip), encoder=REUSE_ENCODER,
                     cache=cache, dedup=dedup) for dedup in (None, *args.thresholds)])
            cells = [f"{run['fps']:8.3f} {run['fps'] / off['fps']:5.2f} {100 * run['reused'] / run['frames']:5.0f}%"
                     for run in on]
            setup = "/".join(f"{run['setup']:.1f}" for run in (off, *on))
            rss = "/".join(f"{run['rss_mb']:.0f}" for run in (off, *on))
            print(f"{model:27} {precision:>4} {off['fps']:8.3f} | " + " | ".join(cells)
                  + f"   (setup {setup} s, RSS {rss} MB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--seconds", type=float, default=30.0, help="aim for efficiency runs this long")
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--precisions", nargs="*", default=["f32", "bf16"])
    parser.add_argument("--cache-dir", default=None, help="IR cache (default: a fresh temporary one)")
    parser.add_argument("--rounds", type=int, default=2, help="repeat every measurement; the best counts")
    parser.add_argument("--measure", nargs="*", choices=["efficiency", "reuse"], default=["efficiency", "reuse"])
    parser.add_argument("--reuse-frames", type=int, default=REUSE_FRAMES,
                        help="frames from the start of the clip for the reuse measurement")
    parser.add_argument("--thresholds", nargs="*", type=float, default=[DEFAULT_DEDUP],
                        help="--dedup thresholds the reuse measurement compares with reuse off")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, lambda kind, **job: (child_bare if kind == "bare" else child_pipeline)(**job))
        return

    cache = args.cache_dir or tempfile.mkdtemp(prefix="vidscale-bench-")
    with av.open(str(args.clip)) as container:
        stream = container.streams.video[0]
        height, width, total = stream.height, stream.width, stream.frames
    print(f"clip: {args.clip.name} {width}x{height}, {total} frames; efficiency runs ~{args.seconds:.0f} s each, "
          f"best of {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        if "efficiency" in args.measure:
            efficiency(args, cache, Path(tmp), height, width, total)
        if "reuse" in args.measure:
            reuse(args, cache, Path(tmp), total)


if __name__ == "__main__":
    main()
