"""The reference-semantics DDIM sampler: the authors' loop, waste and quirks included.

This path is the ground truth every faster path is tested against; keep it plain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..model import DiffPortrait360
from .ddim import DDIMTables, ddim_tables
from .noise import NoiseSource

Q_SAMPLE_T = 999  # the 3D-aware start is q_sample(feature, t=999) although the first step is t=981


@dataclass
class SampleResult:
    """Final latent [B, 4, h, w]; with ``record=True`` also x_T and every step's x and pred_x0."""

    latent: Tensor
    x_T: Tensor
    tables: DDIMTables
    x_steps: list[Tensor] = field(default_factory=list)
    pred_x0_steps: list[Tensor] = field(default_factory=list)
    unet_calls: int = 0


def q_sample_999(model: DiffPortrait360, feature_latent: Tensor, noise: Tensor) -> Tensor:
    """``sqrt(a_999) * z + sqrt(1 - a_999) * n`` with the float16 model tables, products in float32."""
    a = model.sqrt_alphas_cumprod[Q_SAMPLE_T].float()
    b = model.sqrt_one_minus_alphas_cumprod[Q_SAMPLE_T].float()
    return a * feature_latent + b * noise


def ddim_step(x: Tensor, eps: Tensor, tables: DDIMTables, i: int, noise: Tensor) -> tuple[Tensor, Tensor]:
    """One DDIM update at table index ``i`` (float32): returns (x_prev, pred_x0)."""
    a_t = torch.tensor(float(tables.alphas[i]), dtype=torch.float32, device=x.device)
    a_prev = torch.tensor(float(tables.alphas_prev[i]), dtype=torch.float32, device=x.device)
    sigma = torch.tensor(float(tables.sigmas[i]), dtype=torch.float32, device=x.device)
    s1m = torch.tensor(float(tables.sqrt_one_minus_alphas[i]), dtype=torch.float32, device=x.device)
    pred_x0 = (x - s1m * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma ** 2).sqrt() * eps
    return a_prev.sqrt() * pred_x0 + dir_xt + sigma * noise, pred_x0


@torch.no_grad()
def sample_reference(model: DiffPortrait360, *, context: Tensor, hint: Tensor, ref_front: Tensor,
                     ref_back: list[Tensor] | None = None, latent_hw: tuple[int, int] | None = None,
                     steps: int = 50, eta: float = 0.5, cfg_scale: float = 3.0,
                     feature_latent: Tensor | None = None, noise: NoiseSource,
                     record: bool = False, progress: Callable[[int, int], None] | None = None) -> SampleResult:
    """Sample one batch (a back view, or one 8-frame window) exactly as the reference does.

    context: [B, 77, C]; hint: [B, 3, 8h, 8w]; ref_front and each ref_back: [B, 4, h, w] (already
    repeated over the batch, as the reference does); feature_latent: [B, 4, h, w] for the
    3D-aware start or None. Draw order: start latent (always, discarded with a feature latent),
    q_sample noise, one draw per step (the last step too).
    """
    b = context.shape[0]
    h, w = latent_hw if latent_hw is not None else (hint.shape[2] // 8, hint.shape[3] // 8)
    shape = (b, model.cfg.unet.in_channels, h, w)
    device = context.device
    x = noise(shape, device)
    if feature_latent is not None:
        x = q_sample_999(model, feature_latent, noise(shape, device))
    tables = ddim_tables(model.alphas_cumprod, steps, eta)
    res = SampleResult(latent=x, x_T=x, tables=tables)
    for n, i in enumerate(reversed(range(tables.steps))):
        t = torch.full((b,), int(tables.timesteps[i]), dtype=torch.long, device=device)
        eps = model.apply_model(x, t, context, hint, ref_front, ref_back or []).eps
        res.unet_calls += 1
        if cfg_scale != 1.0:
            eps_u = model.apply_model(x, t, context, hint, None, uc=True).eps
            res.unet_calls += 1
            eps = eps_u + cfg_scale * (eps - eps_u)
        x, pred_x0 = ddim_step(x, eps, tables, i, noise(shape, device))
        if record:
            res.x_steps.append(x)
            res.pred_x0_steps.append(pred_x0)
        if progress is not None:
            progress(n + 1, tables.steps)
    res.latent = x
    return res
