"""What a fitted field shows at its surface, measured with short rays: the GLB export (:mod:`.glb`)
puts the mesh where the renders put the silhouette and colours it as the renders do.

* :func:`silhouette_level`: one density level is the wrong answer if fixed (on the 64^2 head the
  level-10 surface lies about a pixel outside the rendered silhouette all round, level 40 already
  inside it in places; it depends on how sharp the fit's density is), so it is measured: the
  level at which "the mesh covers this ray" agrees best with "the render's opacity reaches 0.5".
* :func:`snap_to_level`: marching cubes bulges out of a softplus-of-trilinear field; vertices are
  moved onto the field's own iso-surface.
* :func:`surface_colors`: the colour a render shows, not the field's raw colour at the point (a
  render blends colours over the depth where opacity rises; the raw colour is over-contrasted).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from .model import Nerf


@torch.no_grad()
def _window(nerf: "Nerf", points: torch.Tensor, inward: torch.Tensor, start: float, stop: float, k: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-step volume rendering of the rays ``points + t * inward``, t from ``start`` to ``stop``
    (world; negative is outside) in ``k`` steps -> (t [K], weights [N, K], rgb [N, K, 3]). Cells the
    occupancy grid marks empty have no density, as in the renderer."""
    from .render import scene_to_unit
    assert nerf.field is not None and nerf.occ is not None
    step = (stop - start) / k
    t = start + (torch.arange(k, dtype=torch.float32, device=points.device) + 0.5) * step
    x01 = scene_to_unit(points[:, None, :] + inward[:, None, :] * t[None, :, None], nerf.config.bound)
    x01 = x01.reshape(-1, 3).clamp(0, 1)
    keep = nerf.occ.lookup(x01).nonzero()[:, 0]                       # empty cells: no density, skip the field
    sigma = torch.zeros(x01.shape[0], device=points.device)
    rgb = torch.zeros(x01.shape[0], 3, device=points.device)
    if keep.numel():
        s, c = nerf.field(x01[keep], inward[keep // k])
        sigma[keep], rgb[keep] = s.float(), c.float()
    tau = (sigma * step).view(-1, k)
    alpha = -torch.expm1(-tau)
    trans = torch.exp(-(torch.cumsum(tau, 1) - tau))
    return t, trans * alpha, rgb.view(-1, k, 3)


def _chunks(n: int, per: int):
    for s in range(0, n, per):
        yield slice(s, min(s + per, n))


@torch.no_grad()
def _ray_stats(nerf: "Nerf", o: torch.Tensor, d: torch.Tensor, near: torch.Tensor, far: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays from ``near`` to ``far`` sampled every renderer step -> (opacity [N], largest density
    met [N]); empty cells of the occupancy grid count as empty, as in the renderer."""
    from .render import sampled_densities
    _, sigma = sampled_densities(nerf.field, nerf.occ, o, d, near, far, nerf.config.bound, nerf.step_size)
    return -torch.expm1(-sigma.sum(1) * nerf.step_size), sigma.amax(1)


@torch.no_grad()
def silhouette_level(nerf: "Nerf", rays: int = 16384, seed: int = 0, chunk: int = 2048) -> float | None:
    """The density iso-level whose surface has the silhouettes of the renders: over ``rays``
    random rays through the occupied box, a mesh at level L covers a ray where the largest density
    on it reaches L, and a render shows something where the ray's opacity reaches 0.5; the level
    that makes the two agree on the most rays (the middle of the best interval, geometrically).
    None when no ray reaches opacity 0.5 (no surface to match)."""
    from .render import ray_box
    assert nerf.field is not None and nerf.occ is not None
    nerf.field.eval()
    b = nerf.config.bound
    lo01, hi01 = nerf.occ.bbox01()
    if bool((lo01 > hi01).any()):
        return None
    lo, hi = (lo01.float() * 2 * b - b).cpu(), (hi01.float() * 2 * b - b).cpu()
    g = torch.Generator().manual_seed(seed)
    centre, radius = (lo + hi) / 2, float((hi - lo).norm()) / 2 + 1e-6
    u = torch.randn(rays, 3, generator=g)
    o = centre + 3 * radius * u / u.norm(dim=1, keepdim=True)
    d = lo + (hi - lo) * torch.rand(rays, 3, generator=g) - o         # towards a random point of the box
    d = d / d.norm(dim=1, keepdim=True)
    near, far = ray_box(o, d, lo, hi)
    hit = far > near
    o, d, near, far = (x[hit].to(nerf.device) for x in (o, d, near, far))
    opac, peak = [], []
    for sl in _chunks(o.shape[0], chunk):
        a, m = _ray_stats(nerf, o[sl], d[sl], near[sl], far[sl])
        opac.append(a.cpu())
        peak.append(m.cpu())
    if not opac:
        return None
    a, m = torch.cat(opac).double(), torch.cat(peak).double()
    shown = a >= 0.5
    if not bool(shown.any()):
        return None
    order = torch.argsort(m)
    m, shown = m[order], shown[order]
    # threshold just above the i-th smallest peak: rays 0..i are uncovered, the rest covered
    wrong = torch.cumsum(shown.double(), 0) + (~shown).double().flip(0).cumsum(0).flip(0) - (~shown).double()
    best = int(torch.argmin(wrong))
    worse = (wrong[best:] != wrong[best]).nonzero()[:, 0]           # the flat run of best thresholds
    end = best + (int(worse[0]) if worse.numel() else m.numel() - best) - 1
    lo_l, hi_l = float(m[best]), float(m[min(end + 1, m.numel() - 1)])
    return float(np.sqrt(max(lo_l, 1e-6) * max(hi_l, 1e-6)))


@torch.no_grad()
def snap_to_level(nerf: "Nerf", points: np.ndarray, normals: np.ndarray, level: float, reach: float,
                  samples: int = 16, chunk: int = 1 << 14) -> np.ndarray:
    """Move vertices ``points`` [N, 3] along their outward unit ``normals`` [N, 3] onto the field's
    own ``level`` iso-surface, searched within ``reach`` (world) either side -> points [N, 3].
    Marching cubes interpolates the *activated* density linearly between grid samples, which
    overestimates a softplus-of-trilinear field between them: its surface bulges out by up to a
    cell (15 extra silhouette pixels of 1750 on the 64^2 head at resolution 128). A point with
    no crossing in reach stays."""
    nerf.field.eval()
    out = points.astype(np.float32).copy()
    t = torch.linspace(-reach, reach, samples, device=nerf.device)
    for sl in _chunks(points.shape[0], chunk):
        p = torch.from_numpy(out[sl]).to(nerf.device)
        n = torch.from_numpy(normals[sl].astype(np.float32)).to(nerf.device)
        x = p[:, None, :] + n[:, None, :] * t[None, :, None]
        x01 = ((x + nerf.config.bound) / (2 * nerf.config.bound)).reshape(-1, 3).clamp(0, 1)
        f = nerf.field.density(x01).float().view(-1, samples) - level
        f = torch.where(nerf.occ.lookup(x01).view(-1, samples), f, torch.full_like(f, -level))
        cross = (f[:, :-1] >= 0) & (f[:, 1:] < 0)                      # inside -> outside going outward
        near = (t[:-1] + t[1:]).abs() * 0.5                             # prefer the crossing nearest the vertex
        score = torch.where(cross, near[None, :], torch.full_like(f[:, :-1], float("inf")))
        k = score.argmin(1)
        f0, f1 = f.gather(1, k[:, None])[:, 0], f.gather(1, (k + 1)[:, None])[:, 0]
        tc = t[k] + (t[1] - t[0]) * (f0 / (f0 - f1).clamp_min(1e-12))
        tc = torch.where(torch.isfinite(score.gather(1, k[:, None])[:, 0]), tc, torch.zeros_like(tc))
        out[sl] += (n * tc[:, None]).cpu().numpy()
    return out


@torch.no_grad()
def surface_colors(nerf: "Nerf", points: np.ndarray, normals: np.ndarray, outside: float, inside: float,
                   samples: int = 10,
                   chunk: int = 1 << 14) -> np.ndarray:
    """What the field shows at surface ``points`` [N, 3] seen head-on along their outward unit
    ``normals`` [N, 3] -> colour [N, 3] float32 in [0, 1]: the volume-rendered colour of a ray from
    ``outside`` (world) outside to ``inside`` inside, divided by that ray's opacity (the background
    never leaks in). Where the ray meets nothing, the field's colour at the point."""
    nerf.field.eval()
    out = np.zeros((points.shape[0], 3), np.float32)
    for sl in _chunks(points.shape[0], chunk):
        p = torch.from_numpy(points[sl].astype(np.float32)).to(nerf.device)
        d = -torch.from_numpy(normals[sl].astype(np.float32)).to(nerf.device)
        _, w, rgb = _window(nerf, p, d, -outside, inside, samples)
        acc = w.sum(1, keepdim=True)
        col = (w[..., None] * rgb).sum(1) / acc.clamp_min(1e-6)
        mid = rgb[:, int(samples * outside / (outside + inside))]
        out[sl] = torch.where(acc > 1e-3, col, mid).clamp(0, 1).cpu().numpy()
    return out
