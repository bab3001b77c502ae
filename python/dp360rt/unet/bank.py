"""The reference bank: what the appearance net writes and the main UNet reads.

One entry per SpatialTransformer, in execution order (input blocks, middle, output blocks), each the
normalized self-attention input ``norm1(x)`` of shape [B, HW, C].
"""
from __future__ import annotations

from torch import Tensor


class BankWriter:
    """Records ``norm1(x)`` of every transformer block of the appearance net."""

    def __init__(self) -> None:
        self.entries: list[Tensor] = []

    def visit(self, x_norm: Tensor) -> None:
        self.entries.append(x_norm)
        return None


class BankReader:
    """Hands bank entry ``i`` to the ``i``-th transformer block of the main UNet as extra keys/values."""

    def __init__(self, entries: list[Tensor]) -> None:
        self.entries = entries
        self.index = 0

    def visit(self, x_norm: Tensor) -> Tensor:
        if self.index >= len(self.entries):
            raise RuntimeError(f"reference bank has {len(self.entries)} entries but the UNet asked for more; "
                               "appearance net and UNet configs differ")
        entry = self.entries[self.index]
        self.index += 1
        return entry
