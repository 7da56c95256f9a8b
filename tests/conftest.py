import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vidscale.models.arch import SRVGGNetCompact

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


def media(name: str) -> Path:
    path = MEDIA / name
    if not path.is_file():
        pytest.skip(f"shared test media {path} is not present")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One IR cache for the whole run: each real model is converted once, not once per test."""
    return tmp_path_factory.mktemp("vidscale-cache")


def save_compact(path: Path, *, upscale: int = 4, last_bias: float = 0.0) -> Path:
    """A real SRVGGNetCompact whose residual branch is zero: its output is the nearest-neighbour
    upscale of its input (plus `last_bias`), which makes exact expectations possible."""
    torch.manual_seed(0)
    module = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=upscale)
    with torch.no_grad():
        last = module.body[-1]
        last.weight.zero_()
        last.bias.fill_(last_bias)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def identity_model(tmp_path_factory) -> Path:
    return save_compact(tmp_path_factory.mktemp("models") / "identity_x4.safetensors")


def nearest(frame: np.ndarray, scale: int) -> np.ndarray:
    return frame.repeat(scale, axis=0).repeat(scale, axis=1)


@pytest.fixture(scope="session")
def identity_x2(tmp_path_factory) -> Path:
    return save_compact(tmp_path_factory.mktemp("models") / "identity_x2.safetensors", upscale=2)


class RunsShellOnLoad:
    """A pickled object that runs a shell command when unpickled: the malicious-weights test."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))
