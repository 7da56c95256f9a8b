"""vidscale: Real-ESRGAN video and picture upscaling on OpenVINO, with static shapes.

    import vidscale
    vidscale.upscale("episode.mkv", "episode.4x.mkv", model="realesr-animevideov3", scale=2)

    frames = vidscale.FrameUpscaler(vidscale.UpscaleSettings(model="RealESRGAN_x4plus_anime_6B"))
    big = frames(rgb)   # (H, W, 3) uint8/uint16 numpy array in, (4H, 4W, 3) out
"""

from __future__ import annotations

import importlib

from .config import UpscaleSettings
from .errors import EngineError, MediaError, ModelError, OutputClosedError, UsageError, VidscaleError

__all__ = [
    "EncoderSettings", "EngineError", "FrameUpscaler", "MediaError", "ModelError", "OutputClosedError",
    "UpscaleSettings", "UsageError", "VideoResult", "VidscaleError", "upscale",
]

# Imported when first asked for: PyAV, OpenVINO and torch take over a second to load, which the
# command line would spend before it could even parse its arguments or take a Ctrl-C cleanly.
_LAZY = {"EncoderSettings": "media", "FrameUpscaler": "pipeline", "VideoResult": "pipeline", "upscale": "api"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
