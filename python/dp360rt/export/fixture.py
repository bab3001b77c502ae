"""A fixture set's two models exported for ``dp360rt verify --backend ort|trt``
(:func:`dp360rt.verify.verify` with ``backend=`` and no ``export_dir``, which runs the cases with
:class:`dp360rt.verify.BackendCaseRunner`).

The profiles :data:`VERIFY_PROFILES` are exported at every image size the cases use (read from
their tensors, so a set with 16x24 latents gets ``window8@128x192`` and so on).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from dp360rt.export.profiles import LATENT_FACTOR, parse_profile, sized
from dp360rt.model import DiffPortrait360

# What the fixture cases call: nvs apply at 8 rows (window8), nvs DDIM with batched guidance
# (window8x2cfg, the shape of verify.EXPORTED_PLAN), back-view apply at 1 row and DDIM at 1+1 rows (backview).
VERIFY_PROFILES = ("window8", "window8x2cfg", "backview")


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


def export_fixture(fixture_dir: str | Path, out_dir: str | Path, models: Mapping[str, DiffPortrait360],
                   profiles: tuple[str, ...] = VERIFY_PROFILES, progress: bool = False,
                   cases: Mapping[str, Any] | None = None) -> Path:
    """Export a fixture set's two models (``models["nvs"]``, ``models["backview"]``, built from its
    config and weights) for ``verify(..., backend=...)``: ``profiles`` at every image size of
    ``cases`` (:func:`case_image_sizes`; the config's square size when no cases are given)."""
    from .onnx_export import export_models
    square = LATENT_FACTOR * models["nvs"].cfg.latent_size
    sizes = case_image_sizes(cases) if cases is not None else []
    todo = [parse_profile(p) for p in profiles if not sizes or (square, square) in sizes]
    todo += [sized(parse_profile(p), hw) for hw in sizes if hw != (square, square) for p in profiles]
    export_models(models, out_dir, todo, sources={k: f"fixture {fixture_dir}" for k in models}, progress=progress)
    return Path(out_dir)
