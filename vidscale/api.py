"""vidscale.upscale(): the whole video path, for a program rather than a shell."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .config import UpscaleSettings, check_settings
from .errors import UsageError
from .jobs import ENCODER_KEYS, checked_values
from .media import EncoderSettings
from .pipeline import VideoResult, upscale_video
from .progress import Progress


def upscale(source: str | os.PathLike | object, destination: str | os.PathLike, *,
            settings: UpscaleSettings = UpscaleSettings(), encoder: EncoderSettings = EncoderSettings(),
            strict: bool = False, overwrite: bool = False, progress=None, **changes) -> VideoResult:
    """Upscale a video file or stream into `destination`, copying every other stream.

    `source` is a path, "-" (stdin) or a readable binary file object; `destination` a path or "-".
    Keyword `changes` override fields of `settings` (model, scale, tile, precision, device, ...)
    or, for codec/crf/preset/pix_fmt/format/options, of `encoder`; they take what a job file
    takes (tile=64, dedup="off", options={"tune": "film"}) and are checked as it is.
    """
    if not isinstance(settings, UpscaleSettings) or not isinstance(encoder, EncoderSettings):
        raise UsageError("upscale(): settings must be an UpscaleSettings and encoder an EncoderSettings")
    if not isinstance(strict, bool) or not isinstance(overwrite, bool):
        raise UsageError("upscale(): strict and overwrite are True or False")
    if progress is not None and not isinstance(progress, Progress):
        raise UsageError(f"upscale(): progress = {progress!r} is not a vidscale.progress.Progress (or None)")
    check_settings(settings, "upscale()")
    cache_dir = changes.pop("cache_dir", None)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise UsageError(f"upscale(): cache_dir = {cache_dir!r} is not a path")
    changes = checked_values(changes, "upscale()")
    if cache_dir is not None:
        changes["cache_dir"] = Path(cache_dir)
    encoder_fields = {k: changes.pop(k) for k in ENCODER_KEYS if k in changes}
    return upscale_video(source, destination, replace(settings, **changes), replace(encoder, **encoder_fields),
                         strict=strict, overwrite=overwrite, progress=progress)
