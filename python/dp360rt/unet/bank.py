"""The reference bank: what the appearance net writes and the main UNet reads.

One entry per SpatialTransformer, in execution order (input blocks, middle, output blocks), each the
normalized self-attention input ``norm1(x)``. A bank object decides how a transformer block's
self-attention uses it:

* :class:`BankWriter` (appearance net): records ``norm1(x)``, then plain self-attention.
* :class:`BankReader` (reference semantics): keys/values from ``cat([norm1(x), entry])`` per sample.
* :class:`SharedBank` (fast engine): the entry is held once (batch 1 per group); its keys/values
  are projected once and shared by every frame, window and call that reads them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Routed by backend (Triton kernel on CUDA, the PyTorch twin elsewhere); a module global, so
# export tools can patch ``bank.shared_kv_attention``.
from ..kernels.dispatch import shared_kv_attention
from .attention import Attention, merge_heads, split_heads


class BankWriter:
    """Records ``norm1(x)`` [B, HW, C] of every transformer block of the appearance net."""

    def __init__(self) -> None:
        self.entries: list[Tensor] = []

    def record(self, x_norm: Tensor) -> None:
        self.entries.append(x_norm)

    def self_attention(self, attn: Attention, x_norm: Tensor) -> Tensor:
        self.record(x_norm)
        return attn(x_norm)


class BankReader:
    """Reference read: the ``i``-th transformer block attends to ``cat([norm1(x), entries[i]])``.

    entries: [B, M, C] each (already repeated over the batch, as the reference does).
    """

    def __init__(self, entries: list[Tensor]) -> None:
        self.entries = entries
        self.index = 0

    def _next(self) -> int:
        if self.index >= len(self.entries):
            raise RuntimeError(f"reference bank has {len(self.entries)} entries but the UNet asked for more; "
                               "appearance net and UNet configs differ")
        self.index += 1
        return self.index - 1

    def self_attention(self, attn: Attention, x_norm: Tensor) -> Tensor:
        entry = self.entries[self._next()]
        return attn(x_norm, torch.cat([x_norm, entry], dim=1))


class SharedBank(BankReader):
    """Fast read: bank entries at batch 1 per group, read by the first rows of the batch.

    entries: [G, M, C] each, one row per group (G requests or timesteps); ``rows[g]`` consecutive
    batch rows read group ``g``; rows after ``sum(rows)`` (the unconditional branch) read no bank.
    Projected keys/values are cached per entry, so several UNet calls in one step share them.
    """

    def __init__(self, entries: list[Tensor], rows: list[int]) -> None:
        super().__init__(entries)
        if entries and len(rows) != entries[0].shape[0]:
            raise ValueError(f"{len(rows)} row groups for a bank with {entries[0].shape[0]} groups")
        self.rows = rows
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}

    def for_call(self, rows: list[int]) -> "SharedBank":
        """A reader for one UNet call (fresh layer index) sharing this bank's cached keys/values."""
        other = SharedBank.__new__(SharedBank)
        other.entries, other.index, other.rows, other.kv = self.entries, 0, rows, self.kv
        return other

    def self_attention(self, attn: Attention, x_norm: Tensor) -> Tensor:
        i = self._next()
        if i not in self.kv:
            e = self.entries[i]
            self.kv[i] = (split_heads(attn.to_k(e), attn.heads), split_heads(attn.to_v(e), attn.heads))
        kb, vb = self.kv[i]
        q = split_heads(attn.to_q(x_norm), attn.heads)
        k = split_heads(attn.to_k(x_norm), attn.heads)
        v = split_heads(attn.to_v(x_norm), attn.heads)
        if self.rows == [q.shape[0]]:
            # One group reading with every row: no slicing, so a graph traced at one batch size
            # (dp360rt.export) stays valid at any other.
            return attn.to_out(merge_heads(shared_kv_attention(q, k, v, kb, vb)))
        outs, s = [], 0
        for g, n in enumerate(self.rows):
            outs.append(shared_kv_attention(q[s:s + n], k[s:s + n], v[s:s + n], kb[g:g + 1], vb[g:g + 1]))
            s += n
        if s < q.shape[0]:
            outs.append(F.scaled_dot_product_attention(q[s:], k[s:], v[s:]))
        return attn.to_out(merge_heads(torch.cat(outs) if len(outs) > 1 else outs[0]))
