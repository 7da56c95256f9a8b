"""Command line: argument parsing, exit statuses, and the only place that prints to a person."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .config import DEFAULT_IMAGE_MODEL, UpscaleSettings
from .errors import VidscaleError
from .tiling import DEFAULT_OVERLAP

EXIT_INTERRUPTED = 130


def _tile(text: str) -> tuple[int, int] | None:
    """`0` (automatic), `N` (N x N) or `HxW`."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile {text!r} is not N or HxW") from None
    if parts == [0]:
        return None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"tile {text!r} must be 0 (automatic), N or HxW with N > 0")
    return parts[0], parts[1]


def _engine_options(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("-m", "--model", default=default_model,
                        help=f"catalog name or a .pth/.safetensors file (default: {default_model})")
    parser.add_argument("-s", "--scale", type=int, help="output scale (default: the model's own)")
    parser.add_argument("-t", "--tile", type=_tile, default=None,
                        help="tile size in input pixels, N or HxW; 0 = automatic (default)")
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                        help=f"input pixels shared by neighbouring tiles (default: {DEFAULT_OVERLAP})")
    parser.add_argument("--precision", default="auto", choices=("auto", "f32", "bf16", "f16"),
                        help="inference precision (auto: bf16 where the device supports it)")
    parser.add_argument("--device", default="CPU", help="OpenVINO device: CPU, GPU, NPU, AUTO... (default: CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidscale", description="Real-ESRGAN upscaling on OpenVINO.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where converted models are kept (default: $VIDSCALE_CACHE_DIR, "
                             "else $XDG_CACHE_HOME/vidscale)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("models", help="list the bundled models")

    image = commands.add_parser("image", help="upscale one still picture (PNG or JPEG)")
    image.add_argument("input", type=Path)
    image.add_argument("-o", "--output", type=Path, required=True, help="PNG or JPEG to write")
    image.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _engine_options(image, DEFAULT_IMAGE_MODEL)
    return parser


def settings_from(args: argparse.Namespace) -> UpscaleSettings:
    return UpscaleSettings(model=args.model, scale=args.scale, tile=args.tile, overlap=args.overlap,
                           precision=args.precision, device=args.device, cache_dir=args.cache_dir)


def run_models(args: argparse.Namespace) -> int:
    from .engine import EngineSettings, ir_path
    from .models import catalog_entries

    cache_dir = EngineSettings(cache_dir=args.cache_dir).resolved_cache_dir
    rows = [("name", "scale", "architecture", "parameters", "source", "converted")]
    for entry in catalog_entries():
        converted = "yes" if ir_path(entry.loaded(), cache_dir).is_file() else "no"
        rows.append((entry.name, f"x{entry.scale}", entry.architecture, f"{entry.parameters:,}",
                     entry.source, converted))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def run_image(args: argparse.Namespace) -> int:
    from .media import Image, check_output, read_image, write_image
    from .pipeline import FrameUpscaler, sample_type

    check_output(args.output, [args.input], args.overwrite)
    picture = read_image(args.input)
    started = time.monotonic()
    upscaler = FrameUpscaler(settings_from(args))
    rgb = upscaler(picture.rgb.copy())
    if picture.has_alpha:
        # Like Real-ESRGAN, alpha goes through the model too (as grey), so edges stay as sharp as
        # the colour they belong to.
        alpha = upscaler(np.repeat(picture.alpha[:, :, None], 3, axis=2))
        rgb = np.concatenate([rgb, alpha[:, :, :1]], axis=2)
    write_image(Image(rgb), args.output)
    if not args.quiet:
        h, w = picture.pixels.shape[:2]
        precision = upscaler.engine.precision_for(sample_type(rgb.dtype))
        print(f"{args.output}: {w}x{h} -> {rgb.shape[1]}x{rgb.shape[0]} with {upscaler.model.name} "
              f"({precision}, {upscaler.engine.settings.device}) in {time.monotonic() - started:.1f} s",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = {"models": run_models, "image": run_image}[args.command]
    try:
        return run(args)
    except VidscaleError as exc:
        print(f"vidscale: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("vidscale: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
