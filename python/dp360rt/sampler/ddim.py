"""The DDIM tables derived from the training noise schedule (:mod:`dp360rt.noise_schedule`), with
the reference's float16 roundings reproduced exactly (SEMANTICS.md §4)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class DDIMTables:
    """DDIM sampling tables in ascending timestep order (index 0 is the last step taken).

    timesteps: [S] int64; alphas: [S] float16 (alphas_cumprod at t); alphas_prev: [S] float64;
    sigmas: [S] float64; sqrt_one_minus_alphas: [S] float16.
    """

    timesteps: Tensor
    alphas: Tensor
    alphas_prev: Tensor
    sigmas: Tensor
    sqrt_one_minus_alphas: Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())


def ddim_tables(alphas_cumprod: Tensor, steps: int, eta: float) -> DDIMTables:
    """DDIM tables of the reference's ``make_schedule`` ("uniform" discretization).

    alphas_cumprod: [T] float16 model buffer. The sigma formula keeps the reference's two float16
    roundings (``1 - alpha_t`` and its reciprocal); ``sqrt(1 - alpha_t)`` is taken in float16.
    """
    T = alphas_cumprod.numel()
    if not isinstance(steps, int) or steps <= 0 or steps > T:
        raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
    ts = np.asarray(list(range(0, T, T // steps))) + 1
    if ts[-1] >= T or len(ts) != steps:
        good = [s for s in (1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500) if T % s == 0]
        raise ValueError(f"{steps} DDIM steps give the timestep list {ts.tolist()[-3:]}... which the reference "
                         f"cannot sample (t={ts[-1]} >= {T}); use a step count dividing {T}, e.g. {good}")
    a = alphas_cumprod.detach().to("cpu", torch.float16)
    alphas = a[torch.from_numpy(ts)]
    alphas_prev = np.asarray([a[0].item()] + a[torch.from_numpy(ts[:-1])].tolist(), dtype=np.float64)
    recip = (1 - alphas).reciprocal().double().numpy()   # float16 1 - alpha_t, float16 reciprocal
    sigmas = eta * np.sqrt((1 - alphas_prev) * recip * (1 - alphas.double().numpy() / alphas_prev))
    return DDIMTables(
        timesteps=torch.from_numpy(ts).long(),
        alphas=alphas,
        alphas_prev=torch.from_numpy(alphas_prev),
        sigmas=torch.from_numpy(np.asarray(sigmas, dtype=np.float64)),
        sqrt_one_minus_alphas=torch.sqrt(1 - alphas),
    )
