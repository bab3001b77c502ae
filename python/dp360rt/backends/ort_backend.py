"""The ONNX Runtime backend: the fast sampler's network calls on exported static-shape ONNX files.

An export directory (written by the offline toolchain, ``python -m dp360rt.export``) holds one ONNX file
per network and batch shape, and ``manifest.json`` describing each (:mod:`.manifest`).
:class:`OrtBackend` is an :class:`~dp360rt.backends.exported.ExportedBackend` (file selection,
model checks) that runs the files with ``onnxruntime`` (CPU EP; CUDA EP with I/O bound to torch
CUDA tensors when available).

``onnxruntime`` is imported only when a session is created, so ``dp360rt`` imports without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .exported import ExportedBackend
from .manifest import TORCH_DTYPES, ExportedFile, ExportManifest, ExportMismatchError


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
