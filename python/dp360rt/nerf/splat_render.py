"""A differentiable 3D Gaussian splat renderer in plain PyTorch (CPU or any device) and the loop
that refines a splat against posed views.

:func:`render_splat` projects each Gaussian with the camera (EWA: 2D covariance from the
Jacobian of the perspective map), sorts by camera depth and alpha-composites front to back per
pixel, one 16x16 tile at a time over the Gaussians whose 3-sigma box touches the tile.
:func:`render_splat_reference` is the brute-force twin (every pixel, every Gaussian, Python
loops) that tests compare it to. When ``gsplat`` (CUDA) is importable and the splat lives on a
CUDA device, :func:`render_splat` hands the work to it instead.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .cameras import split_camera

SH_C0 = 0.28209479177387814
TILE = 16
LOW_PASS = 0.3          # pixels^2 added to every 2D covariance: keeps sub-pixel Gaussians visible
ALPHA_MAX = 0.99
ALPHA_MIN = 1.0 / 255.0


def quat_to_rotmat(q: Tensor) -> Tensor:
    """Quaternions [N, 4] (w, x, y, z; any norm) -> rotation matrices [N, 3, 3]."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)


def project(params: dict[str, Tensor], camera: Tensor, width: int, height: int) -> dict[str, Tensor]:
    """Project the Gaussians of ``params`` (see :func:`dp360rt.nerf.splat.SplatParams`) with a
    25-number camera -> {"xy" [N, 2] pixel (column, row) with integer values at pixel centres,
    "depth" [N], "conic" [N, 3] (a, b, c of the inverse 2D covariance), "radius" [N] (3 sigma,
    pixels), "rgb" [N, 3], "opacity" [N], "valid" [N] bool (in front of the camera)}."""
    means = params["means"]
    dt = means.dtype
    c2w, K = split_camera(torch.as_tensor(camera, dtype=torch.float64))
    R = c2w[:3, :3].to(means.device, dt)
    t = c2w[:3, 3].to(means.device, dt)
    fx, fy = float(K[0, 0]) * width, float(K[1, 1]) * height
    cx, cy = float(K[0, 2]) * width - 0.5, float(K[1, 2]) * height - 0.5
    p = (means - t) @ R                                     # camera frame: x right, y down, z forward
    z = p[:, 2]
    valid = z > 0.01
    zs = torch.where(valid, z, torch.ones_like(z))
    x, y = p[:, 0] / zs, p[:, 1] / zs
    xy = torch.stack([fx * x + cx, fy * y + cy], -1)
    rot = quat_to_rotmat(params["quats"])
    S = torch.exp(params["log_scales"])
    M = rot * S[:, None, :]                                  # R S: covariance = M M^T
    cov_w = M @ M.transpose(1, 2)
    cov_c = R.T @ cov_w @ R
    J = torch.zeros(means.shape[0], 2, 3, dtype=dt, device=means.device)
    J[:, 0, 0] = fx / zs
    J[:, 0, 2] = -fx * x / zs
    J[:, 1, 1] = fy / zs
    J[:, 1, 2] = -fy * y / zs
    cov2 = J @ cov_c @ J.transpose(1, 2)
    a = cov2[:, 0, 0] + LOW_PASS
    b = cov2[:, 0, 1]
    c = cov2[:, 1, 1] + LOW_PASS
    det = (a * c - b * b).clamp_min(1e-12)
    conic = torch.stack([c / det, -b / det, a / det], -1)
    mid = 0.5 * (a + c)
    lam = mid + torch.sqrt((mid * mid - det).clamp_min(0.01))
    radius = 3.0 * torch.sqrt(lam)
    rgb = (0.5 + SH_C0 * params["f_dc"]).clamp_min(0.0)
    return {"xy": xy, "depth": z, "conic": conic, "radius": radius, "rgb": rgb,
            "opacity": torch.sigmoid(params["logit_opacity"]), "valid": valid}


def _composite(px: Tensor, pr: dict[str, Tensor], idx: Tensor, bg: Tensor) -> Tensor:
    """Pixels [P, 2] (column, row) over Gaussians ``idx`` (already sorted near to far) -> rgb [P, 3]."""
    if idx.numel() == 0:
        return bg.expand(px.shape[0], 3)
    d = px[:, None, :] - pr["xy"][idx][None]                 # [P, n, 2]
    co = pr["conic"][idx]
    power = -0.5 * (co[:, 0] * d[..., 0] ** 2 + co[:, 2] * d[..., 1] ** 2) - co[:, 1] * d[..., 0] * d[..., 1]
    alpha = (pr["opacity"][idx] * torch.exp(power.clamp_max(0.0))).clamp_max(ALPHA_MAX)
    alpha = torch.where(alpha >= ALPHA_MIN, alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha], 1), 1)   # [P, n+1]
    w = alpha * trans[:, :-1]
    return w @ pr["rgb"][idx] + trans[:, -1:] * bg


def render_splat(params: dict[str, Tensor], camera: Tensor, width: int, height: int,
                 background: Tensor | None = None) -> Tensor:
    """Render the splat ``params`` from one 25-number camera -> rgb [H, W, 3] (differentiable
    with respect to every entry of ``params``), composited over ``background`` ([3], default
    white)."""
    dev, dt = params["means"].device, params["means"].dtype
    bg = torch.ones(3, dtype=dt, device=dev) if background is None else torch.as_tensor(background, dtype=dt, device=dev)
    if dev.type == "cuda":
        out = _render_gsplat(params, camera, width, height, bg)
        if out is not None:
            return out
    pr = project(params, camera, width, height)
    xy, r = pr["xy"], pr["radius"]
    vis = pr["valid"] & (xy[:, 0] + r > -0.5) & (xy[:, 0] - r < width - 0.5) & \
        (xy[:, 1] + r > -0.5) & (xy[:, 1] - r < height - 0.5)
    order = torch.argsort(pr["depth"].detach())
    order = order[vis[order]]
    xo, yo, ro = xy[order, 0].detach(), xy[order, 1].detach(), r[order].detach()
    out = torch.empty(height, width, 3, dtype=dt, device=dev)
    rows = []
    for ty in range(0, height, TILE):
        cols = []
        y1 = min(ty + TILE, height)
        for tx in range(0, width, TILE):
            x1 = min(tx + TILE, width)
            hit = (xo + ro >= tx - 0.5) & (xo - ro <= x1 - 0.5) & (yo + ro >= ty - 0.5) & (yo - ro <= y1 - 0.5)
            idx = order[hit]
            gy, gx = torch.meshgrid(torch.arange(ty, y1, device=dev, dtype=dt),
                                    torch.arange(tx, x1, device=dev, dtype=dt), indexing="ij")
            px = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
            cols.append(_composite(px, pr, idx, bg).reshape(y1 - ty, x1 - tx, 3))
        rows.append(torch.cat(cols, 1))
    out = torch.cat(rows, 0)
    return out


def _render_gsplat(params: dict[str, Tensor], camera: Tensor, width: int, height: int, bg: Tensor) -> Tensor | None:
    try:
        from gsplat import rasterization  # type: ignore[import-not-found]
    except ImportError:
        return None
    c2w, K = split_camera(torch.as_tensor(camera, dtype=torch.float64))
    dev = params["means"].device
    viewmat = torch.linalg.inv(c2w).float().to(dev)[None]
    Kp = K.clone()
    Kp[0] *= width
    Kp[1] *= height
    # K * size gives the same pixel centres as project(): gsplat's pixel i is centred at i + 0.5
    rgb = (0.5 + SH_C0 * params["f_dc"]).clamp_min(0.0)
    img, _, _ = rasterization(params["means"], params["quats"], torch.exp(params["log_scales"]),
                              torch.sigmoid(params["logit_opacity"]), rgb, viewmat, Kp.float().to(dev)[None],
                              width, height, backgrounds=bg[None].float())
    return img[0]


def render_splat_reference(params: dict[str, Tensor], camera: Tensor, width: int, height: int,
                           background: Tensor | None = None) -> Tensor:
    """Brute force twin of :func:`render_splat` for tests: every pixel walks every Gaussian in
    depth order with scalar arithmetic (no tiles, no culling) -> rgb [H, W, 3]. Slow: tiny cases only."""
    with torch.no_grad():
        pr = project(params, camera, width, height)
        bg = torch.ones(3, dtype=torch.float64) if background is None else torch.as_tensor(background, dtype=torch.float64)
        order = torch.argsort(pr["depth"]).tolist()
        out = torch.zeros(height, width, 3, dtype=torch.float64)
        for yy in range(height):
            for xx in range(width):
                T, col = 1.0, torch.zeros(3, dtype=torch.float64)
                for i in order:
                    if not bool(pr["valid"][i]):
                        continue
                    dx, dy = xx - float(pr["xy"][i, 0]), yy - float(pr["xy"][i, 1])
                    a, b, c = (float(v) for v in pr["conic"][i])
                    power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
                    al = min(ALPHA_MAX, float(pr["opacity"][i]) * math.exp(min(power, 0.0)))
                    if al < ALPHA_MIN:
                        continue
                    col += T * al * pr["rgb"][i].double()
                    T *= 1 - al
                out[yy, xx] = col + T * bg
        return out


def refine_splat(params: dict[str, Tensor], images: list[Tensor], cameras: Tensor, steps: int = 200,
                 lr: float = 0.01, background: Tensor | None = None, seed: int = 0,
                 progress: Any = None) -> list[float]:
    """Fit ``params`` (updated in place) to ``images`` ([H, W, 3] in [0, 1]) seen by ``cameras``
    ([N, 25]) with Adam on an L1 loss, one random view per step, for ``steps`` steps. Returns the
    loss of every step."""
    for v in params.values():
        v.requires_grad_(True)
    lrs = {"means": lr * 0.05, "log_scales": lr * 0.5, "quats": lr * 0.1, "logit_opacity": lr * 5, "f_dc": lr * 2.5}
    opt = torch.optim.Adam([{"params": [params[k]], "lr": lrs[k]} for k in lrs], eps=1e-15)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for s in range(steps):
        i = int(torch.randint(len(images), (1,), generator=g))
        img = images[i].to(params["means"].device, params["means"].dtype)
        out = render_splat(params, cameras[i], img.shape[1], img.shape[0], background)
        loss = (out - img).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(s, float(loss))
    for v in params.values():
        v.requires_grad_(False)
    return losses
