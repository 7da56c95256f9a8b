"""Settings, frozen and built once at the edge (CLI or API); vary them with dataclasses.replace."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
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


def check_settings(settings: UpscaleSettings, where: str) -> None:
    """Refuse an UpscaleSettings built with a value of the wrong type (a program's
    `UpscaleSettings(tile="32")`), which would fail later as a TypeError deep inside the run."""
    hints = typing.get_type_hints(UpscaleSettings)
    for field in dataclasses.fields(UpscaleSettings):
        value = getattr(settings, field.name)
        if not fits(value, hints[field.name]) or (field.name == "tile" and value is not None and not (
                len(value) == 2 and all(isinstance(t, int) and not isinstance(t, bool) for t in value))):
            raise UsageError(f"{where}: UpscaleSettings {field.name} = {value!r} is not a valid value; give a "
                             f"{hints[field.name]}".replace("typing.", "").replace("pathlib.", ""))
    try:
        parse_dedup(settings.dedup)
    except ValueError as exc:
        raise UsageError(f"{where}: UpscaleSettings {exc}") from None
    if settings.memory_budget <= 0:
        raise UsageError(f"{where}: UpscaleSettings memory_budget = {settings.memory_budget!r} is not valid; "
                         f"give the bytes inference may use, e.g. {DEFAULT_MEMORY_BUDGET}")


def fits(value, hint) -> bool:
    """Whether `value` is of the type `hint` names (X, or X | Y), a bool not counting as a number."""
    allowed = tuple(typing.get_origin(t) or t for t in (typing.get_args(hint) or (hint,)))
    allowed = tuple(type(None) if t is None else t for t in allowed)
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


RAY_STORAGES = ("shared", "object-store")
"""Where Ray tasks find inputs: paths every machine mounts, or Ray's object store (distributed.py)."""
