"""Export DiffPortrait360's networks to static-shape ONNX files plus ``manifest.json``.

One file per (model kind, network, batch shape); shape profiles (:mod:`dp360rt.export.profiles`) decide
which shapes; a shape shared by several profiles is exported once and listed under each.

Files that differ only in batch size are traced once, at the smallest batch with the same structure
(one sample; one window for the 360° UNets and pose net), with the batch dimension symbolic, and
then written once per batch size with every input and output dimension pinned to static values.
Tracing runs the network, so this keeps the exporter's memory and time at the small batch: the
``batch32`` UNet at full size traces like the ``window8`` one. The weights live outside the graphs
in one external-data file per model kind (``KIND/weights.data``) that holds every distinct tensor
once: the batch sizes of a network, and networks with the same weights (the UNet with and without
the bank, in every profile), read the same bytes. Every file is
checked with ``onnx.checker`` (path-based, full check), hashed, and described in the manifest
(module, profiles, input/output names, shapes and dtypes, opset, precision, traced batch, sha256 of
the file, of the weights file and of the weights it was made from).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from dp360rt.backends.manifest import MANIFEST_FORMAT, MANIFEST_NAME, MODULE_PREFIX, config_json, state_dict_hashes
from dp360rt.model import DiffPortrait360
from dp360rt.text.clip import empty_prompt_ids

from . import wrappers as W
from .profiles import LATENT_FACTOR, MODULES, Profile

STORE_NAME = "weights.data"
INLINE_BYTES = 1024                        # smaller tensors stay inside the graph file
EXPORTERS = ("auto", "torchscript", "dynamo")
PRECISIONS = ("fp32", "fp16")
N_BANK_NAME = "bank_{:02d}"
N_RES_NAME = "res_{:02d}"


@dataclass
class ExportOptions:
    opset: int = 17
    precision: str = "fp32"            # fp32 | fp16 (fp16 weights + matmuls/convs, see dp360rt.export.fp16)
    exporter: str = "auto"             # torchscript (preferred) | dynamo | auto (torchscript, else dynamo)
    attention: str = "lse"             # lse | concat (see dp360rt.export.wrappers.export_attention)
    check: bool = True                 # onnx.checker (full check) on every written file
    modules: tuple[str, ...] | None = None   # subset of MODULES (None: all)
    release_weights: bool = False      # free each network's weights once its files are written (big exports)

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ValueError(f"opset {self.opset} < 17: LayerNormalization needs opset 17")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {EXPORTERS}")
        if self.attention not in W.ATTENTION_MODES:
            raise ValueError(f"attention must be one of {W.ATTENTION_MODES}")
        bad = [m for m in self.modules or () if m not in MODULES]
        if bad:
            raise ValueError(f"unknown module(s) {bad}; choose from {MODULES}")


@dataclass
class ExportJob:
    """One ONNX file to write."""

    kind: str
    module: str
    rows: int
    cond_rows: int | None
    refs: int
    profiles: list[str] = field(default_factory=list)
    trace_rows: int = 0                # batch the graph is traced at (0: rows)
    image_hw: tuple[int, int] | None = None   # (height, width) pixels; None: the config's square size

    def __post_init__(self) -> None:
        self.trace_rows = self.trace_rows or self.rows

    @property
    def file(self) -> str:
        size = "" if self.image_hw is None or self.module == "text" else f"_{self.image_hw[0]}x{self.image_hw[1]}"
        if self.module == "unet":
            return f"{self.kind}/unet_b{self.rows}_c{self.cond_rows}_r{self.refs}{size}.onnx"
        if self.module == "appearance":
            return f"{self.kind}/appearance_r{self.rows}{size}.onnx"
        return f"{self.kind}/{self.module}_b{self.rows}{size}.onnx"

    @property
    def size_key(self) -> tuple[int, int] | None:
        """The image size as far as this network sees it (the text tower sees none)."""
        return None if self.module == "text" else self.image_hw

    def latent_hw(self, model: DiffPortrait360) -> tuple[int, int]:
        """Latent (height, width) of this file's inputs."""
        square = model.cfg.latent_size
        return (square, square) if self.image_hw is None else (self.image_hw[0] // LATENT_FACTOR,
                                                               self.image_hw[1] // LATENT_FACTOR)

    @property
    def key(self) -> tuple:
        return (self.kind, self.module, self.rows, self.cond_rows, self.refs if self.module == "unet" else None,
                self.size_key)

    @property
    def all_conditional(self) -> bool:
        return self.module == "unet" and self.cond_rows == self.rows

    @property
    def trace_key(self) -> tuple:
        """Jobs with equal trace keys are one graph at different batch sizes."""
        cond = "all" if self.all_conditional else self.cond_rows
        return (self.kind, self.module, self.trace_rows, cond, self.refs if self.module == "unet" else None,
                self.size_key)

    def traced(self) -> "ExportJob":
        """This job at its trace batch."""
        return dataclasses.replace(self, rows=self.trace_rows,
                                   cond_rows=self.trace_rows if self.all_conditional else self.cond_rows)

    def input_rows(self, name: str) -> int:
        """Batch (first) dimension of input ``name`` in this file."""
        return self.cond_rows if self.module == "unet" and name.startswith("res_") else self.rows


@dataclass
class SummaryRow:
    kind: str
    module: str
    profiles: list[str]
    file: str
    bytes: int
    seconds: float
    cpu_seconds: float = float("nan")
    shared_bytes: int = 0              # weights it reads that earlier files wrote (not in ``bytes``)


# -- planning ----------------------------------------------------------------------------------------
def trace_rows(module: str, rows: int, cond_rows: int | None, frames: int) -> int:
    """The smallest batch with the structure of a ``rows``-row call: samples are independent in
    the text tower and the VAE (1 row), windows of ``frames`` rows in the pose net and the UNets.
    The appearance net (its rows are the bank's references) and a UNet call mixing conditional and
    unconditional rows (the split is a constant of the graph) are traced as they are."""
    if module in ("text", "vae_encoder", "vae_decoder"):
        return 1
    if module == "appearance" or (module == "unet" and cond_rows != rows):
        return rows
    return frames


def plan_jobs(models: Mapping[str, DiffPortrait360], profiles: Iterable[Profile],
              modules: Iterable[str] | None = None) -> list[ExportJob]:
    """The files the profiles need, each once, ordered network by network (small ones first)."""
    modules = tuple(modules or MODULES)
    jobs: dict[tuple, ExportJob] = {}
    for p in profiles:
        if p.kind not in models:
            raise ValueError(f"profile {p.name!r} is for the {p.kind} model, which was not given "
                             f"(pass --{p.kind} CKPT, or drop the profile)")
        frames = models[p.kind].frames
        for module in modules:
            for rows, cond in p.batches(module):
                if module in ("unet", "unet_nobank", "pose") and (rows % frames or (cond or 0) % frames):
                    raise ValueError(f"profile {p.name!r}: {module} batch {rows} (cond {cond}) is not a multiple "
                                     f"of the {p.kind} model's {frames}-frame window")
                job = ExportJob(p.kind, module, rows, cond, p.refs, trace_rows=trace_rows(module, rows, cond, frames),
                                image_hw=None if module == "text" else p.image_hw)
                job = jobs.setdefault(job.key, job)
                if p.name not in job.profiles:
                    job.profiles.append(p.name)
    order = {m: i for i, m in enumerate(MODULES)}
    return sorted(jobs.values(), key=lambda j: (j.kind, order[j.module], j.rows, j.cond_rows or 0))


def group_jobs(jobs: Iterable[ExportJob]) -> list[list[ExportJob]]:
    """Jobs grouped by trace (one traced graph each), in plan order, smallest batch first."""
    groups: dict[tuple, list[ExportJob]] = {}
    for j in jobs:
        groups.setdefault(j.trace_key, []).append(j)
    return [sorted(g, key=lambda j: j.rows) for g in groups.values()]


# -- example inputs and wrappers -----------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _meta_model(kind: str, cfg: Any) -> DiffPortrait360:
    from dp360rt.model import build_model
    return build_model(kind, cfg, device="meta")


def _meta_shapes(model: DiffPortrait360, refs: int, rows: int,
                 latent_hw: tuple[int, int]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(bank entry shapes [refs, HW, C], pose residual shapes [rows, C, h, w]) without computing anything."""
    m = _meta_model(model.kind, model.cfg)
    cfg = model.cfg
    h, w = latent_hw
    ctx = torch.empty(refs, cfg.text.max_position_embeddings, cfg.unet.context_dim, device="meta")
    with torch.no_grad():
        entries = W.AppearanceExport(m)(torch.empty(refs, 4, h, w, device="meta"),
                                        torch.zeros(refs, dtype=torch.long, device="meta"), ctx)
        res = W.PoseExport(m)(torch.empty(rows, 4, h, w, device="meta"),
                              torch.empty(rows, 3, LATENT_FACTOR * h, LATENT_FACTOR * w, device="meta"),
                              torch.zeros(rows, dtype=torch.long, device="meta"),
                              torch.empty(rows, ctx.shape[1], ctx.shape[2], device="meta"))
    return [tuple(e.shape) for e in entries], [tuple(r.shape) for r in res]


def build_job(job: ExportJob, model: DiffPortrait360,
              seed: int = 0) -> tuple[nn.Module, tuple[Tensor, ...], list[str], list[str]]:
    """(wrapper module, example inputs, input names, output names) of one file."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    h, w = job.latent_hw(model)
    sh, sw = LATENT_FACTOR * h, LATENT_FACTOR * w
    ctx_len, cdim = cfg.text.max_position_embeddings, cfg.unet.context_dim
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    unif = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1  # noqa: E731
    b = job.rows
    t = lambda n: torch.full((n,), 500, dtype=torch.long)  # noqa: E731
    if job.module == "text":
        ids = empty_prompt_ids(ctx_len).expand(b, -1).contiguous()
        return W.TextExport(model), (ids,), ["token_ids"], ["context"]
    if job.module == "vae_encoder":
        return W.VAEEncoderExport(model), (unif(b, 3, sh, sw),), ["image"], ["mean", "logvar"]
    if job.module == "vae_decoder":
        return W.VAEDecoderExport(model), (randn(b, 4, h, w),), ["latent"], ["image"]
    if job.module == "appearance":
        entries, _ = _meta_shapes(model, b, 1, (h, w))
        return (W.AppearanceExport(model), (randn(b, 4, h, w), t(b), randn(b, ctx_len, cdim)),
                ["refs", "t", "context"], [N_BANK_NAME.format(i) for i in range(len(entries))])
    if job.module == "pose":
        _, res = _meta_shapes(model, 1, b, (h, w))
        return (W.PoseExport(model), (randn(b, 4, h, w), unif(b, 3, sh, sw), t(b), randn(b, ctx_len, cdim)),
                ["x", "hint", "t", "context"], [N_RES_NAME.format(i) for i in range(len(res))])
    base = (randn(b, 4, h, w), t(b), randn(b, ctx_len, cdim))
    if job.module == "unet_nobank":
        return W.UNetNoBankExport(model), base, ["x", "t", "context"], ["eps"]
    if job.module == "unet":
        entries, res = _meta_shapes(model, job.refs, job.cond_rows, (h, w))
        bank = tuple(randn(1, e[0] * e[1], e[2]) for e in entries)
        resid = tuple(randn(*r) for r in res)
        names = (["x", "t", "context"] + [N_BANK_NAME.format(i) for i in range(len(bank))]
                 + [N_RES_NAME.format(i) for i in range(len(resid))])
        return W.UNetExport(model, job.cond_rows, len(bank), len(resid)), base + bank + resid, names, ["eps"]
    raise ValueError(job.module)


# -- one file -------------------------------------------------------------------------------------------
def _torch_export(wrapper: nn.Module, args: tuple[Tensor, ...], path: Path, in_names: list[str],
                  out_names: list[str], opts: ExportOptions) -> str:
    """Write ``path`` with torch's exporter, the batch (first) dimension of every input but the
    bank entries and of every output symbolic; returns the exporter used."""
    batched = [n for n in in_names if not n.startswith("bank_")] + list(out_names)

    def torchscript() -> None:
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opts.opset,
                          input_names=in_names, output_names=out_names, do_constant_folding=True,
                          dynamic_axes={n: {0: f"{n}_rows"} for n in batched})

    def dynamo() -> None:
        from torch.export import Dim
        shapes = tuple({0: Dim.AUTO} if n in batched else None for n in in_names)   # AUTO: may specialize
        torch.onnx.export(wrapper, args, str(path), dynamo=True, opset_version=max(opts.opset, 18),
                          input_names=in_names, output_names=out_names, external_data=True, optimize=True,
                          verbose=False, dynamic_shapes=shapes)

    with warnings.catch_warnings(), W.export_attention(opts.attention), torch.no_grad():
        warnings.simplefilter("ignore")
        if opts.exporter == "dynamo":
            dynamo()
            return "dynamo"
        try:
            torchscript()
            return "torchscript"
        except (TypeError, NotImplementedError, RuntimeError) as e:
            msg = str(e).lower()
            if opts.exporter == "torchscript" or not ("dynamo" in msg or "torchscript" in msg):
                raise
            print(f"TorchScript exporter unavailable ({e}); using the dynamo exporter", file=sys.stderr)
            dynamo()
            return "dynamo"


def _meta_output_shapes(job: ExportJob, model: DiffPortrait360) -> list[tuple[int, ...]]:
    """Output shapes of a file's wrapper, from a run on meta tensors (no compute)."""
    wrapper, args, _, _ = build_job(job, _meta_model(model.kind, model.cfg))
    with torch.no_grad():
        out = wrapper(*(a.to("meta") for a in args))
    return [tuple(o.shape) for o in (out if isinstance(out, (tuple, list)) else (out,))]


def _pin_shapes(proto: Any, job: ExportJob, out_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Make every graph input and output static for ``job``'s batch; drop the traced intermediate
    shapes (runtimes infer them again from the now-static inputs)."""
    inits = {i.name for i in proto.graph.initializer}
    for v in proto.graph.input:
        if v.name not in inits and not v.name.startswith("bank_"):
            v.type.tensor_type.shape.dim[0].dim_value = job.input_rows(v.name)   # replaces the symbolic dim
    for v in proto.graph.output:
        dims = v.type.tensor_type.shape.dim
        want = out_shapes[v.name]
        if len(dims) not in (0, len(want)):
            raise RuntimeError(f"output {v.name}: exported rank {len(dims)} differs from the model's {len(want)}")
        del dims[:]
        for d in want:
            dims.add().dim_value = int(d)
    del proto.graph.value_info[:]


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _dtype_name(elem_type: int) -> str:
    import onnx
    return {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
            onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool", onnx.TensorProto.BFLOAT16: "bfloat16",
            onnx.TensorProto.UINT8: "uint8"}[elem_type]


def _io_specs(graph: Any) -> tuple[list[dict], list[dict]]:
    def spec(v: Any) -> dict:
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if any(d < 0 for d in dims):
            raise RuntimeError(f"tensor {v.name} has a dynamic dimension {dims}; exports must be static")
        return {"name": v.name, "shape": dims, "dtype": _dtype_name(tt.elem_type)}
    inits = {i.name for i in graph.initializer}
    return [spec(v) for v in graph.input if v.name not in inits], [spec(v) for v in graph.output]


class WeightStore:
    """One model kind's external-data file: every distinct weight tensor once, found by content.

    :meth:`externalize` moves a graph's initializers (``INLINE_BYTES`` or more) into the file and
    points them at their bytes (location, offset, length); a tensor already there is not written
    again. The file is started afresh for each export of the kind."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.size = 0
        self._index: dict[bytes, tuple[int, int]] = {}

    def externalize(self, proto: Any) -> tuple[int, int]:
        """Externalize ``proto``'s initializers in place -> (bytes it reads, bytes newly written)."""
        import onnx
        read = written = 0
        with open(self.path, "ab") as f:
            for t in proto.graph.initializer:
                if not t.HasField("raw_data") or len(t.raw_data) < INLINE_BYTES:
                    continue
                key = hashlib.sha256(t.raw_data).digest()
                if key not in self._index:
                    f.write(t.raw_data)
                    self._index[key] = (self.size, len(t.raw_data))
                    self.size += len(t.raw_data)
                    written += len(t.raw_data)
                offset, length = self._index[key]
                read += length
                del t.external_data[:]
                for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
                t.data_location = onnx.TensorProto.EXTERNAL
                t.ClearField("raw_data")
        return read, written


def export_group(jobs: list[ExportJob], model: DiffPortrait360, out_dir: Path, opts: ExportOptions,
                 store: WeightStore) -> list[dict]:
    """Trace one graph for ``jobs`` (same network, different batch sizes; see :func:`group_jobs`),
    convert it (fp16), move its weights into ``store``, and write, check and hash one
    static-shape graph file per job. Returns the manifest entries (``data_sha256`` is filled in
    by :func:`export_models` once the store is complete; ``new_bytes``: what the store grew by)."""
    import onnx
    t0, c0 = time.perf_counter(), time.process_time()
    lead = jobs[0]
    tmp = out_dir / ".tmp" / lead.file.replace("/", "__")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        wrapper, args, in_names, out_names = build_job(lead.traced(), model)
        wrapper.eval()
        exporter = _torch_export(wrapper, args, tmp / "model.onnx", in_names, out_names, opts)
        del wrapper, args
        proto = onnx.load(str(tmp / "model.onnx"), load_external_data=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fp16_stats = None
    if opts.precision == "fp16":
        from .fp16 import convert_mixed_fp16
        fp16_stats = convert_mixed_fp16(proto)
    weight_bytes = sum(i.ByteSize() for i in proto.graph.initializer)
    read, written = store.externalize(proto)
    proto.producer_name = "dp360rt-export"
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opts.opset)
    data_file = (Path(lead.file).parent / store.path.name).as_posix() if read else None
    entries = []
    for job in jobs:
        final = out_dir / job.file
        final.unlink(missing_ok=True)
        _pin_shapes(proto, job, dict(zip(out_names, _meta_output_shapes(job, model))))
        onnx.save_model(proto, str(final))
        in_specs, out_specs = _io_specs(proto.graph)
        if opts.check:
            onnx.checker.check_model(str(final), full_check=True)
        graph_bytes = final.stat().st_size
        entries.append({
            "file": job.file, "kind": job.kind, "module": job.module, "profiles": list(job.profiles), "rows": job.rows,
            "cond_rows": job.cond_rows, "refs": job.refs, "traced_rows": job.trace_rows, "inputs": in_specs,
            "outputs": out_specs, "opset": opset, "precision": opts.precision, "exporter": exporter,
            "attention": opts.attention if job.module == "unet" else None, "sha256": sha256_file(final),
            "data_file": data_file, "data_sha256": None, "bytes": graph_bytes + read,
            "new_bytes": graph_bytes + (written if job is lead else 0), "weight_bytes": weight_bytes,
            "fp16": fp16_stats, "seconds": round(time.perf_counter() - t0, 3),
            "cpu_seconds": round(time.process_time() - c0, 3),
        })
        t0, c0 = time.perf_counter(), time.process_time()
    return entries


# -- a whole export ---------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import onnx
    from ..version import __version__
    return {"dp360rt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "python": sys.version.split()[0]}


_SUBMODULE = {"text": "cond_stage_model", "vae_encoder": "first_stage_model", "vae_decoder": "first_stage_model",
              "appearance": "control_model", "pose": "pose_control_model", "unet": "model",
              "unet_nobank": "model"}


def _release(model: DiffPortrait360, module: str) -> None:
    """Free a network's weights (replace them by meta tensors) once all its files are written."""
    getattr(model, _SUBMODULE[module]).to("meta")


def export_models(models: Mapping[str, DiffPortrait360], out_dir: str | Path, profiles: list[Profile],
                  options: ExportOptions | None = None, sources: Mapping[str, str | None] | None = None,
                  progress: bool = True, log: Callable[[str], None] | None = None) -> tuple[dict, list[SummaryRow]]:
    """Export every file the profiles need for ``models`` (``{"nvs": model, "backview": model}``,
    either may be missing) into ``out_dir``; writes ``manifest.json`` and returns it with the summary rows.

    ``sources``: per kind, the checkpoint file the weights came from (hashed into the manifest) or a
    free-form description (``"random seed 0"``). An existing manifest in ``out_dir`` keeps its entries
    for model kinds not exported now.
    """
    opts = options or ExportOptions()
    from ..io.checks import writable_dir
    out = writable_dir(out_dir, "export directory")
    for kind, m in models.items():
        if m.kind != kind:
            raise ValueError(f"models[{kind!r}] is a {m.kind} model")
        bad = sorted({str(p.dtype) for p in m.parameters() if p.dtype != torch.float32})
        if bad:
            raise ValueError(f"export from float32 weights (the {kind} model has {bad}); use --fp16 / "
                             "precision='fp16' for half-precision files")
    jobs = plan_jobs(models, profiles, opts.modules)
    groups = group_jobs(jobs)
    sources = dict(sources or {})
    model_info: dict[str, Any] = {}
    hashes: dict[tuple[str, str], str] = {}
    for kind, m in models.items():
        state = m.state_dict()
        full, per = state_dict_hashes(state, sorted(set(MODULE_PREFIX.values())))
        for prefix, h in per.items():
            hashes[kind, prefix] = h
        src = sources.get(kind)
        src_sha = sha256_file(Path(src)) if src and Path(src).is_file() else None
        model_info[kind] = {"config": config_json(m.cfg), "source": src, "source_sha256": src_sha,
                            "state_dict_sha256": full,
                            "module_sha256": {p: hashes[kind, p] for p in sorted(set(MODULE_PREFIX.values()))}}
        del state
    entries, rows = [], []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="file", desc="export", file=sys.stderr)
    stores = {kind: WeightStore(out / kind / STORE_NAME) for kind in {j.kind for j in jobs}}
    try:
        for i, group in enumerate(groups):
            if bar is not None:
                bar.set_postfix_str(group[0].file)
            m = models[group[0].kind]
            for job, e in zip(group, export_group(group, m, out, opts, stores[group[0].kind])):
                e["state_dict_sha256"] = hashes[job.kind, MODULE_PREFIX[job.module]]
                e["source_sha256"] = model_info[job.kind]["source_sha256"]
                entries.append(e)
                new = e.pop("new_bytes")
                rows.append(SummaryRow(job.kind, job.module, list(job.profiles), job.file, new, e["seconds"],
                                       e["cpu_seconds"], e["bytes"] - new))
                if log is not None:
                    log(f"{job.file}: {e['bytes'] / 2**20:.1f} MiB in {e['seconds']:.1f} s")
                if bar is not None:
                    bar.update(1)
            if opts.release_weights and (group[0].kind, _SUBMODULE[group[0].module]) not in {
                    (j.kind, _SUBMODULE[j.module]) for g in groups[i + 1:] for j in g}:
                _release(m, group[0].module)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(out / ".tmp", ignore_errors=True)
    data_sha = {kind: sha256_file(st.path) for kind, st in stores.items()}
    for e in entries:
        if e["data_file"]:
            e["data_sha256"] = data_sha[e["kind"]]
    manifest = _merge_manifest(out, models.keys(), model_info, entries, profiles, opts)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest, rows


def _merge_manifest(out: Path, kinds: Iterable[str], model_info: dict, entries: list[dict], profiles: list[Profile],
                    opts: ExportOptions) -> dict:
    kinds = set(kinds)
    old: dict[str, Any] = {}
    p = out / MANIFEST_NAME
    if p.is_file():
        try:
            old = json.loads(p.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("format") != MANIFEST_FORMAT:
            old = {}
    files = [f for f in old.get("files", []) if f.get("kind") not in kinds] + entries
    models = {k: v for k, v in old.get("models", {}).items() if k not in kinds}
    models.update(model_info)
    prof = {k: v for k, v in old.get("profiles", {}).items() if v.get("kind") not in kinds}
    for pr in profiles:
        prof[pr.name] = {"kind": pr.kind, "description": pr.description, "unet": [list(x) for x in pr.unet],
                         "nobank": list(pr.nobank), "pose": list(pr.pose), "refs": pr.refs,
                         "vae_encoder": list(pr.vae_encoder), "vae_decoder": list(pr.vae_decoder),
                         "text": list(pr.text), "image_hw": list(pr.image_hw) if pr.image_hw else None,
                         "files": [e["file"] for e in entries if pr.name in e["profiles"]]}
    return {"format": MANIFEST_FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(), "opset": opts.opset, "precision": opts.precision, "attention": opts.attention,
            "models": models, "profiles": prof, "files": files}


def format_summary(rows: list[SummaryRow]) -> str:
    """The summary table: module, file, what it added on disk (graph + weights no earlier file
    wrote), time; weights it shares with earlier files in the last column."""
    def size(n: int) -> str:
        return f"{n / 2**20:.1f} MiB" if n < 2 ** 30 else f"{n / 2**30:.2f} GiB"
    lines = [f"{'kind':<9} {'module':<12} {'profiles':<30} {'file':<36} {'new':>10} {'time':>8} {'cpu':>8}  shared"]
    for r in rows:
        shared = size(r.shared_bytes) if r.shared_bytes else ""
        lines.append(f"{r.kind:<9} {r.module:<12} {','.join(r.profiles):<30} {r.file:<36} {size(r.bytes):>10} "
                     f"{r.seconds:7.1f}s {r.cpu_seconds:7.1f}s  {shared}")
    total = sum(r.bytes for r in rows)
    lines.append(f"{len(rows)} file(s), {total / 2**30:.2f} GiB on disk, {sum(r.seconds for r in rows):.1f} s wall, "
                 f"{sum(r.cpu_seconds for r in rows):.1f} s CPU")
    return "\n".join(lines)
