"""PyAV side of vidscale: reading and writing pictures and videos. Never imports openvino."""

from __future__ import annotations

import errno
import glob
import heapq
import itertools
import os
import re
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, Interpolation, VideoReformatter

from .errors import MediaError, OutputClosedError, UsageError
from .files import alive

# PyAV's logging bridge can deadlock when FFmpeg logs from worker threads; errors reach us as
# exceptions anyway.
av.logging.set_level(None)
# SVT-AV1 writes its configuration banner (about 20 lines) to stderr at every encoder start, past
# FFmpeg's log level; an unattended job's log should show only its errors. A user's own SVT_LOG wins.
os.environ.setdefault("SVT_LOG", "1")

IMAGE_CODECS = {".png": "png", ".jpg": "mjpeg", ".jpeg": "mjpeg"}


@dataclass(frozen=True)
class Image:
    """RGB(A) samples, HxWx3 or HxWx4, uint8 or uint16 (16-bit sources keep their depth).

    `grey`: the source had no colour; the model still sees RGB, and a PNG is written back grey.
    """

    pixels: np.ndarray
    grey: bool = False

    @property
    def has_alpha(self) -> bool:
        return self.pixels.shape[2] == 4

    @property
    def rgb(self) -> np.ndarray:
        return self.pixels[:, :, :3]

    @property
    def alpha(self) -> np.ndarray | None:
        return self.pixels[:, :, 3] if self.has_alpha else None


def read_image(path: Path) -> Image:
    path = Path(path)
    check_readable(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} holds no picture; give a PNG or JPEG image")
            codec = container.streams.video[0].codec_context.name
            # Pictures come through FFmpeg's image demuxers (png_pipe, webp_pipe, image2, ...).
            if not (container.format.name.endswith("_pipe") or container.format.name in ("image2", "gif")):
                raise MediaError(f"{path} is {codec} in {container.format.name.split(',')[0]}, not a picture; "
                                 f"give a PNG or JPEG image (vidscale upscale takes video)")
            frame = next(container.decode(video=0), None)
    except av.FFmpegError as exc:
        raise MediaError(f"{path} is not a readable image ({exc.strerror or exc}); "
                         f"give a PNG or JPEG file") from exc
    if frame is None:
        raise MediaError(f"{path} holds no decodable picture; give a PNG or JPEG image")
    orientation = 1
    if codec == "mjpeg":
        segments = list(_jpeg_segments(path.read_bytes()))
        if segments[-1:] != [(0xD9, b"")]:
            # FFmpeg fills in what is missing of a cut-short JPEG, without an error.
            raise MediaError(f"{path} is cut short (its JPEG end marker is missing); download or copy it again")
        # A camera's picture is stored as the sensor saw it, and shown turned as EXIF says.
        orientation = _exif_orientation(segments)
    fmt = frame.format
    deep = any(c.bits > 8 for c in fmt.components)
    alpha = fmt.name == "pal8" or any(c.is_alpha for c in fmt.components)
    target = ("rgba64le" if deep else "rgba") if alpha else ("rgb48le" if deep else "rgb24")
    pixels = frame.to_ndarray(format=target)
    if alpha and (fmt.name == "pal8" or codec == "mjpeg") and (pixels[:, :, 3] == 255).all():
        # A palette without transparency is plain RGB, and so is a JPEG: FFmpeg decodes an Adobe
        # CMYK one to RGB with an opaque alpha plane.
        pixels = pixels[:, :, :3]
    grey = fmt.name != "pal8" and sum(not c.is_alpha for c in fmt.components) == 1
    return Image(np.ascontiguousarray(_upright(pixels, orientation)), grey=grey)


def _jpeg_segments(data: bytes):
    """(marker, payload) of a JPEG's segments in order, walked by their lengths (an EXIF
    thumbnail's own markers sit inside its APP1 payload) and over each scan's coded data; the
    last is (0xD9, b"") when the picture runs to its end marker."""
    at = 2  # after the start-of-image marker
    while at + 1 < len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xD9:
            yield marker, b""
            return
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        yield marker, data[at + 4 : at + 2 + length]
        at += 2 + length
        if marker == 0xDA:  # a scan: entropy-coded data up to the next marker
            while True:
                at = data.find(b"\xff", at)
                if at < 0 or at + 1 >= len(data):
                    return
                # 0xFF 0x00 is a coded 0xFF; RSTn markers sit inside the scan.
                if data[at + 1] == 0x00 or 0xD0 <= data[at + 1] <= 0xD7:
                    at += 2
                elif data[at + 1] == 0xFF:
                    at += 1
                else:
                    break


def _exif_orientation(segments) -> int:
    """The EXIF orientation (1-8, 1 upright) of a JPEG's segments; 1 without one."""
    for marker, payload in segments:
        if marker != 0xE1 or not payload.startswith(b"Exif\x00\x00"):
            continue
        tiff = payload[6:]
        order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
        if order is None or len(tiff) < 8:
            return 1
        ifd = int.from_bytes(tiff[4:8], order)
        count = int.from_bytes(tiff[ifd : ifd + 2], order)
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
                value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
                return value if 1 <= value <= 8 else 1
        return 1
    return 1


def _upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """`pixels` as the EXIF orientation says they are shown."""
    if orientation in (5, 6, 7, 8):  # stored on their side: transposed first
        pixels = pixels.transpose(1, 0, 2)
    if orientation in (2, 3, 6, 7):
        pixels = pixels[:, ::-1]
    if orientation in (3, 4, 7, 8):
        pixels = pixels[::-1]
    return pixels


def image_codec(path: Path, image: Image) -> str:
    """The codec that writes `image` (its upscaled self has the same channels) to `path`, or
    UsageError: asked before the upscale, which may take minutes, as well as at the write."""
    codec = IMAGE_CODECS.get(Path(path).suffix.lower())
    if codec is None:
        raise UsageError(f"cannot write {path}: unknown picture type {Path(path).suffix!r}; "
                         f"use one of {', '.join(IMAGE_CODECS)}")
    if codec == "mjpeg" and image.has_alpha:
        raise UsageError(f"cannot write {path}: JPEG has no alpha channel; write a .png instead")
    return codec


def write_image(image: Image, path: Path) -> None:
    """Write PNG (8 or 16 bit, with alpha) or JPEG; a failed write leaves nothing at `path`."""
    path = Path(path)
    codec = image_codec(path, image)
    pixels = image.pixels
    deep = pixels.dtype == np.uint16
    if codec == "mjpeg":
        if deep:
            pixels = (pixels.astype(np.uint32) * 255 + 32767) // 65535
            pixels = pixels.astype(np.uint8)
        source_format, pix_fmt = "rgb24", "yuvj444p"
    elif image.grey:
        source_format = pix_fmt = ("ya16be" if deep else "ya8") if image.has_alpha else (
            "gray16be" if deep else "gray")
    elif image.has_alpha:
        source_format, pix_fmt = ("rgba64le", "rgba64be") if deep else ("rgba", "rgba")
    else:
        source_format, pix_fmt = ("rgb48le", "rgb48be") if deep else ("rgb24", "rgb24")
    if codec == "png" and image.grey:
        frame = _grey_frame(pixels, pix_fmt)
    else:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format=source_format)
    with atomic_output(path) as tmp:
        with av.open(str(tmp), "w", format="image2", options={"update": "1"}) as container:
            stream = container.add_stream(codec)
            stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, pix_fmt
            if codec == "mjpeg":
                stream.codec_context.qmin = stream.codec_context.qmax = 1
            for packet in stream.encode(frame.reformat(format=pix_fmt)):
                container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def _grey_frame(pixels: np.ndarray, pix_fmt: str) -> av.VideoFrame:
    """A grey(+alpha) frame of `pix_fmt` from RGB(A) samples, with Rec.601 luma weights as
    Real-ESRGAN uses when it turns its output back to grey."""
    luma = pixels[:, :, :3] @ np.array([0.299, 0.587, 0.114])
    samples = np.rint(luma)[:, :, None]
    if pixels.shape[2] == 4:
        samples = np.concatenate([samples, pixels[:, :, 3:]], axis=2)
    height, width, channels = samples.shape
    # PyAV cannot build ya8/ya16 frames from arrays, so the (big-endian, packed) samples are
    # written into the frame's plane directly.
    dtype = np.dtype(">u2") if pixels.dtype == np.uint16 else np.dtype(np.uint8)
    frame = av.VideoFrame(width, height, pix_fmt)
    plane = frame.planes[0]
    rows = np.frombuffer(plane, dtype).reshape(height, plane.line_size // dtype.itemsize)
    rows[:, : width * channels] = samples.reshape(height, width * channels)
    return frame


def check_readable(path: Path) -> None:
    if not path.exists():
        raise MediaError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise MediaError(f"{path} is a directory; give a file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path} is empty; give a complete file")


def check_output(path: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse outputs that would clobber an input or an existing file without --overwrite."""
    _check_name_length(path)
    try:
        _check_output(path, inputs, overwrite)
    except OSError as exc:  # a path too long for the system, a folder that cannot be searched
        raise UsageError(f"output {path} cannot be used ({exc.strerror}); "
                         f"choose another output path") from None


# The longest name vidscale puts beside an output: a batch record's temporary file, with a pid of
# up to 7 digits (Linux's largest pid_max).
_LONGEST_BESIDE = ".{name}.vidscale.json.1234567.partial"


def _check_name_length(path: Path) -> None:
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except OSError:
        name_max = 255
    extra = len(_LONGEST_BESIDE.format(name=""))
    size = len(os.fsencode(path.name))
    if size + extra > name_max:
        raise UsageError(f"output file name {path.name[:40]}... is {size} bytes; at most {name_max - extra} "
                         f"fit beside the temporary and record files vidscale writes next to it; choose a "
                         f"shorter name")


def _check_output(path: Path, inputs: list[Path], overwrite: bool) -> None:
    for source in inputs:
        if source.exists() and path.exists() and os.path.samefile(source, path):
            raise UsageError(f"output {path} is the input file; choose another output path")
    # The output is written beside its path and renamed over it: a link would be replaced by a
    # file, and so would a device or pipe (as root, `-o /dev/null --overwrite` would replace the
    # system's /dev/null).
    if path.is_symlink():
        raise UsageError(f"output {path} is a symbolic link; give the path it points to, "
                         f"{path.resolve()}, instead")
    if path.exists() and not path.is_file():
        raise UsageError(f"output {path} exists and is not a regular file (a directory, device or "
                         f"pipe); give a file path, or - to write to stdout")
    if path.exists() and not overwrite:
        raise UsageError(f"output {path} already exists; pass --overwrite to replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise MediaError(f"output directory {path.parent} is a file, not a directory; "
                         f"choose another output path")
    if not path.parent.is_dir():
        raise MediaError(f"output directory {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise MediaError(f"output directory {path.parent} is not writable; choose another output")


@contextmanager
def atomic_output(path: Path, before_rename: Callable[[Path], None] | None = None, replace: bool = True):
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds
    (and `before_rename`, given the finished temporary file, then does too). Without `replace`, a
    file that appeared at `path` meanwhile (another run's) is kept and this one fails.

    Temporary files of `path` whose process no longer runs on this machine (killed with SIGKILL,
    or by a power cut) are removed first: an episode's is gigabytes. A live writer of the same
    path elsewhere would collide with this one anyway."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = stale.name[len(path.name) + 2 : -len(".partial")]
        if pid.isdigit() and not alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        if before_rename is not None:
            before_rename(tmp)
        # On disk before the name points at it, and the new name on disk before we say done: after
        # a power cut a complete-looking output (or resume segment) could otherwise hold garbage.
        _sync(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            _rename_if_absent(tmp, path)
        _sync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _rename_if_absent(tmp: Path, path: Path) -> None:
    # A hard link is made only where no file is; the check and the rename are then one step.
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: a narrow window is left
        if not path.exists():
            os.replace(tmp, path)
            return
    else:
        tmp.unlink()
        return
    raise UsageError(f"{path} appeared while this run worked (another run wrote it); it is kept, "
                     f"pass --overwrite to replace it")


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Video: open, decode to RGB, encode from RGB, copy every other stream.
# ---------------------------------------------------------------------------------------------

# Colour properties use FFmpeg's own names (what ffprobe prints), indexed by the AVCOL_* values
# that PyAV exposes as plain ints on codec contexts and frames.
COLORSPACES = {0: "gbr", 1: "bt709", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m",
               8: "ycgco", 9: "bt2020nc", 10: "bt2020c", 11: "smpte2085",
               12: "chroma-derived-nc", 13: "chroma-derived-c", 14: "ictcp"}
COLOR_RANGES = {1: "tv", 2: "pc"}
COLOR_PRIMARIES = {1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m",
                   8: "film", 9: "bt2020", 10: "smpte428", 11: "smpte431", 12: "smpte432",
                   22: "ebu3213"}
COLOR_TRCS = {1: "bt709", 4: "gamma22", 5: "gamma28", 6: "smpte170m", 7: "smpte240m",
              8: "linear", 9: "log100", 10: "log316", 11: "iec61966-2-4", 12: "bt1361e",
              13: "iec61966-2-1", 14: "bt2020-10", 15: "bt2020-12", 16: "smpte2084",
              17: "smpte428", 18: "arib-std-b67"}

# The YUV<->RGB matrices swscale implements. BT.2020 constant luminance (bt2020c) and the
# others are not among them, so such sources are refused rather than converted wrongly.
_SWS_MATRIX = {"bt709": Colorspace.ITU709, "fcc": Colorspace.FCC, "bt470bg": Colorspace.ITU601,
               "smpte170m": Colorspace.SMPTE170M, "smpte240m": Colorspace.SMPTE240M,
               "bt2020nc": Colorspace.BT2020}
_SWS_RANGE = {"tv": ColorRange.MPEG, "pc": ColorRange.JPEG}

# Tags an output gets when the source did not say which primaries and transfer it uses: the
# ones that go with the output's matrix (the matrix alone is not enough for a player to agree).
_PRIMARIES_TRC_FOR_MATRIX = {"bt709": ("bt709", "bt709"),
                             "smpte170m": ("smpte170m", "smpte170m"),
                             "bt470bg": ("bt470bg", "smpte170m"),
                             "bt2020nc": ("bt2020", "bt2020-10")}

# ACCURATE_RND keeps a YUV->RGB->YUV round trip within one code value; FULL_CHR_H_INT
# interpolates chroma horizontally instead of repeating it, which matters for sharp line art.
_SWS_FLAGS = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
# swscale's full-chroma YUV->rgb48 path wraps instead of clipping when YUV samples lie outside
# the nominal range (real encodes have them): a bright pixel comes out black or green. The
# 16-bit decode therefore does without FULL_CHR_H_INT.
_SWS_FLAGS_DEEP_DECODE = Interpolation.BILINEAR | Interpolation.ACCURATE_RND

ENCODER_DEFAULTS: dict[str, dict[str, str]] = {
    "libx264": {"crf": "18", "preset": "slow", "tune": "animation"},
    "libx265": {"crf": "20", "preset": "medium", "tune": "animation",
                "x265-params": "log-level=error"},
    "libsvtav1": {"crf": "30", "preset": "8"},
    "libvpx-vp9": {"crf": "30", "b": "0", "row-mt": "1", "cpu-used": "4"},
    "ffv1": {"level": "3", "slicecrc": "1"},
}
"""Encoder options tuned for anime, per codec; EncoderSettings fields and options override them."""

# Containers chosen by output extension. Explicit, because FFmpeg's own guess maps .m4v to a raw
# MPEG-4 elementary stream and our temporary names end in .partial anyway.
OUTPUT_FORMATS = {".mkv": "matroska", ".webm": "webm", ".mp4": "mp4", ".m4v": "mp4",
                  ".mov": "mov", ".nut": "nut", ".ts": "mpegts", ".m2ts": "mpegts",
                  ".mts": "mpegts"}
PIPE_FORMAT = "matroska"
# AVI stores no timestamps, only a frame rate and decode order: variable frame timing and
# B-frames come out mistimed (measured: a VFR clip's frames decoded up to 0.4 s early).
_REFUSED_FORMATS = {".avi": "avi"}
# MPEG-TS takes any stream, but writes one it has no stream type for as private data, which reads
# back as an untyped data stream (FLAC, PCM, ASS and SRT among them); these are the codecs it keeps.
# Conservative: a codec missing here is refused with a pointer to .mkv, never damaged.
_MPEGTS_CODECS = {"h264", "hevc", "mpeg2video", "mpeg4", "aac", "aac_latm", "ac3", "eac3", "mp2", "mp3",
                  "opus", "dvb_subtitle", "dvb_teletext"}
# Codecs (by name prefix) that these muxers take when the stream is added and refuse only when
# the header (MOV: FLAC, Opus) or the index at the end (MP4: PCM) is written: after all the work,
# with "Invalid argument". FFmpeg 7's movenc, measured with every codec PyAV encodes.
_REFUSED_WHEN_WRITTEN = {"mov": ("flac", "opus"), "mp4": ("pcm_",)}
# AVDISCARD_ALL: what a demuxer sets on a stream that is not to be read as one.
_DISCARD_ALL = 48
# Containers whose muxer drops chapters without a word.
_NO_CHAPTERS = {"mpegts"}
# These write their index (moov) at the end by seeking back, which a pipe cannot do; fragmented
# MP4 puts an empty moov first and the samples in self-contained fragments. delay_moov holds the
# moov back until the first fragment so it can carry the edit list: without it every timestamp
# comes back shifted by the encoder's B-frame delay.
_SEEKING_FORMATS = {"mp4", "mov", "ipod", "ismv", "3gp", "3g2", "psp"}
_FRAGMENTED = "frag_keyframe+empty_moov+delay_moov+default_base_moof"

# Tags that describe the old video bitstream (written by the old encoder or by mkvmerge's
# statistics) and would be false on the re-encoded stream.
_STALE_VIDEO_TAGS = ("encoder", "bps", "duration", "number_of_frames", "number_of_bytes",
                     "_statistics_")


def _label(source) -> str:
    if source == "-":
        return "stdin"
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return str(getattr(source, "name", "the input stream"))


class _Stopped(Exception):
    """A KeyboardInterrupt met in FFmpeg's read callback, which passes on only Exceptions."""

    def __init__(self, interrupt: KeyboardInterrupt):
        super().__init__()
        self.interrupt = interrupt


class _StoppableReader:
    """A file object FFmpeg reads through its callback. Ctrl-C or a stop signal arriving while the
    main thread waits in read() (opening a quiet pipe) would be swallowed there ("Exception
    ignored") and the open would go on waiting; it comes back as a _Stopped instead."""

    def __init__(self, file):
        self._file = file

    def read(self, size: int) -> bytes:
        try:
            return self._file.read(size)
        except KeyboardInterrupt as exc:
            raise _Stopped(exc) from None

    def __getattr__(self, name: str):
        return getattr(self._file, name)


@contextmanager
def _stoppable():
    try:
        yield
    except _Stopped as stopped:
        raise stopped.interrupt from None


def open_input(source) -> av.container.InputContainer:
    """Open `source` for demuxing: a path, "-" for stdin, or a readable binary file object.

    A pipe must hold a streamable container (matroska, nut, mpegts, fragmented mp4). Every
    failure is a MediaError with a one-line message naming the input and what to do: missing,
    a directory, empty, not media, truncated, no video stream, a still image, an undecodable
    video codec. The caller closes the returned container.
    """
    label = _label(source)
    if source == "-":
        file = _StoppableReader(sys.stdin.buffer)
    elif isinstance(source, (str, os.PathLike)):
        check_readable(Path(source))
        file = str(source)
    else:
        file = _StoppableReader(source)
    try:
        with _stoppable():
            container = av.open(file, "r")
    except av.error.EOFError as exc:
        raise MediaError(f"{label} is truncated: it ends inside its header; "
                         f"give the complete file") from exc
    except av.error.InvalidDataError as exc:
        raise MediaError(f"{label} is not a video file FFmpeg recognises; "
                         f"give a video such as .mkv or .mp4") from exc
    except av.FFmpegError as exc:
        raise MediaError(f"{label} cannot be opened ({exc.strerror or exc}); "
                         f"check that it is a complete video file") from exc
    try:
        _video_stream(container, label)
    except BaseException:
        container.close()
        raise
    return container


def keyframe_pts(path: Path) -> list[int]:
    """The pts (video time base) of the video stream's keyframe packets, in file order, read
    without decoding: where segments can start."""
    with open_input(path) as container:
        stream = _video_stream(container, str(path))
        try:
            return [p.pts for p in container.demux(stream) if p.is_keyframe and p.pts is not None and p.size]
        except av.FFmpegError as exc:
            raise MediaError(f"reading {path} failed ({exc.strerror or exc}); "
                             f"check that the file is complete") from exc


def video_packet_count(path: Path) -> int | None:
    """How many video packets `path` holds, read without decoding; None when it cannot be read.
    A file cut short holds fewer than were written into it."""
    try:
        with av.open(str(path)) as container:
            return sum(1 for p in container.demux(video=0) if p.size)
    except (av.FFmpegError, IndexError):  # IndexError: no video stream
        return None


def _is_attached_picture(stream) -> bool:
    return stream.type == "video" and bool(stream.disposition & av.stream.Disposition.attached_pic)


def _video_stream(container, label: str):
    """The stream to upscale: the first video stream that is not cover art."""
    fmt = container.format.name
    if fmt in ("image2", "image2pipe") or fmt.endswith("_pipe"):
        raise MediaError(f"{label} is a still image, not a video; "
                         f"use `vidscale image` to upscale pictures")
    videos = [s for s in container.streams.video if not _is_attached_picture(s)]
    if not videos:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise MediaError(f"{label} has no video stream (only {', '.join(kinds)}); "
                         f"give a file with video")
    stream = videos[0]
    if stream.codec_context is None or not stream.codec_context.is_decoder:
        raise MediaError(f"{label}: this FFmpeg build cannot decode its video codec "
                         f"({stream.codec_context.name if stream.codec_context else 'unknown'}); "
                         f"convert it with a full FFmpeg first")
    return stream


@dataclass(frozen=True)
class VideoInfo:
    """What a writer and a pipeline need to know about the video stream being upscaled.

    Colour fields use FFmpeg's names. `colorspace` (the YUV matrix) and `color_range` are never
    unknown: an untagged matrix is taken as BT.709 for HD (height >= 720 or width >= 1280) and
    BT.601 (smpte170m) for SD, an untagged range as limited ("tv"), as players do;
    the *_guessed flags say a guess was made. `color_primaries` and `color_trc` are None when the
    source does not say. `rotation` is counter-clockwise degrees (PyAV's convention);
    `display_matrix` the whole matrix it comes from (FFmpeg's nine integers), which also says
    whether the picture is mirrored, None when the source has none.
    `average_rate` is what the container says (Matroska may say 1000); `guessed_rate` is
    FFmpeg's guess from the timestamps (r_frame_rate).
    """

    width: int
    height: int
    frames: int | None
    time_base: Fraction
    average_rate: Fraction | None
    guessed_rate: Fraction | None
    sample_aspect_ratio: Fraction | None
    rotation: int
    pix_fmt: str
    bit_depth: int
    colorspace: str
    color_range: str
    color_primaries: str | None
    color_trc: str | None
    colorspace_guessed: bool
    color_range_guessed: bool
    display_matrix: tuple[int, ...] | None = None

    @property
    def deep(self) -> bool:
        """The source has more than 8 bits per sample."""
        return self.bit_depth > 8


@dataclass(frozen=True, eq=False)
class VideoFrame:
    """One decoded frame of the upscaled stream: `index` counts from 0 in presentation order,
    `pts` and `duration` (0: the source does not say) are in the video stream's time_base, `rgb`
    is (H, W, 3) uint8, or uint16 when deep."""

    index: int
    pts: int
    rgb: np.ndarray
    duration: int = 0


def default_colorspace(width: int, height: int) -> str:
    """The matrix players assume for an untagged picture of this size."""
    return "bt709" if height >= 720 or width >= 1280 else "smpte170m"


class VideoReader:
    """Demux and decode `source` (see open_input); a context manager.

    `events()` yields, in demux order, a VideoFrame for every decoded frame of the video
    stream and the raw av.Packet of every other stream, for a VideoWriter to copy.
    deep=True gives uint16 RGB (full 16-bit scale) whatever the source depth, for > 8-bit
    output. Packets the decoder rejects are concealed and counted in `corrupt_packets` (their
    timestamps in `corrupt_at`), as ffmpeg does, unless strict=True, which raises MediaError on
    the first one. Frames a decoder cannot produce (a stream starting mid-GOP) are not output;
    the packets ahead of the first picture that gave none are counted in `lost_at_start`
    (strict=True raises MediaError instead). Frames flagged interlaced are upscaled as the
    pictures they are (the fields woven together), their timestamps in `interlaced_at`. A size
    change mid-stream raises MediaError, and so
    does a video that ends before its header says it does (truncated). Video streams other than
    the upscaled one are copied as they are.

    YUV->RGB uses the source's matrix and range (see VideoInfo for untagged sources). BT.2020
    (non-constant luminance) is converted with the BT.2020 matrix only, as swscale does: the RGB
    stays in BT.2020 primaries and its transfer (PQ, HLG) is not tone-mapped, and the writer
    tags the output with the source's primaries and transfer, so the round trip is faithful.
    """

    def __init__(self, source, *, deep: bool = False, strict: bool = False):
        self.label = _label(source)
        self.deep = deep
        self.strict = strict
        self.corrupt_at: list[int | None] = []
        self.interlaced_at: list[int | None] = []
        self.lost_at_start = 0
        # Timestamps of the video packets decoded before the first picture came out.
        self._before_first: list[int | None] | None = []
        self._abandoned = False
        self.container = open_input(source)
        try:
            self.stream = _video_stream(self.container, self.label)
            # Not frame threads: they report a broken packet a few packets late, and one
            # reported while the decoder drains at the end loses the good frames after it. A
            # frame of the source costs little to decode beside upscaling it.
            self.stream.codec_context.thread_type = "SLICE"
            self._reformatter = VideoReformatter()
            self._next_index = 0
            self._last_pts = self._last_duration = None
            self._end_pts = 0  # the latest pts + duration of any frame decoded
            self._events = self._demux()
            # Decode up to the first frame now: the rotation and real frame size are only known
            # from a decoded frame, and an undecodable input is better refused at open.
            self._lookahead: list = []
            first = None
            with _stoppable():
                for event in self._events:
                    self._lookahead.append(event)
                    if isinstance(event, av.VideoFrame):
                        first = event
                        break
            if first is None:
                raise MediaError(f"{self.label} holds no decodable video frame; "
                                 f"check that the file is complete")
            self.info = self._describe(first)
            # Cover art and other attached pictures: the demuxer gives each as one packet, before
            # any other, so they are all in the lookahead.
            self.attached_pictures = {e.stream.index: bytes(e) for e in self._lookahead
                                      if isinstance(e, av.Packet) and _is_attached_picture(e.stream)}
        except BaseException:
            self.container.close()
            raise

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._abandoned:
            self.container.close()

    def abandon(self) -> None:
        """Leave the input open for good: a thread is still inside it (a blocking read of a quiet
        pipe), and closing it under that thread would crash the process."""
        self._abandoned = True

    def _describe(self, frame: av.VideoFrame) -> VideoInfo:
        stream, ctx = self.stream, self.stream.codec_context
        fmt = frame.format
        matrix = COLORSPACES.get(frame.colorspace)
        colour_range = COLOR_RANGES.get(frame.color_range)
        if fmt.is_rgb:
            matrix, colour_range = "gbr", "pc"
        matrix_guessed, range_guessed = matrix is None, colour_range is None
        if matrix is None:
            matrix = default_colorspace(frame.width, frame.height)
        if matrix not in _SWS_MATRIX and matrix != "gbr":
            raise MediaError(f"{self.label} uses the {matrix} colour matrix, which FFmpeg's "
                             f"scaler cannot convert to RGB; convert it to bt709 first")
        sar = stream.sample_aspect_ratio or ctx.sample_aspect_ratio
        return VideoInfo(
            width=frame.width, height=frame.height,
            frames=stream.frames or None,
            time_base=stream.time_base,
            average_rate=stream.average_rate,
            guessed_rate=stream.guessed_rate,
            sample_aspect_ratio=sar if sar else None,
            rotation=round(frame.rotation) % 360 or _rotate_tag(stream),
            pix_fmt=fmt.name,
            bit_depth=max(c.bits for c in fmt.components),
            colorspace=matrix,
            color_range=colour_range or "tv",
            color_primaries=COLOR_PRIMARIES.get(frame.color_primaries),
            color_trc=COLOR_TRCS.get(frame.color_trc),
            colorspace_guessed=matrix_guessed,
            color_range_guessed=range_guessed,
            display_matrix=_display_matrix(frame),
        )

    @property
    def duration(self) -> float | None:
        """Seconds, as the container's header says; None when it does not say."""
        duration = self.container.duration
        return None if duration is None else duration / av.time_base

    @property
    def expected_frames(self) -> int | None:
        """For progress only: the container's frame count, else duration x frame rate (Matroska
        stores no count), else None."""
        if self.info.frames:
            return self.info.frames
        rate = self.info.guessed_rate or self.info.average_rate
        if self.container.duration and rate and rate <= 240:
            return round(self.container.duration / av.time_base * rate)
        return None

    def events(self):
        """Yield VideoFrame and av.Packet records in demux order (see the class docstring)."""
        lookahead, self._lookahead = self._lookahead, []
        for event in chain(lookahead, self._events):
            yield self._frame(event) if isinstance(event, av.VideoFrame) else event
        self._check_complete()

    def _declared_end(self) -> Fraction | None:
        """Where the header says the video ends, in seconds, when it says so reliably: Matroska's
        per-track DURATION tag (written in the header, so a pipe has it too) or an MP4/MOV track
        duration. MPEG-TS durations are estimated from the bit rate, so none is trusted there."""
        stream = self.stream
        tag = stream.metadata.get("DURATION")
        if tag:
            try:
                hours, minutes, seconds = tag.split(":")
                return (int(hours) * 60 + int(minutes)) * 60 + Fraction(seconds)
            except ValueError:
                return None
        if self.container.format.name.startswith("mov") and stream.duration:
            return ((stream.start_time or 0) + stream.duration) * stream.time_base
        return None

    def _check_complete(self) -> None:
        """Refuse an input that ends before its header says it does: a truncated file, or a pipe
        closed early, otherwise decodes cleanly and would give an output that looks complete."""
        declared = self._declared_end()
        if declared is None or self._last_pts is None:
            return
        tb = self.stream.time_base
        rate = self.info.guessed_rate or self.info.average_rate
        nominal = 1 / rate if rate else 0
        interval = self._last_duration * tb if self._last_duration else nominal
        # A broken last packet was read, then concealed: the file is whole.
        last = max([self._last_pts, *(pts for pts in self.corrupt_at if pts is not None)])
        # With repeated timestamps the frame decoded last may be a 1-tick one beside a whole
        # frame's: the end is the latest any frame reaches, and a frame's length the longer one.
        end = max(last * tb + interval, self._end_pts * tb)
        if declared - end > max(interval, nominal) / 2:
            raise MediaError(f"{self.label} stops at {float(end):.3f} s but its header says the video "
                             f"runs to {float(declared):.3f} s: it is truncated or its pipe closed "
                             f"early; give the complete file")

    def seek(self, pts: int) -> None:
        """Decode from the keyframe at or before `pts` (video time base) instead of the start:
        events() goes on from there. Frames a seek lands before `pts` on are still given; the
        caller drops them."""
        self._lookahead = []
        self._before_first = None  # not the start of the stream
        self.stream.codec_context.flush_buffers()
        try:
            self.container.seek(pts, stream=self.stream, backward=True)
        except av.FFmpegError as exc:
            raise MediaError(f"{self.label} cannot seek to pts {pts} ({exc.strerror or exc}); "
                             f"remux it into .mkv, which has an index") from exc
        self._events = self._demux()

    def copied_packets(self):
        """Yield only the packets of the other streams, in demux order, without decoding the
        video: joining segments encoded earlier needs the rest of the file, not its pictures.
        Use either this or events(), once."""
        lookahead, self._lookahead = self._lookahead, []
        yield from (event for event in lookahead if isinstance(event, av.Packet))
        # The demuxer carries on from where the frame looked ahead at open left it.
        yield from self._demux(decode=False)

    def _demux(self, decode: bool = True):
        """Decoded av.VideoFrames of the video stream (unless not `decode`) and packets of the others."""
        video = self.stream
        try:
            for packet in self.container.demux():
                # Size-0 packets are demuxer flush markers, not data; `dts is None` would also
                # drop real packets of streams whose muxer leaves dts unset.
                if packet.size == 0 or packet.stream.type == "attachment":
                    continue
                if packet.stream is not video:
                    yield packet
                elif decode:
                    yield from self._decode(packet)
            if decode:
                yield from self._decode(None)
        except av.FFmpegError as exc:
            if self.label == "stdin" and self.container.format.name.startswith("mov"):
                # Most MP4s are written with their index (moov) last, which needs a seek back.
                raise MediaError(f"reading stdin failed ({exc.strerror or exc}); an MP4 or MOV can be read "
                                 f"from a pipe only with its index first (ffmpeg -movflags +faststart): "
                                 f"give the file's path instead") from exc
            raise MediaError(f"reading {self.label} failed ({exc.strerror or exc}); "
                             f"check that the file is complete") from exc

    def _decode(self, packet):
        if self._before_first is not None and packet is not None:
            self._before_first.append(_packet_time(packet))
        try:
            frames = self.stream.codec_context.decode(packet)
        except (av.error.InvalidDataError, av.error.UndefinedError) as exc:
            self._corrupt(exc, None if packet is None else _packet_time(packet))
            return
        for frame in frames:
            if self._before_first is not None:
                self._count_lost_at_start(frame.pts)
            if frame.is_corrupt:
                self._corrupt(None, frame.pts)
            yield frame

    def _count_lost_at_start(self, first: int | None) -> None:
        """Pictures come out in presentation order, so a packet decoded ahead of the first one
        with an earlier timestamp never gave one: its references lie before the start of the
        stream (cut mid-GOP, or open-GOP leading pictures)."""
        early, self._before_first = self._before_first, None
        if first is not None:
            self.lost_at_start = sum(1 for pts in early if pts is not None and pts < first)
        if self.lost_at_start and self.strict:
            raise MediaError(f"{self.label}: the first {self.lost_at_start} video packets give no picture "
                             f"(the stream starts without a keyframe); drop --strict to start at its "
                             f"first picture, as ffmpeg does")

    @property
    def corrupt_packets(self) -> int:
        return len(self.corrupt_at)

    def _corrupt(self, exc, pts: int | None) -> None:
        self.corrupt_at.append(pts)
        if self.strict:
            where = (f"near {float(pts * self.info.time_base):.3f} s (pts {pts})" if pts is not None
                     else "at the end")
            raise MediaError(f"{self.label}: corrupt video data {where}"
                             f"{f' ({exc.strerror})' if exc else ''}; "
                             f"drop --strict to conceal errors as ffmpeg does")

    def _frame(self, frame: av.VideoFrame) -> VideoFrame:
        info = self.info
        index = self._next_index
        if frame.interlaced_frame:
            self.interlaced_at.append(frame.pts)
        if (frame.width, frame.height) != (info.width, info.height):
            raise MediaError(f"{self.label}: frame {index} changes size from "
                             f"{info.width}x{info.height} to {frame.width}x{frame.height}; "
                             f"videos that change resolution are not supported")
        if frame.pts is None:
            raise MediaError(f"{self.label}: frame {index} has no timestamp; "
                             f"remux the input into .mkv first")
        self._last_pts, self._last_duration = frame.pts, frame.duration
        self._end_pts = max(self._end_pts, frame.pts + (frame.duration or 0))
        target = "rgb48le" if self.deep else "rgb24"
        if info.colorspace == "gbr":
            rgb = self._reformatter.reformat(frame, format=target)
        else:
            rgb = self._reformatter.reformat(
                frame, format=target, src_colorspace=_SWS_MATRIX[info.colorspace],
                src_color_range=_SWS_RANGE[info.color_range], dst_color_range=ColorRange.JPEG,
                interpolation=_SWS_FLAGS_DEEP_DECODE if self.deep else _SWS_FLAGS)
        self._next_index += 1
        return VideoFrame(index, frame.pts, rgb.to_ndarray(), frame.duration or 0)


def _made_again(stream, video, chapters: bool) -> bool:
    """Whether `stream` is one the output is made with anyway, not a stream of its own: an
    MP4/MOV chapter track (its demuxer reads it into the chapters, which are copied, and marks it
    discarded) or a QuickTime timecode track (the video's timecode tag, which is copied and from
    which the MOV muxer makes it again). `chapters`: the input has chapters."""
    if stream.discard == _DISCARD_ALL:
        return True
    if chapters and stream.type == "subtitle" and getattr(stream.codec_context, "codec_tag", None) == "text":
        # Read from a pipe, the demuxer cannot seek to the chapter track to mark it, and takes
        # the chapters from the index instead; the track is QuickTime text, where MP4 subtitles
        # are tx3g. Copied, it was a subtitle track of the chapter names (or refused by MKV).
        return True
    timecode = stream.metadata.get("timecode")
    return stream.type == "data" and timecode is not None and timecode == video.metadata.get("timecode")


def _frame_rate(info: VideoInfo) -> Fraction | None:
    """The source's frame rate where it is plausible: Matroska often reports an average rate of
    1000 (its time base)."""
    return next((r for r in (info.average_rate, info.guessed_rate) if r and r <= 240), None)


def _packet_time(packet: av.Packet) -> int | None:
    return packet.pts if packet.pts is not None else packet.dts


def _display_matrix(frame) -> tuple[int, ...] | None:
    try:
        data = frame.side_data.get("DISPLAYMATRIX")
    except ValueError:  # side data of a type PyAV does not know (FFmpeg's EXIF, say): it reads none
        return None
    return None if data is None else tuple(int(v) for v in np.frombuffer(bytes(data), np.int32))


def _rotate_tag(stream) -> int:
    """Rotation from the legacy `rotate` tag (clockwise), as counter-clockwise degrees."""
    try:
        return -int(stream.metadata.get("rotate", 0)) % 360
    except ValueError:
        return 0


@dataclass(frozen=True)
class EncoderSettings:
    """How the upscaled video is encoded. None fields take ENCODER_DEFAULTS / the rules below.

    pix_fmt: yuv420p, or yuv420p10le when the source has > 8 bits and the codec can.
    options: extra encoder options (key, value), applied last.
    offered: names among crf, preset and the options' keys that are only offered: the encoder
    takes them if it knows them, as a batch's [defaults] offer theirs to jobs of several encoders.
    Any other one the encoder does not know (a misspelt -x, --crf for FFV1) is refused.
    format: container; default from the output extension, matroska for "-".
    colorspace / color_range: the output's YUV matrix and range; default the source's matrix
    when tagged, else the usual one for the OUTPUT size (bt709 for HD), and limited ("tv").
    """

    codec: str = "libx264"
    crf: int | None = None
    preset: str | None = None
    pix_fmt: str | None = None
    options: tuple[tuple[str, str], ...] = ()
    format: str | None = None
    colorspace: str | None = None
    color_range: str | None = None
    offered: frozenset[str] = frozenset()


class _WholeWrites:
    """A file descriptor for FFmpeg to write through (stdout): each write is written whole or
    raises. Through sys.stdout.buffer, a write cut short by a file-size limit or a full disk came
    back as success, and the output lost bytes from its middle with exit status 0."""

    def __init__(self, fd: int):
        self._fd = fd

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        return len(data)

    def seekable(self) -> bool:
        # A redirect to a file is; a pipe is not.
        try:
            os.lseek(self._fd, 0, os.SEEK_CUR)
        except OSError:
            return False
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self._fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)


class _LibraryStderr:
    """What C libraries wrote on file descriptor 2 themselves (x264, x265 and SVT-AV1 print the
    reason they refuse a setting there, past FFmpeg's log), read back once they are done."""

    def __init__(self):
        self.text = ""

    def last_line(self) -> str:
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        # "x264 [error]: invalid preset 'nosuch'" -> "invalid preset 'nosuch'"
        return re.sub(r"^\S+ ?\[\w+\]: *", "", lines[-1]) if lines else ""


@contextmanager
def _library_stderr():
    """Capture fd 2 while inside: a library's own line belongs in vidscale's one-line error, not
    above it."""
    said = _LibraryStderr()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError):  # stderr closed (2>&-): nothing to keep clean
        yield said
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            said.text = capture.read().decode(errors="replace")


def _is_broken_pipe(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == errno.EPIPE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _encoder(name: str) -> av.Codec:
    try:
        codec = av.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        codec = None
    if codec is None or codec.type != "video":
        available = sorted(n for n in ENCODER_DEFAULTS if n in av.codecs_available)
        raise UsageError(f"this FFmpeg has no video encoder named {name!r}; "
                         f"available: {', '.join(available)}")
    return codec


def output_pix_fmt(codec: av.Codec | str, settings: EncoderSettings, info: VideoInfo) -> str:
    """The pixel format the video is encoded in: the requested one, else yuv420p, or
    yuv420p10le for a > 8-bit source when the encoder can write it."""
    if isinstance(codec, str):
        codec = _encoder(codec)
    formats = [f.name for f in codec.video_formats or ()]
    pix_fmt = settings.pix_fmt
    if pix_fmt is None:
        pix_fmt = "yuv420p10le" if info.deep and "yuv420p10le" in formats else "yuv420p"
    if formats and pix_fmt not in formats:
        raise UsageError(f"encoder {codec.name} cannot write pixel format {pix_fmt}; "
                         f"it takes {', '.join(formats)}")
    return pix_fmt


def is_deep(pix_fmt: str) -> bool:
    """More than 8 bits per sample: such output is fed 16-bit RGB so the extra bits are real."""
    return max(c.bits for c in av.VideoFormat(pix_fmt).components) > 8


# Past this many pixels a side (8K), an encoder's refusal may be of the frame size: FFV1 took a
# 12000x12000 frame here and refused 16000x16000 with "Function not implemented".
_LARGEST_USUAL_SIDE = 8192


class VideoWriter:
    """Encode upscaled frames and copy every other stream of `reader`'s input; a context manager.

    destination: a path (written to a temporary name beside it and renamed on success, so a
    failed run leaves nothing that looks complete) or "-" for stdout (video bytes only).
    width, height: the upscaled size. The video stream keeps the source's time base, sample
    aspect ratio, rotation and stream tags (language, title, disposition). Audio, subtitles,
    data streams and other video streams are copied packet for packet with their tags and
    disposition; attachments, chapters and container tags are copied too. A stream the output
    container cannot carry is refused with a MediaError (never dropped). MP4/MOV to a pipe is
    written fragmented. A reader closing the pipe raises OutputClosedError.

    segment=True writes one segment of a resumable run: the video stream only, with the exact
    (pts, dts, duration) of every packet kept in `packets` (the container may round them), for
    join_segments. `after` is the previous segment's last (source pts, written pts), so
    timestamps continue as they would in one run. `video_template` (join_segments): the video
    is not encoded but copied with write_encoded, its stream made from this segment's stream.
    `on_commit(file, frames)` runs when a file output is complete, just before it is renamed into
    place: what vouches for the output (a batch's sidecar) is then never missing beside it.
    """

    def __init__(self, destination, reader: VideoReader, width: int, height: int,
                 encoder: EncoderSettings = EncoderSettings(), *, segment: bool = False,
                 after: tuple[int, int] | None = None, video_template=None,
                 on_commit: Callable[[Path, int], None] | None = None, replace: bool = True):
        self.reader = reader
        self.width, self.height = width, height
        self.frames_written = 0
        self.retimed_frames = 0
        self._last_source_pts, self._last_pts = after or (None, None)
        self.segment = segment
        self.packets: list[tuple[int, int | None, int]] = []
        self._durations: dict[int, int] = {}
        self._held: av.Packet | None = None
        self._first_video: tuple[int, int] | None = None
        self._video_end = 0
        self._template = video_template
        self.label = "stdout" if destination == "-" else str(destination)
        self._stack = ExitStack()
        self._closed = False
        self._on_commit = on_commit
        self._replace = replace
        self._partial: Path | None = None
        try:
            self._open(destination, encoder)
        except BaseException as exc:
            self._abort(exc)
            raise

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self._abort(exc)

    def _open(self, destination, settings: EncoderSettings) -> None:
        source = self.reader.container
        fmt = settings.format
        options = {}
        if destination == "-":
            fmt = fmt or PIPE_FORMAT
            if fmt in _SEEKING_FORMATS:
                options["movflags"] = _FRAGMENTED
            if sys.stdout is None:
                raise UsageError("stdout is closed, so -o - has nowhere to write; give a file or a pipe")
            target = _WholeWrites(sys.stdout.fileno())
        else:
            path = Path(destination)
            if fmt is None:
                fmt = OUTPUT_FORMATS.get(path.suffix.lower()) or _REFUSED_FORMATS.get(path.suffix.lower())
                if fmt is None:
                    raise UsageError(f"cannot tell which container to write for {path}; "
                                     f"use one of {', '.join(OUTPUT_FORMATS)}")
        if fmt not in OUTPUT_FORMATS.values() and fmt not in _REFUSED_FORMATS.values():
            # Raw and picture formats (rawvideo, yuv4mpegpipe) hold the video alone: every other
            # stream would be lost, or the encoder refused only after the last frame.
            raise UsageError(f"-f {fmt} is not a container vidscale writes; use one of "
                             f"{', '.join(sorted(set(OUTPUT_FORMATS.values())))}")
        if fmt in _REFUSED_FORMATS.values():
            raise UsageError(f"{self.label}: {fmt} cannot store each frame's timestamp (variable frame "
                             f"rate and B-frames come out mistimed); write .mkv or .mp4 instead")
        if destination != "-":
            commit = None if self._on_commit is None else lambda tmp: self._on_commit(tmp, self.frames_written)
            self._partial = self._stack.enter_context(atomic_output(path, commit, self._replace))
            target = str(self._partial)
        codec = _encoder(settings.codec)
        try:
            self.container = self._stack.enter_context(
                av.open(target, "w", format=fmt, options=options))
        except (av.FFmpegError, ValueError) as exc:
            raise MediaError(f"cannot write {fmt} to {self.label} ({exc}); "
                             f"choose another container") from exc
        self._streams = {}
        self._made_again: set[int] = set()
        if self.segment:
            self._add_video(self.reader.stream, codec, settings)
            return
        self.container.metadata.update(
            {k: v for k, v in source.metadata.items() if k.lower() != "encoder"})
        chapters = source.chapters()
        for stream in source.streams:
            if stream is self.reader.stream and self._template is not None:
                self._streams[stream.index] = self._add_joined_video(stream)
            elif stream is self.reader.stream:
                self._streams[stream.index] = self._add_video(stream, codec, settings)
            elif stream.type == "attachment":
                self._add_attachment(stream)
            elif _is_attached_picture(stream) and self.container.format.name == "matroska":
                self._add_picture_attachment(stream)
                self._made_again.add(stream.index)
            elif _made_again(stream, self.reader.stream, bool(chapters)):
                self._made_again.add(stream.index)
            else:
                self._streams[stream.index] = self._copy_stream(stream)
        if chapters:
            if self.container.format.name in _NO_CHAPTERS:
                raise MediaError(f"{self.label}: the {self.container.format.name} container cannot "
                                 f"carry chapters; write .mkv instead")
            self.container.set_chapters(chapters)

    def _add_video(self, source, codec: av.Codec, settings: EncoderSettings):
        info = self.reader.info
        options = dict(ENCODER_DEFAULTS.get(codec.name, {}))
        if settings.crf is not None:
            options["crf"] = str(settings.crf)
        if settings.preset is not None:
            options["preset"] = settings.preset
        options.update(settings.options)
        pix_fmt = output_pix_fmt(codec, settings, info)
        try:
            if not self._keeps(codec.canonical_name):
                raise ValueError(codec.canonical_name)
            stream = self.container.add_stream(codec.name, options=options)
        except ValueError as exc:
            raise MediaError(f"{self.label}: the {self.container.format.name} container cannot "
                             f"hold {codec.name} video; choose another container") from exc
        ctx = stream.codec_context
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, pix_fmt
        stream.time_base = ctx.time_base = info.time_base
        rate = _frame_rate(info)
        if rate:
            # Rate control of several encoders (SVT-AV1, VP9) reads the frame rate; the
            # timestamps themselves stay the source's, so VFR stays VFR.
            ctx.framerate = rate
        if info.sample_aspect_ratio:
            ctx.sample_aspect_ratio = info.sample_aspect_ratio
        self._orient(stream)
        if settings.colorspace:
            matrix = settings.colorspace
        elif info.colorspace_guessed or info.colorspace == "gbr":
            matrix = default_colorspace(self.width, self.height)
        else:
            matrix = info.colorspace
        if matrix not in _SWS_MATRIX:
            raise UsageError(f"cannot write the {matrix} colour matrix; "
                             f"use one of {', '.join(_SWS_MATRIX)}")
        colour_range = settings.color_range or "tv"
        if colour_range not in _SWS_RANGE:
            raise UsageError(f"unknown colour range {colour_range!r}; use tv (limited) or pc (full)")
        primaries, trc = _PRIMARIES_TRC_FOR_MATRIX.get(matrix, (None, None))
        primaries = info.color_primaries or primaries
        trc = info.color_trc or trc
        ctx.colorspace = _code(COLORSPACES, matrix)
        ctx.color_range = _code(COLOR_RANGES, colour_range)
        if primaries:
            ctx.color_primaries = _code(COLOR_PRIMARIES, primaries)
        if trc:
            ctx.color_trc = _code(COLOR_TRCS, trc)
        self._to_yuv = dict(format=pix_fmt, dst_colorspace=_SWS_MATRIX[matrix],
                            dst_color_range=_SWS_RANGE[colour_range], interpolation=_SWS_FLAGS)
        self._reformatter = VideoReformatter()
        self._open_encoder(ctx, codec, pix_fmt)
        # What the encoder left of its options is what it does not know.
        unknown = sorted(set(ctx.options) - settings.offered)
        if unknown:
            raise UsageError(f"encoder {codec.name} does not take {', '.join(unknown)}; drop "
                             f"{'it' if len(unknown) == 1 else 'them'} (--crf, --preset, -x or the job file's "
                             f"key), or check the spelling")
        return self._tag_video(stream, source)

    def _open_encoder(self, ctx, codec: av.Codec, pix_fmt: str) -> None:
        """Open the encoder now rather than at the first frame, so that settings it refuses fail
        before any work is done, with a message about the settings rather than the disk."""
        with _library_stderr() as said:
            try:
                ctx.open()
                failure = None
            except av.FFmpegError as exc:
                failure = exc
        if failure is None:
            if said.text:  # not a refusal: passed on as the library wrote it
                sys.stderr.write(said.text)
            return
        # Some encoders (FFV1, VP9) take odd sizes with half-size colour; x264 and x265 do not.
        chroma = av.VideoFormat(pix_fmt, self.width, self.height).components[-1]
        if (chroma.width, chroma.height) != (self.width, self.height) and (self.width % 2 or self.height % 2):
            raise UsageError(f"{codec.name} cannot write the {self.width}x{self.height} output in "
                             f"{pix_fmt}, which stores colour at half size, with an odd side; use "
                             f"--pix-fmt yuv444p, or a scale that makes both sides even") from failure
        reason = said.last_line() or failure.strerror
        size = (f", or the {self.width}x{self.height} frame size (beyond what many encoders take: use a "
                f"smaller --scale)" if max(self.width, self.height) > _LARGEST_USUAL_SIDE else "")
        raise UsageError(f"encoder {codec.name} refused its settings ({reason}); check "
                         f"--preset, --crf, -x and --pix-fmt{size}") from failure

    def _orient(self, stream) -> None:
        """The source's display matrix, whole: its rotation alone would turn a mirrored picture
        (a front camera's) upside down, or lose the mirror."""
        info = self.reader.info
        if info.display_matrix is not None:
            stream.set_display_matrix(info.display_matrix)
        elif info.rotation:
            stream.set_display_rotation(info.rotation)

    def _tag_video(self, stream, source):
        stream.metadata.update({k: v for k, v in self._tags(source).items()
                                if not k.lower().startswith(_STALE_VIDEO_TAGS)})
        stream.disposition = source.disposition
        self.video = stream
        return stream

    def _add_joined_video(self, source):
        """The upscaled stream of a join: codec parameters (headers, size, colour tags, sample
        aspect ratio) from a segment; time base, rotation and tags as _add_video sets them."""
        # Packets copied into a stream whose encoder was opened come out mangled, hence a template.
        stream = self.container.add_stream_from_template(self._template)
        stream.time_base = self.reader.info.time_base
        rate = _frame_rate(self.reader.info)
        if rate:
            # As the encoder's stream has it: muxers derive frame durations from it (Matroska's
            # default duration, the last MP4 sample's), which the segments' packets do not carry.
            stream.codec_context.framerate = rate
        stream.metadata.clear()  # the segment's own tags (encoder, statistics) are not the source's
        self._orient(stream)
        return self._tag_video(stream, source)

    def _keeps(self, codec: str) -> bool:
        name = self.container.format.name
        if name == "mpegts":
            return codec in _MPEGTS_CODECS
        return not codec.startswith(_REFUSED_WHEN_WRITTEN.get(name, ()))

    def _copy_stream(self, source):
        try:
            if not self._keeps(source.codec_context.codec.canonical_name if source.codec_context else "data"):
                raise ValueError(source.index)
            stream = self.container.add_stream_from_template(source)
        except ValueError as exc:
            codec = source.codec_context.name if source.codec_context else "data"
            fix = ("remux the input without that stream, or with it converted, first"
                   if self.container.format.name == "matroska" else "write .mkv instead")
            raise MediaError(f"{self.label}: the {self.container.format.name} container cannot "
                             f"carry stream {source.index} ({source.type}, {codec}); {fix}") from exc
        # PyAV writes the metadata dict into the stream when the header is written.
        stream.metadata.update(self._tags(source))
        stream.disposition = source.disposition
        return stream

    def _tags(self, source) -> dict[str, str]:
        """`source`'s tags as a muxer takes them: FFmpeg reads an MP4 or MOV track's title as
        "name" and writes "title" as one, so MP4 to MP4 lost it, and MKV named it NAME."""
        tags = dict(source.metadata)
        if "mov" in self.reader.container.format.name.split(",") and "name" in tags:
            tags.setdefault("title", tags.pop("name"))
        return tags

    def _add_attachment(self, source) -> None:
        name = source.metadata.get("filename")
        if name is None:
            raise MediaError(f"{self.reader.label}: attachment stream {source.index} has no "
                             f"file name; remux the input with mkvmerge first")
        try:
            # Matroska is the one container with attachments; others take them as streams of
            # no type (MPEG-TS) or fail when the header is written.
            if self.container.format.name != "matroska":
                raise ValueError(name)
            self.container.add_attachment(name, source.mimetype or "application/octet-stream",
                                          source.data)
        except (av.FFmpegError, ValueError) as exc:
            raise MediaError(f"{self.label}: the {self.container.format.name} container cannot "
                             f"carry attachments ({name}); write .mkv instead") from exc

    def _add_picture_attachment(self, source) -> None:
        """An attached picture (a Matroska attachment the demuxer shows as one, or MP4 cover art)
        goes into Matroska as the attachment it is, not as a one-frame video track."""
        data = self.reader.attached_pictures.get(source.index)
        if data is None:
            raise MediaError(f"{self.reader.label}: the attached picture of stream {source.index} "
                             f"could not be read; remux the input with mkvmerge first")
        codec = source.codec_context.name if source.codec_context else "mjpeg"
        kind = {"mjpeg": ("jpg", "image/jpeg"), "png": ("png", "image/png")}.get(codec, ("bin", None))
        name = source.metadata.get("filename") or f"cover.{kind[0]}"
        mimetype = source.metadata.get("mimetype") or kind[1] or "application/octet-stream"
        self.container.add_attachment(name, mimetype, data)

    def write_frame(self, rgb: np.ndarray, pts: int, duration: int = 0) -> None:
        """Encode one upscaled frame, (height, width, 3) uint8 or uint16, at its SOURCE pts and
        for its source duration (0: unknown, the muxer derives one from the frame rate).

        Frames come in presentation order. A frame repeating the previous timestamp (some
        sources have them) is moved one tick of the time base later and counted in
        `retimed_frames`: encoders and MP4 need increasing timestamps, and dropping the frame
        as ffmpeg would is not allowed here. Timestamps that go backwards are an error.
        """
        if self._last_source_pts is not None and pts < self._last_source_pts:
            raise MediaError(f"{self.label}: frame {self.frames_written} has pts {pts}, before "
                             f"the previous frame's {self._last_source_pts}; frames must come "
                             f"in presentation order")
        self._last_source_pts = pts
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1
            self.retimed_frames += 1
        self._last_pts = pts
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype not in (np.uint8, np.uint16):
            raise MediaError(f"{self.label}: frame at pts {pts} is {rgb.dtype} {rgb.shape}, "
                             f"expected ({self.height}, {self.width}, 3) uint8 or uint16")
        if rgb.strides[1:] != (3 * rgb.itemsize, rgb.itemsize):
            rgb = np.ascontiguousarray(rgb)
        # Wrapped, not copied (a 4x frame is megabytes; rows may be strided, as a stitched view's
        # are): the conversion below makes the frame the encoder keeps.
        frame = av.VideoFrame.from_numpy_buffer(rgb, format="rgb48le" if rgb.dtype == np.uint16 else "rgb24")
        frame = self._reformatter.reformat(frame, **self._to_yuv)
        frame.pts = pts
        frame.time_base = self.reader.info.time_base
        if duration > 0:
            self._durations[pts] = duration
        self._encode(frame)
        self.frames_written += 1

    def _encode(self, frame: av.VideoFrame | None) -> None:
        with self._errors():
            packets = self.video.encode(frame)
            # Encoders give packets no duration (the muxer would derive 1/frame rate): a held
            # drawing, an end card or any VFR frame would be cut short.
            for packet in packets:
                packet.duration = self._durations.pop(packet.pts, packet.duration)
            if self.segment:
                # Before mux, which rescales them to the container's (maybe coarser) time base.
                self.packets += [(p.pts, p.dts, p.duration) for p in packets]
            for packet in packets:
                self._mux_video(packet)

    def _mux_video(self, packet: av.Packet) -> None:
        """Mux a packet of the upscaled stream. An MP4/MOV sample lasts until the next one's dts;
        only the last one's own duration counts, and with B-frames that is not the last frame's.
        It is held back until close, which stretches it to end the track where the last frame
        does, as Matroska's block durations do."""
        if self.container.format.name not in _SEEKING_FORMATS:
            self.container.mux(packet)
            return
        if self._first_video is None:
            self._first_video = (packet.pts, packet.dts)
        if packet.duration:
            self._video_end = max(self._video_end, packet.pts + packet.duration)
        if self._held is not None:
            self.container.mux(self._held)
        self._held = packet

    def _mux_held(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        first_pts, first_dts = self._first_video
        if held.duration and None not in (held.dts, first_dts):
            # The track's presentation starts at first_pts, its samples at first_dts.
            held.duration = max(self._video_end - held.dts - (first_pts - first_dts), 1)
        self.container.mux(held)

    @property
    def last_pts(self) -> tuple[int, int] | None:
        """(source pts, written pts) of the last frame, for the `after` of a following segment."""
        return None if self._last_pts is None else (self._last_source_pts, self._last_pts)

    @property
    def extradata(self) -> bytes:
        """The encoder's global headers (e.g. H.264 SPS/PPS); segments joined must share them."""
        return bytes(self.video.codec_context.extradata or b"")

    def write_encoded(self, packet: av.Packet) -> None:
        """Mux a video packet encoded by a segment writer, its timestamps in the source time
        base; counted in frames_written (these encoders give one packet per frame)."""
        packet.stream = self.video
        packet.time_base = self.reader.info.time_base
        with self._errors():
            self._mux_video(packet)
        self.frames_written += 1

    def write_packet(self, packet: av.Packet) -> None:
        """Mux a packet of a copied stream (as yielded by VideoReader.events)."""
        if packet.stream.index in self._made_again:
            return
        packet.stream = self._streams[packet.stream.index]
        with self._errors():
            self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoder, write the trailer and (for a file) move it into place."""
        if self._closed:
            return
        try:
            if self._template is None:
                self._encode(None)
            with self._errors():
                self._mux_held()
                self._closed = True
                self._stack.close()
        except BaseException as exc:
            self._abort(exc)
            raise

    def abandon(self) -> None:
        """Leave the output open for good: a thread is still inside it (a blocking write to a
        reader that stopped reading), and closing it under that thread would crash the process.
        A temporary file is unlinked all the same; the thread's writes go nowhere."""
        self._closed = True
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)

    def _abort(self, exc: BaseException) -> None:
        """Close everything after a failure; the temporary file is removed, never renamed."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:
            # The original failure is the one worth reporting; closing a broken container
            # (e.g. a closed pipe) fails again for the same reason.
            pass

    @contextmanager
    def _errors(self):
        try:
            yield
        except (av.FFmpegError, OSError) as exc:
            if _is_broken_pipe(exc):
                raise OutputClosedError(f"{self.label} was closed by the reading process; "
                                        f"output stopped early") from exc
            code = getattr(exc, "errno", None)
            if code == errno.ENOSPC:
                raise MediaError(f"no space left on the device writing {self.label}; "
                                 f"free some space and run again") from exc
            if code == errno.ENOENT:
                raise MediaError(f"the folder of {self.label} is gone (removed while this run wrote it); "
                                 f"make it again and run again") from exc
            if code == errno.EFBIG:
                raise MediaError(f"{self.label} grew past the largest file allowed here ({exc.strerror}); "
                                 f"raise the limit (ulimit -f) or write where larger files fit") from exc
            if code in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise MediaError(f"cannot write {self.label} ({exc.strerror}); "
                                 f"choose an output in a writable directory") from exc
            raise MediaError(f"writing {self.label} failed ({exc}); "
                             f"check free space and the encoder settings") from exc


@dataclass(frozen=True)
class EncodedSegment:
    """A segment file a segment VideoWriter wrote: its exact packet timestamps (source time
    base) and its encoder's global headers."""

    path: Path
    packets: list[tuple[int, int | None, int]]
    extradata: bytes


def join_segments(destination: Path, reader: VideoReader, encoder: EncoderSettings,
                  segments: list[EncodedSegment], frames: int,
                  on_commit: Callable[[Path, int], None] | None = None, replace: bool = True) -> None:
    """Write `destination` from the video packets of `segments`, in order and without
    re-encoding, and every other stream of `reader`'s input copied as a VideoWriter copies them,
    merged by time so the muxer's interleaving buffer stays small. The output is renamed into
    place only when it holds `frames` frames. Raises MediaError when segments do not fit
    together (other stream headers, packets missing): the joined stream would not decode."""
    time_base = reader.info.time_base
    order = itertools.count()

    def video():
        last_dts = None
        for segment in segments:
            if segment.extradata != segments[0].extradata:
                raise MediaError(f"{segment.path} was encoded with other stream headers than "
                                 f"{segments[0].path}; delete the work directory and run again")
            with _open_segment(segment.path) as container:
                packets = (p for p in container.demux(video=0) if p.size)
                for packet, stamps in itertools.zip_longest(packets, segment.packets):
                    if packet is None or stamps is None:
                        raise MediaError(f"{segment.path} does not hold the {len(segment.packets)} "
                                         f"packets recorded for it; delete the work directory and "
                                         f"run again")
                    packet.pts, packet.dts, packet.duration = stamps
                    if packet.dts is not None and last_dts is not None and packet.dts <= last_dts:
                        # Each segment's encoder starts its decode times before its first frame
                        # by its B-frame delay, which a gap in a variable rate can bring back to
                        # the last segment's: MP4 and MOV refuse that. Later in decode order and
                        # still no later than the frame's own time, it decodes the same.
                        packet.dts = last_dts + 1
                        if packet.pts is not None and packet.dts > packet.pts:
                            raise MediaError(f"{segment.path} cannot follow the segment before it (decode "
                                             f"times overlap); give the output as .mkv, or run without --resume")
                    last_dts = packet.dts if packet.dts is not None else last_dts
                    stamp = packet.dts if packet.dts is not None else packet.pts
                    yield stamp * time_base, next(order), True, packet

    def others():
        when = Fraction(0)
        for packet in reader.copied_packets():
            stamp = packet.dts if packet.dts is not None else packet.pts
            if stamp is not None:
                when = stamp * packet.time_base
            yield when, next(order), False, packet

    with _open_segment(segments[0].path) as first:
        template = first.streams.video[0]
        writer = VideoWriter(destination, reader, template.width, template.height, encoder,
                             video_template=template, on_commit=on_commit, replace=replace)
    with writer:
        for _, _, upscaled, packet in heapq.merge(video(), others(), key=lambda item: item[:2]):
            if upscaled:
                writer.write_encoded(packet)
            else:
                writer.write_packet(packet)
        if writer.frames_written != frames:
            raise MediaError(f"joined {writer.frames_written} frames but decoded {frames}; "
                             f"the output is incomplete and was not kept")


@contextmanager
def _open_segment(path: Path):
    try:
        with av.open(str(path)) as container:
            yield container
    except av.FFmpegError as exc:
        raise MediaError(f"segment {path} cannot be read ({exc}); delete the work directory "
                         f"and run again") from exc


def _code(names: dict[int, str], name: str) -> int:
    return next(code for code, known in names.items() if known == name)
