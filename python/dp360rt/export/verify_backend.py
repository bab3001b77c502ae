"""``dp360rt verify --backend ort|trt`` (:func:`dp360rt.verify.verify` with ``backend=``) through an exported backend: every golden case of a fixture set recomputed with the
networks running in ONNX Runtime (or TensorRT), compared with the same tolerances as
``dp360rt verify``.

* single calls (``*_apply_cond`` / ``*_apply_uncond``): the fast engine's schedule (shared bank at
  batch 1, pose residuals for the conditional rows) with every network call on the backend;
* whole DDIM runs (``*_ddim``): :func:`~dp360rt.sampler.fast.sample_windows_fast` with
  ``backend=...`` on one window of recorded noises;
* ``text_encode`` / ``vae_encode`` / ``vae_decode``: the exported text tower and VAE.

Without ``export_dir`` the fixture's models are exported to a temporary directory first: the
profiles :data:`VERIFY_PROFILES` at every image size the cases use (read from their tensors, so a
set with 16x24 latents gets ``window8@128x192`` and so on).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from dp360rt.export.profiles import LATENT_FACTOR, parse_profile, sized

from dp360rt.model import DiffPortrait360
from dp360rt.sampler.fast import apply_fast, sample_fast_recorded
from dp360rt.sampler.noise import RecordedNoise
from dp360rt.sampler.plan import BatchPlan
from dp360rt.verify import _Runner

# What the fixture cases call: nvs apply at 8 rows (window8), nvs DDIM with batched guidance
# (window8x2cfg), back-view apply at 1 row and DDIM at 1+1 rows (backview).
VERIFY_PROFILES = ("window8", "window8x2cfg", "backview")
EXPORTED_PLAN = BatchPlan(windows_per_call=1, batch_cfg=True)     # the window8x2cfg UNet's shape


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
        return apply_fast(m, inp["x_noisy"], inp["t"], inp["context"], inp["hint"],
                          None if uc else inp.get("ref_front"), ref_back, backend=self.backend(m.kind))

    def sample(self, m: DiffPortrait360, inp: dict[str, Any], ref_back: list[Tensor], noise: RecordedNoise):
        return sample_fast_recorded(m, inp, ref_back, noise, plan=EXPORTED_PLAN, backend=self.backend(m.kind))


def case_image_sizes(cases: Mapping[str, Any]) -> list[tuple[int, int]]:
    """Every image size (height, width in pixels) the cases' networks see, read from their tensors:
    VAE images, latents (x 8) and DDIM ``latent_hw`` (x 8); in first-seen order."""
    sizes: list[tuple[int, int]] = []

    def add(h: int, w: int, factor: int = 1) -> None:
        if (h * factor, w * factor) not in sizes:
            sizes.append((h * factor, w * factor))

    for name, case in cases.items():
        inp = case.get("inputs") if isinstance(case, Mapping) else None
        if not isinstance(inp, Mapping):
            continue
        if isinstance(inp.get("image"), Tensor) and inp["image"].dim() == 4:
            add(*inp["image"].shape[-2:])
        for key in ("latent", "x_noisy"):
            if isinstance(inp.get(key), Tensor) and inp[key].dim() == 4:
                add(*inp[key].shape[-2:], factor=LATENT_FACTOR)
        if "latent_hw" in inp:
            h, w = (int(v) for v in inp["latent_hw"])
            add(h, w, factor=LATENT_FACTOR)
    return sizes


def export_fixture(fixture_dir: str | Path, out_dir: str | Path, runner: _Runner | None = None,
                   profiles: tuple[str, ...] = VERIFY_PROFILES, progress: bool = False,
                   cases: Mapping[str, Any] | None = None) -> Path:
    """Export a fixture set's two models (its config and weights) for ``verify(..., backend=...)``:
    ``profiles`` at every image size of ``cases`` (:func:`case_image_sizes`; the config's square
    size when no cases are given)."""
    from .onnx_export import export_models
    runner = runner or _Runner(Path(fixture_dir), "fast")
    models = {k: runner.model(k) for k in ("nvs", "backview")}
    square = LATENT_FACTOR * models["nvs"].cfg.latent_size
    sizes = case_image_sizes(cases) if cases is not None else []
    todo = [parse_profile(p) for p in profiles if not sizes or (square, square) in sizes]
    todo += [sized(parse_profile(p), hw) for hw in sizes if hw != (square, square) for p in profiles]
    export_models(models, out_dir, todo, sources={k: f"fixture {fixture_dir}" for k in models}, progress=progress)
    return Path(out_dir)
