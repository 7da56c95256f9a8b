"""Settings, frozen and built once at the edge (CLI or API); vary them with dataclasses.replace."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tiling import DEFAULT_OVERLAP

DEFAULT_VIDEO_MODEL = "realesr-animevideov3"
DEFAULT_IMAGE_MODEL = "RealESRGAN_x4plus_anime_6B"
# Activation memory one compiled request may use; the automatic tile size keeps inside it.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3
# Largest mean absolute difference of any 8x8 block, in 8-bit code values, for a frame to reuse
# the last upscaled one. Measured over the whole shared anime clips (onepiece 24 fps, anime4k 60
# fps): held drawings differ by at most 10.2 (compression noise), every new drawing by 50 or more,
# so no threshold up to 10 reuses real motion there; what bounds it is fidelity. At 5 the clips
# reuse 44% and 46% of frames and the worst reused frame is 48.2 / 47.4 dB PSNR from the one whose
# output it takes, 2 dB and more above x264 crf 18's own average frame (46.2 / 41.8 dB); at 6 the
# worst (46.3 dB) is no better than that average; at 4 (31% / 30% reused) it is hardly better on
# onepiece (48.6 dB).
DEFAULT_DEDUP = 5.0
# Length of a resumable run's segments (see segments.py): at most this much work is redone after a stop.
DEFAULT_SEGMENT_SECONDS = 60.0


def parse_dedup(value: str | float | None) -> float | None:
    """A --dedup (or job file dedup) value: "off" (None), "exact" (0) or a threshold below 255."""
    if value is None or value == "off":
        return None
    if value == "exact":
        return 0.0
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"dedup {value!r} is not off, exact or a number") from None
    if isinstance(value, bool) or not 0 <= threshold < 255:
        raise ValueError(f"dedup threshold {value!r} must be at least 0 and below 255 "
                         f"(at 255 every frame would be reused)")
    return threshold


@dataclass(frozen=True)
class UpscaleSettings:
    model: str = DEFAULT_VIDEO_MODEL
    """A catalog name or a path to a .pth / .safetensors file."""
    scale: int | None = None
    """Output scale; None is the model's native scale."""
    tile: tuple[int, int] | None = None
    """Requested tile (height, width) in input pixels; None chooses one from memory_budget."""
    overlap: int = DEFAULT_OVERLAP
    precision: str = "auto"
    device: str = "CPU"
    cache_dir: Path | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    tune: bool = False
    """With tile None: measure which tile shape and stream count run fastest for each frame size on
    this device (once; the choice is cached, see tuning.py) instead of taking the largest tile."""
    calibration: Path | None = None
    """precision="int8": a video or picture to calibrate the quantization on; None uses the input
    being upscaled where it is a file (a pipe cannot be read twice), else a bundled synthetic set."""
    dedup: float | None = DEFAULT_DEDUP
    """Video only: reuse the last upscaled frame for source frames that match it (see
    pipeline.frames_match); None turns it off, 0 reuses identical frames only."""


RAY_STORAGES = ("shared", "object-store")
"""Where Ray tasks find inputs: paths every machine mounts, or Ray's object store (distributed.py)."""
