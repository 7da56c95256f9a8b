"""`vidscale image` and `vidscale models` as a person runs them: files in, files out, exit statuses."""

import subprocess
import sys

import av
import numpy as np
import pytest

from clips import make_clip
from conftest import nearest, save_compact
from vidscale.cli import main
from vidscale.media import Image, read_image, write_image
from vidscale.pipeline import FrameUpscaler


@pytest.fixture
def run(cache_dir, capsys):
    def run(*args: str) -> tuple[int, str]:
        status = main(["--cache-dir", str(cache_dir), *args])
        return status, capsys.readouterr().err

    return run


def test_rgba_keeps_its_alpha(tmp_path, run, identity_model):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (13, 17, 4), dtype=np.uint8)
    write_image(Image(pixels), tmp_path / "in.png")
    status, _ = run("image", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "-m", str(identity_model))
    assert status == 0
    out = read_image(tmp_path / "out.png").pixels
    assert out.shape == (52, 68, 4)
    assert np.array_equal(out, nearest(pixels, 4))


def test_a_uniform_alpha_stays_uniform(tmp_path, run):
    # The model darkens by 5 levels: an opaque alpha sent through it would come out 250.
    model = save_compact(tmp_path / "darker.safetensors", last_bias=-5 / 255)
    pixels = np.random.default_rng(5).integers(20, 256, (13, 17, 4), dtype=np.uint8)
    pixels[:, :, 3] = 255
    write_image(Image(pixels), tmp_path / "in.png")
    assert run("image", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "-m", str(model))[0] == 0
    out = read_image(tmp_path / "out.png").pixels
    assert (out[:, :, 3] == 255).all()
    assert np.abs(out[:, :, :3].astype(int) - nearest(pixels[:, :, :3], 4) + 5).max() <= 1


def test_a_cmyk_jpeg_is_a_picture_without_alpha(tmp_path, run, identity_model):
    pil = pytest.importorskip("PIL.Image")  # PyAV cannot write CMYK JPEG
    rgb = np.random.default_rng(8).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pil.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert not read_image(tmp_path / "cmyk.jpg").has_alpha
    assert run("image", str(tmp_path / "cmyk.jpg"), "-o", str(tmp_path / "out.jpg"), "-m", str(identity_model))[0] == 0


def test_pictures_other_than_png_and_jpeg_are_read(tmp_path, run, identity_model):
    pixels = np.random.default_rng(9).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    with av.open(str(tmp_path / "in.bmp"), "w", format="image2") as out:
        stream = out.add_stream("bmp")
        stream.width, stream.height, stream.pix_fmt = 8, 6, "bgr24"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="bgr24")))
    assert run("image", str(tmp_path / "in.bmp"), "-o", str(tmp_path / "out.png"), "-m", str(identity_model))[0] == 0
    assert np.array_equal(read_image(tmp_path / "out.png").pixels, nearest(pixels, 4))


def test_a_16_bit_png_keeps_16_bits(tmp_path, run, identity_model):
    pixels = np.random.default_rng(6).integers(0, 65536, (9, 10, 3), dtype=np.uint16)
    write_image(Image(pixels), tmp_path / "deep.png")
    assert run("image", str(tmp_path / "deep.png"), "-o", str(tmp_path / "out.png"), "-m", str(identity_model),
               "-s", "2")[0] == 0
    out = read_image(tmp_path / "out.png").pixels
    assert out.dtype == np.uint16 and out.shape == (18, 20, 3)
    # Not rounded to 8 bits: the low byte survives.
    assert len(np.unique(out & 0xFF)) > 200


@pytest.mark.parametrize("dtype, alpha", [(np.uint8, False), (np.uint16, False), (np.uint8, True),
                                          (np.uint16, True)])
def test_grey_pictures_stay_grey(tmp_path, run, identity_model, dtype, alpha):
    rng = np.random.default_rng(10)
    grey = rng.integers(0, np.iinfo(dtype).max + 1, (6, 9, 1), dtype=dtype)
    pixels = np.concatenate([grey] * 3 + ([rng.integers(0, 256, (6, 9, 1)).astype(dtype)] if alpha else []),
                            axis=2)
    write_image(Image(pixels, grey=True), tmp_path / "grey.png")
    assert read_image(tmp_path / "grey.png").grey
    assert run("image", str(tmp_path / "grey.png"), "-o", str(tmp_path / "out.png"), "-m", str(identity_model))[0] == 0
    out = read_image(tmp_path / "out.png")
    assert out.grey and out.pixels.dtype == dtype and out.has_alpha == alpha
    assert np.array_equal(out.pixels, nearest(pixels, 4))


def with_exif_orientation(jpeg: bytes, orientation: int, order: str = "little") -> bytes:
    """`jpeg` with an APP1 EXIF segment whose only tag is the orientation."""
    def number(value, size):
        return value.to_bytes(size, order)

    tiff = ((b"II" if order == "little" else b"MM") + number(42, 2) + number(8, 4) + number(1, 2)
            + number(0x0112, 2) + number(3, 2) + number(1, 4) + number(orientation, 2) + b"\x00\x00" + number(0, 4))
    exif = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + jpeg[2:]


@pytest.mark.parametrize("orientation, shown", [
    (1, lambda p: p), (3, lambda p: np.rot90(p, 2)), (6, lambda p: np.rot90(p, -1)), (8, lambda p: np.rot90(p, 1)),
    (2, lambda p: p[:, ::-1]), (5, lambda p: p.transpose(1, 0, 2))])
@pytest.mark.parametrize("order", ["little", "big"])
def test_a_jpeg_is_upscaled_as_its_exif_orientation_shows_it(tmp_path, run, identity_model, orientation, shown, order):
    # A phone's portrait photo is stored on its side: it came out sideways.
    stored = np.random.default_rng(5).integers(0, 256, (12, 16, 3), np.uint8)
    write_image(Image(stored), tmp_path / "plain.jpg")
    decoded = read_image(tmp_path / "plain.jpg").pixels
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(with_exif_orientation((tmp_path / "plain.jpg").read_bytes(), orientation, order))
    assert np.array_equal(read_image(photo).pixels, shown(decoded))
    if orientation == 6:
        assert run("image", str(photo), "-o", str(tmp_path / "out.png"), "-m", str(identity_model))[0] == 0
        assert read_image(tmp_path / "out.png").pixels.shape == (64, 48, 3)


def test_jpeg_output_and_its_limits(tmp_path, run, identity_model, monkeypatch):
    pixels = np.full((8, 8, 3), 128, np.uint8)
    write_image(Image(pixels), tmp_path / "grey.png")
    assert run("image", str(tmp_path / "grey.png"), "-o", str(tmp_path / "out.jpg"), "-m", str(identity_model))[0] == 0
    assert np.abs(read_image(tmp_path / "out.jpg").pixels.astype(int) - 128).max() <= 2
    write_image(Image(np.full((8, 8, 4), 128, np.uint8)), tmp_path / "alpha.png")
    # Refused before the upscale, which for a large picture takes minutes.
    monkeypatch.setattr(FrameUpscaler, "__call__", lambda *_: pytest.fail("upscaled before the refusal"))
    for output, message in (("alpha.jpg", "JPEG has no alpha channel; write a .png instead"),
                            ("alpha.webp", "unknown picture type '.webp'; use one of .png")):
        status, err = run("image", str(tmp_path / "alpha.png"), "-o", str(tmp_path / output), "-m",
                          str(identity_model))
        assert status == 2 and message in err
        assert not (tmp_path / output).exists()


@pytest.mark.parametrize("case, status, message", [
    ("missing", 5, "does not exist"),
    ("directory", 5, "is a directory"),
    ("empty", 5, "is empty"),
    ("garbage", 5, "is not a readable image"),
    ("video", 5, "is h264 in matroska, not a picture; give a PNG or JPEG image (vidscale upscale takes video)"),
    # FFmpeg fills in the missing part of a cut-short JPEG without an error: it was upscaled, exit 0.
    ("cut JPEG", 5, "cut.jpg is cut short (its JPEG end marker is missing); download or copy it again"),
    ("exists", 2, "already exists; pass --overwrite"),
    ("same", 2, "is the input file"),
    ("model", 3, "unknown model 'no-such-model'; known models: RealESRGAN_x4plus_anime_6B"),
    ("device", 4, "device 'GPU' is not available"),
    ("scale", 2, "scale 8 is not possible"),
])
def test_bad_requests_fail_with_one_clear_line_and_leave_nothing(tmp_path, run, identity_model, case, status,
                                                                message):
    good = tmp_path / "good.png"
    write_image(Image(np.zeros((4, 4, 3), np.uint8)), good)
    source, output, extra = good, tmp_path / "out.png", ["-m", str(identity_model)]
    if case == "missing":
        source = tmp_path / "nope.png"
    elif case == "directory":
        source = tmp_path
    elif case == "empty":
        source = tmp_path / "empty.png"
        source.write_bytes(b"")
    elif case == "garbage":
        source = tmp_path / "garbage.png"
        source.write_bytes(np.random.default_rng(7).bytes(5000))
    elif case == "video":
        source = make_clip(tmp_path / "clip.mkv", frames=2)
    elif case == "cut JPEG":
        pixels = np.random.default_rng(3).integers(0, 256, (48, 64, 3), np.uint8)
        write_image(Image(pixels), tmp_path / "whole.jpg")
        assert read_image(tmp_path / "whole.jpg").pixels.shape == (48, 64, 3)
        source = tmp_path / "cut.jpg"
        source.write_bytes((tmp_path / "whole.jpg").read_bytes()[:-100])
    elif case == "exists":
        output.write_bytes(b"keep me")
    elif case == "same":
        output = good
    elif case == "model":
        extra = ["-m", "no-such-model"]
    elif case == "device":
        extra += ["--device", "GPU"]
    elif case == "scale":
        extra += ["-s", "8"]
    before = source.read_bytes() if source.is_file() else None
    got, err = run("image", str(source), "-o", str(output), *extra)
    assert got == status
    assert message in err and len(err.strip().splitlines()) == 1
    if before is not None:
        assert source.read_bytes() == before
    if case == "exists":
        assert output.read_bytes() == b"keep me"
    elif case != "same":
        assert not output.exists()
    assert not list(tmp_path.glob(".*partial"))


def test_models_lists_the_catalog_through_python_m(cache_dir):
    done = subprocess.run([sys.executable, "-m", "vidscale", "--cache-dir", str(cache_dir), "models"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["name", "scale", "architecture", "parameters", "source", "converted"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"RealESRGAN_x4plus_anime_6B", "realesr-animevideov3", "RealESRGAN_x4plus"}
    assert rows["RealESRGAN_x4plus_anime_6B"][1:4] == ["x4", "RRDBNet", "4,467,779"]
    assert rows["realesr-animevideov3"][1:4] == ["x4", "SRVGGNetCompact", "621,424"]
