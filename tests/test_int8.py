"""INT8 with NNCF: quantization of a real model, the quality gate, and the quantized-IR cache."""

import json
import shutil

import av
import numpy as np
import pytest

from conftest import media
from vidscale import quantize
from vidscale.cli import main
from vidscale.engine import Engine, EngineSettings, read_ir
from vidscale.errors import EngineError, UsageError
from vidscale.models import resolve

nncf = pytest.importorskip("nncf")

MODEL = "realesr-animevideov3"


def demo_frames(every: int, offset: int = 0, size: tuple[int, int] = (240, 320)) -> list[np.ndarray]:
    """Frames of the One Piece demo, downscaled to keep quantization quick on a shared machine."""
    with av.open(str(media("realesrgan_onepiece_demo.mp4"))) as container:
        return [frame.reformat(width=size[1], height=size[0]).to_ndarray(format="rgb24")
                for index, frame in enumerate(container.decode(video=0)) if index % every == offset]


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("int8-cache")


@pytest.fixture(scope="module")
def calibration():
    return demo_frames(every=40)


@pytest.fixture(scope="module")
def int8_engine(int8_cache, calibration):
    return Engine(resolve(MODEL), EngineSettings(precision="int8", cache_dir=int8_cache), calibration)


def psnr_of(reference: np.ndarray, test: np.ndarray) -> float:
    return quantize.psnr(reference, test)


def test_int8_of_a_real_model_passes_the_gate_and_stays_close_to_f32(int8_engine, int8_cache):
    (record,) = (int8_cache / "int8").glob(f"{MODEL}-*.json")
    (measured,) = json.loads(record.read_text())["psnr"].values()
    assert measured >= quantize.INT8_MIN_PSNR
    ir = int8_engine._int8_ir
    assert any(op.get_type_name() == "FakeQuantize" for op in ir.get_ordered_ops())
    # A frame the calibration never saw, through both models.
    frame = demo_frames(every=40, offset=17)[0][:64, :96][None].copy()
    f32 = Engine(resolve(MODEL), EngineSettings(precision="f32", cache_dir=int8_cache)).upscaler((64, 96))
    got, expected = int8_engine.upscaler((64, 96))(frame), f32(frame)
    assert got.shape == expected.shape == (1, 256, 384, 3)
    assert not np.array_equal(got, expected)  # really quantized, not the float model
    assert psnr_of(expected, got) >= 36.0


def test_the_quantized_ir_is_cached_and_reused(int8_engine, int8_cache, calibration, monkeypatch):
    def no_quantization(*_args, **_kwargs):
        raise AssertionError("quantized again despite a cached INT8 IR")

    monkeypatch.setattr(quantize, "quantize", no_quantization)
    monkeypatch.setattr(quantize, "gate_psnr", no_quantization)
    again = Engine(resolve(MODEL), EngineSettings(precision="int8", cache_dir=int8_cache), calibration)
    frame = np.full((1, 16, 16, 3), 128, np.uint8)
    assert np.array_equal(again.upscaler((16, 16))(frame), int8_engine.upscaler((16, 16))(frame))


@pytest.mark.parametrize("damaged", [".xml", ".bin", ".json"])
def test_a_damaged_cached_int8_model_is_quantized_again(int8_engine, int8_cache, calibration, tmp_path,
                                                       monkeypatch, damaged):
    for folder in ("ir", "int8"):
        shutil.copytree(int8_cache / folder, tmp_path / folder)
    (xml,) = (tmp_path / "int8").glob(f"{MODEL}-*.xml")
    path = xml.with_suffix(damaged)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])  # a disk fault, a copy cut short
    made = []

    def quantized_again(_nncf, float_ir, _crops, arch):
        made.append(arch)
        return float_ir  # what the cache holds is under test here, not quantization

    monkeypatch.setattr(quantize, "quantize", quantized_again)
    Engine(resolve(MODEL), EngineSettings(precision="int8", cache_dir=tmp_path), calibration)
    assert made == ["SRVGGNetCompact"]
    read_ir(xml)  # written again whole, for the next run
    assert json.loads(xml.with_suffix(".json").read_text())["psnr"]


def test_the_cache_key_follows_the_calibration_frames_and_the_weights(calibration, tmp_path):
    model = resolve(MODEL)
    crops = quantize.calibration_crops(calibration, model.spec.size_multiple)
    other = quantize.calibration_crops(calibration[1:], model.spec.size_multiple)
    key = quantize.int8_path(model, crops, tmp_path, nncf.__version__)
    assert key == quantize.int8_path(model, crops.copy(), tmp_path, nncf.__version__)
    assert key != quantize.int8_path(model, other, tmp_path, nncf.__version__)
    assert key != quantize.int8_path(model, crops, tmp_path, "0.0.0")
    assert key != quantize.int8_path(resolve("RealESRGAN_x4plus_anime_6B"), crops, tmp_path, nncf.__version__)


def test_the_gate_refuses_a_deliberately_bad_calibration_and_keeps_refusing(int8_cache, calibration,
                                                                            monkeypatch):
    # Calibrated on dark, flat frames, the activation ranges cannot hold real content; the gate,
    # measured on the frames to be upscaled, must catch it.
    dark = [np.full((96, 128, 3), 12, np.uint8), np.full((96, 128, 3), 30, np.uint8)]
    settings = EngineSettings(precision="int8", cache_dir=int8_cache)
    message = (r"INT8 quality gate failed: \d+\.\d dB < 40 dB against f32 on 24 crops of the frames to "
               r"upscale; use --precision bf16")
    with pytest.raises(EngineError, match=message):
        Engine(resolve(MODEL), settings, dark, evaluation=calibration)

    def no_work(*_):
        raise AssertionError("quantized or measured again despite the cached result")

    monkeypatch.setattr(quantize, "quantize", no_work)
    monkeypatch.setattr(quantize, "gate_psnr", no_work)
    with pytest.raises(EngineError, match=message):
        Engine(resolve(MODEL), settings, dark, evaluation=calibration)


def test_calibration_frames_must_be_rgb_samples():
    with pytest.raises(UsageError, match="needs at least one frame"):
        quantize.calibration_crops([], 1)
    with pytest.raises(UsageError, match=r"must be \(H, W, 3\) uint8 RGB"):
        quantize.calibration_crops([np.zeros((8, 8), np.uint8)], 1)


def test_without_nncf_int8_fails_with_one_line(identity_model, cache_dir, monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf now raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'vidscale\[int8\]'"):
        Engine(resolve(identity_model), EngineSettings(precision="int8", cache_dir=cache_dir))
    picture = tmp_path / "in.png"
    av_frame = av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), np.uint8), format="rgb24")
    with av.open(str(picture), "w", format="image2") as out:
        stream = out.add_stream("png", width=8, height=8, pix_fmt="rgb24")
        out.mux(stream.encode(av_frame))
        out.mux(stream.encode(None))
    status = main(["--cache-dir", str(cache_dir), "image", str(picture), "-o", str(tmp_path / "out.png"),
                   "-m", str(identity_model), "--precision", "int8"])
    err = capsys.readouterr().err.strip()
    assert status == UsageError.exit_status
    assert err.count("\n") == 0 and "pip install 'vidscale[int8]'" in err
