"""Volume rendering of PanoHead's tri-grid: rays, coarse and importance samples, ray marching.

Conventions (FACTS §4-5): a camera label is 25 numbers (4x4 cam2world row-major, OpenCV axes,
then normalized intrinsics); pixel (row i, col j) of an R x R render is ray m = i*R + j through
((j + 0.5)/R, (i + 0.5)/R). A world point is scaled by 2/box_warp and read from three planes of
shape (32, D, T, T) with trilinear ``grid_sample`` (plane 0 indexed by (x, y, z), plane 1 by
(x, z, y), plane 2 by (y, z, x) as (W, H, D)); the three features are averaged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .draws import Draws

# which coordinates index (W, H, D) of each plane
PLANE_COORDS = ((0, 1, 2), (0, 2, 1), (1, 2, 0))
CROP_MARGIN = 0.1          # samples with |x| or |z| beyond box_warp/2 - 0.1 are made empty


def ray_bundle(cam2world: Tensor, intrinsics: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """Rays of an R x R render: cam2world [N, 4, 4], intrinsics [N, 3, 3] -> origins, unit
    directions [N, R*R, 3] (ray m = row * R + col)."""
    n, r = cam2world.shape[0], resolution
    dev = cam2world.device
    idx = torch.arange(r, dtype=torch.float32, device=dev) * (1.0 / r) + (0.5 / r)
    v, u = torch.meshgrid(idx, idx, indexing="ij")                          # v: row, u: column
    u = u.reshape(1, -1).expand(n, -1)
    v = v.reshape(1, -1).expand(n, -1)
    fx, fy = intrinsics[:, 0, 0:1], intrinsics[:, 1, 1:2]
    cx, cy, sk = intrinsics[:, 0, 2:3], intrinsics[:, 1, 2:3], intrinsics[:, 0, 1:2]
    ones = torch.ones_like(u)
    x_cam = (u - cx + cy * sk / fy - sk * v / fy) / fx * ones
    y_cam = (v - cy) / fy * ones
    pts = torch.stack((x_cam, y_cam, ones, ones), dim=-1)                   # homogeneous points at depth 1
    world = torch.bmm(cam2world, pts.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
    origins = cam2world[:, :3, 3]
    dirs = F.normalize(world - origins[:, None, :], dim=2)
    return origins.unsqueeze(1).repeat(1, dirs.shape[1], 1), dirs


def sample_trigrid(planes: Tensor, points: Tensor, box_warp: float, depth: int) -> Tensor:
    """Features of world points from the tri-grid: planes [N, 3, 32*D, T, T] (channel c*D + d),
    points [N, M, 3] -> [N, 3, M, 32] (one row per plane; the caller averages them)."""
    n, n_planes, cd, h, w = planes.shape
    m = points.shape[1]
    grid = planes.reshape(n * n_planes, cd // depth, depth, h, w)
    p = (2 / box_warp) * points
    coords = torch.stack([p[..., list(ix)] for ix in PLANE_COORDS], 1).reshape(n * n_planes, 1, 1, m, 3)
    out = F.grid_sample(grid, coords.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.permute(0, 4, 3, 2, 1).reshape(n, n_planes, m, cd // depth)


def outside_box(points: Tensor, box_warp: float) -> Tensor:
    """[N, M, 3] -> bool [N, M, 1]: the sample lies beyond the crop box in x or z (y is free)."""
    return ~(points[..., [0, 2]].abs() <= (box_warp / 2 - CROP_MARGIN)).all(dim=-1, keepdim=True)


def march(colors: Tensor, densities: Tensor, depths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Alpha-composite sorted samples (midpoint rule, density softplus(sigma - 1)).

    colors [N, M, S, C], densities and depths [N, M, S, 1] -> (features [N, M, C], depth [N, M, 1]
    clamped to the call's depth range, weights [N, M, S-1, 1])."""
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    dens_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    alpha = 1 - torch.exp(-(F.softplus(dens_mid - 1) * deltas))
    trans = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * torch.cumprod(trans, -2)[:, :, :-1]
    rgb = torch.sum(weights * colors_mid, -2)
    depth = torch.sum(weights * depths_mid, -2) / weights.sum(2)
    depth = torch.clamp(torch.nan_to_num(depth, float("inf")), torch.min(depths), torch.max(depths))
    return rgb, depth, weights


def stratified_depths(n: int, m: int, start: float, end: float, samples: int, draws: Draws, device,
                      disparity: bool = False) -> Tensor:
    """Coarse sample depths [N, M, S, 1]: S even steps over [start, end] each jittered forward by
    U * step (one uniform draw of shape [N, M, S, 1]); in disparity space when ``disparity``."""
    if disparity:
        t = torch.linspace(0, 1, samples, device=device).reshape(1, 1, samples, 1).repeat(n, m, 1, 1)
        t = t + draws.rand(t.shape, device) * (1 / (samples - 1))
        return 1.0 / (1.0 / start * (1.0 - t) + 1.0 / end * t)
    t = torch.linspace(start, end, samples, device=device).reshape(1, 1, samples, 1).repeat(n, m, 1, 1)
    return t + draws.rand(t.shape, device) * ((end - start) / (samples - 1))


@torch.no_grad()
def importance_depths(depths: Tensor, weights: Tensor, count: int, draws: Draws) -> Tensor:
    """Fine sample depths [N, M, count, 1] drawn from the coarse weights (FACTS §5): weights
    max-pooled then averaged (+0.01), inverse-CDF sampling over the coarse midpoints with one
    uniform draw of shape [N*M, count] (not stratified, not sorted). No gradient."""
    n, m, s, _ = depths.shape
    z = depths.reshape(n * m, s)
    w = weights.reshape(n * m, -1).unsqueeze(1).float()
    w = F.avg_pool1d(F.max_pool1d(w, 2, 1, padding=1), 2, 1).squeeze(1) + 0.01
    bins = 0.5 * (z[:, :-1] + z[:, 1:])
    pdf_w = w[:, 1:-1] + 1e-5
    n_bins = pdf_w.shape[1]
    pdf = pdf_w / torch.sum(pdf_w, -1, keepdim=True)
    cdf = torch.cumsum(pdf, -1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
    u = draws.rand([n * m, count], depths.device).contiguous()
    k = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(k - 1, 0)
    above = torch.clamp_max(k, n_bins)
    cdf_lo, cdf_hi = torch.gather(cdf, 1, below), torch.gather(cdf, 1, above)
    bin_lo, bin_hi = torch.gather(bins, 1, below), torch.gather(bins, 1, above)
    denom = cdf_hi - cdf_lo
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    t = bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)
    return t.reshape(n, m, count, 1)


def render_trigrid(planes: Tensor, decoder, origins: Tensor, directions: Tensor, options: dict, draws: Draws,
                   trace: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """PanoHead's importance renderer: coarse pass, importance pass, one march over all samples
    sorted by depth.

    planes [N, 3, 32*D, T, T]; origins, directions [N, M, 3]; ``options``: ray_start, ray_end,
    depth_resolution, depth_resolution_importance, box_warp, triplane_depth, clamp_mode,
    disparity_space_sampling. Returns (features [N, M, C], depth [N, M, 1], weight sum [N, M, 1])."""
    if options.get("clamp_mode", "softplus") != "softplus":
        raise ValueError(f"clamp_mode {options['clamp_mode']!r} is not supported (PanoHead uses 'softplus')")
    start, end = options["ray_start"], options["ray_end"]
    if isinstance(start, str) or isinstance(end, str):
        raise ValueError("ray_start/ray_end 'auto' is not supported. Fix: set numeric ray_start and ray_end "
                         "(PanoHead: 2.25 and 3.3; DiffPortrait360 renders with ray_start 2.35)")
    n, m, _ = origins.shape
    box, depth_d = options["box_warp"], options["triplane_depth"]
    coarse = stratified_depths(n, m, float(start), float(end), options["depth_resolution"], draws, origins.device,
                               options.get("disparity_space_sampling", False))

    def run(depths: Tensor) -> tuple[Tensor, Tensor]:
        k = depths.shape[2]
        pts = (origins.unsqueeze(-2) + depths * directions.unsqueeze(-2)).reshape(n, -1, 3)
        out = decoder(sample_trigrid(planes, pts, box, depth_d))
        sigma = out["sigma"]
        if options.get("density_noise", 0) > 0:
            sigma = sigma + draws.randn(sigma.shape, sigma.device) * options["density_noise"]
        sigma = torch.where(outside_box(pts, box), torch.full_like(sigma, -1e3), sigma)
        return out["rgb"].reshape(n, m, k, -1), sigma.reshape(n, m, k, 1)

    colors, dens = run(coarse)
    if trace is not None:
        trace["depths_coarse"] = coarse
    n_imp = options.get("depth_resolution_importance", 0)
    if n_imp > 0:
        _, _, w = march(colors, dens, coarse)
        fine = importance_depths(coarse, w, n_imp, draws)
        if trace is not None:
            trace["depths_fine"] = fine
        colors_f, dens_f = run(fine)
        depths = torch.cat([coarse, fine], -2)
        colors = torch.cat([colors, colors_f], -2)
        dens = torch.cat([dens, dens_f], -2)
        _, order = torch.sort(depths, dim=-2)
        depths = torch.gather(depths, -2, order)
        colors = torch.gather(colors, -2, order.expand(-1, -1, -1, colors.shape[-1]))
        dens = torch.gather(dens, -2, order)
    else:
        depths = coarse
    rgb, depth, weights = march(colors, dens, depths)
    return rgb, depth, weights.sum(2)
