"""Peak RSS of `vidscale upscale` does not grow with the length of the video.

A synthetic clip (a panning cel drawing, 160x120, with audio) of 100 and of 2,000 frames, each upscaled x2
with realesr-animevideov3 in a fresh process (reuse off, so every frame goes through the model);
prints both peaks and their ratio.

    python bench/memory_bench.py [--frames 100 2000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import peak_rss_mb, run_child, serve_child, synthetic_clip


def child(clip: str, cache: str) -> dict:
    from vidscale.config import UpscaleSettings
    from vidscale.media import EncoderSettings
    from vidscale.pipeline import upscale_video

    settings = UpscaleSettings(model="realesr-animevideov3", scale=2, cache_dir=Path(cache), dedup=None)
    with tempfile.TemporaryDirectory() as tmp:
        result = upscale_video(clip, Path(tmp) / "out.mkv", settings,
                               EncoderSettings(codec="libx264", preset="ultrafast"))
    return {"frames": result.frames, "fps": result.fps,
            "rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="*", default=[100, 2000])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, child)
        return
    cache = args.cache_dir or tempfile.mkdtemp(prefix="vidscale-bench-")
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for frames in args.frames:
            clip = synthetic_clip(Path(tmp) / f"clip{frames}.mkv", frames, height=120, width=160)
            run = run_child(__file__, {"clip": str(clip), "cache": cache})
            peaks.append(run["rss_mb"])
            print(f"{run['frames']:6d} frames  {run['fps']:7.2f} fps  peak RSS {run['rss_mb']:7.1f} MB", flush=True)
    print(f"peak RSS ratio, longest / shortest: {peaks[-1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
