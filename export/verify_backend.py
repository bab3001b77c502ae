"""``verify`` through an exported backend: every golden case of a fixture set recomputed with the
networks running in ONNX Runtime (or TensorRT), compared with the same tolerances as
``dp360rt verify``.

* single calls (``*_apply_cond`` / ``*_apply_uncond``): the fast engine's schedule (shared bank at
  batch 1, pose residuals for the conditional rows) with every network call on the backend;
* whole DDIM runs (``*_ddim``): :func:`~dp360rt.sampler.fast.sample_windows_fast` with
  ``backend=...`` on one window of recorded noises;
* ``text_encode`` / ``vae_encode`` / ``vae_decode``: the exported text tower and VAE.

Without ``export_dir`` the fixture's models are exported to a temporary directory first (the
profiles :data:`VERIFY_PROFILES`).
"""
from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from dp360rt.checkpoint import CheckpointError
from dp360rt.config import ConfigError
from dp360rt.model import ApplyOutput, DiffPortrait360
from dp360rt.sampler.fast import _single_reference, sample_windows_fast, write_shared_bank
from dp360rt.sampler.noise import RecordedNoise
from dp360rt.sampler.plan import BatchPlan
from dp360rt.sampler.reference import SampleResult
from dp360rt.scheduler.schedule import ddim_tables
from dp360rt.verify import STANDARD_CASES, TOL_CALL, CaseResult, _Runner, compare

# What the fixture cases call: nvs apply at 8 rows (window8), nvs DDIM with batched guidance
# (window8x2cfg), back-view apply at 1 row and DDIM at 1+1 rows (backview).
VERIFY_PROFILES = ("window8", "window8x2cfg", "backview")
BACKENDS = ("ort", "trt", "torch")


@torch.no_grad()
def apply_with_backend(backend: Any, x: Tensor, t: Tensor, context: Tensor, hint: Tensor,
                       ref_front: Tensor | None, ref_back: list[Tensor]) -> ApplyOutput:
    """:func:`dp360rt.sampler.fast.apply_fast` with every network call on ``backend``."""
    if ref_front is None:
        return ApplyOutput(eps=backend.unet(x, t, context, None, None, cond_rows=0), bank=None, pose_residuals=[])
    if not bool((t == t[:1]).all()) or not bool((context == context[:1]).all()):
        raise ValueError("the fast engine's shared bank needs one timestep and one text context per request")
    refs = [_single_reference(ref_front, "ref_front")] + [_single_reference(r, "ref_back") for r in ref_back]
    entries = write_shared_bank(backend, refs, t[:1], context[:1])
    pose = backend.pose(x, hint, t, context)
    eps = backend.unet(x, t, context, backend.bank(entries), pose, cond_rows=x.shape[0])
    return ApplyOutput(eps=eps, bank=[e.expand(x.shape[0], -1, -1) for e in entries], pose_residuals=pose)


def sample_recorded_with_backend(backend: Any, model: DiffPortrait360, inp: dict, ref_back: list[Tensor],
                                 noise: RecordedNoise, plan: BatchPlan | None = None) -> SampleResult:
    """:func:`dp360rt.sampler.fast.sample_fast_recorded` with ``backend``: one window, recorded noises."""
    from dp360rt.pipeline import Window
    lat = tuple(int(v) for v in inp["latent_hw"])
    hint = inp["hint"]
    if (hint.shape[2] // 8, hint.shape[3] // 8) != lat:
        raise ValueError(f"hint {tuple(hint.shape)} does not match latent size {lat}")
    win = Window(0, hint, inp.get("feature_latent"), noise)
    rec: list[tuple[Tensor, Tensor]] = []
    (z,), calls = sample_windows_fast(
        model, [win], context=_single_reference(inp["context"], "context"),
        ref_front=_single_reference(inp["ref_front"], "ref_front"),
        ref_back=[_single_reference(r, "ref_back") for r in ref_back], steps=int(inp["steps"]),
        eta=float(inp["eta"]), cfg_scale=float(inp["cfg_scale"]), record=rec,
        plan=plan or BatchPlan(windows_per_call=1, batch_cfg=True), backend=backend)
    tables = ddim_tables(model.alphas_cumprod, int(inp["steps"]), float(inp["eta"]))
    return SampleResult(latent=z, x_T=rec[0][0], tables=tables, x_steps=[r[0] for r in rec[1:]],
                        pred_x0_steps=[r[1] for r in rec[1:]], unet_calls=calls)


class BackendRunner(_Runner):
    """The verify runner with the networks on an exported backend."""

    def __init__(self, fixture_dir: Path, backend: str, export_dir: Path | dict[str, Path], **options: Any):
        super().__init__(fixture_dir, "fast")
        self.backend_name, self.options = backend, options
        self.export_dirs = export_dir if isinstance(export_dir, dict) else {"nvs": export_dir, "backview": export_dir}
        self.backends: dict[str, Any] = {}

    def backend(self, kind: str):
        if kind not in self.backends:
            from dp360rt.backends.base import get_backend
            m = self.model(kind)
            opts = dict(self.options)
            if self.backend_name != "torch":
                opts.setdefault("export_dir", self.export_dirs[kind])
            self.backends[kind] = get_backend(self.backend_name, m, **opts)
        return self.backends[kind]

    def _run(self, name: str, case: dict[str, Any]) -> tuple[dict[str, Any], float]:
        inp = case["inputs"]
        b = self.backend("nvs")
        if name.startswith("text_encode") and hasattr(b, "encode_text"):
            return {"context": b.encode_text(inp["token_ids"])}, TOL_CALL
        if name.startswith("vae_encode") and hasattr(b, "encode_image"):
            m = self.model("nvs")
            mean, logvar = b.encode_image(inp["image"])
            latent = m.sample_latent(mean, logvar, RecordedNoise(case.get("noise", []))(mean.shape))
            return {"mean": mean, "logvar": logvar, "latent": latent}, TOL_CALL
        if name.startswith("vae_decode") and hasattr(b, "decode_latent"):
            return {"image": b.decode_latent(inp["latent"])}, TOL_CALL
        return super()._run(name, case)

    def apply(self, m: DiffPortrait360, inp: dict[str, Any], ref_back: list[Tensor], uc: bool):
        return apply_with_backend(self.backend(m.kind), inp["x_noisy"], inp["t"], inp["context"], inp["hint"],
                                  None if uc else inp.get("ref_front"), ref_back)

    def sample(self, m: DiffPortrait360, inp: dict[str, Any], ref_back: list[Tensor], noise: RecordedNoise):
        return sample_recorded_with_backend(self.backend(m.kind), m, inp, ref_back, noise)


def export_fixture(fixture_dir: str | Path, out_dir: str | Path, runner: _Runner | None = None,
                   profiles: tuple[str, ...] = VERIFY_PROFILES, progress: bool = False) -> Path:
    """Export a fixture set's two models (its config and weights) for :func:`verify_with_backend`."""
    from .onnx_export import export_models
    from .profiles import parse_profiles
    runner = runner or _Runner(Path(fixture_dir), "fast")
    models = {k: runner.model(k) for k in ("nvs", "backview")}
    export_models(models, out_dir, parse_profiles(list(profiles)),
                  sources={k: f"fixture {fixture_dir}" for k in models}, progress=progress)
    return Path(out_dir)


def verify_with_backend(fixture_dir: str | Path, backend: str = "ort",
                        export_dir: str | Path | Mapping[str, str | Path] | None = None,
                        on_result: Callable[[CaseResult], None] | None = None,
                        models: Mapping[str, DiffPortrait360] | None = None, **options: Any) -> list[CaseResult]:
    """Recompute every case of a fixture set on ``backend`` (``ort``, ``trt``; ``torch`` checks the
    harness). ``export_dir``: an export of this fixture set's weights (checked against them), or one
    per model kind (``{"nvs": DIR, "backview": DIR}``); None: export to a temporary directory first.
    ``models``: the fixture's models when already built (else built from the fixture set).
    ``options`` go to the backend (e.g. ``providers=``).
    Returns one :class:`~dp360rt.verify.CaseResult` per case; failures are results, not exceptions.
    """
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
        cases = torch.load(d / "cases.pt", map_location="cpu", weights_only=True)
        if not isinstance(cases, dict):
            raise ValueError("top level is not a dict of cases")
    except (FileNotFoundError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        add(CaseResult("cases.pt", False, message=f"unreadable: {e}"))
        return results
    tmp = None
    if export_dir is None and backend != "torch":
        tmp = tempfile.TemporaryDirectory(prefix="dp360rt_verify_")
        export_dir = Path(tmp.name)
    dirs = ({k: Path(v) for k, v in export_dir.items()} if isinstance(export_dir, Mapping)
            else Path(export_dir) if export_dir else d)
    runner = BackendRunner(d, backend, dirs, **options)
    if models is not None:
        runner.models.update(models)
    try:
        if tmp is not None:
            export_fixture(d, export_dir, runner)
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
            except (ValueError, RuntimeError, TypeError) as e:   # ExportMismatchError is a ValueError
                add(CaseResult(name, False, message=f"{type(e).__name__}: {e}"))
        meta = cases.get("_meta", {})
        if isinstance(meta, dict) and isinstance(meta.get("backview_text_context"), Tensor):
            try:
                ref = meta["backview_text_context"]
                from dp360rt.text.clip import empty_prompt_ids
                ids = empty_prompt_ids(ref.shape[1]).expand(ref.shape[0], -1)
                b = runner.backend("backview")
                ctx = b.encode_text(ids) if hasattr(b, "encode_text") else runner.model("backview").encode_text(ids)
                add(compare({"context": ctx}, {"context": ref}, TOL_CALL, "_meta.backview_text_context"))
            except (CheckpointError, ConfigError, ValueError, RuntimeError) as e:
                add(CaseResult("_meta.backview_text_context", False, message=str(e)))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results
