"""Spatial transformers of the UNet, with the reference-bank hooks of DiffPortrait360.

The appearance net *writes* ``norm1(x)`` of every transformer block into a bank; the main UNet
*reads* it: its self-attention takes keys/values from ``[own tokens ; bank tokens]``.
"""
from __future__ import annotations

from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class Bank(Protocol):
    """How a transformer block's self-attention meets the reference bank (see :mod:`dp360rt.unet.bank`)."""

    def self_attention(self, attn: "Attention", x_norm: Tensor) -> Tensor:
        """Called once per transformer block, in execution order, with its ``attn1`` and
        ``norm1(x)`` [B, N, C]; returns the self-attention output [B, N, C]."""


class Attention(nn.Module):
    """Multi-head attention with ``to_q/to_k/to_v`` (no bias) and ``to_out.0``.

    x: [B, N, C] queries; context: [B, M, Cc] keys/values source (defaults to x) -> [B, N, C].
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)
        k = split_heads(self.to_k(context), self.heads)
        v = split_heads(self.to_v(context), self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(merge_heads(out))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, keys ``net.0.proj`` and ``net.2``: [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention (bank-aware), cross-attention to text, GEGLU FF; pre-LayerNorm residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, bank: Bank | None = None) -> Tensor:
        n = self.norm1(x)
        x = (self.attn1(n) if bank is None else bank.self_attention(self.attn1, n)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm(eps 1e-6) -> 1x1 proj_in -> transformer blocks on [B, HW, C] -> 1x1 proj_out -> + x.

    x: [B, C, H, W], context: [B, 77, Cc] -> [B, C, H, W].
    """

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int = 1):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor, bank: Bank | None = None) -> Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x))
        t = t.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            t = block(t, context, bank)
        t = t.transpose(1, 2).reshape(b, -1, h, w)
        return self.proj_out(t) + x
