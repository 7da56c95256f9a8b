"""Throughput tuning: candidates are really measured, the fastest wins, the choice is cached by key."""

import json
from dataclasses import replace

import numpy as np
import pytest

from clips import make_clip
from vidscale import tuning
from vidscale.config import UpscaleSettings
from vidscale.engine import Engine, EngineSettings
from vidscale.models import resolve
from vidscale.media import EncoderSettings, VideoFrame, VideoReader
from vidscale.pipeline import FrameUpscaler, upscale_video


@pytest.fixture
def settings(identity_model, tmp_path):
    return UpscaleSettings(model=str(identity_model), precision="f32", cache_dir=tmp_path, tune=True,
                           overlap=8, memory_budget=64 * 64 * resolve(identity_model).spec.activation_bytes_per_pixel(4))


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


def fake_fps(tile, streams, batch, requests) -> float:
    """Deterministic "speeds": a middle-sized tile with one stream is the fastest, then two tiles
    per request (four would not fit the memory budget), then twice the requests."""
    fps = 10 - abs(tile[0] * tile[1] - 2000) / 1000 + (0.5 if streams == 1 else 0.0)
    return fps + {1: 0, 2: 0.2}[batch] + (0.05 if requests else 0.0)


def test_the_fastest_choice_wins_and_is_used_and_cached(settings, monkeypatch):
    timings = {}

    def fake_measure(engine, tile, streams, batch=1, requests=0, **_):
        timings[(tile, streams, batch, requests)] = fps = fake_fps(tile, streams, batch, requests)
        return fps

    monkeypatch.setattr(tuning, "measure", fake_measure)
    upscaler = FrameUpscaler(settings)
    plan = upscaler.plan(90, 130)
    best_tile, best_streams, best_batch, best_requests = max(timings, key=timings.get)
    assert len(timings) >= 4 and plan.tile_shape == best_tile
    assert (best_streams, best_batch, best_requests) == (1, 2, 2)  # one request per stream, doubled
    assert len(plan) % 2  # so the last request of a frame is short of a tile
    model = upscaler.upscaler_for(plan, "u8")
    assert model.requests == best_requests and model.input_shape[0] == best_batch
    frame = np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    assert np.array_equal(upscaler(frame), frame.repeat(4, 0).repeat(4, 1))  # still exact with its tiles

    record = json.loads((settings.cache_dir / tuning.TUNING_FILE).read_text())
    (entry,) = record.values()
    assert entry["tile"] == list(best_tile) and len(entry["tried"]) == len(timings)

    def no_measuring(*_, **__):
        raise AssertionError("measured again despite a cached choice")

    monkeypatch.setattr(tuning, "measure", no_measuring)
    again = FrameUpscaler(settings)
    assert again.plan(90, 130).tile_shape == best_tile
    assert again.upscaler_for(again.plan(90, 130), "u8").input_shape[0] == best_batch
    # Another frame size, scale or precision is another key: measured afresh.
    for other in (lambda: FrameUpscaler(settings).plan(90, 132),
                  lambda: FrameUpscaler(replace(settings, scale=2)).plan(90, 130),
                  lambda: FrameUpscaler(replace(settings, precision="bf16")).plan(90, 130)):
        with pytest.raises(AssertionError, match="measured again"):
            other()


@pytest.mark.parametrize("damage", ["a list", "an entry without streams", "a tile finer than the overlap"])
def test_a_damaged_cached_choice_is_measured_again(settings, monkeypatch, damage):
    # Only unreadable JSON was: these were a KeyError or TypeError traceback, or an error about
    # a --tile nobody gave.
    monkeypatch.setattr(tuning, "measure", lambda engine, tile, streams, batch=1, requests=0, **_:
                        fake_fps(tile, streams, batch, requests))
    best = FrameUpscaler(settings).plan(90, 130).tile_shape
    path = settings.cache_dir / tuning.TUNING_FILE
    record = json.loads(path.read_text())
    (key,) = record
    if damage == "a list":
        record = []
    elif damage == "an entry without streams":
        del record[key]["streams"]
    else:
        record[key]["tile"] = [8, 8]
    path.write_text(json.dumps(record))
    assert FrameUpscaler(settings).plan(90, 130).tile_shape == best
    assert json.loads(path.read_text())[key]["tile"] == list(best)  # and cached whole again


def test_a_video_runs_with_several_tiles_per_request(settings, monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "measure", lambda engine, tile, streams, batch=1, requests=0, **_: fake_fps(
        tile, streams, batch, requests))
    source = make_clip(tmp_path / "in.mkv", frames=5, size=(130, 90))
    tuned_upscaler = FrameUpscaler(settings)
    plan = tuned_upscaler.plan(90, 130)
    assert tuned_upscaler.upscaler_for(plan, "u8").input_shape[0] == 2 and len(plan) % 2
    lossless = EncoderSettings(codec="ffv1")
    upscale_video(source, tmp_path / "tuned.mkv", settings, lossless)
    upscale_video(source, tmp_path / "plain.mkv", replace(settings, tune=False, tile=plan.tile_shape), lossless)
    with VideoReader(tmp_path / "tuned.mkv") as tuned, VideoReader(tmp_path / "plain.mkv") as plain:
        pairs = list(zip(tuned.events(), plain.events(), strict=True))
    frames = [(a, b) for a, b in pairs if isinstance(a, VideoFrame)]
    assert len(frames) == 5 and all(np.array_equal(a.rgb, b.rgb) for a, b in frames)
