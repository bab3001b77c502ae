"""``dp360rt verify FIXTURE_DIR``: recompute every golden case of a fixture set and compare.

A fixture set holds ``config.json``, the weights (``{kind}_tiny.th`` or the seeded recipe
``init.json`` + ``buffers.pt``) and ``cases.pt`` (inputs, recorded noises, expected outputs of the
authors' code). Error of a tensor = max|ours - ref| / max|ref|; a case passes when every tensor
is within the tolerance (1e-5 for single calls, 1e-4 for whole DDIM runs, as measured in the
fixtures' README).
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from .case_table import CaseResult, CaseTable
from .checkpoint import CheckpointError, fixture_state_dict, load_checkpoint, load_tensors
from .config import ConfigError
from .model import DiffPortrait360, build_model
from .sampler.noise import RecordedNoise
from .sampler.fast import apply_fast, sample_fast_recorded
from .sampler.plan import BatchPlan
from .sampler.reference import sample_reference

TOL_CALL = 1e-5
TOL_DDIM = 1e-4
STANDARD_CASES = ("text_encode", "vae_encode", "vae_decode", "nvs_apply_cond", "nvs_apply_uncond", "nvs_ddim",
                  "backview_apply_cond", "backview_apply_uncond", "backview_ddim")




def tensor_error(ours: Tensor, ref: Tensor) -> tuple[float, float]:
    """(max abs diff, max abs diff / max |ref|); shapes must match."""
    if tuple(ours.shape) != tuple(ref.shape):
        raise ValueError(f"shape {tuple(ours.shape)} vs expected {tuple(ref.shape)}")
    d = (ours.detach().double().cpu() - ref.double()).abs().max().item() if ref.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    if d != d:  # NaN
        return float("inf"), float("inf")
    return d, (d / scale if scale > 0 else d)


def _flatten(name: str, v: Any) -> Iterator[tuple[str, Tensor]]:
    if isinstance(v, Tensor):
        yield name, v
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            yield from _flatten(f"{name}[{i}]", x)


def compare(ours: dict[str, Any], expected: dict[str, Any], tol: float, name: str,
            not_computed: tuple[str, ...] = ()) -> CaseResult:
    """Compare every expected output tensor with ours; a missing output fails the case unless the
    engine by design does not compute it (``not_computed``, e.g. the fast engine's skipped pose pass)."""
    worst = CaseResult(name, True, 0.0, 0.0, tol)
    for key, ref in expected.items():
        if key in not_computed:
            continue
        if key not in ours:
            return CaseResult(name, False, tol=tol, message=f"output '{key}' not produced")
        ref_items, our_items = list(_flatten(key, ref)), dict(_flatten(key, ours[key]))
        for k, r in ref_items:
            if k not in our_items:
                return CaseResult(name, False, tol=tol, message=f"output '{k}' not produced")
            try:
                a, rel = tensor_error(our_items[k], r)
            except ValueError as e:
                return CaseResult(name, False, tol=tol, message=f"{k}: {e}")
            if rel > worst.rel or worst.worst == "":
                worst.max_abs, worst.rel, worst.worst = a, rel, k
    worst.ok = worst.rel <= tol
    return worst


class CaseRunner:
    """Recomputes the golden cases of one fixture set with ``engine`` (``reference`` or ``fast``).

    :meth:`model` builds each model kind from the set's config and weights on first use;
    :meth:`run` computes one case's outputs and returns them with the case's tolerance and the
    outputs the engine by design does not compute. The network calls (:meth:`net` for the text
    tower and the VAE, :meth:`apply`, :meth:`sample`) are methods so that
    :class:`BackendCaseRunner` can put them on another backend. Tensors as in the case files
    (token ids [B, 77], images [B, 3, H, W], latents [B, 4, h, w]).
    """

    def __init__(self, fixture_dir: Path, engine: str):
        self.dir, self.engine = fixture_dir, engine
        self.models: dict[str, DiffPortrait360] = {}

    def model(self, kind: str) -> DiffPortrait360:
        if kind not in self.models:
            m = build_model(kind, self.dir)
            load_checkpoint(m, fixture_state_dict(self.dir, kind))
            self.models[kind] = m
        return self.models[kind]

    @torch.no_grad()
    def run(self, name: str, case: dict[str, Any]) -> tuple[dict[str, Any], float, tuple[str, ...]]:
        ours, tol = self._run(name, case)
        skip = ("pose_residuals",) if self.engine == "fast" and "_apply_uncond" in name else ()
        return ours, tol, skip

    def _run(self, name: str, case: dict[str, Any]) -> tuple[dict[str, Any], float]:
        inp, noise = case["inputs"], case.get("noise", [])
        if name.startswith("text_encode"):
            return {"context": self.net("nvs").encode_text(inp["token_ids"])}, TOL_CALL
        if name.startswith("vae_encode"):
            mean, logvar = self.net("nvs").encode_image(inp["image"])
            latent = self.model("nvs").sample_latent(mean, logvar, RecordedNoise(noise)(mean.shape))
            return {"mean": mean, "logvar": logvar, "latent": latent}, TOL_CALL
        if name.startswith("vae_decode"):
            return {"image": self.net("nvs").decode_latent(inp["latent"])}, TOL_CALL
        kind = next((k for k in ("nvs", "backview") if name.startswith(k + "_")), None)
        if kind is None:
            raise KeyError(name)
        m = self.model(kind)
        ref_back = [inp["ref_back"]] if "ref_back" in inp else []
        if "_apply_" in name:
            uc = "_apply_uncond" in name
            out = self.apply(m, inp, ref_back, uc)
            return {"eps": out.eps, "bank": out.bank, "pose_residuals": out.pose_residuals}, TOL_CALL
        if "_ddim" in name:
            r = self.sample(m, inp, ref_back, RecordedNoise(noise))
            t = r.tables
            return {"x_T": r.x_T, "x_steps": r.x_steps, "pred_x0_steps": r.pred_x0_steps, "final_latent": r.latent,
                    "ddim_timesteps": t.timesteps, "ddim_alphas": t.alphas, "ddim_alphas_prev": t.alphas_prev,
                    "ddim_sigmas": t.sigmas, "ddim_sqrt_one_minus_alphas": t.sqrt_one_minus_alphas}, TOL_DDIM
        raise KeyError(name)

    def net(self, kind: str):
        """What runs the text tower and the VAE of ``kind``: the model itself here, its backend in
        :class:`BackendCaseRunner` (both have ``encode_text``, ``encode_image``, ``decode_latent``)."""
        return self.model(kind)

    def apply(self, m: DiffPortrait360, inp: dict[str, Any], ref_back: list[Tensor], uc: bool):
        if self.engine == "fast":
            return apply_fast(m, inp["x_noisy"], inp["t"], inp["context"], inp["hint"],
                              None if uc else inp.get("ref_front"), ref_back)
        return m.apply_model(inp["x_noisy"], inp["t"], inp["context"], inp["hint"],
                             None if uc else inp.get("ref_front"), ref_back, uc=uc)

    def sample(self, m: DiffPortrait360, inp: dict[str, Any], ref_back: list[Tensor], noise: RecordedNoise):
        if self.engine == "fast":
            return sample_fast_recorded(m, inp, ref_back, noise)
        return sample_reference(
            m, context=inp["context"], hint=inp["hint"], ref_front=inp["ref_front"], ref_back=ref_back,
            latent_hw=tuple(int(v) for v in inp["latent_hw"]), steps=int(inp["steps"]), eta=float(inp["eta"]),
            cfg_scale=float(inp["cfg_scale"]), feature_latent=inp.get("feature_latent"), noise=noise, record=True)


# What an exported UNet serves: one window with batched guidance (the window8x2cfg profile's shape).
EXPORTED_PLAN = BatchPlan(windows_per_call=1, batch_cfg=True)


class BackendCaseRunner(CaseRunner):
    """:class:`CaseRunner` with the fast engine's schedule and every network call on backend
    ``backend`` (``ort``, ``trt``; ``torch`` checks the harness) over the exported files in
    ``export_dir`` (one directory, or one per model kind: ``{"nvs": DIR, "backview": DIR}``).
    ``options`` go to :func:`~dp360rt.backends.base.get_backend` (e.g. ``providers=``, ``threads=``).

    Single calls run :func:`~dp360rt.sampler.fast.apply_fast` on the backend; DDIM cases run
    :func:`~dp360rt.sampler.fast.sample_fast_recorded` with :data:`EXPORTED_PLAN` on one window of
    recorded noises; text and VAE cases the exported text tower and VAE.
    """

    def __init__(self, fixture_dir: Path, backend: str, export_dir: Path | Mapping[str, Path], **options: Any):
        super().__init__(fixture_dir, "fast")
        self.backend_name, self.options = backend, options
        self.export_dirs = ({k: Path(v) for k, v in export_dir.items()} if isinstance(export_dir, Mapping)
                            else {"nvs": Path(export_dir), "backview": Path(export_dir)})
        self.backends: dict[str, Any] = {}

    def backend(self, kind: str):
        if kind not in self.backends:
            from .backends.base import get_backend
            opts = dict(self.options)
            if self.backend_name != "torch":
                opts.setdefault("export_dir", self.export_dirs[kind])
            self.backends[kind] = get_backend(self.backend_name, self.model(kind), **opts)
        return self.backends[kind]

    def net(self, kind: str):
        return self.backend(kind)

    def apply(self, m: DiffPortrait360, inp: dict[str, Any], ref_back: list[Tensor], uc: bool):
        return apply_fast(m, inp["x_noisy"], inp["t"], inp["context"], inp["hint"],
                          None if uc else inp.get("ref_front"), ref_back, backend=self.backend(m.kind))

    def sample(self, m: DiffPortrait360, inp: dict[str, Any], ref_back: list[Tensor], noise: RecordedNoise):
        return sample_fast_recorded(m, inp, ref_back, noise, plan=EXPORTED_PLAN, backend=self.backend(m.kind))


ENGINES = ("reference", "fast")
BACKENDS = ("torch", "ort", "trt")


def verify(fixture_dir: str | Path, engine: str = "reference", backend: str = "torch",
           export_dir: str | Path | dict[str, str | Path] | None = None, on_result: Callable[[CaseResult], None] | None = None,
           **backend_options: Any) -> list[CaseResult]:
    """Recompute every case of a fixture set; returns one :class:`CaseResult` per case.

    ``backend="ort"|"trt"`` runs every network on exported ONNX files (with the fast engine's
    schedule): ``export_dir`` is an export of this fixture set's weights (checked against them);
    without it the fixture's models are exported to a temporary directory first (needs ``onnx``).
    ``export_dir`` may also be one directory per model kind (``{"nvs": DIR, "backview": DIR}``).
    ``backend_options`` go to the backend (e.g. ``providers=``, ``threads=``).
    Missing standard cases, unknown case names and malformed files are failed results, never
    exceptions (except a missing directory or an unknown engine/backend).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    d = Path(fixture_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"fixture directory not found: {d}")
    results: list[CaseResult] = []

    def add(r: CaseResult) -> None:
        results.append(r)
        if on_result is not None:
            on_result(r)

    try:
        if not (d / "cases.pt").is_file():
            raise FileNotFoundError(f"{d / 'cases.pt'} not found")
        cases = load_tensors(d / "cases.pt", "fixture case file",
                             "restore cases.pt from the fixture set (it holds tensors only)")
        if not isinstance(cases, dict):
            raise ValueError("top level is not a dict of cases")
    except (FileNotFoundError, CheckpointError, ValueError) as e:      # never torch's weights_only advice
        add(CaseResult("cases.pt", False, message=f"unreadable: {e}"))
        return results
    if backend == "torch":
        _run_cases(CaseRunner(d, engine), cases, add)
        return results
    with contextlib.ExitStack() as stack:
        fresh = export_dir is None
        if fresh:
            export_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dp360rt_verify_")))
        runner = BackendCaseRunner(d, backend, export_dir, **backend_options)
        if fresh:
            from .export.fixture import export_fixture      # the offline toolchain, only when no export is given
            try:
                export_fixture(d, export_dir, {k: runner.model(k) for k in ("nvs", "backview")}, cases=cases)
            except (CheckpointError, ConfigError, ValueError, RuntimeError) as e:
                add(CaseResult("export", False, message=f"{type(e).__name__}: {e}"))
                return results
        _run_cases(runner, cases, add)
    return results


def _run_cases(runner: CaseRunner, cases: dict[str, Any], add: Callable[[CaseResult], None]) -> None:
    for name in STANDARD_CASES:
        if name not in cases:
            add(CaseResult(name, False, message="case missing from cases.pt"))
    for name, case in cases.items():
        if name.startswith("_"):
            continue
        try:
            if not isinstance(case, dict) or "inputs" not in case or "outputs" not in case:
                raise ValueError("case lacks 'inputs'/'outputs'")
            ours, tol, skip = runner.run(name, case)
            add(compare(ours, case["outputs"], tol, name, skip))
        except KeyError as e:
            msg = "unknown case kind" if e.args and e.args[0] == name else f"missing field {e}"
            add(CaseResult(name, False, message=msg))
        except (CheckpointError, ConfigError) as e:
            add(CaseResult(name, False, message=str(e)))
        except (ValueError, RuntimeError, TypeError) as e:        # ExportMismatchError is a ValueError
            add(CaseResult(name, False, message=f"{type(e).__name__}: {e}"))
    meta = cases.get("_meta", {})
    if isinstance(meta, dict) and isinstance(meta.get("backview_text_context"), Tensor):
        try:
            ref = meta["backview_text_context"]
            from .text.clip import empty_prompt_ids
            ids = empty_prompt_ids(ref.shape[1]).expand(ref.shape[0], -1)
            add(compare({"context": runner.net("backview").encode_text(ids)}, {"context": ref}, TOL_CALL,
                        "_meta.backview_text_context"))
        except (CheckpointError, ConfigError, ValueError, RuntimeError) as e:
            add(CaseResult("_meta.backview_text_context", False, message=str(e)))


# `dp360rt verify`'s table of CaseResults.
TABLE = CaseTable(30, (("max abs", "max_abs", 10, ".3e"), ("rel err", "rel", 10, ".3e"), ("tol", "tol", 8, ".0e")))
