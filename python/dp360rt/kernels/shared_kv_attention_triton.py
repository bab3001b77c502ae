"""Triton twin of :func:`dp360rt.kernels.shared_kv_attention.shared_kv_attention`.

One kernel, one online softmax over ``[own keys of the frame ; shared keys]``: each program owns a
block of queries of one (frame, head), loops over the frame's own keys, then over the shared keys
(held once, ``[1, H, M, D]``, for every frame: never expanded or concatenated in memory), and
writes ``acc / l``. fp32 accumulation; the output has the dtype of ``q``. Without a shared part it
is plain attention (the unconditional branch, the appearance net).

Head dims that are not powers of two (SD1.5: 40, 80, 160) are padded to the next power of two
(at least 16, the smallest ``tl.dot`` tile) with masked loads; any sequence lengths (masked).
fp32 inputs use IEEE fp32 dot products (no TF32), so fp32 results match the PyTorch path.

Needs triton to import (the dispatcher imports it only when :mod:`.triton_env` says a kernel can
run). Under the interpreter a single small block configuration is used (autotuning there is
pointlessly slow), on a GPU a short Hopper-oriented autotune list (:class:`.triton_env.Kernel`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_env

LOG2E = 1.4426950408889634


def head_block(d: int) -> int:
    """Padded head dim: next power of two, at least 16 (``tl.dot`` needs K >= 16)."""
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _attend(q, m_i, l_i, acc, k_base, skn, skd, v_base, svn, svd, L, qk_scale, offs_n, offs_d, d_mask,
            IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of the query tile q [BLOCK_M, BLOCK_D] over L more keys/values (at
    ``k_base``/``v_base`` with strides (skn, skd)/(svn, svd)): the running max m_i [BLOCK_M], sum
    l_i [BLOCK_M] and unnormalized output acc [BLOCK_M, BLOCK_D] after them."""
    for start in range(0, L, BLOCK_N):
        kn = start + offs_n
        n_mask = kn < L
        kt = tl.load(k_base + offs_d[:, None] * skd + kn[None, :] * skn,
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)          # [BLOCK_D, BLOCK_N]
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)           # [BLOCK_N, BLOCK_D]
        if UPCAST:
            v = v.to(tl.float32)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _shared_kv_fwd(Q, K, V, KS, VS, O,
                   sqb, sqh, sqn, sqd,
                   skb, skh, skn, skd,
                   svb, svh, svn, svd,
                   s_ksh, s_ksn, s_ksd,
                   s_vsh, s_vsn, s_vsd,
                   sob, soh, son, sod,
                   H, N, M, D, qk_scale,
                   HAS_SHARED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < D

    q_ptrs = Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    # the frame's own keys, then the shared keys: one copy for all frames (batch index 0)
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, K + b.to(tl.int64) * skb + h * skh, skn, skd,
                            V + b.to(tl.int64) * svb + h * svh, svn, svd, N, qk_scale, offs_n, offs_d, d_mask,
                            IEEE, UPCAST, BLOCK_N)
    if HAS_SHARED:
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, KS + h * s_ksh, s_ksn, s_ksd, VS + h * s_vsh, s_vsn, s_vsd, M,
                                qk_scale, offs_n, offs_d, d_mask, IEEE, UPCAST, BLOCK_N)

    out = acc / l_i[:, None]
    o_ptrs = O + b.to(tl.int64) * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2),
                                 (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3),
                                 (64, 32, 4, 2), (32, 64, 4, 2)]]


def _prune(configs, named_args, **kwargs):
    """Drop tiles too large for the padded head dim (shared memory / registers), and the 128-row
    query tiles when there are few queries."""
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    fp32 = kwargs.get("IEEE", False) and not kwargs.get("UPCAST", False)
    n = named_args.get("N", 1 << 30)
    tile = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]  # noqa: E731
    keep = [c for c in configs
            if not (bd >= 256 and (tile(c) > 128 * 64 or c.num_stages > 2))
            and not (fp32 and bd >= 128 and (tile(c) > 64 * 64 or c.num_stages > 2))
            and not (n <= 64 and c.kwargs["BLOCK_M"] > 64)]
    return keep or [min(configs, key=lambda c: (tile(c), c.num_stages))]


_KERNEL = triton_env.Kernel(_shared_kv_fwd, _CONFIGS, key=["N", "M", "BLOCK_D", "HAS_SHARED", "IEEE", "UPCAST"],
                            prune=_prune)


def _check(name: str, x: Tensor, ref: Tensor | None = None) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, H, L, D], got {tuple(x.shape)}")
    if ref is not None and (x.dtype != ref.dtype or x.device != ref.device):
        raise ValueError(f"{name} has dtype/device {x.dtype}/{x.device}, q has {ref.dtype}/{ref.device}")


def shared_kv_attention_triton(q: Tensor, k: Tensor, v: Tensor,
                               k_shared: Tensor | None = None, v_shared: Tensor | None = None, *,
                               block_m: int | None = None, block_n: int | None = None,
                               num_warps: int = 4, num_stages: int = 2) -> Tensor:
    """Attention of each frame's queries over ``[its own keys ; the shared keys]`` in one kernel.

    q, k, v: [B, H, N, D] (any strides, e.g. ``split_heads`` views); k_shared, v_shared:
    [1, H, M, D] or None (plain attention). Returns [B, H, N, D] in q's dtype (a transposed view
    of a [B, N, H, D] buffer, so ``merge_heads`` needs no copy). Scale ``D**-0.5``.

    ``block_m``/``block_n`` (powers of two >= 16) fix the tiles instead of autotuning (with
    ``num_warps``/``num_stages`` on a GPU); under the interpreter they default to large tiles.
    """
    triton_env.require(q.device, _shared_kv_fwd)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(name, x, q)
    b, h, n, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"own q/k/v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in triton_env.DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; the Triton kernel takes {triton_env.DTYPES}")
    if d > triton_env.MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} > {triton_env.MAX_HEAD_DIM} is not supported by the Triton kernel")
    has_shared = k_shared is not None
    if has_shared:
        if v_shared is None:
            raise ValueError("k_shared given without v_shared")
        _check("k_shared", k_shared, q)
        _check("v_shared", v_shared, q)
        if k_shared.shape[0] != 1 or k_shared.shape[1] != h or k_shared.shape[3] != d or v_shared.shape != k_shared.shape:
            raise ValueError(f"shared keys/values must be [1, {h}, M, {d}], got {tuple(k_shared.shape)} / "
                             f"{tuple(v_shared.shape)}")
        m = k_shared.shape[2]
        ks, vs = k_shared, v_shared
    else:
        m, ks, vs = 0, k, v                 # dummies, never read
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    interpret = triton_env.interpreting()
    block_d = head_block(d)
    args = (q, k, v, ks, vs, out,
            *q.stride(), *k.stride(), *v.stride(),
            *ks.stride()[1:], *vs.stride()[1:],
            *out.stride(),
            h, n, m, d, (d ** -0.5) * LOG2E)
    # The interpreter's tl.dot multiplies bf16 operands as their raw uint16 bits (triton 3.x
    # interpreter bug), so under the interpreter bf16 tiles are upcast to fp32 before each dot.
    upcast = interpret and q.dtype == torch.bfloat16
    meta = dict(HAS_SHARED=has_shared, IEEE=q.dtype == torch.float32 or upcast, UPCAST=upcast, BLOCK_D=block_d)
    blocks = None
    if interpret or block_m is not None or block_n is not None:
        # Interpreter defaults: few large tiles (its cost is per executed op, not per element).
        blocks = dict(BLOCK_M=block_m or min(64, max(16, triton.next_power_of_2(n))),
                      BLOCK_N=block_n or min(128, max(16, triton.next_power_of_2(max(n, m)))))
    _KERNEL(lambda bl: (triton.cdiv(n, bl["BLOCK_M"]), b * h), args, meta, blocks,
            num_warps=num_warps, num_stages=num_stages)
    return out


def flops(b: int, h: int, n: int, m: int, d: int) -> int:
    """Matmul FLOPs of one call: ``4 * B * H * N * (N + M) * D``."""
    return 4 * b * h * n * (n + m) * d


__all__ = ["shared_kv_attention_triton", "flops", "head_block", "LOG2E"]
