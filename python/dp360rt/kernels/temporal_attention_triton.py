"""Triton twin of :func:`dp360rt.kernels.temporal_attention.temporal_attention_reference`, read in
the UNet's own layout.

Hidden states are ``[B*F, S, H*D]`` (the F frames of a window consecutive in the batch, S spatial
tokens); for every (window b, token s, head h) the F frames attend to each other. The PyTorch
reference permutes to ``(B*S, H, F, D)``, runs SDPA and permutes back; this kernel reads
``[B*F, S, H*D]`` directly through strides (no permute copies) and writes the output in the same
layout.

F is small (8), far below a ``tl.dot`` tile, so the kernel is a memory-bound broadcast-multiply:
a program owns BLOCK_S tokens x F query frames (rows) of one head of one window, loops over the F
key frames with an online softmax, and accumulates in fp32. F is padded to a power of two (masked),
as is D.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_env
from .shared_kv_attention_triton import LOG2E

__all__ = ["temporal_attention_triton"]


@triton.jit
def _temporal_fwd(Q, K, V, O,
                  sqb, sqs, sqc, skb, sks, skc, svb, svs, svc, sob, sos, soc,
                  S, F, D, qk_scale,
                  F_PAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    r = tl.arange(0, BLOCK_S * F_PAD)              # rows: (token, query frame)
    s = pid_s * BLOCK_S + r // F_PAD
    i = r % F_PAD
    s_mask = s < S
    row_mask = s_mask & (i < F)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    col = h * D + offs_d
    frame0 = (b * F).to(tl.int64)

    q = tl.load(Q + (frame0 + i)[:, None] * sqb + s[:, None] * sqs + col[None, :] * sqc,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q * qk_scale
    kv_mask = s_mask[:, None] & d_mask[None, :]
    k_rows = K + s[:, None] * sks + col[None, :] * skc
    v_rows = V + s[:, None] * svs + col[None, :] * svc

    m_i = tl.full([BLOCK_S * F_PAD], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_S * F_PAD], 0.0, tl.float32)
    acc = tl.full([BLOCK_S * F_PAD, BLOCK_D], 0.0, tl.float32)
    for j in range(0, F):                          # key frames (same token, same head)
        kj = tl.load(k_rows + (frame0 + j) * skb, mask=kv_mask, other=0.0).to(tl.float32)
        sc = tl.sum(q * kj, 1)
        m_new = tl.maximum(m_i, sc)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new)
        l_i = l_i * alpha + p
        vj = tl.load(v_rows + (frame0 + j) * svb, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * vj
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + (frame0 + i)[:, None] * sob + s[:, None] * sos + col[None, :] * soc,
             out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


_CONFIGS = [triton.Config({"BLOCK_S": bs}, num_warps=w, num_stages=st)
            for bs, w, st in [(4, 4, 2), (8, 4, 2), (16, 4, 2), (32, 4, 2), (8, 8, 2), (16, 8, 2), (32, 8, 2),
                              (2, 4, 2), (16, 4, 3)]]


def _prune(configs, named_args, **kwargs):
    """Keep the register tile (BLOCK_S * F_PAD rows x BLOCK_D) at or below 16K fp32 elements."""
    rows = kwargs.get("F_PAD", named_args.get("F_PAD", 8))
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    keep = [c for c in configs if c.kwargs["BLOCK_S"] * rows * bd <= 16384]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_S"])]


_KERNEL = triton_env.Kernel(_temporal_fwd, _CONFIGS, key=["S", "F", "D", "F_PAD", "BLOCK_D"], prune=_prune)


def temporal_attention_triton(q: Tensor, k: Tensor, v: Tensor, frames: int, heads: int, *,
                              block_s: int | None = None, num_warps: int = 4) -> Tensor:
    """Attention across the ``frames`` consecutive batch rows, per token and head.

    q, k, v: [B*F, S, H*D] (any strides); returns a contiguous [B*F, S, H*D] tensor in q's dtype.
    Equals :func:`~dp360rt.kernels.temporal_attention.temporal_attention_reference`. ``block_s``
    (a power of two) fixes the number of tokens per program instead of autotuning; under the
    interpreter it defaults to a large block.
    """
    triton_env.require(q.device, _temporal_fwd)
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q/k/v must share one [B*F, S, C] shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError("q/k/v must share dtype and device")
    if q.dtype not in triton_env.DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; the Triton kernel takes {triton_env.DTYPES}")
    bf, s, c = q.shape
    if frames <= 0 or bf % frames:
        raise ValueError(f"batch {bf} is not a multiple of the window length {frames}")
    if c % heads:
        raise ValueError(f"{c} channels do not split into {heads} heads")
    d = c // heads
    out = torch.empty(bf, s, c, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    b = bf // frames
    args = (q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(), s, frames, d, (d ** -0.5) * LOG2E)
    meta = dict(F_PAD=triton.next_power_of_2(frames), BLOCK_D=triton.next_power_of_2(d))
    blocks = None
    if triton_env.interpreting() or block_s is not None:
        blocks = dict(BLOCK_S=block_s or min(64, triton.next_power_of_2(s)))
    _KERNEL(lambda bl: (heads, triton.cdiv(s, bl["BLOCK_S"]), b), args, meta, blocks, num_warps=num_warps)
    return out
