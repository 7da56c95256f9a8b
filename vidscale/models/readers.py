"""Weight readers: PyTorch pickles, safetensors, and ncnn .param/.bin pairs.

Every reader returns a state dict in BasicSR/Real-ESRGAN key naming, so one ``detect`` serves them all.
Weight files are untrusted input: pickles go through torch's weights-only unpickler, which refuses any
object that is not a tensor or a plain container, and every failure becomes a one-line ModelError.
"""

import io
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import safetensors.torch
import torch

from vidscale.errors import ModelError, first_line
from vidscale.models.detect import detect, normalize_keys

PICKLE_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX)


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict stored in a ``.pth``/``.pt`` or ``.safetensors`` file."""
    path = Path(path)
    check_weight_path(path)
    return weights_from_bytes(read_file(path), path)


def read_ncnn(param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict held by an ncnn model, converted to the official torch key names."""
    param_path, bin_path = Path(param_path), Path(bin_path)
    return ncnn_from_bytes(read_file(param_path), read_file(bin_path), param_path)


def check_weight_path(path: Path) -> None:
    """Refuse, before reading anything, a path that cannot be a weight file."""
    if path.is_dir():
        _directory(path)
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelError(
            f"{path} is not a weight file vidscale reads (expected {', '.join(WEIGHT_SUFFIXES)}, "
            "or an ncnn .param with its .bin)"
        )


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"model file {path} does not exist; check the path or use a catalog name") from None
    except IsADirectoryError:
        _directory(path)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from None


def _directory(path: Path) -> NoReturn:
    raise ModelError(f"{path} is a directory, not a model file; give the weight file inside it")


def weights_from_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """Parse the bytes of a weight file; ``path`` chooses the format by its suffix and names errors."""
    if not data:
        raise ModelError(f"{path} is empty; the download or copy probably failed")
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        try:
            loaded: object = safetensors.torch.load(data)
        except Exception as exc:
            raise ModelError(f"{path} is not a readable safetensors file ({_short(exc)})") from None
    else:
        loaded = _unpickle_weights(data, path)
    return normalize_keys(_state_dict_of(loaded, path))


# How torch 2.13's weights-only unpickler words a refused global, constructor or call.
_CODE_MARKERS = ("GLOBAL", "add_safe_globals", "unrecognized function")


# What a weight file may unpack to. Real-ESRGAN's largest (x4plus) is 67 MB; a torch checkpoint is
# a zip, and a deflated entry of zeros claims a thousand times its size before anything checks it.
_MAX_UNPACKED_BYTES = 512 * 1024**2


def _unpickle_weights(data: bytes, path: Path) -> object:
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                unpacked = sum(entry.file_size for entry in archive.infolist())
        except (zipfile.BadZipFile, ValueError):
            unpacked = 0  # torch.load says what is wrong with it
        if unpacked > _MAX_UNPACKED_BYTES:
            raise ModelError(f"{path} unpacks to {unpacked / 1024**2:.0f} MB, more than any super-resolution "
                             f"model's weights ({_MAX_UNPACKED_BYTES // 1024**2} MB at most); it is not "
                             f"loaded")
    try:
        with warnings.catch_warnings():
            # torch warns (two lines on stderr) of any pickle protocol but its own before refusing it.
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's restricted unpickler stops at the first import or call of anything but tensor
        # rebuilding, before running it; garbage bytes fail in the same unpickler on a bad opcode.
        if any(marker in str(exc) for marker in _CODE_MARKERS):
            raise ModelError(
                f"{path} contains code or objects that are not plain weights and will not be loaded; "
                "use a .safetensors file or a .pth holding only tensors"
            ) from None
        raise ModelError(f"{path} is not a readable PyTorch weight file ({_short(exc)}); save the weights with "
                         f"torch.save (a state dict of tensors), or as .safetensors") from None
    except Exception as exc:
        # Garbage surfaces as KeyError, EOFError, RuntimeError... depending on the first bytes.
        raise ModelError(
            f"{path} is not a readable PyTorch weight file ({type(exc).__name__}); it may be truncated or corrupt"
        ) from None


def _state_dict_of(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    # BasicSR training checkpoints keep the EMA weights (the better ones) beside the raw ones.
    if isinstance(loaded, dict):
        for wrapper in ("params_ema", "params"):
            if loaded.get(wrapper):  # a checkpoint may keep an empty EMA beside the weights
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict) or not loaded:
        raise ModelError(f"{path} holds a {type(loaded).__name__} rather than a state dict of tensors")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelError(
                f"{path} is not a plain state dict: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    return loaded


def _short(exc: Exception) -> str:
    # torch's weights-only refusal opens with advice to load the file unrestricted (which runs any
    # code in it); the reason comes after.
    _, marker, reason = str(exc).partition("WeightsUnpickler error:")
    return first_line(reason if marker and reason.strip() else exc)[:200]


# --- ncnn -------------------------------------------------------------------------------------------

_NCNN_MAGIC = "7767517"
_TAG_FP16 = 0x01306B47
_TAG_FP32 = 0
# Layers that move or combine blobs without weights; anything else cannot be one of our networks.
_PLAIN_LAYERS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle"}
_INTERP_NEAREST = 1
# Convolution param ids other than out channels (0), weight count (6) and fused activation (9, 10),
# with the only values a 3x3, stride 1, pad 1 convolution with bias may have.
_CONV_FIXED = {1: 3, 11: 3, 2: 1, 12: 1, 3: 1, 13: 1, 4: 1, 14: 1, 15: 1, 16: 1, 5: 1, 8: 0}
_CONV_REQUIRED = (1, 4, 5)


@dataclass(frozen=True)
class _Layer:
    kind: str
    name: str
    params: dict[int, str | list[str]]

    def int_param(self, key: int, default: int) -> int:
        return int(self._scalar(key, default))

    def float_param(self, key: int, default: float) -> float:
        return float(self._scalar(key, default))

    def float_list(self, key: int) -> list[float]:
        values = self.params.get(key, [])
        try:
            return [float(v) for v in values] if isinstance(values, list) else [float(values)]
        except ValueError:
            raise ModelError(f"ncnn layer {self.name} has a malformed value {values!r} for parameter {key}") from None

    def _scalar(self, key: int, default: int | float) -> int | float:
        value = self.params.get(key, default)
        try:
            return int(value) if isinstance(default, int) else float(value)
        except (TypeError, ValueError):
            raise ModelError(f"ncnn layer {self.name} has a malformed value {value!r} for parameter {key}") from None


@dataclass(frozen=True)
class _Conv:
    weight: torch.Tensor
    bias: torch.Tensor
    leaky: bool  # fused LeakyReLU(0.2), how ncnn stores RRDBNet's activations


def ncnn_from_bytes(param_data: bytes, bin_data: bytes, param_path: Path) -> dict[str, torch.Tensor]:
    """Map an ncnn graph's Convolution/PReLU layers, in graph order, onto the torch parameter names."""
    layers = _parse_param(param_data, param_path)
    weighted = _read_bin(layers, bin_data, param_path)
    if any(isinstance(item, torch.Tensor) for item in weighted):
        state_dict = _compact_keys(weighted, param_path)
    else:
        state_dict = _rrdb_keys(weighted, param_path)
    spec = detect(state_dict, str(param_path))
    # The weights alone fit the torch module; the resizes must fit too, or ncnn computes something else
    # (the x2/x3 animevideov3 files add a bicubic downscale after the x4 network).
    interps = [
        (layer.int_param(0, 0), layer.float_param(1, 1.0), layer.float_param(2, 1.0))
        for layer in layers
        if layer.kind == "Interp"
    ]
    if spec.arch == "RRDBNet":
        expected = [(_INTERP_NEAREST, 2.0, 2.0)] * 2
    else:
        expected = [(_INTERP_NEAREST, float(spec.scale), float(spec.scale))]
    if interps != expected:
        _bad_ncnn(param_path, f"its resize layers {interps} are not those of {spec.arch} ({expected}); "
                              f"for an x2 or x3 file made of the x4 network and a downscale, give the x4 one "
                              f"with --scale 2 or 3")
    # So must the arithmetic: what is added, multiplied and shuffled.
    for layer in layers:
        if layer.kind == "BinaryOp" and (layer.int_param(0, 0), layer.int_param(1, 0)) != (0, 0):
            _bad_ncnn(param_path, f"its {layer.name} is not the addition of two tensors {spec.arch} makes there")
        if layer.kind == "PixelShuffle" and layer.int_param(0, 1) != spec.scale:
            _bad_ncnn(param_path, f"its {layer.name} shuffles by {layer.int_param(0, 1)}, where {spec.arch} "
                                  f"x{spec.scale} shuffles by {spec.scale}")
        if layer.kind == "Eltwise" and (layer.int_param(0, 1), layer.float_list(1)) != (1, [0.2, 1.0]):
            _bad_ncnn(param_path, f"its {layer.name} is not the residual sum (0.2 x block + input) of RRDBNet")
    return state_dict


def _parse_param(data: bytes, path: Path) -> list[_Layer]:
    try:
        lines = data.decode("ascii").split("\n")
    except UnicodeDecodeError:
        _bad_ncnn(path, "it is not a text .param file")
    if lines[0].strip() != _NCNN_MAGIC:
        _bad_ncnn(path, f"it does not start with the ncnn magic number {_NCNN_MAGIC}")
    layers = []
    for line in lines[2:]:
        tokens = line.split()
        if not tokens:
            continue
        try:
            kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
        except (IndexError, ValueError):
            _bad_ncnn(path, f"cannot parse the layer line {line.strip()!r}")
        params: dict[int, str | list[str]] = {}
        for item in tokens[4 + n_in + n_out :]:
            key_text, _, value = item.partition("=")
            try:
                key = int(key_text)
            except ValueError:
                _bad_ncnn(path, f"layer {name} has a malformed parameter {item!r}")
            # ncnn writes array parameter k as key -23300-k with "count,v1,v2,...".
            if key <= -23300:
                params[-23300 - key] = value.split(",")[1:]
            else:
                params[key] = value
        layers.append(_Layer(kind, name, params))
    for layer in layers:
        if layer.kind not in _PLAIN_LAYERS | {"Convolution", "PReLU"}:
            _bad_ncnn(path, f"it has a {layer.kind} layer ({layer.name}), which RRDBNet and SRVGGNetCompact do not")
    return layers


def _read_bin(layers: list[_Layer], data: bytes, path: Path) -> list[_Conv | torch.Tensor]:
    """Convolutions and PReLU slopes in graph order, with the .bin consumed exactly to its end."""
    offset = 0

    def take(layer: _Layer, size: int) -> bytes:
        nonlocal offset
        if offset + size > len(data):
            _bad_ncnn(
                path,
                f"its .bin ends at byte {len(data)} but layer {layer.name} needs {size} bytes from {offset}; "
                "the .bin is truncated or belongs to another .param",
            )
        chunk = data[offset : offset + size]
        offset += size
        return chunk

    def fp32(layer: _Layer, count: int) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(take(layer, 4 * count), dtype="<f4").astype(np.float32))

    weighted: list[_Conv | torch.Tensor] = []
    for layer in layers:
        if layer.kind == "PReLU":
            slopes = layer.int_param(0, 0)
            if slopes <= 0:
                _bad_ncnn(path, f"PReLU {layer.name} has {slopes} slopes")
            weighted.append(fp32(layer, slopes))
        elif layer.kind == "Convolution":
            out_ch, count, leaky = _conv_shape(layer, path)
            (tag,) = struct.unpack("<I", take(layer, 4))
            if tag == _TAG_FP16:
                raw = take(layer, (2 * count + 3) // 4 * 4)[: 2 * count]
                flat = torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float32))
            elif tag == _TAG_FP32:
                flat = fp32(layer, count)
            else:
                _bad_ncnn(
                    path, f"layer {layer.name} stores quantised weights (tag {tag:#010x}); use an fp16/fp32 export"
                )
            weight = flat.reshape(out_ch, count // (out_ch * 9), 3, 3)
            weighted.append(_Conv(weight, fp32(layer, out_ch), leaky))
    if offset != len(data):
        left = len(data) - offset
        _bad_ncnn(path, f"its .bin has {left} bytes left after the last layer; it belongs to another .param")
    return weighted


def _conv_shape(layer: _Layer, path: Path) -> tuple[int, int, bool]:
    for key in _CONV_REQUIRED:
        if key not in layer.params:
            _bad_ncnn(path, f"convolution {layer.name} does not set parameter {key}")
    for key in layer.params:
        if key in (0, 6, 9, 10):
            continue
        if key not in _CONV_FIXED or layer.int_param(key, 0) != _CONV_FIXED[key]:
            _bad_ncnn(path, f"convolution {layer.name} is not a 3x3, stride 1, pad 1 convolution with bias ({key}=)")
    out_ch, count = layer.int_param(0, 0), layer.int_param(6, 0)
    if out_ch <= 0 or count <= 0 or count % (out_ch * 9):
        _bad_ncnn(path, f"convolution {layer.name} has {count} weights, not a whole number of {out_ch}x3x3 filters")
    activation = layer.int_param(9, 0)
    leaky = activation == 2 and layer.float_list(10) == [0.2]
    if activation not in (0, 2) or (activation == 2 and not leaky):
        _bad_ncnn(path, f"convolution {layer.name} has a fused activation other than LeakyReLU(0.2)")
    return out_ch, count, leaky


def _compact_keys(weighted: list[_Conv | torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    # SRVGGNetCompact's body is conv, PReLU, conv, PReLU, ..., conv: the same order ncnn runs them.
    if len(weighted) % 2 == 0:
        _bad_ncnn(path, "it does not end with a convolution as SRVGGNetCompact does")
    state_dict = {}
    for index, item in enumerate(weighted):
        is_conv = index % 2 == 0
        if isinstance(item, _Conv) != is_conv or (is_conv and item.leaky):
            _bad_ncnn(path, "its convolutions and PReLUs do not alternate as in SRVGGNetCompact")
        if isinstance(item, _Conv):
            state_dict[f"body.{index}.weight"] = item.weight
            state_dict[f"body.{index}.bias"] = item.bias
        else:
            state_dict[f"body.{index}.weight"] = item
    return state_dict


def _rrdb_keys(weighted: list[_Conv | torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    # RRDBNet's parameters in forward order, each with whether ncnn must have fused its LeakyReLU.
    num_block, rest = divmod(len(weighted) - 6, 15)
    if rest or num_block < 1:
        _bad_ncnn(path, f"its {len(weighted)} convolutions are not 6 + 15 per RRDB block")
    names = [("conv_first", False)]
    for block in range(num_block):
        for rdb in (1, 2, 3):
            names += [(f"body.{block}.rdb{rdb}.conv{conv}", conv < 5) for conv in range(1, 6)]
    names += [("conv_body", False), ("conv_up1", True), ("conv_up2", True), ("conv_hr", True), ("conv_last", False)]
    state_dict = {}
    for (name, leaky), conv in zip(names, weighted, strict=True):
        if conv.leaky != leaky:
            _bad_ncnn(path, f"the activation after {name} differs from RRDBNet's")
        state_dict[f"{name}.weight"] = conv.weight
        state_dict[f"{name}.bias"] = conv.bias
    return state_dict


def _bad_ncnn(path: Path, reason: str) -> NoReturn:
    raise ModelError(f"{path} cannot be used as an ncnn Real-ESRGAN model: {reason}")
