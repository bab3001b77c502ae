"""The TensorRT backend (TensorRT >= 10): engines built from the exported ONNX files, run on
preallocated torch CUDA buffers, optionally replayed as CUDA graphs.

* :func:`build_engine` - one ONNX file -> serialized engine (fp32 / fp16 / bf16; fp8 and int8 only
  for ONNX files that carry explicit Q/DQ quantization, else :class:`NotImplementedError`).
* :class:`TrtEngine` - one deserialized engine: an execution context whose I/O tensor addresses are
  torch CUDA tensors, enqueued on torch's current stream (``execute_async_v3``); with
  ``cuda_graph=True`` the enqueue is captured once and replayed (static input/output buffers).
  Engines of one backend share one activation workspace (calls are sequential on one stream).
* :class:`TrtBackend` - the fast sampler's backend over an export directory (selection of the file
  whose static shapes match each call, as the ORT backend), engines from :mod:`.engine_cache`.
* :func:`build_engines` - build/refresh the engines of a whole export (``python -m dp360rt.export --to trt``).

``tensorrt`` is imported only here and only when used; ``dp360rt`` imports without it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .engine_cache import EngineCache, EngineKey, onnx_content_sha256
from .exported import ExportedBackend
from .manifest import ExportedFile, ExportManifest, ExportMismatchError

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")


class TrtUnavailableError(ImportError, RuntimeError):
    """TensorRT >= 10 or a CUDA GPU is missing (an ``ImportError``: an optional dependency)."""


_TRT_FIX = "Fix: pip install tensorrt (>= 10, CUDA 12 wheels) on a CUDA GPU machine, or use --backend ort (backend='ort')"


def import_trt():
    """``tensorrt`` (>= 10) with a CUDA device, else :class:`TrtUnavailableError` saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TrtUnavailableError(f"TensorRT is not installed: the trt backend needs TensorRT >= 10. {_TRT_FIX}") from e
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TrtUnavailableError(f"TensorRT {trt.__version__} found; the trt backend needs >= 10. {_TRT_FIX}")
    if not torch.cuda.is_available():
        raise TrtUnavailableError(f"the trt backend needs a CUDA GPU (torch.cuda.is_available() is False). {_TRT_FIX}")
    return trt


_LOGGER = None


def _logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def environment(device: int | str | torch.device | None = None) -> dict[str, str]:
    """The engine-cache key fields of this machine: TensorRT version, GPU name, compute capability."""
    trt = import_trt()
    dev = torch.device(device if device is not None else "cuda")
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return {"trt_version": str(trt.__version__), "gpu_name": torch.cuda.get_device_name(idx),
            "compute_capability": f"{major}.{minor}"}


# -- building ----------------------------------------------------------------------------------------
STRONGLY_TYPED_FROM = (10, 12)     # BuilderFlag.FP16/BF16 are deprecated from here and removed in 11


def trt_version(trt) -> tuple[int, int]:
    """(major, minor) of a ``tensorrt`` module."""
    parts = (str(trt.__version__).split(".") + ["0"])[:2]
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def precision_setup(trt, precision: str) -> tuple[int, list, list]:
    """(network creation flags, builder flags to set, builder flags to clear) for ``precision``.

    From TensorRT 10.12 reduced precision comes from the ONNX file's own types: the network is
    strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; an ``--fp16`` export holds fp16
    weights and matmuls/convolutions) and no precision flag is set (they are deprecated there and
    gone in 11). Older TensorRT 10 builds a weakly typed network with ``FP16``/``BF16`` allowed."""
    strong = trt_version(trt) >= STRONGLY_TYPED_FROM
    if precision == "fp32":
        return 0, [], [trt.BuilderFlag.TF32]       # fp32 means fp32: no TF32 matmuls/convolutions
    if strong:
        if precision == "bf16":
            raise ValueError(f"TensorRT {trt.__version__} builds strongly typed networks, so bf16 engines need a "
                             "bf16 ONNX file, and the exporter writes fp16. Fix: build precision='fp16' from an "
                             "--fp16 export")
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED), [], []
    if precision in ("fp8", "int8"):
        return 0, [trt.BuilderFlag.FP8 if precision == "fp8" else trt.BuilderFlag.INT8, trt.BuilderFlag.FP16], []
    return 0, [trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16], []


def _has_explicit_quantization(trt, network) -> bool:
    kinds = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def build_engine(onnx_path: str | Path, precision: str = "fp16", workspace_bytes: int | None = None,
                 builder_optimization_level: int | None = None, log: Callable[[str], None] | None = None) -> bytes:
    """Parse one (static-shape) ONNX file and build a serialized engine.

    ``fp16``: from TensorRT 10.12 a strongly typed network of the file's own types (build from an
    ``--fp16`` export), before that a weakly typed one with fp16 kernels allowed
    (:func:`precision_setup`); ``bf16`` only before 10.12; ``fp32`` also turns TensorRT's default TF32 off. ``fp8``/``int8`` need explicit quantization (Q/DQ nodes, e.g. from NVIDIA's Model
    Optimizer) - TensorRT 10 deprecates implicit int8 calibration - so they raise
    :class:`NotImplementedError` for files without Q/DQ layers.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = import_trt()
    network_flags, set_flags, clear_flags = precision_setup(trt, precision)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags)   # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if builder_optimization_level is not None:
        config.builder_optimization_level = int(builder_optimization_level)
    if precision in ("fp8", "int8"):
        if not _has_explicit_quantization(trt, network):
            raise NotImplementedError(
                f"{precision} engines need an ONNX file with explicit Q/DQ quantization (TensorRT 10 dropped implicit "
                f"int8 calibration); {Path(onnx_path).name} has none. Quantize the exported file first (e.g. NVIDIA "
                "TensorRT Model Optimizer) or build fp16")
    for flag in set_flags:
        config.set_flag(flag)
    for flag in clear_flags:
        config.clear_flag(flag)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the TensorRT log above)")
    if log is not None:
        log(f"built {Path(onnx_path).name} ({precision}) in {time.perf_counter() - t0:.1f} s")
    return bytes(memoryview(serialized))


def engine_key(manifest: ExportManifest, entry: ExportedFile, precision: str, env: dict[str, str],
               memo: Path | None = None) -> EngineKey:
    """The cache key of ``entry``: the ONNX content hash is recomputed from the files (memoized by
    size/mtime), so an ONNX file replaced behind the manifest's back cannot reuse an old engine."""
    path = manifest.path(entry)
    data = manifest.dir / entry.data_file if entry.data_file else None
    content = onnx_content_sha256(path, data, memo)
    shapes = ";".join(f"{s.name}={'x'.join(map(str, s.shape))}:{s.dtype}" for s in entry.inputs)
    return EngineKey(onnx_sha256=content, precision=precision, profile=f"{','.join(entry.profiles)}|{shapes}",
                     trt_version=env["trt_version"], gpu_name=env["gpu_name"],
                     compute_capability=env["compute_capability"])


def _stem(entry: ExportedFile) -> str:
    return entry.file.removesuffix(".onnx").replace("/", "__")


# -- running -------------------------------------------------------------------------------------------
def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, tdt in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8),
                      ("FP8", getattr(torch, "float8_e4m3fn", None))):
        if hasattr(trt.DataType, name) and tdt is not None:
            table[getattr(trt.DataType, name)] = tdt
    return table[dt]


class _Workspace:
    """One activation buffer shared by every engine of a backend (their calls never overlap)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer: Tensor | None = None

    def ensure(self, nbytes: int) -> Tensor:
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=self.device)
        return self.buffer


class TrtEngine:
    """One engine with its execution context, I/O as torch CUDA tensors.

    Without CUDA graphs, inputs are bound in place (converted first only when dtype/layout differ)
    and outputs are fresh tensors from torch's caching allocator. With ``cuda_graph=True`` inputs
    are copied into static buffers, the captured enqueue is replayed and outputs are cloned out of
    the static buffers.
    """

    def __init__(self, engine_bytes: bytes, device: str | torch.device = "cuda", cuda_graph: bool = False,
                 workspace: _Workspace | None = None, name: str = "engine"):
        trt = import_trt()
        self.trt, self.name = trt, name
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise RuntimeError(f"{name}: TensorRT could not deserialize the engine (version or GPU mismatch?)")
        self.workspace = workspace
        self._shared_memory = False
        if workspace is not None and hasattr(trt, "ExecutionContextAllocationStrategy"):
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            self._shared_memory = True
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{name}: could not create an execution context (out of GPU memory?)")
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise ExportMismatchError(f"{name}: tensor {n} has a dynamic shape {shape}; build from static exports")
            self.specs[n] = (shape, _torch_dtype(trt, self.engine.get_tensor_dtype(n)))
            (self.inputs if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else self.outputs).append(n)
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, Tensor] = {}
        if cuda_graph:
            self.static = {n: torch.empty(s, dtype=d, device=self.device) for n, (s, d) in self.specs.items()}

    def _memory_size(self) -> int:
        e = self.engine
        return int(e.device_memory_size_v2 if hasattr(e, "device_memory_size_v2") else e.device_memory_size)

    def _bind_workspace(self) -> None:
        if self._shared_memory:
            buf = self.workspace.ensure(self._memory_size())
            if hasattr(self.context, "set_device_memory"):
                self.context.set_device_memory(buf.data_ptr(), buf.numel())
            else:
                self.context.device_memory = buf.data_ptr()

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed")

    def __call__(self, feeds: dict[str, Tensor]) -> list[Tensor]:
        stream = torch.cuda.current_stream(self.device)
        for n in self.inputs:
            shape, dt = self.specs[n]
            if tuple(feeds[n].shape) != shape:
                raise ExportMismatchError(f"{self.name}: input {n} {list(feeds[n].shape)} vs engine {list(shape)}")
        if self.cuda_graph:
            return self._call_graph(feeds, stream)
        self._bind_workspace()
        keep = []
        for n in self.inputs:
            _, dt = self.specs[n]
            v = feeds[n].to(self.device, dt).contiguous()
            keep.append(v)
            self.context.set_tensor_address(n, v.data_ptr())
        outs = [torch.empty(self.specs[n][0], dtype=self.specs[n][1], device=self.device) for n in self.outputs]
        for n, o in zip(self.outputs, outs):
            self.context.set_tensor_address(n, o.data_ptr())
        self._enqueue(stream)
        # `keep` and the outputs belong to torch's caching allocator on this same stream: memory is
        # only reused by work ordered after this enqueue.
        return outs

    def _call_graph(self, feeds: dict[str, Tensor], stream: torch.cuda.Stream) -> list[Tensor]:
        for n in self.inputs:
            self.static[n].copy_(feeds[n], non_blocking=True)
        if self.graph is None:
            self._bind_workspace()
            for n, t in self.static.items():
                self.context.set_tensor_address(n, t.data_ptr())
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                self._enqueue(side)        # one plain enqueue first (TensorRT's lazy setup), then capture
            side.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                self._enqueue(side)
            stream.wait_stream(side)
            self.graph = graph
            if self._shared_memory:
                # the captured kernels hold the workspace address: pin it for this graph's lifetime
                self._graph_workspace = self.workspace.buffer
        self.graph.replay()
        return [self.static[n].clone() for n in self.outputs]


class TrtBackend(ExportedBackend):
    """:class:`~dp360rt.backends.exported.ExportedBackend` on TensorRT engines (built on first use
    of each file, or loaded from the engine cache when the key matches exactly).

    ``precision``: engine precision (fp16 default); ``cache_dir``: engine cache (default
    ``EXPORT_DIR/engines``); ``rebuild=False`` refuses to build - a missing or stale engine raises
    :class:`~dp360rt.backends.engine_cache.StaleEngineError`; ``cuda_graphs``: replay each engine
    as a CUDA graph.
    """

    name = "trt"

    def __init__(self, export_dir: str | Path, kind: str, profiles: Iterable[str] | None = None, *,
                 precision: str = "fp16", cache_dir: str | Path | None = None, rebuild: bool = True,
                 cuda_graphs: bool = False, device: str | torch.device = "cuda", workspace_bytes: int | None = None,
                 share_activation_memory: bool = True, manifest: ExportManifest | None = None,
                 log: Callable[[str], None] | None = None):
        super().__init__(export_dir, kind, profiles, manifest)
        import_trt()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        self.precision = precision
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise TrtUnavailableError(f"the trt backend runs on CUDA devices, not {self.device}")
        self.cache = EngineCache(cache_dir or self.manifest.dir / "engines")
        self.rebuild, self.cuda_graphs, self.workspace_bytes, self.log = rebuild, cuda_graphs, workspace_bytes, log
        self.env = environment(self.device)
        self.workspace = _Workspace(self.device) if share_activation_memory else None

    @classmethod
    def from_model(cls, model: Any, export_dir: str | Path | None = None, profile: str | Sequence[str] | None = None,
                   *, verify_weights: bool = True, **kw: Any) -> "TrtBackend":
        if export_dir is None:
            raise ExportMismatchError("the trt backend builds engines from exported ONNX files: pass export_dir=DIR")
        manifest = ExportManifest.load(export_dir)
        profiles = [profile] if isinstance(profile, str) else profile
        dev = next(model.parameters()).device
        kw.setdefault("device", dev if dev.type == "cuda" else "cuda")
        backend = cls(export_dir, model.kind, profiles, manifest=manifest, **kw)
        cls._check_model(manifest, model, backend.entries, verify_weights)
        return backend

    def engine_bytes(self, entry: ExportedFile) -> tuple[bytes, Path, bool]:
        key = engine_key(self.manifest, entry, self.precision, self.env, self.cache.dir / "onnx_hashes.json")
        path = self.manifest.path(entry)
        return self.cache.get(_stem(entry), key,
                              lambda: build_engine(path, self.precision, self.workspace_bytes, log=self.log),
                              rebuild=self.rebuild, extra={"onnx_file": entry.file})

    def _make_runner(self, entry: ExportedFile) -> Callable[[dict[str, Tensor]], list[Tensor]]:
        data, _, _ = self.engine_bytes(entry)
        eng = TrtEngine(data, self.device, self.cuda_graphs, self.workspace, name=entry.file)
        want = [s.name for s in entry.outputs]
        if sorted(eng.outputs) != sorted(want) or sorted(eng.inputs) != sorted(s.name for s in entry.inputs):
            raise ExportMismatchError(f"{entry.file}: engine I/O {eng.inputs} -> {eng.outputs} differs from the "
                                      "manifest's; re-export and rebuild")
        order = [eng.outputs.index(n) for n in want]     # the manifest's output order

        def run(feeds: dict[str, Tensor]) -> list[Tensor]:
            outs = eng(feeds)
            x = next((v for v in feeds.values() if v.is_floating_point()), None)
            dt = x.dtype if x is not None else torch.float32
            return [outs[i].to(dt) if outs[i].is_floating_point() and outs[i].dtype != dt else outs[i] for i in order]
        return run


def build_engines(export_dir: str | Path, precision: str = "fp16", cache_dir: str | Path | None = None,
                  workspace_bytes: int | None = None, kinds: Iterable[str] | None = None,
                  profiles: Iterable[str] | None = None, rebuild: bool = True,
                  log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Build (or find in the cache) the engine of every file of an export; one summary row per file."""
    import_trt()
    manifest = ExportManifest.load(export_dir)
    cache = EngineCache(cache_dir or manifest.dir / "engines")
    env = environment()
    want_profiles = None if profiles is None else set(profiles)
    rows = []
    for entry in manifest.files:
        if kinds is not None and entry.kind not in set(kinds):
            continue
        if want_profiles is not None and not want_profiles & set(entry.profiles):
            continue
        t0 = time.perf_counter()
        key = engine_key(manifest, entry, precision, env, cache.dir / "onnx_hashes.json")
        data, path, cached = cache.get(_stem(entry), key,
                                       lambda: build_engine(manifest.path(entry), precision, workspace_bytes, log=log),
                                       rebuild=rebuild, extra={"onnx_file": entry.file})
        rows.append({"file": entry.file, "engine": str(path), "bytes": len(data), "cached": cached,
                     "seconds": time.perf_counter() - t0})
    return rows
