"""Temporal (cross-frame) attention of the motion modules, PyTorch reference; a Triton kernel
(:mod:`.temporal_attention_triton`) is the GPU twin.

Hidden states are ``[B*F, S, H*D]`` (the F frames of a window consecutive in the batch, S spatial
tokens). For every (window b, token s, head h) the F frames attend to each other:
``softmax(q k^T / sqrt(D)) v`` over an F x F score matrix. This permutes to ``(B*S, H, F, D)``,
runs SDPA and permutes back.
"""
from __future__ import annotations

import torch.nn.functional as F_
from torch import Tensor


def temporal_attention_reference(q: Tensor, k: Tensor, v: Tensor, frames: int, heads: int) -> Tensor:
    """PyTorch reference. q, k, v: [B*F, S, C] with C = heads * D -> [B*F, S, C]."""
    bf, s, c = q.shape
    if bf % frames or c % heads:
        raise ValueError(f"temporal attention: batch {bf} / frames {frames}, channels {c} / heads {heads}")
    b, d = bf // frames, c // heads

    def to_seq(x: Tensor) -> Tensor:        # (b f) s (h d) -> (b s) h f d
        return x.reshape(b, frames, s, heads, d).permute(0, 2, 3, 1, 4).reshape(b * s, heads, frames, d)

    out = F_.scaled_dot_product_attention(to_seq(q), to_seq(k), to_seq(v))
    return out.reshape(b, s, heads, frames, d).permute(0, 3, 1, 2, 4).reshape(bf, s, c)
