"""Self-attention whose keys/values are ``[own tokens ; shared reference tokens]``, computed
without concatenating or broadcasting the shared part per frame.

Two partial attentions (own keys per frame; shared keys once for all frames) are merged with
their log-sum-exp: ``out = (e^{l1} o1 + e^{l2} o2) / (e^{l1} + e^{l2})``, the same softmax as over
the concatenation. PyTorch reference implementation; a Triton kernel is the GPU twin.
"""
from __future__ import annotations

import torch
from torch import Tensor


def attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention with its log-sum-exp. q: [B, H, N, D], k/v: [B, H, M, D] ->
    (out [B, H, N, D], lse [B, H, N] float32). Scale ``D**-0.5``."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse.float()
    if q.device.type == "cuda":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
            return out, lse[..., : q.shape[2]].float()
        except (RuntimeError, NotImplementedError):
            pass
    return attention_lse_math(q, k, v)


def attention_lse_math(q: Tensor, k: Tensor, v: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The same in plain matmuls, chunked over queries so no full score matrix exists at once
    (also the path FLOP counters see on meta tensors)."""
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for s in range(0, q.shape[2], chunk):
        sc = torch.matmul(q[:, :, s:s + chunk].float() * scale, k.float().transpose(-1, -2))
        lse = torch.logsumexp(sc, dim=-1)
        outs.append(torch.matmul(torch.exp(sc - lse[..., None]), v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_partials(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> Tensor:
    """Combine two partial softmax attentions over disjoint key sets."""
    w1 = torch.sigmoid(l1 - l2)[..., None]          # e^{l1} / (e^{l1} + e^{l2}), overflow-free
    out = o2.float().lerp_(o1.float(), w1) if o1.dtype == torch.float32 else o2.float().lerp(o1.float(), w1)
    return out.to(o1.dtype)


def shared_kv_attention(q: Tensor, k: Tensor, v: Tensor, k_shared: Tensor, v_shared: Tensor) -> Tensor:
    """Attention of each frame's queries over ``[its own keys ; the shared keys]``.

    q, k, v: [B, H, N, D] (own tokens of B frames); k_shared, v_shared: [1, H, M, D] (one copy
    for all B frames). Returns [B, H, N, D]; equals ``sdpa(q, cat([k, k_shared]), cat([v, v_shared]))``.
    """
    b, h, n, d = q.shape
    o_own, l_own = attention_lse(q, k, v)
    # All frames' queries against the one shared copy: fold frames into the query axis.
    qf = q.transpose(0, 1).reshape(1, h, b * n, d)
    o_sh, l_sh = attention_lse(qf, k_shared, v_shared)
    o_sh = o_sh.reshape(h, b, n, d).transpose(0, 1)
    l_sh = l_sh.reshape(h, b, n).transpose(0, 1)
    return merge_partials(o_own, l_own, o_sh, l_sh)


def shared_kv_attention_reference(q: Tensor, k: Tensor, v: Tensor, k_shared: Tensor, v_shared: Tensor) -> Tensor:
    """The materialized concatenation the reference computes (test oracle)."""
    b = q.shape[0]
    kk = torch.cat([k, k_shared.expand(b, -1, -1, -1)], dim=2)
    vv = torch.cat([v, v_shared.expand(b, -1, -1, -1)], dim=2)
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv)
