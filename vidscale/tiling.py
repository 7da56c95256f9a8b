"""Cut frames into tiles of ONE static shape and stitch the upscaled tiles back.

The engine compiles a model for exactly one input shape, so every tile this module hands out has
exactly ``plan.tile_shape``. Edge tiles are shifted back inside the frame instead of being shrunk
(a shrunken edge tile fed to a model compiled for another shape is the bug this project exists to
avoid), and a frame smaller than a tile is reflect-padded up to it and cropped after.

Neighbouring tiles overlap so that every kept output pixel was computed with real image context
around it; the seam between two tiles sits in the middle of their overlap, and each output pixel
comes from exactly one tile.

Pure numpy; imports nothing from vidscale so the engine and the pipeline can both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_OVERLAP",
    "Tile",
    "TilePlan",
    "choose_tile",
    "parse_tile",
    "plan_tiles",
    "round_up",
    "split",
    "stitch",
]

# Input pixels shared by neighbouring tiles. The seam sits mid-overlap, so every kept pixel has at
# least overlap/2 = 16 real pixels of context towards the tile edge. Real-ESRGAN's own tiled
# inference keeps 10 (its default tile_pad) and its seams are already hard to see; RRDB's effective
# receptive field is wider than that, so 16 gives margin for a tiled-vs-whole-frame PSNR >= 45 dB
# while wasting only ~6% extra compute per axis on 512-pixel tiles.
DEFAULT_OVERLAP = 32


@dataclass(frozen=True)
class Tile:
    """One tile of a plan.

    Coordinates are plain ints (not slices) so plans stay hashable and comparable; the slice
    properties are what callers index with.
    """

    y: int
    """Top row of the tile in the padded input frame."""
    x: int
    """Left column of the tile in the padded input frame."""
    height: int
    width: int
    scale: int
    keep_box: tuple[int, int, int, int]
    """(top, bottom, left, right), half-open, in input-frame pixels: the part of the frame only
    this tile supplies. Never reaches into padding."""

    @property
    def src(self) -> tuple[slice, slice]:
        """Where the tile's input lies in the padded input frame."""
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)

    @property
    def keep(self) -> tuple[slice, slice]:
        """The region of the upscaled tile to keep."""
        top, bottom, left, right = self.keep_box
        s = self.scale
        return (
            slice((top - self.y) * s, (bottom - self.y) * s),
            slice((left - self.x) * s, (right - self.x) * s),
        )

    @property
    def dst(self) -> tuple[slice, slice]:
        """Where the kept region goes in the output frame; same shape as ``keep``."""
        top, bottom, left, right = self.keep_box
        s = self.scale
        return slice(top * s, bottom * s), slice(left * s, right * s)


@dataclass(frozen=True)
class TilePlan:
    """How one frame size is cut. Build it with :func:`plan_tiles`, not directly."""

    height: int
    width: int
    tile_shape: tuple[int, int]
    """(tile_h, tile_w): the one input shape to compile the model for."""
    overlap: int
    scale: int
    multiple: int
    padded_shape: tuple[int, int]
    """The frame size after reflect padding; equals (height, width) unless the frame is smaller
    than the tile along an axis."""
    tiles: tuple[Tile, ...]
    """Row-major: all tiles of the first tile row, then the next row."""

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.height * self.scale, self.width * self.scale

    @property
    def out_tile_shape(self) -> tuple[int, int]:
        """The shape every model output must have; anything else is an engine bug."""
        return self.tile_shape[0] * self.scale, self.tile_shape[1] * self.scale

    def __len__(self) -> int:
        return len(self.tiles)


def parse_tile(value) -> tuple[int, int] | None:
    """A tile as the CLI and job files give it: 0 (automatic), N, "N", "HxW" or [H, W]; None is
    automatic. Returns (height, width), or None for automatic; ValueError names what is wrong."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        try:
            parts = [int(p) for p in str(value).lower().split("x")]
        except ValueError:
            raise ValueError(f"tile {value!r} is not N or HxW") from None
    if parts == [0]:
        return None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(isinstance(p, int) and p > 0 for p in parts):
        raise ValueError(f"tile {value!r} must be 0 (automatic), N or HxW with N > 0")
    return parts[0], parts[1]


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value."""
    return -(-value // multiple) * multiple


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass, and numpy integers are not ints; accept the latter, refuse the former.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _axis_tile(size: int, requested: int, multiple: int) -> int:
    """The tile length along one axis: the requested one, or the whole axis when it fits."""
    return round_up(size, multiple) if size <= requested else requested


def _axis_count(size: int, tile: int, overlap: int) -> int:
    """Number of tiles along an axis; the closed form of the loop in :func:`_axis_starts`."""
    if tile >= size:
        return 1
    return 1 + -(-(size - tile) // (tile - overlap))


def _axis_starts(size: int, tile: int, overlap: int) -> list[int]:
    if tile >= size:
        return [0]
    step = tile - overlap
    starts = [0]
    while starts[-1] + tile < size:
        # The previous tile ended before the frame edge, so size - tile is strictly greater than
        # its start: shifting the last tile back never duplicates a start.
        starts.append(min(starts[-1] + step, size - tile))
    return starts


def _axis_keeps(size: int, tile: int, starts: list[int]) -> list[tuple[int, int]]:
    """Half-open kept intervals, one per tile, partitioning [0, size).

    The cut between neighbours is the middle of their overlap, where both tiles are furthest from
    their own edges and so have the most context.
    """
    cuts = [(a + b + tile) // 2 for a, b in zip(starts, starts[1:])]
    return list(zip([0, *cuts], [*cuts, size]))


def plan_tiles(
    height: int,
    width: int,
    tile: tuple[int, int],
    overlap: int = DEFAULT_OVERLAP,
    scale: int = 1,
    multiple: int = 1,
) -> TilePlan:
    """Plan the tiles of a (height, width) frame, all of exactly one shape.

    ``tile`` is the requested (tile_h, tile_w) and must be divisible by ``multiple``. Along an axis
    where the frame fits in the requested tile, the tile shrinks to the frame size rounded up to
    ``multiple`` (one tile, padded if rounding added pixels). Elsewhere tiles start every
    ``tile - overlap`` pixels and the last one is shifted back to end at the frame edge.
    """
    height = _check_int("height", height, 1)
    width = _check_int("width", width, 1)
    overlap = _check_int("overlap", overlap, 0)
    scale = _check_int("scale", scale, 1)
    multiple = _check_int("multiple", multiple, 1)
    try:
        req_h, req_w = tile
    except (TypeError, ValueError):
        raise ValueError(f"tile must be a (tile_h, tile_w) pair, got {tile!r}") from None
    req_h = _check_int("tile height", req_h, 1)
    req_w = _check_int("tile width", req_w, 1)
    for name, req in (("tile height", req_h), ("tile width", req_w)):
        if req % multiple:
            raise ValueError(f"{name} {req} is not divisible by the model's multiple {multiple}")

    tile_h = _axis_tile(height, req_h, multiple)
    tile_w = _axis_tile(width, req_w, multiple)
    # Overlap only matters on an axis that is actually cut, so a whole-frame tile smaller than the
    # overlap (a tiny frame) is fine.
    for name, size, length in (("height", height, tile_h), ("width", width, tile_w)):
        if length < size and length <= overlap:
            raise ValueError(
                f"tile {name} {length} must be greater than overlap {overlap} "
                f"to cut a frame {name} of {size}"
            )

    starts_y = _axis_starts(height, tile_h, overlap)
    starts_x = _axis_starts(width, tile_w, overlap)
    keeps_y = _axis_keeps(height, tile_h, starts_y)
    keeps_x = _axis_keeps(width, tile_w, starts_x)
    tiles = tuple(
        Tile(y, x, tile_h, tile_w, scale, (top, bottom, left, right))
        for y, (top, bottom) in zip(starts_y, keeps_y)
        for x, (left, right) in zip(starts_x, keeps_x)
    )
    return TilePlan(
        height=height,
        width=width,
        tile_shape=(tile_h, tile_w),
        overlap=overlap,
        scale=scale,
        multiple=multiple,
        padded_shape=(max(height, tile_h), max(width, tile_w)),
        tiles=tiles,
    )


def _pad_sources(size: int, padded: int) -> np.ndarray:
    # numpy's "reflect" reflects again when the pad is longer than the axis and repeats the only
    # pixel of a 1-pixel axis, so one call covers every size down to 1x1.
    return np.pad(np.arange(size), (0, padded - size), mode="reflect")[size:]


def split(plan: TilePlan, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Cut an (H, W, C) frame into an (n_tiles, tile_h, tile_w, C) batch of the frame's dtype.

    Pass ``out`` to fill a caller-owned buffer instead of allocating one per frame.
    """
    if frame.ndim != 3 or frame.shape[:2] != (plan.height, plan.width):
        raise ValueError(
            f"frame shape {frame.shape} does not match the plan's ({plan.height}, {plan.width}, C)"
        )
    tile_h, tile_w = plan.tile_shape
    shape = (len(plan), tile_h, tile_w, frame.shape[2])
    if out is None:
        out = np.empty(shape, dtype=frame.dtype)
    elif out.shape != shape or out.dtype != frame.dtype:
        raise ValueError(
            f"out has shape {out.shape} and dtype {out.dtype}; expected {shape} and {frame.dtype}"
        )

    # Along a padded axis there is exactly one tile, starting at 0, so padding is done inside each
    # tile from its own pixels instead of building a padded copy of the whole frame.
    valid_h = min(plan.height, tile_h)
    valid_w = min(plan.width, tile_w)
    pad_rows = _pad_sources(plan.height, tile_h) if valid_h < tile_h else None
    pad_cols = _pad_sources(plan.width, tile_w) if valid_w < tile_w else None
    for i, tile in enumerate(plan.tiles):
        out[i, :valid_h, :valid_w] = frame[tile.y : tile.y + valid_h, tile.x : tile.x + valid_w]
        if pad_rows is not None:
            out[i, valid_h:, :valid_w] = out[i, pad_rows, :valid_w]
        if pad_cols is not None:
            # Rows first, then columns (over the padded rows too), the order np.pad fills corners.
            # out[i] first: mixing the integer i with an index array would move the array's axis.
            out[i][:, valid_w:] = out[i][:, pad_cols]
    return out


def stitch(plan: TilePlan, tiles_out, out: np.ndarray | None = None) -> np.ndarray:
    """Paste each upscaled tile's keep region into an (H*scale, W*scale, C) frame.

    ``tiles_out`` is an (n, tile_h*scale, tile_w*scale, C) array or a sequence of n such tiles.
    Every tile's shape is checked: a wrong-shaped model output must fail loudly, never be pasted.
    A plan of one tile gives a view of it (no ``out``): a 4x frame is megabytes to copy, and its
    keep region already is the frame.
    """
    if len(tiles_out) != len(plan):
        raise ValueError(f"got {len(tiles_out)} tiles for a plan of {len(plan)}")
    expected = plan.out_tile_shape
    first = tiles_out[0]
    if first.ndim != 3:
        raise ValueError(f"tiles must be (h, w, C), got shape {first.shape}")
    shape = (*plan.out_shape, first.shape[2])
    if out is None and len(plan) > 1:
        out = np.empty(shape, dtype=first.dtype)
    elif out is not None and out.shape != shape:
        raise ValueError(f"out has shape {out.shape}; expected {shape}")
    for i, (tile, data) in enumerate(zip(plan.tiles, tiles_out)):
        if data.shape != (*expected, shape[2]):
            raise ValueError(
                f"tile {i} has shape {data.shape}; the plan expects {(*expected, shape[2])}"
            )
        if out is None:  # the one tile
            return data[tile.keep]
        out[tile.dst] = data[tile.keep]
    return out


def choose_tile(
    height: int,
    width: int,
    *,
    max_pixels: int,
    multiple: int = 1,
    overlap: int = DEFAULT_OVERLAP,
) -> tuple[int, int]:
    """Pick the (tile_h, tile_w) to compile for, with tile_h * tile_w <= max_pixels.

    The whole frame (rounded up to ``multiple``) when that fits the budget. Otherwise each axis is
    split into k equal parts, tile = ceil(size / k) + overlap rounded up to ``multiple``, and the
    (k_h, k_w) giving the fewest tiles wins; ties go to the fewest computed pixels (tiles x tile
    area), i.e. the least overlap recomputed. The budget is checked on the rounded tile because
    that is the shape the model is compiled and run for.
    """
    height = _check_int("height", height, 1)
    width = _check_int("width", width, 1)
    max_pixels = _check_int("max_pixels", max_pixels, 1)
    multiple = _check_int("multiple", multiple, 1)
    overlap = _check_int("overlap", overlap, 0)

    whole_h = round_up(height, multiple)
    whole_w = round_up(width, multiple)
    if whole_h * whole_w <= max_pixels:
        return whole_h, whole_w

    best: tuple[tuple[int, int], tuple[int, int]] | None = None
    seen_h = set()
    for k_h in range(1, height + 1):
        part_h = -(-height // k_h)
        tile_h = whole_h if k_h == 1 else min(round_up(part_h + overlap, multiple), whole_h)
        if tile_h in seen_h:
            continue
        seen_h.add(tile_h)
        # The widest tile the budget leaves, then the fewest width parts whose tile fits in it:
        # round_up(c + overlap, m) <= limit exactly when c <= limit - overlap (limit is a multiple).
        limit_w = max_pixels // tile_h // multiple * multiple
        if whole_w <= limit_w:
            tile_w = whole_w
        elif limit_w - overlap >= 1:
            part_w = -(-width // -(-width // (limit_w - overlap)))
            tile_w = round_up(part_w + overlap, multiple)
        else:
            continue
        count = _axis_count(height, tile_h, overlap) * _axis_count(width, tile_w, overlap)
        score = (count, count * tile_h * tile_w)
        if best is None or score < best[0]:
            best = (score, (tile_h, tile_w))
    if best is None:
        raise ValueError(
            f"max_pixels={max_pixels} is too small for any tile with overlap {overlap} "
            f"and multiple {multiple} on a {width}x{height} frame"
        )
    return best[1]
