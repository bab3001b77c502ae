"""Refinement of a 3D Gaussian splat against posed views, in the manner of 3DGS (Kerbl et al.
2023) shortened for a CPU: Adam with one learning rate per parameter group (the position's
decaying exponentially and scaled by the splat's extent), an L1 + D-SSIM loss on one view per
step (views in a fresh random order every pass), and adaptive density control: Gaussians whose
screen-space position gradient stays large are cloned (small ones) or split in two (large ones),
and nearly transparent ones are pruned, never above ``max_splats``.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from ._threads import ThreadTuner
from .splat_render import quat_to_rotmat, render_splat

# 3DGS's learning rates (for ``lr`` = 0.01); "means" is per unit of the splat's extent
BASE_LRS = {"means": 1.6e-4, "log_scales": 5e-3, "quats": 1e-3, "logit_opacity": 5e-2, "f_dc": 2.5e-3}
SHORT_BOOST = {"means": 4.0, "f_dc": 4.0}    # a few hundred steps, not 30k: colour and position move faster
MEANS_LR_FINAL = 0.01                        # the position's rate decays to this fraction
GRAD_THRESHOLD = 2e-4                        # mean screen-space gradient (NDC units, as in 3DGS) that densifies
PERCENT_DENSE = 0.01                         # clone below, split above this fraction of the extent
MIN_OPACITY = 0.005
DENSIFY_MIN_STEPS = 200                      # shorter runs never densify: early gradients say little
GROWTH = 0.1                                 # each densification adds at most this fraction of the Gaussians


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean structural similarity of two images [H, W, 3] (Gaussian window, as in 3DGS)."""
    x = torch.arange(window, dtype=a.dtype, device=a.device) - window // 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()

    def blur(t: Tensor) -> Tensor:     # separable, per channel, zero padding
        t = torch.nn.functional.conv2d(t, g.view(1, 1, 1, -1).expand(3, 1, 1, window), padding=(0, window // 2), groups=3)
        return torch.nn.functional.conv2d(t, g.view(1, 1, -1, 1).expand(3, 1, window, 1), padding=(window // 2, 0), groups=3)
    a, b = a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None]
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))).mean()


def _replace(params: dict[str, Tensor], opt: torch.optim.Adam, keep: Tensor, extra: dict[str, Tensor]) -> None:
    """Keep the Gaussians ``keep`` [N] bool and append ``extra`` (new rows of every entry), in
    ``params`` and in Adam's moments (zeros for the new rows)."""
    for group in opt.param_groups:
        old = group["params"][0]
        name = group["name"]
        new = torch.cat([old.detach()[keep], extra[name].to(old.dtype)]).requires_grad_(True)
        state = opt.state.pop(old, None)
        if state:
            for m in ("exp_avg", "exp_avg_sq"):
                state[m] = torch.cat([state[m][keep], torch.zeros_like(extra[name], dtype=state[m].dtype)])
            opt.state[new] = state
        group["params"][0] = new
        params[name] = new


def densify_and_prune(params: dict[str, Tensor], opt: torch.optim.Adam, grad: Tensor, extent: float,
                      max_splats: int, gen: torch.Generator, max_new: int | None = None) -> None:
    """Clone the small and split the large Gaussians whose mean screen-space gradient ``grad``
    [N] reaches :data:`GRAD_THRESHOLD` (the largest first, at most ``max_new`` of them and while
    the total stays within ``max_splats``), then prune those below :data:`MIN_OPACITY` opacity."""
    p = {k: v.detach() for k, v in params.items()}
    n = p["means"].shape[0]
    big = p["log_scales"].exp().amax(-1) > PERCENT_DENSE * extent
    cand = torch.nonzero(grad >= GRAD_THRESHOLD)[:, 0]
    room = max(0, max_splats - n) if max_new is None else max(0, min(max_splats - n, max_new))
    cand = cand[torch.argsort(grad[cand], descending=True)][:room]
    clone, split = cand[~big[cand]], cand[big[cand]]
    # a split Gaussian becomes two samples of itself, each 1.6 times smaller
    rep = split.repeat(2)
    z = torch.randn(rep.shape[0], 3, generator=gen, dtype=p["means"].dtype) * p["log_scales"][rep].exp()
    off = (quat_to_rotmat(p["quats"][rep]) @ z[..., None])[..., 0]
    extra = {k: torch.cat([v[clone], v[rep]]) for k, v in p.items()}
    extra["means"] = torch.cat([p["means"][clone], p["means"][rep] + off])
    extra["log_scales"] = torch.cat([p["log_scales"][clone], p["log_scales"][rep] - math.log(1.6)])
    keep = torch.ones(n, dtype=torch.bool)
    keep[split] = False
    _replace(params, opt, keep, extra)
    alive = torch.sigmoid(params["logit_opacity"].detach()) >= MIN_OPACITY
    if not bool(alive.all()) and bool(alive.any()):
        _replace(params, opt, alive, {k: v.detach()[:0] for k, v in params.items()})


def refine_splat(params: dict[str, Tensor], images: list[Tensor], cameras: Tensor, steps: int = 200,
                 lr: float = 0.01, background: Tensor | None = None, seed: int = 0, progress: Any = None,
                 densify: bool = True, max_splats: int = 200_000, ssim_weight: float = 0.2) -> list[float]:
    """Fit ``params`` (see :func:`dp360rt.nerf.splat.init_splat`; its entries are replaced, so
    the number of Gaussians may change) to ``images`` ([H, W, 3] in [0, 1]) seen by ``cameras``
    ([N, 25]) for ``steps`` steps of Adam on ``(1 - ssim_weight) L1 + ssim_weight (1 - SSIM)``,
    one view per step. ``lr`` scales all of :data:`BASE_LRS`; with ``densify`` (and at least
    :data:`DENSIFY_MIN_STEPS` steps) the Gaussians are cloned / split / pruned every 10% of the
    steps between 20% and 70% of them, growing by at most :data:`GROWTH` each time. Returns the
    loss of every step."""
    dev, dt = params["means"].device, params["means"].dtype
    for k in BASE_LRS:
        params[k] = params[k].detach().clone().requires_grad_(True)
    extent = float((params["means"].detach() - params["means"].detach().mean(0)).norm(dim=-1).max().clamp_min(1e-3))
    rates = {k: v * (lr / 0.01) * SHORT_BOOST.get(k, 1.0) for k, v in BASE_LRS.items()}
    rates["means"] *= extent
    opt = torch.optim.Adam([{"params": [params[k]], "lr": rates[k], "name": k} for k in BASE_LRS], eps=1e-15)
    g = torch.Generator().manual_seed(seed)
    every = max(1, steps // 10)
    grad_sum = torch.zeros(params["means"].shape[0], dtype=dt)
    seen = torch.zeros_like(grad_sum)
    order: list[int] = []
    losses = []
    # on a shared CPU two OpenMP threads waiting on each other can be 10x slower than one
    tuner = ThreadTuner(window=6, every=100) if dev.type == "cpu" else None
    try:
        for s in range(steps):
            t0 = time.perf_counter()
            if not order:
                order = torch.randperm(len(images), generator=g).tolist()
            i = order.pop()
            img = images[i].to(dev, dt)
            h, w = img.shape[:2]
            opt.param_groups[0]["lr"] = rates["means"] * MEANS_LR_FINAL ** (s / max(1, steps - 1))
            meta: dict[str, Tensor] = {}
            out = render_splat(params, cameras[i], w, h, background, meta=meta)
            loss = (1 - ssim_weight) * (out - img).abs().mean()
            if ssim_weight > 0:
                loss = loss + ssim_weight * (1 - ssim(out, img))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if tuner is not None:
                tuner.record(time.perf_counter() - t0, 1)
            if densify and meta.get("xy") is not None and meta["xy"].grad is not None:
                gxy = meta["xy"].grad.detach().cpu() * torch.tensor([0.5 * w, 0.5 * h], dtype=dt)
                grad_sum += gxy.norm(dim=-1) * meta["visible"].cpu()
                seen += meta["visible"].cpu().to(dt)
                if steps >= DENSIFY_MIN_STEPS and steps // 5 <= s + 1 <= 0.7 * steps and (s + 1) % every == 0:
                    n = params["means"].shape[0]
                    densify_and_prune(params, opt, grad_sum / seen.clamp_min(1), extent, max_splats, g,
                                      max_new=math.ceil(GROWTH * n))
                    grad_sum = torch.zeros(params["means"].shape[0], dtype=dt)
                    seen = torch.zeros_like(grad_sum)
            if progress is not None:
                progress(s, losses[-1])
    finally:
        if tuner is not None:
            tuner.restore()
    for k in BASE_LRS:
        params[k] = params[k].detach()
    return losses
