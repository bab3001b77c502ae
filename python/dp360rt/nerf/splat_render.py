"""A differentiable 3D Gaussian splat renderer in plain PyTorch (CPU or any device); the loop
that refines a splat against posed views with it is :mod:`.splat_refine`.

:func:`render_splat` projects each Gaussian with the camera (EWA: 2D covariance from the
Jacobian of the perspective map), sorts by camera depth and alpha-composites front to back per
pixel: every (Gaussian, TILE x TILE tile) pair where the Gaussian's alpha can reach ``ALPHA_MIN``
is evaluated at once, and each pixel's transmittance is an exclusive cumulative sum of
log(1 - alpha) over its tile's pairs (vectorised: no Python loop over tiles or Gaussians).
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
TILE = 4                # pixels a side of a tile: small, so little of a pair's tile lies outside its Gaussian
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
    "depth" [N], "conic" [N, 3] (a, b, c of the inverse 2D covariance), "radius" [N] (pixels:
    beyond it the Gaussian's alpha is below ALPHA_MIN), "rgb" [N, 3], "opacity" [N], "valid" [N] bool (in front of the camera)}."""
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
    opacity = torch.sigmoid(params["logit_opacity"])
    # beyond this distance alpha < ALPHA_MIN on every side, so the Gaussian draws nothing there
    reach = 2.0 * torch.log((opacity / ALPHA_MIN).clamp_min(1.0))
    radius = torch.sqrt(lam * reach)
    rgb = (0.5 + SH_C0 * params["f_dc"]).clamp_min(0.0)
    return {"xy": xy, "depth": z, "conic": conic, "radius": radius, "rgb": rgb, "opacity": opacity, "valid": valid}


def _pairs(xy: Tensor, radius: Tensor, width: int, height: int) -> tuple[Tensor, Tensor, int]:
    """Every (Gaussian, tile) pair where a Gaussian (already sorted near to far) may draw ->
    (Gaussian index [K], tile index [K]) grouped by tile, near to far within a tile, and the
    number of tile columns."""
    ntx = (width + TILE - 1) // TILE
    # pixel c (centre at integer c) can be drawn when |c - x| <= radius
    c0 = torch.ceil(xy - radius[:, None]).clamp_min(0).long() // TILE
    c1 = torch.floor(xy + radius[:, None]).long()
    c1 = torch.minimum(c1, torch.tensor([width - 1, height - 1], device=xy.device)) // TILE
    c1 = torch.maximum(c1, c0 - 1)                            # empty ranges give no pairs
    n = (c1 - c0 + 1).clamp_min(0)
    cnt = n[:, 0] * n[:, 1]
    gid = torch.repeat_interleave(torch.arange(xy.shape[0], device=xy.device), cnt)
    k = torch.arange(gid.shape[0], device=xy.device) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
    nx = n[gid, 0].clamp_min(1)
    tile = (c0[gid, 1] + k // nx) * ntx + c0[gid, 0] + k % nx
    order = torch.argsort(tile, stable=True)
    return gid[order], tile[order], ntx


def _rasterize(pr: dict[str, Tensor], idx: Tensor, width: int, height: int, bg: Tensor) -> Tensor:
    """Alpha-composite the Gaussians ``idx`` (sorted near to far) of the projection ``pr`` over
    ``bg`` -> rgb [H, W, 3]. All (Gaussian, tile) pairs at once: the alphas of each pair's
    TILE x TILE pixels, transmittance from a per-tile exclusive cumulative sum of log(1 - alpha)."""
    dev, dt = pr["xy"].device, pr["xy"].dtype
    xy, co, op, rgb = pr["xy"][idx], pr["conic"][idx], pr["opacity"][idx], pr["rgb"][idx]
    gid, tile, ntx = _pairs(xy.detach(), pr["radius"][idx].detach(), width, height)
    nty = (height + TILE - 1) // TILE
    off = torch.arange(TILE * TILE, device=dev)
    px = ((tile % ntx)[:, None] * TILE + off % TILE).to(dt)           # [K, TILE^2] pixel columns
    py = ((tile // ntx)[:, None] * TILE + off // TILE).to(dt)
    inside = (px < width) & (py < height)
    dx, dy = px - xy[gid, 0, None], py - xy[gid, 1, None]
    c = co[gid]
    power = -0.5 * (c[:, 0, None] * dx * dx + c[:, 2, None] * dy * dy) - c[:, 1, None] * dx * dy
    alpha = (op[gid, None] * torch.exp(power.clamp_max(0.0))).clamp_max(ALPHA_MAX)
    alpha = torch.where((alpha >= ALPHA_MIN) & inside, alpha, torch.zeros_like(alpha))
    la = torch.log1p(-alpha).double()
    cs = torch.cumsum(la, 0) - la                                      # exclusive, over all pairs
    first = torch.searchsorted(tile, tile)                             # each pair's tile's first pair
    trans = torch.exp(cs - cs[first]).to(dt)
    n_tiles = ntx * nty
    img = torch.zeros(n_tiles, TILE * TILE, 3, dtype=dt, device=dev).index_add(
        0, tile, (alpha * trans)[..., None] * rgb[gid][:, None, :])
    t_end = torch.exp(torch.zeros(n_tiles, TILE * TILE, dtype=torch.float64, device=dev).index_add(0, tile, la)).to(dt)
    img = img + t_end[..., None] * bg
    img = img.reshape(nty, ntx, TILE, TILE, 3).permute(0, 2, 1, 3, 4).reshape(nty * TILE, ntx * TILE, 3)
    return img[:height, :width]


def render_splat(params: dict[str, Tensor], camera: Tensor, width: int, height: int,
                 background: Tensor | None = None, meta: dict[str, Tensor] | None = None) -> Tensor:
    """Render the splat ``params`` from one 25-number camera -> rgb [H, W, 3] (differentiable
    with respect to every entry of ``params``), composited over ``background`` ([3], default
    white). A ``meta`` dict (PyTorch path only) receives "xy" [N, 2], the projected centres in
    pixels (their ``.grad`` is kept after backward: densification reads it), and "visible" [N]."""
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
    if meta is not None:
        if xy.requires_grad:
            xy.retain_grad()
        meta["xy"], meta["visible"] = xy, vis
    order = torch.argsort(pr["depth"].detach())
    return _rasterize(pr, order[vis[order]], width, height, bg)


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
