"""Throughput tuning: measure which tile shape, inference streams, tiles per request and requests in
flight run a frame size fastest.

The best tile is not always the largest one that fits in memory: on a CPU a smaller tile can keep
the caches warmer and run faster per pixel than the whole frame, overlap costs the other way, and
whether two streams, several tiles per request or more requests than streams pay off depends on the
model, the tile and the core count. So candidates are compiled and timed for a moment on the real
device: every tile shape with one stream and with a stream per core, then, for the fastest, more
tiles per request, then more requests in flight. The winner is kept in a small JSON file in the
cache directory, keyed by model weights, frame size, scale, precision, device and core count: the
next run of the same kind starts with it at no cost.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import Engine
from .files import temporary_beside, write_atomically
from .tiling import choose_tile, plan_tiles, round_up

TUNING_FILE = "tuning.json"
MEASURE_SECONDS = 1.5
# Tiles per request tried beyond one; only as many as a frame has, within the memory budget.
_BATCHES = (2, 4)
# Bumped when what a choice holds changes, so older cached choices are measured afresh.
_FORMAT = 2
# Whole frame (or the memory budget's largest tile), then budgets halved down to an eighth.
_BUDGET_DIVISORS = (1, 2, 4, 8)
_lock = threading.Lock()


@dataclass(frozen=True)
class Choice:
    tile: tuple[int, int]
    streams: int
    batch: int
    """Tiles per request."""
    requests: int
    """Requests in flight; 0 is what OpenVINO finds optimal for the streams."""
    fps: float
    """Whole frames per second measured for this choice."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def candidates(height: int, width: int, *, max_pixels: int, multiple: int, overlap: int) -> list[tuple[int, int]]:
    """Distinct tile shapes to try: the memory budget's choice and ever smaller ones."""
    budget = min(max_pixels, round_up(height, multiple) * round_up(width, multiple))
    tiles: list[tuple[int, int]] = []
    for divisor in _BUDGET_DIVISORS:
        try:
            tile = choose_tile(height, width, max_pixels=max(1, budget // divisor), multiple=multiple,
                               overlap=overlap)
        except ValueError:
            break  # a budget too small for any tile with this overlap
        if tile not in tiles:
            tiles.append(tile)
    return tiles


def tiles_per_frame(engine: Engine, tile: tuple[int, int], *, height: int, width: int, outscale: int,
                    overlap: int) -> int:
    return len(plan_tiles(height, width, tile, overlap=overlap, scale=outscale, multiple=engine.size_multiple))


def measure(engine: Engine, tile: tuple[int, int], streams: int, *, height: int, width: int, outscale: int,
            overlap: int, batch: int = 1, requests: int = 0, sample: str = "u8",
            seconds: float = MEASURE_SECONDS) -> float:
    """Whole frames per second: requests per second over the requests one frame needs (a frame's
    last request may be short of tiles and still cost a whole one)."""
    tiles = tiles_per_frame(engine, tile, height=height, width=width, outscale=outscale, overlap=overlap)
    upscaler = engine.upscaler(tile, outscale=outscale, streams=streams, batch=batch, requests=requests,
                               sample=sample)
    request = np.zeros(upscaler.input_shape, upscaler.dtype)
    queue = upscaler.queue(lambda *_: None)
    for _ in range(upscaler.requests):  # first inferences allocate; keep them out of the timing
        queue.submit(request, None)
    queue.wait_all()
    done, started = 0, time.perf_counter()
    while done < 2 * upscaler.requests or time.perf_counter() - started < seconds:
        queue.submit(request, None)
        done += 1
    queue.wait_all()
    return done / (time.perf_counter() - started) / -(-tiles // batch)


def tuned(engine: Engine, height: int, width: int, *, outscale: int, overlap: int, max_pixels: int,
          sample: str = "u8") -> Choice:
    """The fastest choice for frames of this size and sample type, from the cache or measured now."""
    key = ":".join(str(part) for part in (_FORMAT, engine.model.digest, f"{height}x{width}", outscale,
                                          overlap, engine.precision_for(sample), engine.settings.device, cores()))
    path = engine.settings.resolved_cache_dir / TUNING_FILE
    cached = _cached(_load(path).get(key), height, width, overlap)
    if cached is not None:
        return cached
    frame = {"height": height, "width": width, "outscale": outscale, "overlap": overlap}
    results = []

    def trial(tile, streams, batch=1, requests=0) -> Choice:
        choice = Choice(tile, streams, batch, requests,
                        measure(engine, tile, streams, batch=batch, requests=requests, sample=sample, **frame))
        results.append(choice)
        return choice

    for tile in candidates(height, width, max_pixels=max_pixels, multiple=engine.size_multiple, overlap=overlap):
        for streams in sorted({1, cores()}):
            trial(tile, streams)
    best = max(results, key=lambda choice: choice.fps)
    tile, streams = best.tile, best.streams
    for batch in _BATCHES:
        if batch <= tiles_per_frame(engine, tile, **frame) and batch * tile[0] * tile[1] <= max_pixels:
            trial(tile, streams, batch)
    best = max(results, key=lambda choice: choice.fps)
    # One request per stream is OpenVINO's choice; a second keeps a stream busy while Python
    # hands the next request over.
    optimal = engine.upscaler(tile, outscale=outscale, streams=streams, batch=best.batch, sample=sample).requests
    trial(tile, streams, best.batch, 2 * optimal)
    best = max(results, key=lambda choice: choice.fps)
    with _lock:
        known = _load(path)
        known[key] = {"tile": list(best.tile), "streams": best.streams, "batch": best.batch,
                      "requests": best.requests, "fps": best.fps,
                      "tried": [[*c.tile, c.streams, c.batch, c.requests, round(c.fps, 4)] for c in results]}
        _save(path, known)
    return best


def _load(path: Path) -> dict:
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measuring again is always safe
    return known if isinstance(known, dict) else {}


def _cached(entry, height: int, width: int, overlap: int) -> Choice | None:
    """The cached choice for frames of this size, or None when there is none or it is not one
    that could have been made (edited or damaged by hand): then it is measured again, as for a
    new size, rather than failing, or blaming a --tile nobody gave."""
    try:
        choice = Choice(tuple(entry["tile"]), entry["streams"], entry["batch"], entry["requests"], entry["fps"])
    except (TypeError, KeyError):
        return None
    numbers = (*choice.tile, choice.streams, choice.batch, choice.requests)
    if len(choice.tile) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        return None
    cut_too_fine = any(side < size and side <= overlap for side, size in zip(choice.tile, (height, width)))
    if min(choice.tile, default=0) < 1 or choice.streams < 1 or choice.batch < 1 or cut_too_fine:
        return None
    return choice


def _save(path: Path, known: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(known, indent=1), temporary_beside(path))
