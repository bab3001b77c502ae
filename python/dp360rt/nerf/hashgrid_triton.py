"""Triton kernels of the multiresolution hash encoding (forward and backward).

The same numbers as :func:`dp360rt.nerf.encoding.hash_encode_torch` (same level layout, same
hash, same order of the trilinear weight products and of the corner sum); the backward
scatters ``w * grad`` into the table gradient with atomic adds (so the gradient equals the
PyTorch one up to the order of floating-point additions). One program handles ``BLOCK`` points
of one level. Runs on CUDA, or anywhere under ``TRITON_INTERPRET=1`` (the tests do that on CPU).

Importing this module needs ``triton``; :class:`~dp360rt.nerf.encoding.HashGrid` imports it
lazily, only when the Triton backend is used. :mod:`dp360rt.kernels.triton_env` says whether the
kernels can run on the given tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernels import triton_env
from .hashgrid_spec import PRIMES, HashGridSpec

BLOCK = 128


@triton.jit
def _corner(ix, iy, iz, fx, fy, fz, res, size, off, hashed, p1, p2, m32, c: tl.constexpr):
    ox: tl.constexpr = c & 1
    oy: tl.constexpr = (c >> 1) & 1
    oz: tl.constexpr = (c >> 2) & 1
    vx = ix + ox
    vy = iy + oy
    vz = iz + oz
    if ox == 1:
        wx = fx
    else:
        wx = 1.0 - fx
    if oy == 1:
        wy = fy
    else:
        wy = 1.0 - fy
    if oz == 1:
        wz = fz
    else:
        wz = 1.0 - fz
    w = wx * wy * wz
    stride = res + 1
    dense = vx + vy * stride + vz * stride * stride
    h = vx ^ (vy * p1) ^ (vz * p2)          # int64: the low 32 bits are the uint32 hash
    h = h & m32
    idx = tl.where(hashed != 0, h, dense) % size + off
    return idx, w


@triton.jit
def _cell(x_ptr, n, mask, res):
    resf = res.to(tl.float32)
    x = tl.minimum(tl.maximum(tl.load(x_ptr + n * 3 + 0, mask=mask, other=0.0), 0.0), 1.0) * resf
    y = tl.minimum(tl.maximum(tl.load(x_ptr + n * 3 + 1, mask=mask, other=0.0), 0.0), 1.0) * resf
    z = tl.minimum(tl.maximum(tl.load(x_ptr + n * 3 + 2, mask=mask, other=0.0), 0.0), 1.0) * resf
    cx = tl.minimum(tl.floor(x), resf - 1.0)
    cy = tl.minimum(tl.floor(y), resf - 1.0)
    cz = tl.minimum(tl.floor(z), resf - 1.0)
    return cx.to(tl.int64), cy.to(tl.int64), cz.to(tl.int64), x - cx, y - cy, z - cz


@triton.jit
def _hash_kernel(x_ptr, table_ptr, feat_ptr, res_ptr, size_ptr, off_ptr, hashed_ptr, N, p1, p2, m32,
                 L: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    """Forward: feat [N, L*F] = sum over the 8 corners of w * table[idx]. Backward: table (the
    table gradient) += w * feat (the output gradient) at the same corners."""
    pid = tl.program_id(0)
    lvl = tl.program_id(1)
    n = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = n < N
    res = tl.load(res_ptr + lvl)
    size = tl.load(size_ptr + lvl)
    off = tl.load(off_ptr + lvl)
    hashed = tl.load(hashed_ptr + lvl)
    ix, iy, iz, fx, fy, fz = _cell(x_ptr, n, mask, res)
    fo = tl.arange(0, F)
    feat_ptrs = feat_ptr + n[:, None] * (L * F) + lvl * F + fo[None, :]
    if BACKWARD:
        g = tl.load(feat_ptrs, mask=mask[:, None], other=0.0)
    else:
        acc = tl.zeros([BLOCK, F], dtype=tl.float32)
    for c in tl.static_range(8):
        idx, w = _corner(ix, iy, iz, fx, fy, fz, res, size, off, hashed, p1, p2, m32, c)
        table_ptrs = table_ptr + idx[:, None] * F + fo[None, :]
        if BACKWARD:
            tl.atomic_add(table_ptrs, w[:, None] * g, mask=mask[:, None])
        else:
            acc += w[:, None] * tl.load(table_ptrs, mask=mask[:, None], other=0.0)
    if not BACKWARD:
        tl.store(feat_ptrs, acc, mask=mask[:, None])


_CONST_CACHE: dict[tuple, tuple[Tensor, ...]] = {}


def _level_consts(spec: HashGridSpec, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    key = (spec, str(device))
    if key not in _CONST_CACHE:
        t = spec.tables()
        _CONST_CACHE[key] = (t["res"].to(device), t["size"].to(device), t["offset"].to(device),
                             t["hashed"].to(torch.int32).to(device))
    return _CONST_CACHE[key]  # type: ignore[return-value]


def _launch(x: Tensor, table: Tensor, feat: Tensor, spec: HashGridSpec, backward: bool) -> None:
    res, size, off, hashed = _level_consts(spec, x.device)
    grid = (triton.cdiv(x.shape[0], BLOCK), spec.levels)
    _hash_kernel[grid](x, table, feat, res, size, off, hashed, x.shape[0], PRIMES[1], PRIMES[2], 0xFFFFFFFF,
                       L=spec.levels, F=spec.features, BLOCK=BLOCK, BACKWARD=backward)


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x01: Tensor, table: Tensor, spec: HashGridSpec) -> Tensor:  # type: ignore[override]
        x = x01.detach().float().contiguous()
        tab = table.detach().float().contiguous()
        n = x.shape[0]
        out = torch.empty(n, spec.levels * spec.features, device=x.device, dtype=torch.float32)
        if n:
            _launch(x, tab, out, spec, backward=False)
        ctx.save_for_backward(x)
        ctx.spec = spec
        ctx.table_shape = table.shape
        ctx.table_dtype = table.dtype
        return out

    @staticmethod
    def backward(ctx, gout: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        gtab = torch.zeros(ctx.table_shape, device=x.device, dtype=torch.float32)
        if x.shape[0] and ctx.needs_input_grad[1]:
            _launch(x, gtab, gout.float().contiguous(), ctx.spec, backward=True)
        return None, gtab.to(ctx.table_dtype), None


def hash_encode_triton(x01: Tensor, table: Tensor, spec: HashGridSpec) -> Tensor:
    """Triton hash encoding: x01 [N, 3] in [0, 1], table [sum(sizes), F] -> [N, L * F] float32."""
    triton_env.require(x01.device, _hash_kernel)
    if spec.features & (spec.features - 1):
        raise ValueError("the Triton hash encoding needs a power-of-two feature count per level")
    return _HashEncode.apply(x01, table, spec)
