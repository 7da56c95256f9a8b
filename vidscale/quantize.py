"""INT8: post-training quantization of a model's float IR with NNCF, and the quality gate guarding it.

NNCF is an optional extra (`pip install 'vidscale[int8]'`), imported only here and only when INT8 is
asked for. The quantized IR is cached beside the float one, keyed by the weights, the calibration
crops and the NNCF version, together with the PSNR the gate measured, so a second run neither
quantizes nor measures again. A model whose output falls below INT8_MIN_PSNR against f32 on crops of
the frames it is about to upscale (or, without those, of its calibration) is refused, never run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import openvino as ov

from .engine import Engine, cache_writes, read_ir
from .errors import EngineError, UsageError
from .files import temporary_beside, write_atomically
from .tiling import round_up

# PSNR (dB) of the INT8 model's u8 output against f32's on the gate's crops, all crops pooled
# into one mean squared error. 40 dB is an RMS error of 2.5 levels in 255: invisible on anime.
INT8_MIN_PSNR = 40.0
# Calibration works on crops of one static shape: NNCF's statistics and the gate's compiled models
# then cost the same whatever the frame size, and crops keep the frames' real texture (a downscale
# would sharpen it and move the activation ranges).
CALIBRATION_SIDE = 128
CALIBRATION_CROPS = 24
# Bumped whenever the quantization recipe below changes, so older cached INT8 IRs are not reused.
_INT8_FORMAT = 5
# SmoothQuant's migration strength for convolutions (see quantize).
_SMOOTH_QUANT_ALPHA = 0.7
# Convolutions up to which full bias correction is affordable (see quantize).
_FULL_BIAS_CORRECTION_LIMIT = 32
# RRDBNet's residual additions as OpenVINO names them after conversion from our module: the 18 inside
# the blocks, the 6 around them and the one around the body (a convolution's bias add is
# ".../aten::_convolution/Add" and does not match).
_RRDB_RESIDUAL_ADDS = r".*aten::add/Add$"


def _nncf():
    try:
        import nncf
    except ImportError:
        raise UsageError("--precision int8 needs NNCF, which is not installed: "
                         "pip install 'vidscale[int8]'") from None
    return nncf


def synthetic_frames(count: int = 6, size: tuple[int, int] = (270, 480)) -> list[np.ndarray]:
    """The bundled calibration set: cel-style frames (flat fills, dark outlines, a gradient sky,
    light grain) drawn deterministically, so nothing third-party ships and the digest is stable."""
    rng = np.random.default_rng(20240)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for _ in range(count):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        frame = (top + (bottom - top) * (yy[..., None] / h)).astype(np.float32)
        for _ in range(int(rng.integers(4, 9))):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            ry, rx = rng.integers(h // 12, h // 3), rng.integers(w // 12, w // 3)
            dist = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            frame[dist < 1] = rng.integers(0, 256, 3)
            frame[np.abs(dist - 1) < 0.08] = rng.integers(0, 40, 3)  # ink line
        frame += rng.normal(0, 2.0, frame.shape)
        frames.append(np.clip(frame + 0.5, 0, 255).astype(np.uint8))
    return frames


def calibration_crops(frames: Sequence[np.ndarray], multiple: int, side: int = CALIBRATION_SIDE,
                      count: int = CALIBRATION_CROPS) -> np.ndarray:
    """`count` crops of side x side spread evenly over `frames` ((N, side, side, 3) uint8).

    Positions are drawn from a fixed seed, so the same frames always give the same crops (and the
    same cache key). A frame smaller than a crop is mirrored out to it, as the tiler pads.
    """
    if not frames:
        raise UsageError("INT8 calibration needs at least one frame")
    for frame in frames:
        if frame.dtype not in (np.uint8, np.uint16) or frame.ndim != 3 or frame.shape[2] != 3:
            raise UsageError(f"INT8 calibration frames must be (H, W, 3) uint8 RGB arrays, "
                             f"got {frame.shape} {frame.dtype}")
    # The gate measures u8 output, so deep frames (16-bit PNG, 10-bit video) calibrate at 8 bits.
    frames = [(f >> 8).astype(np.uint8) if f.dtype == np.uint16 else f for f in frames]
    side = round_up(side, multiple)
    rng = np.random.default_rng(0)
    crops = np.empty((count, side, side, 3), np.uint8)
    for index in range(count):
        frame = frames[index * len(frames) // count]
        pad = [(0, max(0, side - frame.shape[0])), (0, max(0, side - frame.shape[1])), (0, 0)]
        if pad[0][1] or pad[1][1]:
            frame = np.pad(frame, pad, mode="symmetric")
        y = int(rng.integers(0, frame.shape[0] - side + 1))
        x = int(rng.integers(0, frame.shape[1] - side + 1))
        crops[index] = frame[y : y + side, x : x + side]
    return crops


def _digest(crops: np.ndarray) -> str:
    return hashlib.sha256(repr(crops.shape).encode() + crops.tobytes()).hexdigest()


def int8_path(model, crops: np.ndarray, cache_dir: Path, nncf_version: str) -> Path:
    key = f"{model.digest}:{_digest(crops)}:{nncf_version}:{_INT8_FORMAT}"
    return cache_dir / "int8" / f"{model.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.xml"


def quantize(nncf, model: ov.Model, crops: np.ndarray, arch: str) -> ov.Model:
    """NNCF post-training quantization of the float IR, calibrated on `crops`.

    MIXED preset: weights symmetric, activations asymmetric, because PReLU/LeakyReLU activations
    are not one-sided as ReLU's are. The first convolution (reading the picture) and the last
    (writing the residual that lands straight on the pixels) stay float: measured on the One Piece
    demo, that lifts realesr-animevideov3 from 39.9 to 40.9 dB. Full bias correction costs a few
    seconds more than the fast one on the compact net and gains a further ~0.2 dB; on the RRDB nets
    (about 100 convolutions) it ran for over 16 minutes, so they get the fast one.

    NNCF's default overflow fix quantizes some weights to 7 bits, for CPUs whose 8-bit dot product
    saturates in 16 bits; VNNI and AMX accumulate in 32 bits and lose nothing with all 8, which
    lifts anime_6B from 37.7 to 39.2 dB. A CPU that does saturate shows it in the gate, which runs
    on the same device. RRDBNet also keeps its residual additions in float: each one otherwise
    requantizes the trunk (asymmetric 8 bits over the whole trunk's range), and 25 of them in a
    row cost it another 1.1 dB; the convolutions they feed still read int8.

    SmoothQuant divides each convolution's input channels by a per-channel scale (alpha 0.7 of
    the way from the activations' range towards the weights'), multiplied back into its weights,
    so that a few wide channels no longer set the one int8 step of the whole activation tensor.
    Measured against the recipe without it, gate on the clip's own frames: realesr-animevideov3
    38.6 -> 42.0 dB on anime4k_web_input.mp4 (alpha 0.5: 41.1, 0.15: 37.2) and 41.9 -> 43.5 on
    the One Piece demo. On anime_6B it lifts anime4k only from 35.4 to 38.1 dB (still
    refused) and drops the One Piece demo from 40.3 to 38.9 (refused), so RRDBNet goes without it
    (its own alpha is left untuned: each try costs 2 minutes of quantization). The scales fold
    into the quantizers and weights: INT8 stays at 1.7x bf16 on animevideov3. NNCF runs SmoothQuant
    only for ModelType.TRANSFORMER, whose rules also leave animevideov3's final addition (the last
    convolution's output plus the upsampled picture) unquantized; that alone is not the gain, as
    alpha 0.15 with the same rules scores below the recipe without SmoothQuant.
    Keeping the most sensitive convolutions in float instead (ranked by the error each removes)
    needed 2 of animevideov3's 16 for anime4k (40.05 dB), costing INT8 1.72 -> 1.57x bf16, and
    lifted anime_6B to only 36.4 dB within a fifth of its multiply-adds after 10 minutes of search.
    """
    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops()
                    if op.get_type_name() == "Convolution"]
    names = [convolutions[0], convolutions[-1]] if len(convolutions) > 2 else []
    patterns = [_RRDB_RESIDUAL_ADDS] if arch == "RRDBNet" else []
    ignored = nncf.IgnoredScope(names=names, patterns=patterns) if names or patterns else None
    smooth = arch != "RRDBNet"
    dataset = nncf.Dataset(list(crops), _to_model_input)
    # NNCF logs and draws its progress bars on stdout, which may be carrying our video: keep its
    # warnings and errors only (errors reach us as exceptions anyway) and swallow the bars.
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED,
                             target_device=nncf.TargetDevice.CPU, subset_size=len(crops),
                             model_type=nncf.ModelType.TRANSFORMER if smooth else None,
                             fast_bias_correction=len(convolutions) > _FULL_BIAS_CORRECTION_LIMIT,
                             ignored_scope=ignored,
                             advanced_parameters=nncf.AdvancedQuantizationParameters(
                                 overflow_fix=nncf.OverflowFix.DISABLE,
                                 smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(
                                     convolution=_SMOOTH_QUANT_ALPHA if smooth else -1)))


def _to_model_input(crop: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None], dtype=np.float32) / np.float32(255.0)


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def gate_psnr(engine: Engine, quantized: ov.Model, crops: np.ndarray) -> float:
    """PSNR of the INT8 model's u8 output against f32's on `crops`."""
    side = crops.shape[1]
    reference = Engine(engine.model, replace(engine.settings, precision="f32")).upscaler((side, side))
    candidate = engine.wrap(quantized.clone(), side, side, batch=1, outscale=engine.native_scale, sample="u8",
                            precision="int8")
    expected = np.stack([reference(crop[None])[0] for crop in crops])
    got = np.stack([candidate(crop[None])[0] for crop in crops])
    return psnr(expected, got)


def int8_model(engine: Engine, frames: Sequence[np.ndarray] | None,
               evaluation: Sequence[np.ndarray] | None = None) -> ov.Model:
    """The quantized IR of engine.model calibrated on `frames` (None: the bundled set), from the
    cache or made now; raises EngineError when it fails the quality gate.

    The gate is measured on crops of `evaluation`, the frames that will be upscaled, when given:
    a calibration that does not represent them (another file, a dark scene) then fails here,
    where measured on its own frames it would always look fine. Without them, on the calibration.
    """
    nncf = _nncf()
    crops = calibration_crops(frames if frames else synthetic_frames(), engine.size_multiple)
    checks = calibration_crops(evaluation, engine.size_multiple) if evaluation else crops
    xml = int8_path(engine.model, crops, engine.settings.resolved_cache_dir, nncf.__version__)
    record_path = xml.with_suffix(".json")
    try:
        quantized = read_ir(xml)
        record = json.loads(record_path.read_text())
        measured = record["psnr"]
    except (OSError, RuntimeError, ElementTree.ParseError, ValueError, KeyError, TypeError):
        # Not made yet, or damaged on disk: quantized (again), as a cache is.
        quantized = quantize(nncf, engine.float_ir(), crops, engine.model.spec.arch)
        record = {"psnr": {}, "crops": len(crops), "side": crops.shape[1], "nncf": nncf.__version__}
        measured = record["psnr"]
        _save(quantized, xml, record)
    # PSNR per set of gate crops, kept even when the gate fails, so the next run on the same frames
    # refuses at once instead of measuring again.
    key = _digest(checks)
    if key not in measured:
        measured[key] = gate_psnr(engine, quantized, checks)
        write_atomically(record_path, json.dumps(record), temporary_beside(record_path))
    if not measured[key] >= INT8_MIN_PSNR:
        what = "frames to upscale" if evaluation else "calibration frames"
        raise EngineError(f"INT8 quality gate failed: {measured[key]:.1f} dB < {INT8_MIN_PSNR:g} dB against "
                          f"f32 on {len(checks)} crops of the {what}; use --precision bf16")
    return quantized


def _save(model: ov.Model, xml: Path, record: dict) -> None:
    # The record first, then the .bin, then the .xml, each renamed into place: a present .xml
    # means a complete set even after a crash or a concurrent run.
    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp, record_path = temporary_beside(xml), xml.with_suffix(".json")
    with cache_writes(tmp):
        write_atomically(record_path, json.dumps(record), temporary_beside(record_path))
        ov.save_model(model, tmp, compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
