"""The OpenVINO engine: static shapes, in-graph pre/post-processing, caches, devices, callbacks."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
import torch

from conftest import nearest, save_compact
from vidscale import engine as engine_module
from vidscale.config import UpscaleSettings
from vidscale.engine import COMPILED_CACHE_SIZE, Engine, EngineSettings, core, read_ir, resolve_precision
from vidscale.errors import EngineError, UsageError
from vidscale.media import read_image
from vidscale.models import resolve
from vidscale.pipeline import FrameUpscaler

BUNDLED = ["RealESRGAN_x4plus_anime_6B", "realesr-animevideov3", "RealESRGAN_x4plus"]
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.fixture
def engine(identity_model, cache_dir):
    return Engine(resolve(identity_model), EngineSettings(precision="f32", cache_dir=cache_dir))


def test_u8_in_u8_out_is_exact_for_an_identity_model(engine):
    frame = np.random.default_rng(1).integers(0, 256, (1, 23, 37, 3), dtype=np.uint8)
    out = engine.upscaler((23, 37))(frame)
    assert out.dtype == np.uint8
    assert np.array_equal(out[0], nearest(frame[0], 4))


def test_u16_variant_keeps_all_16_bits(engine):
    frame = np.random.default_rng(2).integers(0, 65536, (1, 9, 11, 3), dtype=np.uint16)
    out = engine.upscaler((9, 11), sample="u16")(frame)
    assert out.dtype == np.uint16
    assert np.array_equal(out[0], nearest(frame[0], 4))


def test_auto_precision_keeps_16_bit_samples_at_f32(identity_model, cache_dir):
    # bf16 holds 8 significant bits; under "auto" it would quietly turn 16-bit input into 8-bit.
    engine = Engine(resolve(identity_model), EngineSettings(precision="auto", cache_dir=cache_dir))
    assert engine.precision_for("u16") == "f32"
    frame = np.random.default_rng(8).integers(0, 65536, (1, 6, 5, 3), dtype=np.uint16)
    assert np.array_equal(engine.upscaler((6, 5), sample="u16")(frame)[0], nearest(frame[0], 4))


def test_the_automatic_tile_fits_the_memory_of_the_precision_it_runs_at(identity_model, cache_dir):
    # bf16 feature maps take half the bytes, so a budget that holds a whole frame at bf16 makes f32
    # cut it; under "auto" a 16-bit frame runs at f32 and is cut.
    if "BF16" not in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("the CPU has no bf16")
    spec = resolve(identity_model).spec
    height, width = 40, 64
    budget = height * width * spec.activation_bytes_per_pixel(2)
    assert height * width * spec.activation_bytes_per_pixel(4) > budget
    upscaler = FrameUpscaler(UpscaleSettings(model=str(identity_model), precision="auto", cache_dir=cache_dir,
                                             memory_budget=budget, overlap=8))
    assert len(upscaler.plan(height, width, "u8")) == 1
    assert len(upscaler.plan(height, width, "u16")) == 2
    frame = np.random.default_rng(9).integers(0, 65536, (height, width, 3), dtype=np.uint16)
    assert np.array_equal(upscaler(frame), nearest(frame, 4))


@pytest.mark.parametrize("tile", [None, (16, 16)])
def test_one_frame_upscaler_called_from_several_threads_gives_each_its_own_frame(identity_model, cache_dir, tile):
    # They share one synchronous request (whole frames) or one queue (tiles): unserialised, calls
    # failed with "Infer Request is busy", or came back holding tiles of another thread's frame.
    upscaler = FrameUpscaler(UpscaleSettings(model=str(identity_model), precision="f32", cache_dir=cache_dir,
                                             tile=tile, overlap=4))
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (40, 56, 3), np.uint8) for _ in range(16)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(upscaler, frames))
    assert all(np.array_equal(out, nearest(frame, 4)) for frame, out in zip(frames, got))


def test_a_frame_upscaler_keeps_the_models_of_the_last_few_frame_sizes_only(identity_model, cache_dir):
    # A folder of pictures of many sizes: each compiled model and its requests hold memory.
    upscaler = FrameUpscaler(UpscaleSettings(model=str(identity_model), precision="f32", cache_dir=cache_dir))
    for width in range(24, 24 + 4 * (COMPILED_CACHE_SIZE + 3), 4):
        frame = np.full((20, width, 3), width, np.uint8)
        assert np.array_equal(upscaler(frame), nearest(frame, 4))
    assert len(upscaler._upscalers) == COMPILED_CACHE_SIZE


@pytest.mark.parametrize("bias", [0.2, -0.302])  # no x.5 ties: float32 rounding
def test_out_of_range_values_clamp_instead_of_wrapping(tmp_path, cache_dir, bias):
    # Regression: OpenVINO's f32->u8 convert truncates and wraps (300 becomes 44), so a model that
    # overshoots must be clamped inside the graph before the conversion.
    model = resolve(save_compact(tmp_path / "biased.safetensors", last_bias=bias))
    upscaler = Engine(model, EngineSettings(precision="f32", cache_dir=cache_dir)).upscaler((4, 256))
    frame = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :, None], (1, 4, 256, 3)).copy()
    expected = np.clip(np.floor(frame.astype(np.float64) + bias * 255 + 0.5), 0, 255).astype(np.uint8)
    assert np.array_equal(upscaler(frame)[0], nearest(expected[0], 4))


@pytest.mark.parametrize("outscale", [1, 2, 3])
def test_outscale_resizes_in_the_graph(engine, outscale):
    upscaler = engine.upscaler((10, 14), outscale=outscale)
    assert upscaler.output_shape == (1, 10 * outscale, 14 * outscale, 3)
    assert (upscaler(np.full((1, 10, 14, 3), 77, np.uint8)) == 77).all()


def test_outscale_downscale_is_antialiased(engine):
    # x1 from an x4 identity model: a one-pixel checkerboard must come back blurred towards grey.
    # Point sampling would return it unchanged (std 127.5), aliasing in real content.
    board = ((np.indices((10, 14)).sum(axis=0) % 2) * 255).astype(np.uint8)
    out = engine.upscaler((10, 14), outscale=1)(np.repeat(board[None, :, :, None], 3, axis=3))
    assert abs(float(out.mean()) - 127.5) < 2
    assert out.std() < 0.6 * board.std()


@pytest.mark.parametrize("outscale", [2, 1])
def test_integer_downscale_equals_the_interpolate_op(engine, outscale):
    # x2 and x1 from an x4 model run as a strided convolution, not OpenVINO's bicubic_pillow
    # Interpolate (seconds to compile); the picture must come out the same, edges included.
    picture = read_image(SAMPLES / "cartoon.png").rgb[None, 5:35, 9:51].copy()
    native = engine.upscaler((30, 42), sample="f32")(picture.astype(np.float32) / 255)
    source = ops.parameter(native.shape, np.float32)
    resize = ops.interpolate(source, np.array([30 * outscale, 42 * outscale], dtype=np.int64),
                             mode="bicubic_pillow", shape_calculation_mode="sizes", antialias=True,
                             axes=np.array([1, 2], dtype=np.int64))
    reference = core().compile_model(ov.Model([resize], [source]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected = np.floor(np.clip(reference(native)[0], 0, 1) * 255 + 0.5)
    got = engine.upscaler((30, 42), outscale=outscale)(picture)
    assert np.abs(got.astype(np.float64) - expected).max() <= 1


def test_scale_above_native_is_refused(engine):
    with pytest.raises(UsageError, match="scale 5 is not possible"):
        engine.upscaler((8, 8), outscale=5)


def test_a_cache_directory_that_cannot_be_made_is_a_usage_error(identity_model, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_bytes(b"a file")
    with pytest.raises(UsageError, match="cache directory .*cache cannot be made .a file is in the way.; pass --cache-dir"):
        Engine(resolve(identity_model), EngineSettings(cache_dir=blocker))


def test_a_negative_overlap_is_a_usage_error(identity_model, cache_dir):
    with pytest.raises(UsageError, match="overlap -3 is negative; give --overlap 0 or more"):
        FrameUpscaler(UpscaleSettings(model=str(identity_model), overlap=-3, cache_dir=cache_dir))


def test_a_tensor_of_another_shape_never_reaches_the_compiled_model(engine):
    upscaler = engine.upscaler((16, 16))
    for wrong in (np.zeros((1, 16, 15, 3), np.uint8), np.zeros((1, 15, 16, 3), np.uint8),
                  np.zeros((2, 16, 16, 3), np.uint8), np.zeros((1, 16, 16, 3), np.uint16)):
        with pytest.raises(EngineError, match="does not match the compiled shape"):
            upscaler(wrong)
        queue = upscaler.queue(lambda *_: None)
        with pytest.raises(EngineError, match="does not match the compiled shape"):
            queue.submit(wrong, None)


def test_each_shape_gets_its_own_compiled_model(engine):
    a = engine.upscaler((16, 16))
    b = engine.upscaler((16, 20))
    assert a is not b
    assert a.input_shape == (1, 16, 16, 3) and b.input_shape == (1, 16, 20, 3)
    assert engine.upscaler((16, 16)) is a


def test_results_arrive_with_their_userdata_in_any_order(engine):
    upscaler = engine.upscaler((8, 8))
    frames = np.random.default_rng(3).integers(0, 256, (12, 1, 8, 8, 3), dtype=np.uint8)
    results = {}
    queue = upscaler.queue(lambda index, out: results.__setitem__(index, out.copy()))
    for index, frame in enumerate(frames):
        queue.submit(frame, index)
    queue.wait_all()
    assert sorted(results) == list(range(12))
    for index, frame in enumerate(frames):
        assert np.array_equal(results[index][0], nearest(frame[0], 4))


def test_an_error_in_a_callback_is_parked_and_raised_in_the_owner(engine):
    # An exception escaping an OpenVINO callback would abort the whole process.
    upscaler = engine.upscaler((8, 8))

    def fail(index, _out):
        raise ValueError(f"sink failed on {index}")

    queue = upscaler.queue(fail)
    queue.submit(np.zeros((1, 8, 8, 3), np.uint8), 7)
    with pytest.raises(ValueError, match="sink failed on 7"):
        queue.wait_all()
    with pytest.raises(ValueError, match="sink failed on 7"):
        queue.submit(np.zeros((1, 8, 8, 3), np.uint8), 8)


def test_the_converted_ir_is_cached_and_reused(identity_model, tmp_path, monkeypatch):
    settings = EngineSettings(precision="f32", cache_dir=tmp_path)
    Engine(resolve(identity_model), settings).upscaler((8, 8))
    assert list((tmp_path / "ir").glob("*.xml")) and list((tmp_path / "openvino").iterdir())

    def no_conversion(*_):
        raise AssertionError("converted again despite a cached IR")

    monkeypatch.setattr(Engine, "_convert", no_conversion)
    frame = np.full((1, 8, 12, 3), 5, np.uint8)
    assert (Engine(resolve(identity_model), settings).upscaler((8, 12))(frame) == 5).all()


@pytest.mark.parametrize("damaged", [".xml", ".bin"])
def test_a_damaged_cached_ir_is_converted_again(identity_model, tmp_path, capfd, damaged):
    settings = EngineSettings(precision="f32", cache_dir=tmp_path)
    Engine(resolve(identity_model), settings).upscaler((8, 8))
    (xml,) = (tmp_path / "ir").glob("*.xml")
    path = xml.with_suffix(damaged)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])  # a disk fault, a copy cut short
    frame = np.full((1, 8, 12, 3), 5, np.uint8)
    assert (Engine(resolve(identity_model), settings).upscaler((8, 12))(frame) == 5).all()
    read_ir(xml)  # written again whole, for the next run
    # OpenVINO, given damaged XML, tries every frontend, and TensorFlow's logs to stderr.
    assert capfd.readouterr().err == ""


def test_a_conversion_removes_what_a_killed_conversion_left_in_the_cache(identity_model, tmp_path):
    settings = EngineSettings(precision="f32", cache_dir=tmp_path)
    Engine(resolve(identity_model), settings).upscaler((8, 8))
    (xml,) = (tmp_path / "ir").glob("*.xml")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    killed = [xml.with_name(f".{xml.stem}.{gone}.140213.{suffix}") for suffix in ("xml", "bin")]
    running = xml.with_name(f".{xml.stem}.{os.getppid()}.140213.bin")  # a live run's, however old
    just_now = xml.with_name(f".{xml.stem}.{gone}.140214.bin")  # may be another machine's, mid-write
    hour_ago = time.time() - 3600
    for leftover in (*killed, running, just_now):
        leftover.write_bytes(b"half a model")
    for leftover in (*killed, running):
        os.utime(leftover, (hour_ago, hour_ago))
    xml.unlink()  # the killed run's conversion: the next run converts again
    Engine(resolve(identity_model), settings).upscaler((8, 8))
    assert sorted(p.name for p in xml.parent.iterdir()) == sorted(
        [xml.name, xml.with_suffix(".bin").name, running.name, just_now.name])


def test_a_cached_ir_that_cannot_be_read_for_want_of_memory_is_not_taken_for_damaged(identity_model, tmp_path,
                                                                                     monkeypatch):
    settings = EngineSettings(precision="f32", cache_dir=tmp_path)
    Engine(resolve(identity_model), settings).upscaler((8, 8))

    def no_memory(_xml):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:84:\nLoading input model\n"
                           "Can not create file mapping for 5, err=Cannot allocate memory")

    def no_conversion(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(engine_module, "read_ir", no_memory)
    monkeypatch.setattr(Engine, "_convert", no_conversion)
    with pytest.raises(EngineError, match=r"ran out of memory; give the process more \(ulimit -v"):
        Engine(resolve(identity_model), settings).upscaler((8, 12))


@pytest.mark.parametrize("device", ["GPU", "NPU", "AUTO:GPU,CPU", "HETERO:NPU,CPU"])
def test_an_absent_device_is_an_error_not_a_fallback(identity_model, cache_dir, device):
    with pytest.raises(EngineError, match="is not available on this machine .*found: CPU"):
        Engine(resolve(identity_model), EngineSettings(device=device, cache_dir=cache_dir))


def test_precision_auto_and_unsupported_precisions():
    from vidscale.engine import core

    capabilities = core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert resolve_precision("CPU", "auto") == ("bf16" if "BF16" in capabilities else "f32")
    assert resolve_precision("CPU", "f32") == "f32"
    with pytest.raises(UsageError, match="unknown precision"):
        resolve_precision("CPU", "f8")
    if "FP16" not in capabilities:
        with pytest.raises(EngineError, match="f16 is not supported"):
            resolve_precision("CPU", "f16")


@pytest.mark.parametrize("name", BUNDLED)
def test_openvino_f32_equals_torch_f32_with_real_weights(name, cache_dir):
    model = resolve(name)
    x = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model.module()(x).permute(0, 2, 3, 1).numpy()
    upscaler = Engine(model, EngineSettings(precision="f32", cache_dir=cache_dir)).upscaler(
        (20, 28), sample="f32")
    got = upscaler(np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4
