"""The training noise schedule of LDM/SD1.5 that both checkpoints carry as buffers (the model's
12 float16 tables and ``logvar``), with the reference's float16 roundings reproduced exactly
(SEMANTICS.md §4). The DDIM tables the samplers derive from it are in :mod:`dp360rt.sampler.ddim`."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

def schedule_buffers(timesteps: int = 1000, linear_start: float = 0.00085,
                     linear_end: float = 0.012) -> dict[str, Tensor]:
    """The 12 float16 schedule tables [T] and the float32 ``logvar`` [T], computed in float64
    and rounded as the reference registers them (they are checkpoint keys)."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    acp = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - acp) / (1.0 - ac)
    tables = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": acp,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac),
    }
    out = {k: torch.tensor(v, dtype=torch.float16) for k, v in tables.items()}
    out["logvar"] = torch.zeros(timesteps, dtype=torch.float32)
    return out
