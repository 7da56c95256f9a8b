"""Throughput tuning: candidates are really measured, the fastest wins, the choice is cached by key."""

import json
from dataclasses import replace

import numpy as np
import pytest

from vidscale import tuning
from vidscale.config import UpscaleSettings
from vidscale.engine import Engine, EngineSettings
from vidscale.models import resolve
from vidscale.pipeline import FrameUpscaler


@pytest.fixture
def settings(identity_model, tmp_path):
    return UpscaleSettings(model=str(identity_model), precision="f32", cache_dir=tmp_path, tune=True,
                           overlap=8, memory_budget=64 * 64 * resolve(identity_model).spec.activation_bytes_per_pixel)


def test_candidates_are_distinct_shapes_from_the_budget_down():
    tiles = tuning.candidates(90, 120, max_pixels=90 * 120, multiple=2, overlap=8)
    assert tiles[0] == (90, 120) and len(tiles) == len(set(tiles)) > 2
    areas = [h * w for h, w in tiles]
    assert areas == sorted(areas, reverse=True)
    assert all(h % 2 == 0 and w % 2 == 0 for h, w in tiles)


def test_a_real_measurement_runs_the_compiled_model(identity_model, tmp_path):
    engine = Engine(resolve(identity_model), EngineSettings(precision="f32", cache_dir=tmp_path))
    fps = tuning.measure(engine, (32, 32), 1, height=64, width=64, outscale=4, overlap=8, seconds=0.2)
    assert fps > 0


def test_the_fastest_choice_wins_and_is_used_and_cached(settings, monkeypatch):
    timings = {}

    def fake_measure(engine, tile, streams, **_):
        # Deterministic "speeds": the smallest tile with one stream is made the fastest.
        fps = 1000.0 / (tile[0] * tile[1]) + (0.5 if streams == 1 else 0.0)
        timings[(tile, streams)] = fps
        return fps

    monkeypatch.setattr(tuning, "measure", fake_measure)
    upscaler = FrameUpscaler(settings)
    plan = upscaler.plan(100, 130)
    best_tile, best_streams = max(timings, key=timings.get)
    assert len(timings) >= 2 and plan.tile_shape == best_tile
    assert upscaler.upscaler_for(plan, "u8").requests == best_streams == 1
    frame = np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    assert np.array_equal(upscaler(frame), frame.repeat(4, 0).repeat(4, 1))  # still exact with its tiles

    record = json.loads((settings.cache_dir / tuning.TUNING_FILE).read_text())
    (entry,) = record.values()
    assert entry["tile"] == list(best_tile) and len(entry["tried"]) == len(timings)

    def no_measuring(*_, **__):
        raise AssertionError("measured again despite a cached choice")

    monkeypatch.setattr(tuning, "measure", no_measuring)
    assert FrameUpscaler(settings).plan(100, 130).tile_shape == best_tile
    # Another frame size, scale or precision is another key: measured afresh.
    for other in (lambda: FrameUpscaler(settings).plan(100, 132),
                  lambda: FrameUpscaler(replace(settings, scale=2)).plan(100, 130),
                  lambda: FrameUpscaler(replace(settings, precision="bf16")).plan(100, 130)):
        with pytest.raises(AssertionError, match="measured again"):
            other()
