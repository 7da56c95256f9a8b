"""Settings, frozen and built once at the edge (CLI or API); vary them with dataclasses.replace."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tiling import DEFAULT_OVERLAP

DEFAULT_VIDEO_MODEL = "realesr-animevideov3"
DEFAULT_IMAGE_MODEL = "RealESRGAN_x4plus_anime_6B"
# Activation memory one compiled request may use; the automatic tile size keeps inside it.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


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
