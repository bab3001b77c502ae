"""Occupancy grid: a boolean ``res^3`` cell grid over the scene box; samples in empty cells are
skipped by the ray marcher (training and rendering).

Cell ``(cx, cy, cz)`` covers ``[c, c + 1) / res`` of the unit cube in each axis; the mask is
stored ``[z, y, x]``. Two ways to fill it:

* :meth:`OccupancyGrid.set_from_vertex_alpha` (dense voxel fields): a cell is occupied when any of
  its 8 corner vertices has a per-step opacity above the threshold. Since the field interpolates
  its raw density trilinearly and the activation is monotone, no point of an empty cell can be
  denser than its densest corner: skipping is exact up to the threshold.
* :meth:`OccupancyGrid.update_from_density` (hash-grid fields, instant-ngp style): an exponential
  moving maximum of the density at a random point of every cell, thresholded.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def dilate(mask: Tensor, r: int = 1) -> Tensor:
    """Binary dilation of a bool volume by a (2r+1)^3 cube (separable, cheaper than max_pool3d)."""
    out = mask.clone()
    for dim in range(3):
        src = out.clone()
        n = src.shape[dim]
        for s in range(1, r + 1):
            if s >= n:
                break
            out.narrow(dim, s, n - s).logical_or_(src.narrow(dim, 0, n - s))
            out.narrow(dim, 0, n - s).logical_or_(src.narrow(dim, s, n - s))
    return out


def any_corner(vertex_mask: Tensor) -> Tensor:
    """Cells [R-1]^3 with any of their 8 corners True in ``vertex_mask`` [R]^3."""
    m = vertex_mask
    for dim in range(3):
        n = m.shape[dim]
        m = m.narrow(dim, 0, n - 1) | m.narrow(dim, 1, n - 1)
    return m


def any_cell(cell_mask: Tensor) -> Tensor:
    """Vertices [R]^3 touching any True cell of ``cell_mask`` [R-1]^3."""
    m = cell_mask
    for dim in range(3):
        shape = list(m.shape)
        shape[dim] += 1
        out = torch.zeros(shape, dtype=torch.bool, device=m.device)
        n = m.shape[dim]
        out.narrow(dim, 0, n).copy_(m)
        out.narrow(dim, 1, n).logical_or_(m)
        m = out
    return m


dilate_mask = dilate


class OccupancyGrid:
    def __init__(self, res: int, device: torch.device | str = "cpu"):
        self.res = int(res)
        self.device = torch.device(device)
        self.mask = torch.ones(self.res, self.res, self.res, dtype=torch.bool, device=self.device)
        self.values = torch.zeros((self.res,) * 3, device=self.device)   # per-cell density (moving max)
        self._seen = False
        self._bbox: tuple[Tensor, Tensor] | None = None
        self._flat: Tensor | None = None
        self._macro: tuple[int, Tensor] | None = None

    # -- queries ----------------------------------------------------------------------------------
    def cell_index(self, x01: Tensor) -> Tensor:
        r = self.res
        c = (x01 * r).long().clamp_(0, r - 1)
        return (c[:, 2] * r + c[:, 1]) * r + c[:, 0]

    def lookup(self, x01: Tensor) -> Tensor:
        """Occupied? for points in the unit cube [N, 3] -> bool [N]."""
        if self._flat is None:
            self._flat = self.mask.reshape(-1)
        return self._flat[self.cell_index(x01)]

    def bbox01(self) -> tuple[Tensor, Tensor]:
        """Bounding box of the occupied cells in unit-cube coordinates (lo [3], hi [3]); an empty
        grid gives an empty box (lo > hi)."""
        if self._bbox is None:
            m = self.mask
            r = self.res
            if not bool(m.any()):
                self._bbox = (torch.ones(3, device=self.device), torch.zeros(3, device=self.device))
            else:
                lo, hi = [], []
                for dims in ((0, 1), (0, 2), (1, 2)):           # x, y, z axes of the [z, y, x] mask
                    nz = m.any(dim=dims).nonzero()[:, 0]
                    lo.append(float(nz.min()) / r)
                    hi.append(float(nz.max() + 1) / r)
                self._bbox = (torch.tensor(lo, device=self.device), torch.tensor(hi, device=self.device))
        return self._bbox

    @property
    def fraction(self) -> float:
        return float(self.mask.float().mean())

    def set_mask(self, mask: Tensor) -> None:
        self.mask = mask.to(self.device, torch.bool).contiguous()
        self._bbox = None
        self._flat = None
        self._macro = None

    def macro(self) -> tuple[int, Tensor]:
        """Coarse copy for empty-space skipping: cells grouped in blocks of ``k^3`` (about 16
        blocks per axis), a block occupied when any of its cells is, dilated by one block ->
        (k, bool [m, m, m]), ``m = ceil(res / k)``; cell ``c`` is in block ``c // k``."""
        if self._macro is None:
            k = max(1, self.res // 16)
            if k == 1:
                self._macro = (1, self.mask)
            else:
                m = -(-self.res // k)
                pad = m * k - self.res
                a = F.pad(self.mask[None, None], (0, pad, 0, pad, 0, pad))[0, 0]
                blocks = a.reshape(m, k, m, k, m, k).any(5).any(3).any(1)
                blocks = dilate(blocks, 1)
                self._macro = (k, blocks)
        return self._macro

    # -- updates ----------------------------------------------------------------------------------
    def set_from_vertex_alpha(self, alpha: Tensor, threshold: float, dilate: int = 1) -> None:  # noqa: F811
        """``alpha``: per-step opacity at the ``(res + 1)^3`` vertices [z, y, x]."""
        cell = any_corner(alpha > threshold)
        self.set_mask(dilate_mask(cell, dilate) if dilate > 0 else cell)

    @torch.no_grad()
    def update_from_density(self, density_fn, step_size: float, threshold: float, decay: float = 0.95,
                            max_points: int = 2 ** 18, generator: torch.Generator | None = None) -> None:
        """Evaluate ``density_fn(x01 [N, 3]) -> sigma [N]`` at one random point per cell (all cells,
        or a random subset of at most ``max_points`` of them), keep ``max(decay * old, new)``, and
        mark cells whose per-step opacity ``1 - exp(-sigma * step_size)`` exceeds ``threshold``."""
        r = self.res
        n = r ** 3
        vals = self.values.reshape(-1)
        if not self._seen or n <= max_points:
            idx = torch.arange(n, device=self.device)
        else:
            idx = torch.randint(0, n, (max_points,), device=self.device, generator=generator)
        if not self._seen:
            vals.zero_()
            self._seen = True
        vals.mul_(decay)
        cx = idx % r
        cy = (idx // r) % r
        cz = idx // (r * r)
        jitter = torch.rand(idx.shape[0], 3, device=self.device, generator=generator)
        x01 = (torch.stack([cx, cy, cz], -1).float() + jitter) / r
        chunk = 2 ** 16
        for s in range(0, idx.shape[0], chunk):
            sig = density_fn(x01[s:s + chunk]).float()
            vals[idx[s:s + chunk]] = torch.maximum(vals[idx[s:s + chunk]], sig)
        alpha = 1.0 - torch.exp(-vals * step_size)
        m = (alpha > threshold).reshape(r, r, r)
        self.set_mask(dilate(m, 1))

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {"mask": self.mask.to(torch.uint8)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        m = state["mask"]
        self.res = int(m.shape[0])
        self.values = torch.zeros((self.res,) * 3, device=self.device)
        self._seen = False
        self.set_mask(m.bool())


class ViewCarver:
    """Free space from the views themselves (the visual hull of a plain-background capture).

    For every view, the centres of the ``res^3`` cells are projected into the image. A cell is
    *seen* by a view when it projects inside the image (widened by a margin of ``r`` pixels,
    ``r`` = the largest footprint of a cell in that view + 1); it gets a *background vote* when
    the pixel it lands on and all pixels within ``r`` of it match the background colour (within
    ``tol``, max over channels). Cells seen by no view, or with at least ``min_votes`` background
    votes, are empty. With ``background=None`` (background being fitted) only the first rule
    applies.
    """

    def __init__(self, res: int, bound: float, background: Tensor | None, tol: float = 0.01, min_votes: int = 2):
        self.res, self.bound, self.tol, self.min_votes = int(res), float(bound), float(tol), int(min_votes)
        self.background = None if background is None else background.detach().float().cpu()
        n = self.res ** 3
        self.seen = torch.zeros(n, dtype=torch.int16)
        self.votes = torch.zeros(n, dtype=torch.int16)
        r = self.res
        c = (torch.arange(r, dtype=torch.float32) + 0.5) / r * 2 * bound - bound
        z, y, x = torch.meshgrid(c, c, c, indexing="ij")
        self.centres = torch.stack([x, y, z], -1).reshape(-1, 3).double()
        self.cell = 2 * bound / r
        self.views = 0
        self._cache: dict[int, Tensor] = {}

    def add(self, image: Tensor, camera: Tensor) -> None:
        from .cameras import split_camera
        c2w, K = split_camera(torch.as_tensor(camera, dtype=torch.float64).cpu())
        h, w = image.shape[:2]
        p = (self.centres - c2w[:3, 3]) @ c2w[:3, :3]
        z = p[:, 2]
        front = z > 1e-6
        zs = torch.where(front, z, torch.ones_like(z))
        col = (K[0, 0] * p[:, 0] / zs + K[0, 2]) * w - 0.5
        row = (K[1, 1] * p[:, 1] / zs + K[1, 2]) * h - 0.5
        dist = float((c2w[:3, 3]).norm())
        zmin = max(dist - self.bound * math.sqrt(3), 1e-3)
        foot = 0.87 * self.cell * max(float(K[0, 0]) * w, float(K[1, 1]) * h) / zmin
        rad = int(math.ceil(foot)) + 1
        ci, ri = torch.round(col).long(), torch.round(row).long()
        seen = front & (ci >= -rad) & (ci < w + rad) & (ri >= -rad) & (ri < h + rad)
        self.seen += seen.to(torch.int16)
        if self.background is not None:
            not_bg = ((image.float() - self.background).abs().amax(-1) > self.tol).float()
            near_fg = F.max_pool2d(not_bg[None, None], 2 * rad + 1, 1, rad)[0, 0] > 0     # within rad of content
            inside = front & (ci >= 0) & (ci < w) & (ri >= 0) & (ri < h)
            idx = inside.nonzero()[:, 0]
            vote = torch.zeros_like(seen)
            vote[idx] = ~near_fg[ri[idx], ci[idx]]
            self.votes += vote.to(torch.int16)
        self.views += 1
        self._cache.clear()

    def mask(self, res: int | None = None) -> Tensor:
        """May-be-occupied cells, bool [res, res, res] ([z, y, x]); resampled (nearest) to ``res``."""
        res = self.res if res is None else int(res)
        if res not in self._cache:
            m = (self.seen > 0) & (self.votes < self.min_votes)
            m = m.reshape(self.res, self.res, self.res)
            if res != self.res:
                m = F.interpolate(m.float()[None, None], size=(res, res, res), mode="nearest")[0, 0] > 0
            self._cache[res] = m
        return self._cache[res]
