"""Where the engine meets the pictures: frames are tiled, run through compiled models, stitched."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .config import UpscaleSettings
from .engine import Engine, EngineSettings, InferQueue, Upscaler
from .errors import UsageError
from .models import LoadedModel, resolve
from .tiling import TilePlan, choose_tile, plan_tiles, split, stitch

_SAMPLES = {np.dtype(np.uint8): "u8", np.dtype(np.uint16): "u16"}


def sample_type(dtype: np.dtype) -> str:
    """The engine's name for frames of this dtype."""
    sample = _SAMPLES.get(np.dtype(dtype))
    if sample is None:
        raise UsageError(f"frames must be uint8 or uint16 RGB arrays, not {np.dtype(dtype)}")
    return sample


class FrameUpscaler:
    """Upscales RGB frames held in numpy arrays: (H, W, 3) uint8 or uint16 in, (H*s, W*s, 3) out.

    Frames of any size may be mixed; each size gets its own tile plan and its own compiled model,
    so every request OpenVINO sees has exactly the shape it was compiled for.
    """

    def __init__(self, settings: UpscaleSettings = UpscaleSettings(), model: LoadedModel | None = None):
        self.model = model if model is not None else resolve(settings.model)
        native = self.model.spec.scale
        if settings.scale is None:
            settings = replace(settings, scale=native)
        self.settings = settings
        self.engine = Engine(self.model, EngineSettings(device=settings.device, precision=settings.precision,
                                                        cache_dir=settings.cache_dir))
        self.engine.check_outscale(settings.scale)  # before any frame arrives
        self._plans: dict[tuple[int, int], TilePlan] = {}
        self._queues: dict[Upscaler, InferQueue] = {}

    @property
    def scale(self) -> int:
        return self.settings.scale

    def plan(self, height: int, width: int) -> TilePlan:
        """The tile plan for frames of this size (one tile shape, chosen once per size)."""
        key = (height, width)
        plan = self._plans.get(key)
        if plan is None:
            multiple = self.model.spec.size_multiple
            tile = self.settings.tile
            if tile is None:
                max_pixels = self.settings.memory_budget // self.model.spec.activation_bytes_per_pixel
                tile = choose_tile(height, width, max_pixels=max(max_pixels, 1), multiple=multiple,
                                   overlap=self.settings.overlap)
            else:
                tile = tuple(-(-t // multiple) * multiple for t in tile)
            try:
                plan = plan_tiles(height, width, tile, overlap=self.settings.overlap, scale=self.scale,
                                  multiple=multiple)
            except ValueError as exc:
                raise UsageError(f"cannot tile a {width}x{height} frame: {exc}; "
                                 f"use a larger --tile or a smaller --overlap") from exc
            self._plans[key] = plan
        return plan

    def upscaler_for(self, plan: TilePlan, sample: str) -> Upscaler:
        return self.engine.upscaler(plan.tile_shape, outscale=self.scale, sample=sample)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        sample = sample_type(frame.dtype)
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise UsageError(f"frames must be (height, width, 3) RGB arrays, got shape {frame.shape}")
        plan = self.plan(frame.shape[0], frame.shape[1])
        upscaler = self.upscaler_for(plan, sample)
        tiles = split(plan, frame)
        if len(plan) == 1:
            return stitch(plan, upscaler(tiles))
        results = np.empty((len(plan), *upscaler.output_shape[1:]), upscaler.dtype)
        queue = self._queue(upscaler)
        for index in range(len(plan)):
            queue.submit(tiles[index : index + 1], (results, index))
        queue.wait_all()
        return stitch(plan, results)

    def _queue(self, upscaler: Upscaler) -> InferQueue:
        queue = self._queues.get(upscaler)
        if queue is None:
            queue = self._queues[upscaler] = upscaler.queue(_store_tile)
        return queue


def _store_tile(target: tuple[np.ndarray, int], output: np.ndarray) -> None:
    results, index = target
    results[index] = output[0]
