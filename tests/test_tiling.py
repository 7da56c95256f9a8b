import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidscale.tiling import DEFAULT_OVERLAP, choose_tile, plan_tiles, split, stitch


@st.composite
def plans(draw, max_size=4096):
    """Valid plan_tiles arguments: tile sizes divisible by multiple and larger than the overlap.

    The step between tiles is drawn relative to the frame so a plan has at most a few dozen tiles
    per axis; a 4K frame cut into 1-pixel steps would only measure Python's speed.
    """
    height = draw(st.integers(1, min(max_size, 2160)))
    width = draw(st.integers(1, max_size))
    multiple = draw(st.sampled_from([1, 2, 4]))
    overlap = draw(st.integers(0, 48))
    tile = []
    for size in (height, width):
        step = draw(st.integers(max(1, size // 32), size + 8))
        tile.append(-(-(step + overlap) // multiple) * multiple)
    scale = draw(st.integers(1, 4))
    return dict(
        height=height,
        width=width,
        tile=tuple(tile),
        overlap=overlap,
        scale=scale,
        multiple=multiple,
    )


@settings(max_examples=300, deadline=None)
@given(plans(max_size=3840))
def test_plan_properties(args):
    plan = plan_tiles(**args)
    tile_h, tile_w = plan.tile_shape
    height, width = args["height"], args["width"]
    multiple, scale = args["multiple"], args["scale"]
    padded_h, padded_w = plan.padded_shape

    assert len(plan) == len(plan.tiles) >= 1
    assert tile_h % multiple == 0 and tile_w % multiple == 0
    assert tile_h <= args["tile"][0] and tile_w <= args["tile"][1]
    assert plan.out_shape == (height * scale, width * scale)
    assert (padded_h, padded_w) == (max(height, tile_h), max(width, tile_w))
    # Padding only rounds a small axis up to the multiple.
    assert padded_h - height < multiple and padded_w - width < multiple

    # Exactly one tile shape: every input slice and every tile record agrees with tile_shape.
    shapes = {(t.src[0].stop - t.src[0].start, t.src[1].stop - t.src[1].start) for t in plan.tiles}
    assert shapes == {plan.tile_shape}
    assert {(t.height, t.width) for t in plan.tiles} == {plan.tile_shape}

    # The grid is the product of per-axis starts; starts strictly increase, stay inside the padded
    # frame, begin at 0 and the last tile ends exactly at the padded edge (covering it all).
    ys = sorted({t.y for t in plan.tiles})
    xs = sorted({t.x for t in plan.tiles})
    assert len(plan) == len(ys) * len(xs)
    assert [(t.y, t.x) for t in plan.tiles] == [(y, x) for y in ys for x in xs]
    for starts, tile, padded in ((ys, tile_h, padded_h), (xs, tile_w, padded_w)):
        assert starts[0] == 0
        assert all(a < b for a, b in zip(starts, starts[1:]))
        assert starts[-1] + tile == padded
        # Consecutive tiles touch or overlap: no gap in coverage.
        assert all(b <= a + tile for a, b in zip(starts, starts[1:]))
        # Regular steps everywhere except the shifted-back last tile.
        step = tile - args["overlap"]
        assert all(b - a == step for a, b in zip(starts, starts[1:-1]))

    # Keep regions partition the frame: per axis the kept intervals are contiguous, each inside its
    # own tile, and the grid of tiles takes every (row interval, column interval) pair once.
    for index, tile, size in ((0, tile_h, height), (2, tile_w, width)):
        start_of = (lambda t: t.y) if index == 0 else (lambda t: t.x)
        intervals = sorted({(start_of(t), t.keep_box[index], t.keep_box[index + 1]) for t in plan.tiles})
        assert intervals[0][1] == 0 and intervals[-1][2] == size
        assert all(a[2] == b[1] for a, b in zip(intervals, intervals[1:]))
        for start, lo, hi in intervals:
            assert start <= lo < hi <= start + tile
    for t in plan.tiles:
        keep, dst = t.keep, t.dst
        assert keep[0].stop - keep[0].start == dst[0].stop - dst[0].start
        assert keep[1].stop - keep[1].start == dst[1].stop - dst[1].start
        assert 0 <= keep[0].start and keep[0].stop <= tile_h * scale
        assert 0 <= keep[1].start and keep[1].stop <= tile_w * scale


@settings(max_examples=150, deadline=None)
@given(plans(max_size=80))
def test_keep_regions_cover_each_output_pixel_once(args):
    plan = plan_tiles(**args)
    count = np.zeros(plan.out_shape, dtype=np.int32)
    for t in plan.tiles:
        count[t.dst] += 1
    assert (count == 1).all()


@settings(max_examples=150, deadline=None)
@given(
    args=plans(max_size=70),
    dtype=st.sampled_from([np.uint8, np.uint16, np.float32]),
    channels=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_stitch_identity_round_trip(args, dtype, channels, seed):
    args["scale"] = 1
    plan = plan_tiles(**args)
    rng = np.random.default_rng(seed)
    frame = (rng.random((args["height"], args["width"], channels)) * 60000).astype(dtype)

    tiles = split(plan, frame)
    assert tiles.shape == (len(plan), *plan.tile_shape, channels)
    assert tiles.dtype == frame.dtype
    assert np.array_equal(stitch(plan, tiles), frame)


@settings(max_examples=100, deadline=None)
@given(args=plans(max_size=60), scale=st.integers(2, 4), seed=st.integers(0, 2**32 - 1))
def test_split_stitch_nearest_neighbour_model(args, scale, seed):
    args["scale"] = scale
    plan = plan_tiles(**args)
    frame = np.random.default_rng(seed).integers(0, 256, (args["height"], args["width"], 3), np.uint8)

    tiles = split(plan, frame)
    upscaled = np.repeat(np.repeat(tiles, scale, axis=1), scale, axis=2)
    expected = np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)
    assert np.array_equal(stitch(plan, upscaled), expected)
    # Tiles may also arrive one by one from the engine, as a list.
    assert np.array_equal(stitch(plan, list(upscaled)), expected)


def test_split_and_stitch_fill_caller_buffers():
    plan = plan_tiles(1080, 1920, tile=(512, 512), overlap=DEFAULT_OVERLAP, scale=2)
    frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), np.uint8)
    batch = np.empty((len(plan), 512, 512, 3), np.uint8)
    assert split(plan, frame, out=batch) is batch
    upscaled = np.repeat(np.repeat(batch, 2, axis=1), 2, axis=2)
    result = np.empty((2160, 3840, 3), np.uint8)
    assert stitch(plan, upscaled, out=result) is result
    assert np.array_equal(result, np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1))


@pytest.mark.parametrize("height, width", [(96, 128), (90, 125)])
def test_a_one_tile_plan_stitches_without_copying(height, width):
    plan = plan_tiles(height, width, tile=(96, 128), overlap=16, scale=2, multiple=4)
    assert len(plan) == 1
    frame = np.random.default_rng(1).integers(0, 256, (height, width, 3), np.uint8)
    upscaled = np.repeat(np.repeat(split(plan, frame), 2, axis=1), 2, axis=2)
    result = stitch(plan, upscaled)
    assert np.shares_memory(result, upscaled)  # the padding, if any, is sliced off, not copied
    assert np.array_equal(result, np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1))


def test_split_reflect_pads_small_frame_like_numpy():
    plan = plan_tiles(5, 6, tile=(64, 64), overlap=16, multiple=4)
    assert plan.tile_shape == (8, 8) and len(plan) == 1
    frame = np.arange(5 * 6 * 2, dtype=np.uint16).reshape(5, 6, 2)
    expected = np.pad(frame, ((0, 3), (0, 2), (0, 0)), mode="reflect")
    assert np.array_equal(split(plan, frame)[0], expected)


@pytest.mark.parametrize("multiple", [1, 2, 4])
def test_one_pixel_frame(multiple):
    plan = plan_tiles(1, 1, tile=(512, 512), overlap=DEFAULT_OVERLAP, scale=4, multiple=multiple)
    assert plan.tile_shape == (multiple, multiple)
    frame = np.array([[[7, 8, 9]]], np.uint8)
    tiles = split(plan, frame)
    assert (tiles == frame).all()
    upscaled = np.repeat(np.repeat(tiles, 4, axis=1), 4, axis=2)
    assert np.array_equal(stitch(plan, upscaled), np.broadcast_to(frame, (4, 4, 3)))


def test_regression_seed_tiler_made_nine_tile_shapes_on_1080p():
    # The seed tiler clamped edge tiles, giving nine distinct shapes on a 1080p frame; a model
    # compiled for the first shape then returned repeated or shifted tiles.
    plan = plan_tiles(1080, 1920, tile=(512, 512), overlap=DEFAULT_OVERLAP, scale=4)
    shapes = {(t.src[0].stop - t.src[0].start, t.src[1].stop - t.src[1].start) for t in plan.tiles}
    assert shapes == {(512, 512)}
    assert plan.padded_shape == (1080, 1920)
    # The last row and column are shifted back inside the frame, not shrunk.
    assert max(t.y for t in plan.tiles) == 1080 - 512
    assert max(t.x for t in plan.tiles) == 1920 - 512


def test_whole_frame_when_it_fits_in_the_tile():
    plan = plan_tiles(270, 481, tile=(512, 512), overlap=32, multiple=4)
    assert plan.tile_shape == (272, 484)
    assert len(plan) == 1
    assert plan.padded_shape == (272, 484)


def test_stitch_refuses_a_wrong_tile_shape():
    plan = plan_tiles(100, 100, tile=(64, 64), overlap=16, scale=2)
    tiles = [np.zeros((128, 128, 3), np.uint8) for _ in range(len(plan))]
    tiles[-1] = np.zeros((128, 120, 3), np.uint8)
    with pytest.raises(ValueError, match="tile 3 has shape"):
        stitch(plan, tiles)


def test_split_refuses_mismatched_frame_and_buffer():
    plan = plan_tiles(100, 100, tile=(64, 64), overlap=16)
    with pytest.raises(ValueError, match="frame shape"):
        split(plan, np.zeros((100, 99, 3), np.uint8))
    with pytest.raises(ValueError, match="out has shape"):
        split(plan, np.zeros((100, 100, 3), np.uint8), out=np.zeros((len(plan), 64, 64, 3), np.float32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=0, width=10, tile=(8, 8)), "height"),
        (dict(height=10, width=10, tile=(8, 8), overlap=-1), "overlap"),
        (dict(height=10, width=10, tile=(8, 8), scale=0), "scale"),
        (dict(height=10, width=10, tile=(8, 8), multiple=0), "multiple"),
        (dict(height=10, width=10, tile=(0, 8)), "tile height"),
        (dict(height=10, width=10, tile=(8, 6), multiple=4), "not divisible"),
        (dict(height=100, width=10, tile=(16, 16), overlap=16), "greater than overlap"),
        (dict(height=10, width=10, tile=8), "pair"),
        (dict(height=10.0, width=10, tile=(8, 8)), "integer"),
    ],
)
def test_plan_tiles_rejects_bad_arguments(kwargs, message):
    kwargs.setdefault("overlap", 2)
    with pytest.raises(ValueError, match=message):
        plan_tiles(**kwargs)


def test_overlap_larger_than_a_tiny_whole_frame_is_fine():
    assert plan_tiles(3, 3, tile=(512, 512), overlap=DEFAULT_OVERLAP).tile_shape == (3, 3)


@st.composite
def tile_budgets(draw):
    height = draw(st.integers(1, 2160))
    width = draw(st.integers(1, 3840))
    # Budgets down to 1/400 of the frame: small enough to need many tiles and to hit the
    # "too small" error on small frames, not so small that a 4K plan has 100k tiles.
    max_pixels = draw(st.integers(max(1, height * width // 400), 1 << 22))
    return height, width, max_pixels


@settings(max_examples=200, deadline=None)
@given(
    budget=tile_budgets(),
    multiple=st.sampled_from([1, 2, 4]),
    overlap=st.integers(0, 48),
)
def test_choose_tile_properties(budget, multiple, overlap):
    height, width, max_pixels = budget
    whole = (-(-height // multiple) * multiple, -(-width // multiple) * multiple)
    try:
        tile = choose_tile(height, width, max_pixels=max_pixels, multiple=multiple, overlap=overlap)
    except ValueError:
        # Only when even the smallest useful tile (one pixel of new content plus overlap, rounded
        # to the multiple) is over budget.
        smallest = -(-(1 + overlap) // multiple) * multiple
        assert whole[0] * whole[1] > max_pixels
        assert min(smallest, whole[0]) * min(smallest, whole[1]) > max_pixels
        return
    if whole[0] * whole[1] <= max_pixels:
        assert tile == whole
        return
    assert tile[0] * tile[1] <= max_pixels
    assert tile[0] % multiple == 0 and tile[1] % multiple == 0
    assert tile[0] <= whole[0] and tile[1] <= whole[1]
    # The choice is usable as is: plan_tiles keeps it unchanged.
    plan = plan_tiles(height, width, tile=tile, overlap=overlap, multiple=multiple)
    assert plan.tile_shape == tile


def test_choose_tile_examples():
    assert choose_tile(1080, 1920, max_pixels=1920 * 1080) == (1080, 1920)
    assert choose_tile(1080, 1920, max_pixels=1920 * 1080, multiple=4) == (1080, 1920)
    assert choose_tile(1081, 1921, max_pixels=1 << 22, multiple=4) == (1084, 1924)
    tile = choose_tile(1080, 1920, max_pixels=512 * 512, overlap=32, multiple=4)
    assert tile[0] * tile[1] <= 512 * 512
    # Fewer tiles than the naive 512x512 grid on a 1080p frame.
    assert len(plan_tiles(1080, 1920, tile=tile, overlap=32, multiple=4)) <= len(
        plan_tiles(1080, 1920, tile=(512, 512), overlap=32, multiple=4)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(height=0, width=10, max_pixels=100),
        dict(height=10, width=10, max_pixels=0),
        dict(height=10, width=10, max_pixels=100, multiple=0),
        dict(height=10, width=10, max_pixels=100, overlap=-1),
        # A 4x4 tile is the least a multiple of 4 allows.
        dict(height=1, width=1, max_pixels=1, multiple=4),
        # Overlap 32 needs tiles of at least 33 pixels per cut axis.
        dict(height=1000, width=1000, max_pixels=32 * 32, overlap=32),
    ],
)
def test_choose_tile_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        choose_tile(**kwargs)
