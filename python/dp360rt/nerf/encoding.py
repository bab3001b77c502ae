"""Encodings of 3D positions: a dense voxel grid (trilinear) and the multiresolution hash grid.

Positions are given normalized to the unit cube ``[0, 1]^3`` (the scene box mapped onto it).

* :class:`SparseVoxelGrid`: channels on the *active* vertices of an ``R^3`` grid (vertex ``0`` at
  0, vertex ``R - 1`` at 1), trilinear interpolation; parameters exist only where the occupancy
  grid says there may be something, so memory and optimizer work follow the occupied space.
* :class:`HashGrid`: instant-ngp's multiresolution hash encoding (Mueller et al. 2022): ``L``
  levels of resolution ``N_l = floor(N_min * b^l)``, ``b = exp((ln N_max - ln N_min) / (L - 1))``,
  ``F`` features per entry; a level whose ``(N_l + 1)^3`` vertices fit in ``T`` entries is indexed
  densely (``x + y (N_l+1) + z (N_l+1)^2``), otherwise by the spatial hash
  ``(x * 1 ^ y * 2654435761 ^ z * 805459861) mod T`` (uint32 arithmetic). Vertex ``v`` of level
  ``l`` sits at ``v / N_l``; the feature is the trilinear blend of the cell's 8 corners. Tables are
  initialised uniform in ``[-1e-4, 1e-4]``. Backends: the PyTorch code below (CPU, reference),
  a Triton kernel (:mod:`.hashgrid_triton`, CUDA, the same numbers) and tiny-cuda-nn when
  importable (:func:`tcnn_available`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hashgrid_spec import PRIMES, HashGridSpec


def trilinear_corners(x01: Tensor, res: int) -> tuple[Tensor, Tensor]:
    """Flat vertex indices [N, 8] (``(z * R + y) * R + x``) and trilinear weights [N, 8] of the
    cell around each point of ``x01`` [N, 3] on an ``R^3`` vertex grid spanning the unit cube.
    Corner ``c`` has offsets ``(c & 1, (c >> 1) & 1, (c >> 2) & 1)`` in (x, y, z)."""
    r = res
    g = x01.clamp(0.0, 1.0) * (r - 1)
    i0 = g.floor().clamp_(max=r - 2)
    f = g - i0
    i0 = i0.long()
    base = (i0[:, 2] * r + i0[:, 1]) * r + i0[:, 0]
    offs = torch.tensor([0, 1, r, r + 1, r * r, r * r + 1, r * r + r, r * r + r + 1], device=x01.device)
    idx = base[:, None] + offs[None, :]
    fx, fy, fz = f[:, 0:1], f[:, 1:2], f[:, 2:3]
    wx = torch.cat([1 - fx, fx], 1)
    wy = torch.cat([1 - fy, fy], 1)
    wz = torch.cat([1 - fz, fz], 1)
    w = (wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]).reshape(-1, 8)
    return idx, w


class _RowBlend(torch.autograd.Function):
    """out[n] = sum_c w[n, c] * table[rows[n, c]]: ``embedding_bag`` forward; the backward is a
    per-channel 1-D ``index_add_`` (the built-in backward sorts the indices: several times
    slower on CPU). Row 0 gets no gradient (the padding row)."""

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows, w)
        ctx.n = table.shape[0]
        return F.embedding_bag(rows, table, per_sample_weights=w, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        rows, w = ctx.saved_tensors
        c = g.shape[1]
        flat = rows.reshape(-1)
        if flat.dtype != torch.int64 and flat.device.type != "cpu":
            flat = flat.long()
        out = torch.zeros(c, ctx.n, dtype=g.dtype, device=g.device)
        for k in range(c):
            out[k].index_add_(0, flat, (w * g[:, k:k + 1]).reshape(-1))
        out[:, 0] = 0
        return out.t(), None, None


class SparseVoxelGrid(nn.Module):
    """Values on the *active* vertices of an ``R^3`` grid over the unit cube, trilinearly
    interpolated; inactive vertices hold fixed ``empty`` values.

    Storage: per channel group ``k`` a table ``tables[k]`` [1 + n_active, C_k] of offsets from the
    group's empty value (row 0 is all zeros: the row of every inactive vertex; ``padding_idx``
    keeps it out of the gradient) and an index volume ``rows`` [R^3] (vertex -> table row).
    Only active vertices are parameters, so the optimizer's work follows the occupied space,
    not the grid size. Interpolation is one ``embedding_bag`` (gather of the 8 corner rows and
    weighted sum) per group: ``value = empty + sum_c w_c table[rows[v_c]]`` (the weights sum to 1).
    """

    def __init__(self, res: int, groups: list[int], empty: list[list[float]], active: Tensor | None = None,
                 init: list[Tensor] | None = None):
        super().__init__()
        self.res = int(res)
        self.groups = list(groups)
        self.register_buffer("empty", torch.tensor([v for e in empty for v in e], dtype=torch.float32))
        n = self.res ** 3
        if active is None:
            active = torch.ones(n, dtype=torch.bool)
        self.register_buffer("rows", torch.zeros(n, dtype=torch.int32))
        self.tables = nn.ParameterList()
        self._set(active.reshape(-1).bool(), init)

    def empty_of(self, k: int) -> Tensor:
        o = sum(self.groups[:k])
        return self.empty[o:o + self.groups[k]]

    def _set(self, active: Tensor, values: list[Tensor] | None) -> None:
        """values: per group absolute values at every vertex [R^3, C_k] (only active ones kept)."""
        dev = self.rows.device
        nz = active.to(dev).nonzero()[:, 0]
        rows = torch.zeros(self.res ** 3, dtype=torch.int32, device=dev)
        rows[nz] = torch.arange(1, nz.numel() + 1, device=dev, dtype=torch.int32)
        self.rows = rows
        tabs = []
        for k, c in enumerate(self.groups):
            t = torch.zeros(nz.numel() + 1, c, device=dev)
            if values is not None:
                t[1:] = values[k].to(dev)[nz] - self.empty_of(k)
            tabs.append(nn.Parameter(t))
        self.tables = nn.ParameterList(tabs)

    @property
    def active(self) -> Tensor:
        return self.rows > 0

    @property
    def num_active(self) -> int:
        return int(self.tables[0].shape[0]) - 1

    def corners(self, x01: Tensor) -> tuple[Tensor, Tensor]:
        """Table rows [N, 8] and weights [N, 8] of the points' cell corners (reusable across groups)."""
        idx, w = trilinear_corners(x01, self.res)
        return self.rows[idx], w

    def lookup(self, k: int, rows: Tensor, w: Tensor) -> Tensor:
        t = self.tables[k]
        if torch.is_grad_enabled() and t.requires_grad:
            return _RowBlend.apply(t, rows, w) + self.empty_of(k)
        return F.embedding_bag(rows, t, per_sample_weights=w, mode="sum") + self.empty_of(k)

    def forward(self, x01: Tensor) -> list[Tensor]:
        rows, w = self.corners(x01)
        return [self.lookup(k, rows, w) for k in range(len(self.groups))]

    @torch.no_grad()
    def dense(self, k: int) -> Tensor:
        """Group ``k`` at every vertex (the empty value where inactive): [R^3, C_k]."""
        return self.tables[k].detach()[self.rows.long()] + self.empty_of(k)

    @torch.no_grad()
    def remap(self, active: Tensor) -> Tensor:
        """Make ``active`` (bool [R^3]) the active set: vertices active before keep their values,
        new ones start at the empty value. Returns the old row of every new row ([1 + n_new],
        0 for new vertices), to carry optimizer state over."""
        dev = self.rows.device
        nz = active.reshape(-1).to(dev).bool().nonzero()[:, 0]
        src = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), self.rows[nz].long()])
        tabs = [nn.Parameter(t.detach()[src].clone()) for t in self.tables]
        rows = torch.zeros(self.res ** 3, dtype=torch.int32, device=dev)
        rows[nz] = torch.arange(1, nz.numel() + 1, device=dev, dtype=torch.int32)
        self.rows = rows
        self.tables = nn.ParameterList(tabs)
        return src

    @torch.no_grad()
    def resampled(self, res: int, active: Tensor | None = None) -> "SparseVoxelGrid":
        """A grid of ``res^3`` vertices holding the trilinearly resampled values."""
        r = self.res
        vals = [F.interpolate(self.dense(k).t().reshape(1, c, r, r, r), size=(res, res, res), mode="trilinear",
                              align_corners=True)[0].reshape(c, -1).t()
                for k, c in enumerate(self.groups)]
        empty = [self.empty_of(k).tolist() for k in range(len(self.groups))]
        return SparseVoxelGrid(res, self.groups, empty, active, vals).to(self.rows.device)

    def export_state(self) -> dict[str, Tensor]:
        """Exact state: active mask (uint8 [R, R, R]), empty values, tables (row 0 included)."""
        out = {"active": self.active.to(torch.uint8).reshape(self.res, self.res, self.res).cpu(),
               "empty": self.empty.detach().cpu().clone()}
        for k in range(len(self.groups)):
            out[f"table{k}"] = self.tables[k].detach().cpu().contiguous()
        return out

    @classmethod
    def from_state(cls, groups: list[int], state: dict[str, Tensor]) -> "SparseVoxelGrid":
        res = int(state["active"].shape[0])
        g = cls(res, groups, [[0.0] * c for c in groups], torch.zeros(res ** 3, dtype=torch.bool))
        g.empty = state["empty"].float().clone()
        active = state["active"].reshape(-1).bool()
        nz = active.nonzero()[:, 0]
        g.rows[nz] = torch.arange(1, nz.numel() + 1, dtype=torch.int32)
        g.tables = nn.ParameterList([nn.Parameter(state[f"table{k}"].float().clone()) for k in range(len(groups))])
        return g


# ---------------------------------------------------------------------------------------------
# Multiresolution hash grid
# ---------------------------------------------------------------------------------------------

def hash_corner_indices(x01: Tensor, spec: HashGridSpec) -> tuple[Tensor, Tensor]:
    """Indices into the flat table [N, L, 8] (int64) and trilinear weights [N, L, 8] (float32) of
    the 8 cell corners at every level. Corner ``c`` has offsets ``((c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1)``
    in (x, y, z)."""
    t = spec.tables()
    dev = x01.device
    res = t["res"].to(dev)
    pos = x01.float().clamp(0.0, 1.0)[:, None, :] * res[None, :, None].float()      # [N, L, 3]
    cell = pos.floor()
    cell = torch.minimum(cell, (res[None, :, None] - 1).float())
    frac = pos - cell
    cell = cell.long()
    corner = torch.tensor([[(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], device=dev)  # [8, 3]
    v = cell[:, :, None, :] + corner[None, None]                                        # [N, L, 8, 3]
    w = torch.where(corner[None, None].bool(), frac[:, :, None, :], 1.0 - frac[:, :, None, :]).prod(-1)
    stride = (res + 1)[None, :, None]
    dense = v[..., 0] + v[..., 1] * stride + v[..., 2] * stride * stride
    h = (v[..., 0] * PRIMES[0]) ^ (v[..., 1] * PRIMES[1]) ^ (v[..., 2] * PRIMES[2])
    h = h & 0xFFFFFFFF
    idx = torch.where(t["hashed"].to(dev)[None, :, None], h, dense) % t["size"].to(dev)[None, :, None]
    idx = idx + t["offset"].to(dev)[None, :, None]
    return idx, w


def hash_encode_torch(x01: Tensor, table: Tensor, spec: HashGridSpec) -> Tensor:
    """Reference PyTorch hash encoding: x01 [N, 3] in [0, 1], table [sum(sizes), F] -> [N, L * F]
    (float32), level-major (level 0's F features first). Differentiable with respect to ``table``."""
    n = x01.shape[0]
    idx, w = hash_corner_indices(x01, spec)
    out = F.embedding_bag(idx.reshape(n * spec.levels, 8), table.float(), per_sample_weights=w.reshape(n * spec.levels, 8),
                          mode="sum")
    return out.reshape(n, spec.levels * spec.features)


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton hash kernels can run for tensors on ``device`` (CUDA, or any device
    under ``TRITON_INTERPRET=1``); the rule is :func:`dp360rt.kernels.triton_env.can_run`."""
    from ..kernels import triton_env
    return triton_env.can_run(device)


class HashGrid(nn.Module):
    """Multiresolution hash encoding with instant-ngp defaults: 16 levels, 2 features, 2^19
    entries per level, base resolution 16, finest resolution ``max_res`` (the image resolution).

    ``backend``: "auto" (Triton on CUDA, PyTorch otherwise), "torch" or "triton"."""

    def __init__(self, levels: int = 16, features: int = 2, log2_table: int = 19, base_res: int = 16,
                 max_res: int = 512, backend: str = "auto", seed: int = 0):
        super().__init__()
        self.spec = HashGridSpec(levels, features, log2_table, base_res, max(max_res, base_res))
        gen = torch.Generator().manual_seed(seed)
        total = self.spec.offsets[-1]
        self.table = nn.Parameter((torch.rand(total, features, generator=gen) * 2 - 1) * 1e-4)
        self.backend = backend

    @property
    def out_dim(self) -> int:
        return self.spec.levels * self.spec.features

    def forward(self, x01: Tensor) -> Tensor:
        use_triton = self.backend == "triton" or (self.backend == "auto" and x01.device.type == "cuda"
                                                  and triton_available(x01.device))
        if use_triton:
            from .hashgrid_triton import hash_encode_triton
            return hash_encode_triton(x01, self.table, self.spec)
        return hash_encode_torch(x01, self.table, self.spec)


# ---------------------------------------------------------------------------------------------
# Spherical harmonics (real, the instant-ngp / Plenoxels sign convention)
# ---------------------------------------------------------------------------------------------

def sh_basis(d: Tensor, degree: int) -> Tensor:
    """Real spherical harmonics of unit directions d [N, 3] up to ``degree`` (0..3) exclusive of
    nothing: returns [N, (degree + 1)^2]."""
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree >= 1:
        out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [1.0925484305920792 * xy, -1.0925484305920792 * yz, 0.31539156525252005 * (2 * zz - xx - yy),
                -1.0925484305920792 * xz, 0.5462742152960396 * (xx - yy)]
    if degree >= 3:
        out += [-0.5900435899266435 * y * (3 * xx - yy), 2.890611442640554 * xy * z,
                -0.4570457994644658 * y * (4 * zz - xx - yy), 0.3731763325901154 * z * (2 * zz - 3 * xx - 3 * yy),
                -0.4570457994644658 * x * (4 * zz - xx - yy), 1.445305721320277 * z * (xx - yy),
                -0.5900435899266435 * x * (xx - 3 * yy)]
    if degree > 3:
        raise ValueError("sh_basis: degree must be 0..3")
    return torch.stack(out, -1)


def tcnn_available() -> bool:
    """True when ``tinycudann`` imports and CUDA is available (checked lazily)."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
        return True
    except Exception:
        return False
