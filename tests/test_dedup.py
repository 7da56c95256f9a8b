"""Duplicate-frame reuse: anime is drawn on twos and threes, so many frames need no inference."""

from fractions import Fraction

import av
import numpy as np
import pytest

import vidscale
from clips import pattern
from vidscale.media import VideoFrame, VideoReader
from vidscale.pipeline import frames_match

LOSSLESS = dict(codec="ffv1", pix_fmt="yuv444p")


def lossless_clip(path, pictures: list[np.ndarray]):
    """ffv1 yuv444p, so what the reader decodes is what was drawn up to colour conversion."""
    height, width = pictures[0].shape[:2]
    with av.open(str(path), "w") as out:
        video = out.add_stream("ffv1", rate=24)
        video.width, video.height, video.pix_fmt = width, height, "yuv444p"
        for index, picture in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv444p")
            frame.pts, frame.time_base = index, Fraction(1, 24)
            out.mux(video.encode(frame))
        out.mux(video.encode())
    return path


def decoded(path) -> list[np.ndarray]:
    with VideoReader(path) as reader:
        return [e.rgb for e in reader.events() if isinstance(e, VideoFrame)]


def upscale(source, target, cache_dir, model, dedup):
    return vidscale.upscale(source, target, model=str(model), cache_dir=cache_dir, dedup=dedup, **LOSSLESS)


def test_exact_duplicates_give_output_identical_to_full_processing(tmp_path, cache_dir, identity_x2):
    drawings = [pattern(48, 64, shift) for shift in range(5)]
    on_twos = lossless_clip(tmp_path / "twos.mkv", [d for d in drawings for _ in range(2)])
    reused = upscale(on_twos, tmp_path / "reused.mkv", cache_dir, identity_x2, dedup=0.0)
    full = upscale(on_twos, tmp_path / "full.mkv", cache_dir, identity_x2, dedup=None)
    assert (reused.frames, reused.reused_frames) == (10, 5)
    assert (full.frames, full.reused_frames) == (10, 0)
    for a, b in zip(decoded(tmp_path / "reused.mkv"), decoded(tmp_path / "full.mkv"), strict=True):
        assert np.array_equal(a, b)


def test_a_small_moving_detail_is_never_reused(tmp_path, cache_dir, identity_x2):
    # A 3x3 dot moving over a still background: a whole-frame average would call these equal.
    pictures = []
    for step in range(6):
        picture = np.full((48, 64, 3), 120, np.uint8)
        picture[20:23, 10 + 7 * step:13 + 7 * step] = 250
        pictures.append(picture)
    clip = lossless_clip(tmp_path / "dot.mkv", pictures)
    result = upscale(clip, tmp_path / "out.mkv", cache_dir, identity_x2, dedup=vidscale.config.DEFAULT_DEDUP)
    assert result.reused_frames == 0
    for source, upscaled in zip(decoded(clip), decoded(tmp_path / "out.mkv"), strict=True):
        assert np.abs(upscaled[::2, ::2].astype(int) - source).max() <= 3


def test_a_slow_fade_cannot_creep_past_the_threshold(tmp_path, cache_dir, identity_x2):
    # Each frame is 3 code values brighter than the one before: under a threshold of 4 against the
    # previous frame every frame would match, but against the last inferred one only every other.
    clip = lossless_clip(tmp_path / "fade.mkv", [np.full((32, 32, 3), 60 + 3 * k, np.uint8) for k in range(10)])
    result = upscale(clip, tmp_path / "out.mkv", cache_dir, identity_x2, dedup=4.0)
    assert result.reused_frames == 5
    levels = [int(f.mean().round()) for f in decoded(tmp_path / "out.mkv")]
    sources = [int(f.mean().round()) for f in decoded(clip)]
    assert all(abs(a - b) <= 4 for a, b in zip(levels, sources, strict=True))


@pytest.mark.parametrize("dtype, peak", [(np.uint8, 255), (np.uint16, 65535)])
def test_frames_match_measures_blocks_in_8_bit_steps(dtype, peak):
    reference = np.full((20, 27, 3), peak // 2, dtype)
    assert frames_match(reference.copy(), reference, 0)
    step = peak // 255
    changed = reference.copy()
    changed[19, 26] += 5 * step  # the last, partial block (4x3 pixels) at the bottom-right edge
    assert not frames_match(changed, reference, 0)
    # One pixel, all channels, +5: mean over that 4x3 block is 5 * 3 / (12 * 3) = 0.42 steps.
    assert frames_match(changed, reference, 0.5)
    assert not frames_match(changed, reference, 0.4)
    noisy = reference + (np.indices(reference.shape).sum(axis=0) % 3 * step).astype(dtype)
    assert frames_match(noisy, reference, 1.0) and not frames_match(noisy, reference, 0.9)
