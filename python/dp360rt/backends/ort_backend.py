"""The ONNX Runtime backend: the fast sampler's network calls on exported static-shape ONNX files.

An export directory (written by the offline toolchain, ``python -m dp360rt.export``) holds one ONNX file
per network and batch shape, and ``manifest.json`` describing each (module, shape profile, input
and output names/shapes/dtypes, hashes). :class:`ExportedBackend` holds what every exported-file
backend shares - reading the manifest, checking it belongs to the model, picking the file whose
static shapes match a call and refusing loudly when none does; :class:`OrtBackend` runs the files
with ``onnxruntime`` (CPU EP; CUDA EP with I/O bound to torch CUDA tensors when available).

``onnxruntime`` is imported only when a session is created, so ``dp360rt`` imports without it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dp360rt-export-v1"
# Which official state-dict prefix holds the weights of each exported module.
MODULE_PREFIX = {
    "text": "cond_stage_model",
    "vae_encoder": "first_stage_model",
    "vae_decoder": "first_stage_model",
    "appearance": "control_model",
    "pose": "pose_control_model",
    "unet": "model.diffusion_model",
    "unet_nobank": "model.diffusion_model",
}
# Modules whose rows are independent samples: a batch may be split over the exported batch sizes.
SPLITTABLE = ("text", "vae_encoder", "vae_decoder", "appearance")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8}


class ExportMismatchError(ValueError):
    """An export directory cannot serve a call or a model: the message names what differs and the fix."""


# -- the manifest ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ExportedFile:
    """One ONNX file of an export (``manifest.json`` entry)."""

    file: str                        # path relative to the export directory
    kind: str                        # nvs | backview
    module: str                      # text, vae_encoder, vae_decoder, appearance, pose, unet, unet_nobank
    profiles: tuple[str, ...]
    rows: int                        # batch rows of the call (refs for the appearance net)
    cond_rows: int | None            # unet: rows reading the bank
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    precision: str                   # fp32 | fp16
    sha256: str                      # of the .onnx file
    data_file: str | None            # the kind's external weights file (relative), KIND/weights.data
    data_sha256: str | None
    bytes: int                       # .onnx + external data
    state_dict_sha256: str           # of the module's weights (its state-dict prefix) at export
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ExportedFile":
        return cls(file=str(d["file"]), kind=str(d["kind"]), module=str(d["module"]),
                   profiles=tuple(d.get("profiles", ())), rows=int(d["rows"]),
                   cond_rows=None if d.get("cond_rows") is None else int(d["cond_rows"]),
                   inputs=tuple(TensorSpec.from_json(x) for x in d["inputs"]),
                   outputs=tuple(TensorSpec.from_json(x) for x in d["outputs"]), opset=int(d["opset"]),
                   precision=str(d["precision"]), sha256=str(d["sha256"]), data_file=d.get("data_file"),
                   data_sha256=d.get("data_sha256"), bytes=int(d.get("bytes", 0)),
                   state_dict_sha256=str(d.get("state_dict_sha256", "")), raw=dict(d))

    def describe(self) -> str:
        shapes = ", ".join(f"{s.name} {list(s.shape)}" for s in self.inputs[:2])
        cond = f", cond_rows {self.cond_rows}" if self.cond_rows is not None else ""
        return f"{self.file} (profiles {', '.join(self.profiles) or '-'}; {shapes}{cond})"


class ExportManifest:
    """``manifest.json`` of an export directory."""

    def __init__(self, directory: str | Path, data: Mapping[str, Any]):
        self.dir = Path(directory)
        self.data = data
        if data.get("format") != MANIFEST_FORMAT:
            raise ExportMismatchError(f"{self.dir / MANIFEST_NAME}: format {data.get('format')!r}, expected "
                                      f"{MANIFEST_FORMAT!r}. Fix: re-export with this version (python -m dp360rt.export ...)")
        self.files = [ExportedFile.from_json(f) for f in data.get("files", [])]
        self.models: dict[str, Any] = dict(data.get("models", {}))

    @classmethod
    def load(cls, directory: str | Path) -> "ExportManifest":
        d = Path(directory)
        p = d / MANIFEST_NAME
        if not p.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {d}. Fix: export first, e.g. "
                                    f"`python -m dp360rt.export --config full --nvs NVS.th --backview BACK.th --out {d}`")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ExportMismatchError(f"{p} is not valid JSON ({e}); re-export") from e
        return cls(d, data)

    def path(self, entry: ExportedFile) -> Path:
        return self.dir / entry.file

    def select(self, kind: str, profiles: Iterable[str] | None = None) -> list[ExportedFile]:
        want = None if profiles is None else set(profiles)
        return [f for f in self.files if f.kind == kind and (want is None or want & set(f.profiles))]

    @property
    def profiles(self) -> dict[str, Any]:
        return dict(self.data.get("profiles", {}))


# -- weights identity ------------------------------------------------------------------------------
def _tensor_record(key: str, t: Tensor) -> tuple[bytes, Any]:
    t = t.detach().to("cpu").contiguous()
    head = f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode()
    body = t.reshape(-1).view(torch.uint8).numpy() if t.numel() and t.dtype != torch.bool else t.numpy().tobytes()
    return head, body


def state_dict_hashes(state: Mapping[str, Tensor], prefixes: Iterable[str] = ()) -> tuple[str, dict[str, str]]:
    """(sha256 of the whole state dict, sha256 of the entries under each ``prefix.``) in one pass:
    key, dtype, shape and bytes of each entry, keys sorted. Identifies the weights of an export."""
    full = hashlib.sha256()
    per = {p: hashlib.sha256() for p in prefixes}
    for k in sorted(state):
        head, body = _tensor_record(k, state[k])
        hs = [full] + [h for p, h in per.items() if k.startswith(p + ".")]
        for h in hs:
            h.update(head)
            h.update(body)
    return full.hexdigest(), {p: h.hexdigest() for p, h in per.items()}


def state_dict_sha256(state: Mapping[str, Tensor], prefix: str | None = None) -> str:
    """sha256 of a state dict, or of its entries under ``prefix.`` (see :func:`state_dict_hashes`)."""
    if prefix is None:
        return state_dict_hashes(state)[0]
    sub = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
    return state_dict_hashes(sub, [prefix])[1][prefix]


def config_json(cfg: Any) -> Any:
    """A model config as plain JSON values (tuples as lists), for comparing with a manifest."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# -- the shared backend ----------------------------------------------------------------------------
class ExportedBank:
    """One step's bank for an exported UNet: entries [1, M, C] (one request), fed as inputs."""

    def __init__(self, entries: Sequence[Tensor]):
        if not entries:
            raise ExportMismatchError("empty bank")
        if entries[0].shape[0] != 1:
            raise ExportMismatchError(f"exported UNets hold one bank group (entries [1, M, C]); got "
                                      f"{entries[0].shape[0]} groups. Fix: one request per sampler call")
        self.entries = [e.contiguous() for e in entries]


class ExportedBackend:
    """The fast sampler's :class:`~dp360rt.backends.base.Backend` over the static-shape files of one
    model kind in an export directory. Subclasses provide :meth:`_make_runner` (load one file) only.

    Every call picks the file whose static input shapes equal the call's (and, for the UNet, whose
    conditional row count equals ``cond_rows``); when none does it raises
    :class:`ExportMismatchError` listing what was exported - never a silent fallback.
    """

    name = "exported"

    def __init__(self, export_dir: str | Path, kind: str, profiles: Iterable[str] | None = None,
                 manifest: ExportManifest | None = None):
        self.manifest = manifest or ExportManifest.load(export_dir)
        self.kind = kind
        self.profiles = None if profiles is None else tuple(profiles)
        if self.profiles is not None:
            known = set(self.manifest.profiles) | {p for f in self.manifest.files for p in f.profiles}
            unknown = [p for p in self.profiles if p not in known]
            if unknown:
                raise ExportMismatchError(f"profile(s) {unknown} not in the export at {self.manifest.dir} "
                                          f"(has {sorted(known)}). Fix: export them (--profiles ...)")
        self.entries = self.manifest.select(kind, self.profiles)
        if not self.entries:
            have = sorted({f.kind for f in self.manifest.files})
            raise ExportMismatchError(f"the export at {self.manifest.dir} has no files for the {kind} model"
                                      f"{' in profiles ' + str(list(self.profiles)) if self.profiles else ''} "
                                      f"(it has kinds {have}). Fix: export the {kind} model (--{kind} CKPT)")
        self._runners: dict[str, Callable[[dict[str, Tensor]], list[Tensor]]] = {}

    # -- construction helpers --------------------------------------------------------------------
    @classmethod
    def _check_model(cls, manifest: ExportManifest, model: Any, entries: list[ExportedFile],
                     verify_weights: bool) -> None:
        """Refuse an export built from another config or other weights than ``model``."""
        info = manifest.models.get(model.kind)
        if info is None:
            raise ExportMismatchError(f"the export at {manifest.dir} holds no {model.kind} model")
        want, have = info.get("config"), config_json(model.cfg)
        if want is not None and want != have:
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise ExportMismatchError(f"the export at {manifest.dir} was built for another {model.kind} config "
                                      f"(differs in: {', '.join(diff)}). Fix: re-export for this model")
        if verify_weights:
            prefixes = sorted({MODULE_PREFIX[e.module] for e in entries})
            _, hashes = state_dict_hashes({k: v for k, v in model.state_dict().items()
                                           if any(k.startswith(p + ".") for p in prefixes)}, prefixes)
            for prefix in prefixes:
                ours = hashes[prefix]
                for e in entries:
                    if MODULE_PREFIX[e.module] == prefix and e.state_dict_sha256 and e.state_dict_sha256 != ours:
                        raise ExportMismatchError(
                            f"{e.file} was exported from other {prefix} weights than this model's (state-dict "
                            f"sha256 {e.state_dict_sha256[:12]}... vs {ours[:12]}...). Fix: re-export from this "
                            "checkpoint, or pass verify_weights=False to run the exported weights anyway")

    # -- selection -------------------------------------------------------------------------------
    def _candidates(self, module: str) -> list[ExportedFile]:
        return [e for e in self.entries if e.module == module]

    def _select(self, module: str, feeds: Mapping[str, Tensor], cond_rows: int | None = None) -> ExportedFile:
        cands = self._candidates(module)
        for e in cands:
            if cond_rows is not None and e.cond_rows != cond_rows:
                continue
            if {s.name for s in e.inputs} != set(feeds):
                continue
            if all(tuple(feeds[s.name].shape) == s.shape for s in e.inputs):
                return e
        call = ", ".join(f"{k} {list(v.shape)}" for k, v in list(feeds.items())[:4])
        if module in ("unet", "unet_nobank"):
            call += f", cond_rows {cond_rows or 0}"
        have = "; ".join(e.describe() for e in cands) or "none"
        hint = (f" or run the sampler with a BatchPlan whose UNet batch is one of the exported ones"
                if module.startswith("unet") or module == "pose" else "")
        raise ExportMismatchError(
            f"{type(self).__name__} ({self.kind}): no exported '{module}' file has the static shapes of this call "
            f"({call}). Exported '{module}' variants: {have}. Fix: export a profile with these shapes "
            f"(python -m dp360rt.export --profiles ..., custom NAME=ROWS:COND, another image size PROFILE@HxW){hint}")

    def _run(self, module: str, feeds: dict[str, Tensor], cond_rows: int | None = None) -> list[Tensor]:
        entry = self._select(module, feeds, cond_rows)
        runner = self._runners.get(entry.file)
        if runner is None:
            runner = self._runners[entry.file] = self._make_runner(entry)
        return runner(feeds)

    def _make_runner(self, entry: ExportedFile) -> Callable[[dict[str, Tensor]], list[Tensor]]:
        raise NotImplementedError

    def _run_split(self, module: str, feeds: dict[str, Tensor]) -> list[Tensor]:
        """Per-sample networks (:data:`SPLITTABLE`): run a batch as chunks of exported batch sizes,
        largest first; raises the usual shape error when no chunking covers it."""
        assert module in SPLITTABLE, module
        n = next(iter(feeds.values())).shape[0]
        sizes = sorted({e.inputs[0].shape[0] for e in self._candidates(module)
                        if all(tuple(s.shape[1:]) == tuple(feeds[s.name].shape[1:]) if s.name in feeds else False
                               for s in e.inputs)}, reverse=True)
        chunks: list[int] = []
        while sum(chunks) < n:
            b = next((b for b in sizes if b <= n - sum(chunks)), None)
            if b is None:
                return self._run(module, feeds)   # raises the shape error listing the exports
            chunks.append(b)
        if len(chunks) == 1:
            return self._run(module, feeds)
        outs, s = [], 0
        for b in chunks:
            outs.append(self._run(module, {k: v[s:s + b] for k, v in feeds.items()}))
            s += b
        return [torch.cat(parts) for parts in zip(*outs)]

    # -- the Backend protocol ----------------------------------------------------------------------
    def appearance(self, refs: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        # references are independent rows: several bank groups (requests / timesteps) are written
        # as chunks of the exported reference count
        return self._run_split("appearance", {"refs": refs, "t": t, "context": context})

    def bank(self, entries: list[Tensor]) -> ExportedBank:
        """Entries [G, M, C]; exported UNets take one group (G = 1), checked here."""
        return ExportedBank(entries)

    def pose(self, x: Tensor, hint: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        return self._run("pose", {"x": x, "hint": hint, "t": t, "context": context})

    def unet(self, x: Tensor, t: Tensor, context: Tensor, bank: ExportedBank | None,
             residuals: list[Tensor] | None, cond_rows: int | Sequence[int]) -> Tensor:
        feeds = {"x": x, "t": t, "context": context}
        groups = [cond_rows] if isinstance(cond_rows, int) else [int(r) for r in cond_rows]
        if len(groups) > 1:
            raise ExportMismatchError(
                f"{type(self).__name__}: this UNet call reads {len(groups)} bank groups (rows {groups}: requests or "
                "timesteps sharing one call); exported UNets read one group. Fix: sample one request at one "
                "timestep per call with this backend, or use the torch backend")
        cond_rows = groups[0] if groups else 0
        if not cond_rows:
            return self._run("unet_nobank", feeds)[0]
        if bank is None or residuals is None:
            raise ExportMismatchError(f"{type(self).__name__}: a UNet call with {cond_rows} conditional rows needs the "
                                      "bank and the pose residuals (exported UNets take both as inputs)")
        if not isinstance(bank, ExportedBank):
            raise TypeError(f"bank must come from this backend's bank(), got {type(bank).__name__}")
        feeds.update({f"bank_{i:02d}": e for i, e in enumerate(bank.entries)})
        feeds.update({f"res_{i:02d}": r for i, r in enumerate(residuals)})
        return self._run("unet", feeds, cond_rows)[0]

    # -- the other networks (pipeline stages outside the sampler) ----------------------------------
    def encode_text(self, token_ids: Tensor) -> Tensor:
        return self._run_split("text", {"token_ids": token_ids})[0]

    def encode_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self._run_split("vae_encoder", {"image": image})
        return mean, logvar

    def decode_latent(self, latent: Tensor) -> Tensor:
        return self._run_split("vae_decoder", {"latent": latent})[0]

    def describe(self) -> str:
        return "\n".join(f"  {e.module:<12} {e.describe()}" for e in self.entries)


# -- ONNX Runtime ----------------------------------------------------------------------------------
def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("the ort backend needs onnxruntime: pip install onnxruntime (CPU) or "
                          "onnxruntime-gpu (CUDA), or pip install 'dp360rt[export]'") from e
    return ort


_NP_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32", "bool": "bool",
              "uint8": "uint8"}


class OrtBackend(ExportedBackend):
    """:class:`ExportedBackend` on ``onnxruntime`` InferenceSessions (one per file, created on first use).

    ``device``: ``"cpu"`` (CPU EP; tensors are handed over as numpy views) or ``"cuda[:i]"`` (CUDA EP;
    inputs and outputs bound to torch CUDA tensors with I/O binding, no host copies). ``providers``
    overrides the EP list. Outputs come back as torch tensors on ``device`` in the caller's float dtype.
    """

    name = "ort"

    def __init__(self, export_dir: str | Path, kind: str, profiles: Iterable[str] | None = None, *,
                 device: str | torch.device = "cpu", providers: Sequence[Any] | None = None,
                 threads: int | None = None, manifest: ExportManifest | None = None,
                 session_options: Any | None = None):
        super().__init__(export_dir, kind, profiles, manifest)
        self.device = torch.device(device)
        self.threads = threads
        self.session_options = session_options
        ort = _import_ort()
        available = ort.get_available_providers()
        if providers is None:
            if self.device.type == "cuda":
                if "CUDAExecutionProvider" not in available:
                    raise ExportMismatchError(f"device {self.device} needs onnxruntime's CUDAExecutionProvider, but "
                                              f"this onnxruntime has {available}. Fix: pip install onnxruntime-gpu")
                providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
            else:
                providers = ["CPUExecutionProvider"]
        self.providers = list(providers)

    @classmethod
    def from_model(cls, model: Any, export_dir: str | Path | None = None, profile: str | Sequence[str] | None = None,
                   *, verify_weights: bool = True, **kw: Any) -> "OrtBackend":
        """The backend for ``model`` (a :class:`~dp360rt.model.DiffPortrait360`) from ``export_dir``.

        ``profile``: one profile name or several (None: every file of the model's kind). The export
        must have been made from this model's config and (``verify_weights``) weights, else
        :class:`ExportMismatchError`. The device defaults to the model's.
        """
        if export_dir is None:
            raise ExportMismatchError("the ort backend runs exported ONNX files: pass export_dir=DIR (make one with "
                                      "`python -m dp360rt.export --out DIR ...`)")
        manifest = ExportManifest.load(export_dir)
        profiles = [profile] if isinstance(profile, str) else profile
        kw.setdefault("device", next(model.parameters()).device)
        backend = cls(export_dir, model.kind, profiles, manifest=manifest, **kw)
        cls._check_model(manifest, model, backend.entries, verify_weights)
        return backend

    def _session(self, entry: ExportedFile):
        ort = _import_ort()
        so = self.session_options
        if so is None:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # The default order runs every attention chunk's matmul before any chunk's softmax, so
            # all their score tensors live at once (a UNet with 4096 tokens per frame: 8.3 GB at
            # 8 rows vs 1.6 GB in this order, benchmarks/RESULTS.md).
            so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            # ORT's workers spin after each run and take the cores from torch's threads between calls
            # (the sampler's tensor work): a tiny 360° step ran 1.83 s with spinning, 1.26 s without.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.log_severity_level = 3
            n = self.threads or torch.get_num_threads()
            so.intra_op_num_threads = n
        path = self.manifest.path(entry)
        if not path.is_file():
            raise FileNotFoundError(f"{path} listed in the manifest is missing; re-export")
        return ort.InferenceSession(str(path), sess_options=so, providers=self.providers)

    def _make_runner(self, entry: ExportedFile) -> Callable[[dict[str, Tensor]], list[Tensor]]:
        sess = self._session(entry)
        in_specs = {s.name: s for s in entry.inputs}
        out_specs = list(entry.outputs)
        got = [i.name for i in sess.get_inputs()]
        if set(got) != set(in_specs):
            raise ExportMismatchError(f"{entry.file}: session inputs {got} differ from the manifest's "
                                      f"{list(in_specs)}; the file was changed after export - re-export")
        out_names = [o.name for o in sess.get_outputs()]
        use_binding = self.device.type == "cuda"

        def result_dtype(feeds: dict[str, Tensor]) -> torch.dtype:
            x = next((v for v in feeds.values() if v.is_floating_point()), None)
            return x.dtype if x is not None else torch.float32

        if not use_binding:
            def run_cpu(feeds: dict[str, Tensor]) -> list[Tensor]:
                arrays = {k: feeds[k].detach().to("cpu", TORCH_DTYPES[s.dtype]).contiguous().numpy()
                          for k, s in in_specs.items()}
                outs = sess.run(out_names, arrays)
                dt = result_dtype(feeds)
                res = []
                for o in outs:
                    t = torch.from_numpy(o)
                    res.append(t.to(self.device, dt) if t.is_floating_point() else t.to(self.device))
                return res
            return run_cpu

        import numpy as np

        def run_cuda(feeds: dict[str, Tensor]) -> list[Tensor]:
            binding = sess.io_binding()
            keep = []
            dev_id = self.device.index or 0
            for k, s in in_specs.items():
                v = feeds[k].detach().to(self.device, TORCH_DTYPES[s.dtype]).contiguous()
                keep.append(v)
                binding.bind_input(name=k, device_type="cuda", device_id=dev_id,
                                   element_type=np.dtype(_NP_DTYPES[s.dtype]), shape=tuple(v.shape),
                                   buffer_ptr=v.data_ptr())
            outs = []
            for s in out_specs:
                o = torch.empty(s.shape, dtype=TORCH_DTYPES[s.dtype], device=self.device)
                outs.append(o)
                binding.bind_output(name=s.name, device_type="cuda", device_id=dev_id,
                                    element_type=np.dtype(_NP_DTYPES[s.dtype]), shape=tuple(o.shape),
                                    buffer_ptr=o.data_ptr())
            torch.cuda.current_stream(self.device).synchronize()   # inputs written by torch's stream
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            dt = result_dtype(feeds)
            return [o.to(dt) if o.is_floating_point() else o for o in outs]
        return run_cuda
