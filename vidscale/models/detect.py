"""Decide what network a state dict belongs to: architecture from its keys, sizes from tensor shapes.

Weight files carry no trustworthy metadata, so the weights themselves are the description. After the
hyperparameters are read, the candidate network is built on the meta device (no memory, no init) and
every key and shape is compared, so a file that only resembles a supported network is refused here,
with a message, instead of failing later inside ``load_state_dict`` or OpenVINO.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import nn

from vidscale.errors import ModelError
from vidscale.models.arch import RRDB_UNSHUFFLE, RRDBNet, SRVGGNetCompact

ARCHITECTURES: dict[str, type[nn.Module]] = {"RRDBNet": RRDBNet, "SRVGGNetCompact": SRVGGNetCompact}

# conv_first's input channels / output channels -> scale; see RRDBNet's pixel unshuffle.
_RRDB_SCALE_BY_FOLD = {factor * factor: scale for scale, factor in RRDB_UNSHUFFLE.items()}


@dataclass(frozen=True)
class ModelSpec:
    """What to build: an architecture name, its constructor arguments, and the input constraints.

    ``size_multiple``: frame height and width fed to the network must be divisible by it (the tiler
    pads to it); 1 means any size works.
    """

    arch: str
    scale: int
    params: tuple[tuple[str, int | str], ...]
    size_multiple: int

    def activation_bytes_per_pixel(self, feature_bytes: int) -> int:
        """An estimate of the inference memory per input pixel, for choosing tile sizes, with feature
        maps of `feature_bytes` per value (4 at f32, 2 at bf16).

        Both networks peak at full output resolution. RRDBNet's conv_up2 and conv_hr outputs are
        num_feat channels there; the compact net's last convolution, its pixel shuffle and the
        nearest-upscaled input are three 3-channel buffers there, which OpenVINO keeps in f32 at
        any inference precision, as it does the final 3-channel output of both. The low-resolution
        body's buffers are live beside them. Measured peak RSS growth of one OpenVINO request on the
        CPU (one stream) stays 15-40% below this: anime_6B 8.0 KB/px at f32 and 4.0 KB/px at bf16
        (256x256 and 480x640; estimates 9.6 and 5.0 KB), animevideov3 0.62 KB/px at f32 and
        0.59-0.61 KB/px at bf16 (480x640 and 1080x1920; estimates 1.1 and 0.8 KB).
        """
        p = self.kwargs()
        feat = int(p["num_feat"])
        if self.arch == "RRDBNet":
            high_res = 2 * feat * feature_bytes + 2 * 3 * 4
            low_res = (2 * feat + 4 * int(p["num_grow_ch"])) * feature_bytes
        else:
            high_res = 3 * int(p["num_out_ch"]) * 4
            low_res = 2 * feat * feature_bytes
        return high_res * self.scale * self.scale + low_res

    def kwargs(self) -> dict[str, int | str]:
        return dict(self.params)

    def build(self) -> nn.Module:
        """A freshly initialised network in eval mode and float32, ready for ``load_state_dict``."""
        return ARCHITECTURES[self.arch](**self.kwargs()).float().eval()

    def describe(self) -> str:
        p = self.kwargs()
        if self.arch == "RRDBNet":
            body = f"{p['num_block']} blocks of {p['num_feat']} features (grow {p['num_grow_ch']})"
        else:
            body = f"{p['num_conv']} convs of {p['num_feat']} features ({p['act_type']})"
        text = f"{self.arch} x{self.scale}, {body}"
        if self.size_multiple > 1:
            text += f", frame sides padded to multiples of {self.size_multiple}"
        return text


def detect(state_dict: Mapping[str, torch.Tensor], name: str = "the state dict") -> ModelSpec:
    """The ModelSpec whose network loads ``state_dict`` with strict=True, or ModelError.

    ``name`` (a file path or model name) is only used to say which weights an error is about.
    Old ESRGAN key layouts must be renamed first with ``normalize_keys``.
    """
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            _unsupported(name, f"entry {key!r} is not a named tensor")
    if "conv_first.weight" in state_dict:
        spec = _detect_rrdb(state_dict, name)
    elif "body.0.weight" in state_dict:
        spec = _detect_compact(state_dict, name)
    else:
        sample = ", ".join(sorted(state_dict)[:4]) or "no keys at all"
        _unsupported(name, f"neither conv_first nor body.0 weights found (keys: {sample})")
    _check_matches(spec, state_dict, name)
    return spec


def normalize_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of the original ESRGAN code to BasicSR's, without DataParallel's "module."
    prefix; other dicts come back unchanged.

    Two older layouts exist: ``model.N...`` (a Sequential, as saved by the first ESRGAN release) and
    ``RRDB_trunk...`` (its later named version). Both hold the same x4 RRDBNet.
    """
    if state_dict and all(isinstance(key, str) and key.startswith("module.") for key in state_dict):
        # Saved from a model wrapped in torch's DataParallel.
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    for layout in _OLD_LAYOUTS:
        renamed = {}
        for key, value in state_dict.items():
            new_key = _rename(layout, key)
            if new_key is None:
                break
            renamed[new_key] = value
        else:
            # Two old keys landing on one new key means this was not that layout after all.
            if len(renamed) == len(state_dict):
                return renamed
    return dict(state_dict)


_OLD_LAYOUTS: tuple[tuple[tuple[re.Pattern[str], str], ...], ...] = tuple(
    tuple((re.compile(pattern + r"\.(?P<p>weight|bias)"), repl + r".\g<p>") for pattern, repl in layout)
    for layout in (
        (
            (r"model\.0", "conv_first"),
            (r"model\.1\.sub\.(?P<n>\d+)\.RDB(?P<r>[123])\.conv(?P<c>[1-5])\.0", r"body.\g<n>.rdb\g<r>.conv\g<c>"),
            (r"model\.1\.sub\.\d+", "conv_body"),
            (r"model\.3", "conv_up1"),
            (r"model\.6", "conv_up2"),
            (r"model\.8", "conv_hr"),
            (r"model\.10", "conv_last"),
        ),
        (
            (r"conv_first", "conv_first"),
            (r"RRDB_trunk\.(?P<n>\d+)\.RDB(?P<r>[123])\.conv(?P<c>[1-5])", r"body.\g<n>.rdb\g<r>.conv\g<c>"),
            (r"trunk_conv", "conv_body"),
            (r"upconv1", "conv_up1"),
            (r"upconv2", "conv_up2"),
            (r"HRconv", "conv_hr"),
            (r"conv_last", "conv_last"),
        ),
    )
)


def _rename(layout: tuple[tuple[re.Pattern[str], str], ...], key: str) -> str | None:
    for pattern, repl in layout:
        match = pattern.fullmatch(key)
        if match:
            return match.expand(repl)
    return None


def _detect_rrdb(sd: Mapping[str, torch.Tensor], name: str) -> ModelSpec:
    first = _conv_weight(sd, "conv_first.weight", name)
    last = _conv_weight(sd, "conv_last.weight", name)
    num_feat, in_ch = first.shape[0], first.shape[1]
    num_out_ch = last.shape[0]
    # Real-ESRGAN's RRDB models map N channels to N channels; that makes the unshuffle fold readable.
    fold, rest = divmod(in_ch, num_out_ch)
    if rest or fold not in _RRDB_SCALE_BY_FOLD:
        _unsupported(
            name,
            f"RRDBNet-like, but conv_first takes {in_ch} channels for {num_out_ch} output channels "
            "(expected 1x, 4x or 16x)",
        )
    scale = _RRDB_SCALE_BY_FOLD[fold]
    blocks = {int(m.group(1)) for k in sd if (m := re.fullmatch(r"body\.(\d+)\.rdb1\.conv1\.weight", k))}
    if not blocks:
        _unsupported(name, "RRDBNet-like, but it has no RRDB blocks (body.0.rdb1.conv1.weight)")
    grow = _conv_weight(sd, "body.0.rdb1.conv1.weight", name).shape[0]
    params = (
        ("num_in_ch", num_out_ch),
        ("num_out_ch", num_out_ch),
        ("scale", scale),
        ("num_feat", num_feat),
        ("num_block", max(blocks) + 1),
        ("num_grow_ch", grow),
    )
    return ModelSpec("RRDBNet", scale, params, size_multiple=RRDB_UNSHUFFLE[scale])


def _detect_compact(sd: Mapping[str, torch.Tensor], name: str) -> ModelSpec:
    indices = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"body\.(\d+)\.weight", k))})
    convs = [i for i in indices if sd[f"body.{i}.weight"].dim() == 4]
    if len(convs) < 2 or convs != list(range(0, 2 * len(convs), 2)):
        _unsupported(name, f"SRVGGNetCompact-like, but its convolutions sit at body.{convs}")
    if "body.1.weight" not in sd:
        # relu and leakyrelu leave no weights behind, so the file cannot say which one it was trained with.
        _unsupported(name, "SRVGGNetCompact without PReLU weights; its activation cannot be determined")
    first = _conv_weight(sd, "body.0.weight", name)
    last = _conv_weight(sd, f"body.{convs[-1]}.weight", name)
    num_feat, num_in_ch = first.shape[0], first.shape[1]
    # As in Real-ESRGAN, output channels equal input channels; the rest of the last conv is sub-pixels.
    upscale = math.isqrt(last.shape[0] // num_in_ch)
    if upscale < 1 or num_in_ch * upscale * upscale != last.shape[0]:
        _unsupported(
            name,
            f"SRVGGNetCompact-like, but its last conv has {last.shape[0]} outputs, "
            f"not {num_in_ch} channels times a square upscale",
        )
    params = (
        ("num_in_ch", num_in_ch),
        ("num_out_ch", num_in_ch),
        ("num_feat", num_feat),
        ("num_conv", len(convs) - 2),
        ("upscale", upscale),
        ("act_type", "prelu"),
    )
    return ModelSpec("SRVGGNetCompact", upscale, params, size_multiple=1)


def _conv_weight(sd: Mapping[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
    weight = sd.get(key)
    if weight is None or weight.dim() != 4 or 0 in weight.shape:
        _unsupported(name, f"{key} is missing or is not a 4-d convolution weight")
    return weight


def _check_matches(spec: ModelSpec, sd: Mapping[str, torch.Tensor], name: str) -> None:
    with torch.device("meta"):
        expected = ARCHITECTURES[spec.arch](**spec.kwargs()).state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} tensors of the wrong shape, e.g. {k} is {tuple(sd[k].shape)}, "
            f"expected {tuple(expected[k].shape)}"
        )
    if problems:
        _unsupported(name, f"looks like {spec.arch} but does not fit it: " + "; ".join(problems))
    not_float = [k for k in expected if not sd[k].is_floating_point()]
    if not_float:
        _unsupported(name, f"{_few(not_float)} hold {sd[not_float[0]].dtype} values, not floating point weights")
    if spec.kwargs()["num_in_ch"] != 3:
        _unsupported(name, f"it takes {spec.kwargs()['num_in_ch']}-channel pictures; vidscale runs RGB (3-channel) "
                           f"models")
    # A single NaN or infinity (a diverged training run, a damaged file) turns every pixel black.
    not_finite = [k for k in expected if not bool(torch.isfinite(sd[k]).all())]
    if not_finite:
        raise ModelError(f"{name} holds NaN or infinite weights in {_few(not_finite)}: the file is damaged, or "
                         f"its training diverged; use another copy or checkpoint")


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return f"{shown} and {len(keys) - 3} more" if len(keys) > 3 else shown


def _unsupported(name: str, reason: str) -> NoReturn:
    raise ModelError(
        f"{name} is not a supported architecture (RRDBNet, SRVGGNetCompact): {reason}; "
        "use a Real-ESRGAN .pth/.safetensors or a catalog name (vidscale models)"
    )
