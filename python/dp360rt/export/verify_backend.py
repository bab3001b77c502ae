"""``dp360rt verify --backend ort|trt`` (:func:`dp360rt.verify.verify` with ``backend=``) through an exported backend: every golden case of a fixture set recomputed with the
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

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from dp360rt.model import ApplyOutput, DiffPortrait360
from dp360rt.sampler.fast import _single_reference, sample_windows_fast, write_shared_bank
from dp360rt.sampler.noise import RecordedNoise
from dp360rt.sampler.plan import BatchPlan
from dp360rt.sampler.reference import SampleResult
from dp360rt.scheduler.schedule import ddim_tables
from dp360rt.verify import _Runner

# What the fixture cases call: nvs apply at 8 rows (window8), nvs DDIM with batched guidance
# (window8x2cfg), back-view apply at 1 row and DDIM at 1+1 rows (backview).
VERIFY_PROFILES = ("window8", "window8x2cfg", "backview")


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
    """The verify runner with the networks on an exported backend (``ort``, ``trt``; ``torch``
    checks the harness)."""

    def __init__(self, fixture_dir: Path, backend: str, export_dir: Path | Mapping[str, Path], **options: Any):
        super().__init__(fixture_dir, "fast")
        self.backend_name, self.options = backend, options
        self.export_dirs = ({k: Path(v) for k, v in export_dir.items()} if isinstance(export_dir, Mapping)
                            else {"nvs": Path(export_dir), "backview": Path(export_dir)})
        self.backends: dict[str, Any] = {}

    def backend(self, kind: str):
        if kind not in self.backends:
            from dp360rt.backends.base import get_backend
            opts = dict(self.options)
            if self.backend_name != "torch":
                opts.setdefault("export_dir", self.export_dirs[kind])
            self.backends[kind] = get_backend(self.backend_name, self.model(kind), **opts)
        return self.backends[kind]

    def encode_text(self, kind: str, ids: Tensor) -> Tensor:
        b = self.backend(kind)
        return b.encode_text(ids) if hasattr(b, "encode_text") else super().encode_text(kind, ids)

    def encode_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        b = self.backend("nvs")
        return b.encode_image(image) if hasattr(b, "encode_image") else super().encode_image(image)

    def decode_latent(self, latent: Tensor) -> Tensor:
        b = self.backend("nvs")
        return b.decode_latent(latent) if hasattr(b, "decode_latent") else super().decode_latent(latent)

    def apply(self, m: DiffPortrait360, inp: dict[str, Any], ref_back: list[Tensor], uc: bool):
        return apply_with_backend(self.backend(m.kind), inp["x_noisy"], inp["t"], inp["context"], inp["hint"],
                                  None if uc else inp.get("ref_front"), ref_back)

    def sample(self, m: DiffPortrait360, inp: dict[str, Any], ref_back: list[Tensor], noise: RecordedNoise):
        return sample_recorded_with_backend(self.backend(m.kind), m, inp, ref_back, noise)


def export_fixture(fixture_dir: str | Path, out_dir: str | Path, runner: _Runner | None = None,
                   profiles: tuple[str, ...] = VERIFY_PROFILES, progress: bool = False) -> Path:
    """Export a fixture set's two models (its config and weights) for ``verify(..., backend=...)``."""
    from .onnx_export import export_models
    from .profiles import parse_profiles
    runner = runner or _Runner(Path(fixture_dir), "fast")
    models = {k: runner.model(k) for k in ("nvs", "backview")}
    export_models(models, out_dir, parse_profiles(list(profiles)),
                  sources={k: f"fixture {fixture_dir}" for k in models}, progress=progress)
    return Path(out_dir)
