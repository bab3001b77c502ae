"""Volume rendering: ray/box intersection, packed samples, compositing, ray marching.

Quadrature: samples at uniform steps ``delta`` along the part of each ray inside the occupied box
(the scene box ``[-bound, bound]^3`` shrunk to the occupied cells), ``t_k = near + (k + u) delta``
(``u`` random per ray in training, ``1/2`` when rendering); samples in empty occupancy cells are
dropped (their opacity is below the grid's threshold). With optical thickness
``tau_k = sigma(x_k) delta``::

    alpha_k = 1 - exp(-tau_k),  T_k = exp(-sum_{j<k} tau_j),  w_k = T_k alpha_k
    rgb = sum_k w_k c_k + (1 - sum_k w_k) background,   depth = sum_k w_k t_k / sum_k w_k

Training uses the *packed* layout (all kept samples of a batch in one flat array, grouped by ray,
per-ray exclusive sums from one float64 cumulative sum). Rendering marches all rays together in
chunks of steps and drops a ray once its transmittance falls below ``1e-4`` (early termination)
or it leaves the box.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

FieldFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def ray_box(o: Tensor, d: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Entry/exit distances of rays o + t d (t >= 0) through the box [lo, hi] ([3] each).
    A ray misses when ``far <= near``."""
    dd = torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    inv = 1.0 / dd
    t0 = (lo - o) * inv
    t1 = (hi - o) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far


def composite(ray: Tensor, n_rays: int, tau: Tensor, rgb: Tensor, t: Tensor | None = None,
              return_weights: bool = False):
    """Packed compositing: ray [M] (grouped, ordered), tau [M] optical thickness, rgb [M, 3]
    -> (colour [B, 3] without background, opacity [B], weighted distance sum [B] or None
    [, weights [M] when ``return_weights``])."""
    dev = tau.device
    m = tau.shape[0]
    color = torch.zeros(n_rays, 3, device=dev, dtype=rgb.dtype)
    acc = torch.zeros(n_rays, device=dev, dtype=tau.dtype)
    if m == 0:
        # keep the graph connected so backward() works on an empty batch
        z = (tau.sum() + rgb.sum()) * 0.0
        out = (color + z, acc + z, (torch.zeros(n_rays, device=dev) if t is not None else None))
        return (*out, tau * 0.0) if return_weights else out
    cs = torch.cumsum(tau.double(), 0)
    excl = cs - tau.double()
    counts = torch.bincount(ray, minlength=n_rays)
    first = (torch.cumsum(counts, 0) - counts).clamp_max(m - 1)
    trans = torch.exp(-(excl - excl[first][ray])).to(tau.dtype)
    w = trans * -torch.expm1(-tau)
    color = color.index_add(0, ray, w[:, None] * rgb)
    acc = acc.index_add(0, ray, w)
    dsum = torch.zeros(n_rays, device=dev).index_add(0, ray, w * t) if t is not None else None
    return (color, acc, dsum, w) if return_weights else (color, acc, dsum)


def segment_exclusive_cumsum(v: Tensor, ray: Tensor, first: Tensor) -> Tensor:
    """Per-ray exclusive cumulative sums of packed values (float64 inside, ``v``'s dtype out)."""
    cs = torch.cumsum(v.double(), 0)
    excl = cs - v.double()
    return (excl - excl[first][ray]).to(v.dtype)


def distortion_loss(ray: Tensor, n_rays: int, w: Tensor, t: Tensor, step: float) -> Tensor:
    """mip-NeRF 360's distortion loss per ray, summed over rays:
    ``sum_ij w_i w_j |t_i - t_j| + step / 3 * sum_i w_i^2`` (pulls each ray's weights together,
    which removes semi-transparent fog), in O(samples) with per-ray prefix sums."""
    if w.numel() == 0:
        return w.sum() * 0.0
    counts = torch.bincount(ray, minlength=n_rays)
    first = (torch.cumsum(counts, 0) - counts).clamp_max(w.shape[0] - 1)
    w_before = segment_exclusive_cumsum(w, ray, first)
    wt_before = segment_exclusive_cumsum(w * t, ray, first)
    inter = 2.0 * (w * (t * w_before - wt_before)).sum()
    return inter + (step / 3.0) * (w * w).sum()


def scene_to_unit(x: Tensor, bound: float) -> Tensor:
    return (x + bound) * (0.5 / bound)


def occupied_range(occ, o: Tensor, d: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Per-ray [near, far] narrowed to the occupied part: the ray is clipped to the box of the
    occupied cells, then marched coarsely through the occupancy grid's macro cells (see
    :meth:`OccupancyGrid.macro`, dilated by one) to the first and last occupied one. Rays that
    meet no occupied cell get ``far <= near``."""
    lo01, hi01 = occ.bbox01()
    lo = lo01 * (2 * bound) - bound
    hi = hi01 * (2 * bound) - bound
    near, far = ray_box(o, d, lo, hi)
    k, macro = occ.macro()
    if k == 1:
        return near, far
    res, mres = occ.res, macro.shape[0]
    dc = 2 * bound * k / res
    hit = (far > near).nonzero()[:, 0]
    if hit.numel() == 0:
        return near, far
    n_near, n_far = near[hit], far[hit]
    kc = int(math.ceil(float((n_far - n_near).max()) / dc)) + 1
    t = n_near[:, None] + (torch.arange(kc, device=o.device, dtype=o.dtype)[None, :] + 0.5) * dc      # [H, Kc]
    x01 = scene_to_unit(o[hit][:, None, :] + d[hit][:, None, :] * t[..., None], bound).reshape(-1, 3)
    c = (x01 * res).long().clamp_(0, res - 1) // k
    occm = macro.reshape(-1)[(c[:, 2] * mres + c[:, 1]) * mres + c[:, 0]].view(-1, kc) & (t < n_far[:, None] + 0.5 * dc)
    anyo = occm.any(1)
    first = occm.to(torch.uint8).argmax(1)
    last = kc - 1 - occm.flip(1).to(torch.uint8).argmax(1)
    new_near = torch.maximum(n_near, n_near + (first.to(o.dtype) - 1.0) * dc)
    new_far = torch.minimum(n_far, n_near + (last.to(o.dtype) + 2.0) * dc)
    new_far = torch.where(anyo, new_far, new_near)
    near = near.clone()
    far = far.clone()
    near[hit] = new_near
    far[hit] = new_far
    return near, far


@torch.no_grad()
def sampled_densities(field, occ, o: Tensor, d: Tensor, near: Tensor, far: Tensor, bound: float, step: float
                      ) -> tuple[Tensor, Tensor]:
    """Densities every ``step`` along rays (o, d [R, 3] world) from ``near`` to ``far`` [R], in
    one dense block -> (t [R, K] the sample distances, sigma [R, K]); samples at or past ``far``
    or in empty cells of the occupancy grid are 0, as in the renderer. For short measurements
    (surface level, median depth); rendering uses :func:`march`."""
    k = int(((far - near).clamp_min(0).max() / step).ceil()) + 1 if near.numel() else 1
    t = near[:, None] + (torch.arange(k, device=o.device, dtype=near.dtype)[None, :] + 0.5) * step
    x01 = scene_to_unit(o[:, None, :] + d[:, None, :] * t[..., None], bound).reshape(-1, 3)
    keep = ((t < far[:, None]).reshape(-1) & occ.lookup(x01.clamp(0, 1))).nonzero()[:, 0]
    sigma = torch.zeros(x01.shape[0], device=o.device)
    if keep.numel():
        sigma[keep] = field.density(x01[keep]).float()
    return t, sigma.view(-1, k)


@torch.no_grad()
def march_samples(field, occ, o: Tensor, d: Tensor, near: Tensor, far: Tensor, bound: float, step: float,
                  jitter: Tensor | None, min_transmittance: float = 1e-4, chunk_steps: int = 16
                  ) -> tuple[Tensor, Tensor, tuple[Tensor, ...] | None]:
    """The samples worth training on (instant-ngp's first pass): march all rays with the current
    density, skip empty occupancy cells, stop a ray once its transmittance is below
    ``min_transmittance``. Returns (ray index [M], t [M], the field's interpolation data of
    those samples when it has a ``locate`` method, else None), grouped by ray, increasing in t."""
    dev = o.device
    b = o.shape[0]
    locate = getattr(field, "locate", None)
    alive = (far > near).nonzero()[:, 0]
    trans = torch.ones(b, device=dev)
    count = torch.zeros(b, dtype=torch.long, device=dev)            # samples kept so far per ray
    u = jitter if jitter is not None else torch.full((b,), 0.5, device=dev)
    o01 = scene_to_unit(o, bound)
    d01 = d * (0.5 / bound)
    start = near + u * step                                           # t of sample 0
    rays, ts, pos, locs = [], [], [], []
    k0 = 0
    while alive.numel() > 0:
        a_start, a_far = start[alive], far[alive]
        t = a_start[:, None] + torch.arange(k0, k0 + chunk_steps, device=dev, dtype=o.dtype)[None, :] * step
        x01 = (o01[alive][:, None, :] + d01[alive][:, None, :] * t[..., None]).reshape(-1, 3)
        valid = (t < a_far[:, None]).reshape(-1)
        valid &= occ.lookup(x01)
        sel = valid.nonzero()[:, 0]
        if sel.numel():
            tau = torch.zeros(alive.numel() * chunk_steps, device=dev)
            if locate is not None:
                loc = locate(x01[sel])
                tau[sel] = field.density_at(loc).float() * step
            else:
                tau[sel] = field.density(x01[sel]).float() * step
            tau = tau.view(-1, chunk_steps)
            cum = torch.cumsum(tau, 1)
            tr = trans[alive][:, None] * torch.exp(-(cum - tau))                          # before each sample
            use = valid.view(-1, chunk_steps) & (tr > min_transmittance)
            rank = torch.cumsum(use, 1) - 1                                               # position within chunk
            r_idx, k_idx = use.nonzero(as_tuple=True)
            ray = alive[r_idx]
            rays.append(ray)
            ts.append(t[r_idx, k_idx])
            pos.append(count[ray] + rank[r_idx, k_idx])
            if locate is not None:
                where = torch.empty(valid.shape[0], dtype=torch.long, device=dev)
                where[sel] = torch.arange(sel.numel(), device=dev)
                j = where[r_idx * chunk_steps + k_idx]
                locs.append(tuple(v[j] for v in loc))
            count[alive] += use.sum(1)
            trans[alive] = trans[alive] * torch.exp(-cum[:, -1])
        k0 += chunk_steps
        still = (trans[alive] > min_transmittance) & (a_start + k0 * step < a_far)
        alive = alive[still]
        chunk_steps = min(chunk_steps * 2, 128)
    if not rays:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return z, torch.zeros(0, device=dev), (locate(torch.zeros(0, 3, device=dev)) if locate is not None else None)
    # group by ray without sorting: destination = first slot of the ray + position within it
    offset = torch.cumsum(count, 0) - count
    ray = torch.cat(rays)
    dest = offset[ray] + torch.cat(pos)
    out_ray = torch.empty_like(ray)
    out_t = torch.empty(ray.shape[0], device=dev)
    out_ray[dest] = ray
    out_t[dest] = torch.cat(ts)
    out_loc = None
    if locate is not None:
        out_loc = []
        for parts in zip(*locs):
            v = torch.cat(parts)
            ov = torch.empty_like(v)
            ov[dest] = v
            out_loc.append(ov)
        out_loc = tuple(out_loc)
    return out_ray, out_t, out_loc


def render_rays_train(field, occ, o: Tensor, d: Tensor, bound: float, step: float,
                      jitter: Tensor | None, use_dirs: bool = True, distortion: float = 0.0
                      ) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """Differentiable rendering of a batch of rays -> (colour without background [B, 3],
    opacity [B], number of field samples, ``distortion`` x the distortion loss averaged over rays
    or None). Samples come from :func:`march_samples`."""
    near, far = occupied_range(occ, o, d, bound)
    ray, t, loc = march_samples(field, occ, o, d, near, far, bound, step, jitter)
    dirs = d[ray] if use_dirs else None
    if loc is not None:
        sigma, rgb = field.forward_at(loc, dirs)
    else:
        x01 = scene_to_unit(torch.addcmul(o[ray], d[ray], t[:, None]), bound)
        sigma, rgb = field(x01, dirs)
    color, acc, _, w = composite(ray, o.shape[0], sigma * step, rgb, return_weights=True)
    reg = None
    if distortion > 0:
        reg = distortion * distortion_loss(ray, o.shape[0], w, t, step) / o.shape[0]
    return color, acc, int(ray.shape[0]), reg


@torch.no_grad()
def march(field: FieldFn, occ, o: Tensor, d: Tensor, bound: float, step: float, chunk_steps: int = 32,
          min_transmittance: float = 1e-4, use_dirs: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Render rays by marching with early termination -> (colour without background [B, 3],
    opacity [B], expected distance [B] (0 where the opacity is ~0))."""
    b = o.shape[0]
    dev = o.device
    near, far = occupied_range(occ, o, d, bound)
    color = torch.zeros(b, 3, device=dev)
    acc = torch.zeros(b, device=dev)
    dsum = torch.zeros(b, device=dev)
    trans = torch.ones(b, device=dev)
    alive = (far > near).nonzero()[:, 0]
    k0 = 0
    ks = torch.arange(chunk_steps, device=dev, dtype=o.dtype)
    while alive.numel() > 0:
        a_near, a_far = near[alive], far[alive]
        t = a_near[:, None] + (k0 + ks[None, :] + 0.5) * step                    # [A, K]
        x = o[alive][:, None, :] + d[alive][:, None, :] * t[..., None]
        x01 = scene_to_unit(x, bound).reshape(-1, 3)
        valid = (t < a_far[:, None]).reshape(-1) & occ.lookup(x01)
        sel = valid.nonzero()[:, 0]
        tau = torch.zeros(alive.numel() * chunk_steps, device=dev)
        rgb = torch.zeros(alive.numel() * chunk_steps, 3, device=dev)
        if sel.numel():
            dirs = d[alive][sel // chunk_steps] if use_dirs else None
            sg, cl = field(x01[sel], dirs)
            tau[sel] = sg.float() * step
            rgb[sel] = cl.float()
        tau = tau.view(-1, chunk_steps)
        rgb = rgb.view(-1, chunk_steps, 3)
        a = -torch.expm1(-tau)
        cum = torch.cumsum(tau, 1)
        tr = trans[alive][:, None] * torch.exp(-(cum - tau))
        w = tr * a
        color[alive] += (w[..., None] * rgb).sum(1)
        acc[alive] += w.sum(1)
        dsum[alive] += (w * t).sum(1)
        trans[alive] = trans[alive] * torch.exp(-cum[:, -1])
        k0 += chunk_steps
        still = (trans[alive] > min_transmittance) & (a_near + k0 * step < a_far)
        alive = alive[still]
        chunk_steps = min(chunk_steps * 2, 256)
        ks = torch.arange(chunk_steps, device=dev, dtype=o.dtype)
    depth = torch.where(acc > 1e-6, dsum / acc.clamp_min(1e-6), torch.zeros_like(dsum))
    return color, acc, depth
