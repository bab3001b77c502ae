"""AnimateDiff-style temporal motion modules of the 360° UNet (key layout ``N.0.temporal_transformer``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import dispatch
from .attention import FeedForward, merge_heads, split_heads


def sinusoidal_table(dim: int, max_len: int) -> Tensor:
    """The positional table ``pe`` [1, max_len, dim]: sin on even channels, cos on odd."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(pos * div)
    pe[0, :, 1::2] = torch.cos(pos * div)
    return pe


class TemporalAttention(nn.Module):
    """Self-attention across the frames of a window, one sequence per spatial position.

    x: [B*F, HW, C] (frames consecutive in the batch) -> [B*F, HW, C]. The positional table is
    added to the (already normalized) input so that q, k and v all see it.
    """

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))
        self.pos_encoder = nn.Module()
        self.pos_encoder.register_buffer("pe", sinusoidal_table(dim, max_len))

    def forward(self, x: Tensor, frames: int) -> Tensor:
        bf, d, c = x.shape
        b = bf // frames
        if dispatch.kernel_backend(x.device) == "triton":
            # Kernel path: projections and attention in the [(b f), d, c] layout, no permutes.
            t = (x.view(b, frames, d, c) + self.pos_encoder.pe[:, :frames, None].to(x.dtype)).view(bf, d, c)
            q, k, v = (p(t) for p in (self.to_q, self.to_k, self.to_v))
            return self.to_out(dispatch.temporal_attention(q, k, v, frames, self.heads))
        # (b f) d c -> (b d) f c
        t = x.view(b, frames, d, c).transpose(1, 2).reshape(b * d, frames, c)
        t = t + self.pos_encoder.pe[:, :frames].to(t.dtype)
        q, k, v = (split_heads(p(t), self.heads) for p in (self.to_q, self.to_k, self.to_v))
        out = self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return out.view(b, d, frames, c).transpose(1, 2).reshape(bf, d, c)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList(TemporalAttention(dim, heads, max_len) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x), frames) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    """GroupNorm(eps 1e-6) -> Linear proj_in -> temporal block -> Linear proj_out -> + x.

    x: [B*F, C, H, W] -> [B*F, C, H, W].
    """

    def __init__(self, dim: int, heads: int, frames: int, max_len: int):
        super().__init__()
        self.frames = frames
        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(dim, heads, max_len)])
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        bf, c, h, w = x.shape
        if bf % self.frames:
            raise ValueError(f"motion module: batch {bf} is not a multiple of the window length {self.frames} "
                             "(frames of a window must be consecutive in the batch)")
        t = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c))
        for block in self.transformer_blocks:
            t = block(t, self.frames)
        t = self.proj_out(t).reshape(bf, h, w, c).permute(0, 3, 1, 2)
        return t + x


class MotionModule(nn.Module):
    """One entry of ``*_blocks_motion_module``: holds ``0.temporal_transformer``."""

    def __init__(self, dim: int, heads: int, frames: int, max_len: int):
        super().__init__()
        inner = nn.Module()
        inner.temporal_transformer = TemporalTransformer(dim, heads, frames, max_len)
        self.add_module("0", inner)

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, "0").temporal_transformer(x)
