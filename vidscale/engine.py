"""OpenVINO side of vidscale: convert once, reshape statically, compile per shape, run asynchronously.

Every compiled model here has ONE static input shape, and nothing of another shape is ever handed to
it: `Upscaler.check` refuses it before OpenVINO sees it. A frame of another size asks `Engine.upscaler`
for another compiled model. This is the whole point of the project (see DESIGN.md, "Why static shapes").
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino.preprocess import PrePostProcessor

from .errors import MORE_MEMORY, EngineError, UsageError, first_line
from .files import temporary_beside

PRECISIONS = ("auto", "f32", "bf16", "f16", "int8")
# Element type of the frames on both sides of the graph. "f32" is the raw model: float NHWC in [0, 1]
# in, unclamped float out; it exists so tests can compare against torch without quantisation.
SAMPLE_TYPES = {"u8": (ov.Type.u8, np.uint8, 255.0), "u16": (ov.Type.u16, np.uint16, 65535.0),
                "f32": (ov.Type.f32, np.float32, 1.0)}
# Bumped whenever the saved IR would differ for the same weights (conversion recipe changes).
_IR_FORMAT = 1
# Compiled models kept per engine (and per FrameUpscaler): each holds its own memory, which a
# stream of mixed frame sizes would otherwise grow without bound.
COMPILED_CACHE_SIZE = 4


def default_cache_dir() -> Path:
    """$VIDSCALE_CACHE_DIR, else $XDG_CACHE_HOME/vidscale, else ~/.cache/vidscale."""
    explicit = os.environ.get("VIDSCALE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec: a relative path there is invalid and ignored (it would follow the working directory).
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "vidscale"


@dataclass(frozen=True)
class EngineSettings:
    device: str = "CPU"
    precision: str = "auto"
    cache_dir: Path | None = None
    # 0 lets OpenVINO pick the number of parallel requests for throughput on the device.
    requests: int = 0

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else default_cache_dir()


_core_lock = threading.Lock()
_core: ov.Core | None = None


def core() -> ov.Core:
    global _core
    with _core_lock:
        if _core is None:
            _core = ov.Core()
        return _core


def check_device(device: str) -> None:
    """Refuse a device string naming hardware this machine does not have.

    AUTO/MULTI/HETERO are passed through, but every device they list must exist: asking for GPU and
    silently running on the CPU is the kind of surprise we do not want.
    """
    available = core().available_devices
    listed = device.partition(":")[2]
    wanted = [d for d in listed.split(",") if d] if _is_virtual(device) else [device]
    for dev in wanted:
        if not any(a == dev or a.split(".")[0] == dev for a in available):
            raise EngineError(
                f"OpenVINO device {dev!r} is not available on this machine (found: "
                f"{', '.join(available) or 'none'}); pass --device with one of those")


def resolve_precision(device: str, precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    capabilities = _capabilities(device)
    if precision == "auto":
        return "bf16" if "BF16" in capabilities else "f32"
    needed = {"bf16": "BF16", "f16": "FP16", "int8": "INT8"}.get(precision)
    if needed and capabilities and needed not in capabilities:
        raise EngineError(
            f"precision {precision} is not supported by OpenVINO device {device} "
            f"(it supports {', '.join(sorted(capabilities))}); use --precision f32 or auto")
    return precision


def _capabilities(device: str) -> set[str]:
    if _is_virtual(device):
        return set()  # no single answer; let the plugin decide
    return set(core().get_property(device, "OPTIMIZATION_CAPABILITIES"))


def _is_virtual(device: str) -> bool:
    """Whether `device` is one of OpenVINO's devices made of others."""
    return device.partition(":")[0].upper() in ("AUTO", "MULTI", "HETERO", "BATCH")


def ir_path(model, cache_dir: Path) -> Path:
    """Where the converted IR of `model` lives: keyed by the weights' digest, not by name."""
    digest = hashlib.sha256(f"{model.digest}:{_IR_FORMAT}".encode()).hexdigest()[:16]
    return cache_dir / "ir" / f"{model.name}-{digest}.xml"


@contextmanager
def cache_writes(tmp: Path):
    """Writing `tmp` (an IR, .xml and .bin) and renaming it into the cache: a full disk or a
    file-size limit gives EngineError naming the cache and its fix (OpenVINO itself says only
    "iostream error"), and the partial files go."""
    try:
        yield
    except (RuntimeError, OSError) as exc:
        for part in (tmp, tmp.with_suffix(".bin")):
            part.unlink(missing_ok=True)
        raise EngineError(f"cannot write to the model cache {tmp.parent} ({first_line(exc)}); free space "
                          f"there, or give another --cache-dir (or VIDSCALE_CACHE_DIR)") from exc


class Engine:
    """One model on one device at one precision; hands out compiled models by shape.

    For precision "int8" the float IR is quantized with NNCF (see quantize.py) on `calibration`,
    a list of (H, W, 3) uint8 RGB frames (None: a bundled synthetic set), before this returns; a
    model failing the INT8 quality gate on `evaluation` (the frames to be upscaled; None: the
    calibration) raises EngineError here, before any frame is read.
    """

    def __init__(self, model, settings: EngineSettings = EngineSettings(),
                 calibration: Sequence[np.ndarray] | None = None,
                 evaluation: Sequence[np.ndarray] | None = None):
        check_device(settings.device)
        cache = settings.resolved_cache_dir
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = "a file is in the way" if cache.exists() else exc.strerror
            raise UsageError(f"cache directory {cache} cannot be made ({why}); pass --cache-dir "
                             f"(or set VIDSCALE_CACHE_DIR to) a writable directory") from exc
        self.model = model
        self.settings = settings
        self.precision = resolve_precision(settings.device, settings.precision)
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple, Upscaler] = OrderedDict()
        self._int8_ir: ov.Model | None = None
        if self.precision == "int8":
            from .quantize import int8_model  # NNCF is an optional extra, loaded only for INT8

            self._int8_ir = int8_model(self, calibration, evaluation)

    @property
    def native_scale(self) -> int:
        return self.model.spec.scale

    @property
    def size_multiple(self) -> int:
        return self.model.spec.size_multiple

    def float_ir(self) -> ov.Model:
        """A fresh copy of the model's float IR, converted and cached on first use."""
        xml = ir_path(self.model, self.settings.resolved_cache_dir)
        try:
            return read_ir(xml)
        except (OSError, RuntimeError, ElementTree.ParseError) as exc:
            if _out_of_memory(exc):
                raise EngineError(f"reading the cached OpenVINO IR {xml} ran out of memory; "
                                  f"{MORE_MEMORY}") from exc
            # Missing, or damaged on disk: the cache is ours to make again.
            self._convert(xml)
        try:
            return read_ir(xml)
        except (OSError, RuntimeError, ElementTree.ParseError) as exc:
            raise EngineError(f"the OpenVINO IR just written to {xml} cannot be read back "
                              f"({first_line(exc)}); check that disk") from exc

    def _convert(self, xml: Path) -> None:
        import torch  # the one place in the engine that runs torch: a warm cache never converts

        xml.parent.mkdir(parents=True, exist_ok=True)
        module = self.model.module()
        side = 16 * self.size_multiple
        try:
            with torch.no_grad():
                converted = ov.convert_model(module, example_input=torch.rand(1, 3, side, side))
        except RuntimeError as exc:
            if _out_of_memory(exc):
                raise EngineError(f"converting {self.model.name} for OpenVINO ran out of memory; "
                                  f"{MORE_MEMORY}") from exc
            raise
        # Write beside the target and rename, .bin first: a present .xml means a complete pair even
        # if another process or a crash interrupted a conversion.
        tmp = temporary_beside(xml)
        with cache_writes(tmp):
            ov.save_model(converted, tmp, compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(tmp, xml)

    def precision_for(self, sample: str) -> str:
        """The precision a graph for `sample` runs at.

        bf16 carries 8 significant bits, so it would round 16-bit samples (10-bit video, 16-bit
        PNG) back to about 8 bits: under "auto" they run at f32. An explicit request is obeyed.
        """
        if sample == "u16" and self.settings.precision == "auto":
            return "f32"
        return self.precision

    def activation_bytes_per_pixel(self, sample: str) -> int:
        """Estimated inference memory per input pixel of a graph for `sample` (see ModelSpec)."""
        return self.model.spec.activation_bytes_per_pixel(2 if self.precision_for(sample) in ("bf16", "f16") else 4)

    def check_outscale(self, outscale: int) -> None:
        if not 1 <= outscale <= self.native_scale:
            raise UsageError(f"scale {outscale} is not possible with {self.model.name} "
                             f"(native x{self.native_scale}); use a scale from 1 to {self.native_scale}")

    def upscaler(self, tile_shape: tuple[int, int], *, batch: int = 1, outscale: int | None = None,
                 sample: str = "u8", streams: int = 0, requests: int = 0) -> Upscaler:
        """The compiled model for exactly this input shape, compiling it on first use.

        streams: parallel inference streams on the device (0: OpenVINO's throughput default).
        requests: inference requests its queues keep in flight (0: EngineSettings.requests, else
        what OpenVINO finds optimal); the same compiled model serves every count.
        """
        outscale = self.native_scale if outscale is None else outscale
        self.check_outscale(outscale)
        if sample not in SAMPLE_TYPES:
            raise UsageError(f"unknown sample type {sample!r}; use one of {', '.join(SAMPLE_TYPES)}")
        h, w = tile_shape
        m = self.size_multiple
        if h <= 0 or w <= 0 or h % m or w % m or batch <= 0:
            raise EngineError(f"tile shape {h}x{w} (batch {batch}) is not valid for {self.model.name}: "
                              f"height and width must be positive multiples of {m}")
        precision = self.precision_for(sample)
        key = (h, w, batch, outscale, sample, precision, self.settings.device, streams)
        with self._lock:
            upscaler = recall(self._compiled, key)
            if upscaler is None:
                ir = self._int8_ir.clone() if self._int8_ir is not None else self.float_ir()
                upscaler = keep(self._compiled, key, self.wrap(ir, h, w, batch=batch, outscale=outscale,
                                                              sample=sample, precision=precision, streams=streams))
        return upscaler if requests in (0, upscaler.requests) else upscaler.with_requests(requests)

    def wrap(self, ir: ov.Model, h: int, w: int, *, batch: int, outscale: int, sample: str,
             precision: str, streams: int = 0) -> Upscaler:
        """Compile `ir` (consumed: it is reshaped in place) for exactly this shape."""
        graph = _static_graph(ir, batch, h, w, self.native_scale, outscale, sample)
        config = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "CACHE_DIR": str(self.settings.resolved_cache_dir / "openvino"),
        }
        if streams:
            config["NUM_STREAMS"] = str(streams)
        if not _is_virtual(self.settings.device):
            # An INT8 graph carries its precision in its FakeQuantize nodes; the hint only sets
            # what the layers left in float (first and last convolution, RRDBNet's residual
            # additions) run at: bf16 where the device has it, as under "auto". Measured against
            # f32 there, on animevideov3 on one core: INT8 1.74x bf16 instead of 1.60-1.62x (480x640,
            # 272x640; on two cores now 1.78-1.79x), the gate's PSNR within 0.07 dB on both models
            # and both demo clips.
            float_precision = resolve_precision(self.settings.device, "auto")
            config["INFERENCE_PRECISION_HINT"] = float_precision if precision == "int8" else precision
        try:
            compiled = core().compile_model(graph, self.settings.device, config)
        except RuntimeError as exc:
            hint = f"; it ran out of memory: {MORE_MEMORY}" if _out_of_memory(exc) else ""
            raise EngineError(f"OpenVINO could not compile {self.model.name} for {h}x{w} on "
                              f"{self.settings.device} ({first_line(exc)}){hint}") from exc
        return Upscaler(compiled, self.model.name, outscale, sample, self.settings.requests)


def _static_graph(model: ov.Model, n: int, h: int, w: int, native: int, outscale: int,
                  sample: str) -> ov.Model:
    """The model reshaped to [n,3,h,w], wrapped so frames go in and out as NHWC samples."""
    model.reshape({model.inputs[0]: ov.PartialShape([n, 3, h, w])})
    ov_type, _, peak = SAMPLE_TYPES[sample]
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov_type).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    if sample != "f32":
        ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(peak)
    ppp.output().model().set_layout(ov.Layout("NCHW"))
    ppp.output().tensor().set_layout(ov.Layout("NHWC")).set_element_type(ov_type)

    def finish(node):
        if outscale != native:
            # Real-ESRGAN's "outscale": an anti-aliased resize of the native output, so x2 from an
            # x4 model is a clean downscale rather than dropped pixels.
            node = _downscale(node, h * native, w * native, native, outscale)
        if sample == "f32":
            return node if isinstance(node, ov.Output) else node.output(0)
        # OpenVINO's float->integer convert truncates and wraps (300 -> 44): clamp, then add 0.5 so
        # the truncation rounds to nearest.
        node = ops.clamp(node, 0.0, 1.0)
        return ops.add(ops.multiply(node, np.float32(peak)), np.float32(0.5)).output(0)

    ppp.output().postprocess().custom(finish)
    return ppp.build()


def _downscale(node, height: int, width: int, native: int, outscale: int):
    """Pillow's anti-aliased bicubic resize of an [n,c,height,width] node by outscale/native."""
    if native % outscale:
        sizes = np.array([height * outscale // native, width * outscale // native], dtype=np.int64)
        return ops.interpolate(node, sizes, mode="bicubic_pillow", shape_calculation_mode="sizes",
                               antialias=True, axes=np.array([2, 3], dtype=np.int64))
    # By an integer factor f the same filter weighs every output pixel's 4f source rows and columns
    # alike: a depthwise convolution with stride f per axis (two 1-D passes ran faster than one
    # 4f x 4f kernel). OpenVINO's CPU Interpolate took 15-60 s to compile at 240x320-480x640 on a
    # busy 2-core machine, for every shape, even from CACHE_DIR; these compile in 0.1-0.3 s.
    f = native // outscale
    taps, before = _bicubic_taps(f)
    after = len(taps) - f - before
    channels = node.get_partial_shape()[1].get_length()
    kernel = np.ascontiguousarray(np.broadcast_to(taps.astype(np.float32), (channels, 1, 1, len(taps))))
    node = ops.group_convolution(node, kernel[..., None, :], [1, f], [0, before], [0, after], [1, 1])
    node = ops.group_convolution(node, kernel[..., :, None], [f, 1], [before, 0], [after, 0], [1, 1])
    # Pillow leaves out the taps beyond the frame's edge and rescales the others to sum to 1: with
    # zero padding, a division by the weight inside the frame, one factor per row times one per column.
    inside = np.outer(_weight_inside(height, f), _weight_inside(width, f))
    return ops.multiply(node, (1.0 / inside).astype(np.float32)[None, None])


def _bicubic_taps(f: int) -> tuple[np.ndarray, int]:
    """Pillow's bicubic (a = -0.5) weights for a downscale by integer f, summing to 1, and how many
    of them fall before the output pixel's first source pixel: output i reads from f*i - before."""
    offsets = np.arange(-2 * f, 3 * f)
    # Pillow centres output i on source coordinate (i + 0.5) f and stretches the filter f times.
    x = np.abs(offsets + 0.5 - 0.5 * f) / f
    weights = np.where(x < 1, (1.5 * x - 2.5) * x * x + 1,
                       np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))
    used = np.flatnonzero(weights)
    weights = weights[used[0]:used[-1] + 1]
    return weights / weights.sum(), -int(offsets[used[0]])


def _weight_inside(size: int, f: int) -> np.ndarray:
    """Per output pixel along an axis of `size` source pixels: the sum of its taps inside the frame."""
    taps, before = _bicubic_taps(f)
    inside = np.pad(np.ones(size), (before, len(taps) - f - before))
    return np.correlate(inside, taps, mode="valid")[::f]


def recall(cache: OrderedDict, key):
    """What a cache of compiled models holds under `key` (None: nothing), now its most recent."""
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def keep(cache: OrderedDict, key, value):
    """`value` kept under `key` in a cache of the last COMPILED_CACHE_SIZE used; returned."""
    cache[key] = value
    if len(cache) > COMPILED_CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _out_of_memory(exc: BaseException) -> bool:
    """Whether OpenVINO or torch failed for want of memory (under a ulimit or a container's limit)."""
    return any(sign in str(exc) for sign in ("bad_alloc", "Cannot allocate memory", "can't allocate memory"))


def read_ir(xml: Path) -> ov.Model:
    """The OpenVINO IR at `xml`. Raises OSError (missing), ElementTree.ParseError or RuntimeError
    (damaged)."""
    # OpenVINO offers XML it cannot read to every frontend, and TensorFlow's writes its own parse
    # errors to stderr: damaged XML is caught first. Bad weights surface as a RuntimeError.
    ElementTree.parse(xml)
    return core().read_model(xml)


class Upscaler:
    """A model compiled for one static shape: (batch, h, w, 3) samples in, (batch, h*s, w*s, 3) out."""

    def __init__(self, compiled: ov.CompiledModel, name: str, scale: int, sample: str, requests: int):
        self.compiled = compiled
        self.name = name
        self.scale = scale
        self.sample = sample
        self.dtype = SAMPLE_TYPES[sample][1]
        self.input_shape = tuple(compiled.input(0).shape)
        self.output_shape = tuple(compiled.output(0).shape)
        n, h, w, c = self.input_shape
        expected = (n, h * scale, w * scale, c)
        if self.output_shape != expected:
            raise EngineError(f"{name} compiled for {h}x{w} gives output {self.output_shape}, "
                              f"expected {expected}; this model cannot be used at this shape")
        self.requests = requests or compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        self._sync_request = compiled.create_infer_request()

    def with_requests(self, requests: int) -> Upscaler:
        """The same compiled model, its queues keeping `requests` requests in flight."""
        other = copy.copy(self)
        other.requests = requests
        return other

    def check(self, batch: np.ndarray) -> None:
        if batch.shape != self.input_shape or batch.dtype != self.dtype:
            raise EngineError(
                f"refusing to run {self.name}: input {batch.shape} {batch.dtype} does not match the "
                f"compiled shape {self.input_shape} {np.dtype(self.dtype)}")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Synchronous inference of one batch; the result is a new array the caller owns."""
        self.check(batch)
        result = self._sync_request.infer(batch)
        out = result[0]
        _check_output(out, self)
        return out.copy()

    def queue(self, on_result: Callable[[Any, np.ndarray], None]) -> InferQueue:
        return InferQueue(self, on_result)


def _check_output(out: np.ndarray, upscaler: Upscaler) -> None:
    if out.shape != upscaler.output_shape:
        raise EngineError(f"{upscaler.name} returned {out.shape}, expected {upscaler.output_shape}")


class InferQueue:
    """AsyncInferQueue whose callback never raises.

    `on_result(userdata, output)` runs on an OpenVINO thread with a view of the request's output that
    is valid only during the call (copy what you keep). An exception escaping an OpenVINO callback
    aborts the process, so the first error is parked here and re-raised by `wait_all` and every later
    `submit` in the owner's thread; results arriving after it are dropped.
    """

    def __init__(self, upscaler: Upscaler, on_result: Callable[[Any, np.ndarray], None]):
        self.upscaler = upscaler
        self._on_result = on_result
        self._error: BaseException | None = None
        self._queue = ov.AsyncInferQueue(upscaler.compiled, upscaler.requests)
        self._queue.set_callback(self._done)

    def __len__(self) -> int:
        return len(self._queue)

    def _done(self, request: ov.InferRequest, userdata: Any) -> None:
        if self._error is not None:
            return
        try:
            out = request.get_output_tensor(0).data
            _check_output(out, self.upscaler)
            self._on_result(userdata, out)
        except BaseException as exc:  # noqa: BLE001 - must not escape into OpenVINO's thread
            self._error = exc

    def submit(self, batch: np.ndarray, userdata: Any) -> None:
        """Start inference of `batch`; it is copied into the request, so the caller may reuse it."""
        self.raise_parked()
        self.upscaler.check(batch)
        self._queue.start_async(batch, userdata, share_inputs=False)

    def wait_all(self) -> None:
        self._queue.wait_all()
        self.raise_parked()

    def raise_parked(self) -> None:
        if self._error is not None:
            raise self._error
