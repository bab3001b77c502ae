"""The layout of a multiresolution hash grid (:class:`HashGridSpec`) and its spatial-hash primes:
what the PyTorch encoding (:mod:`.encoding`) and the Triton kernel (:mod:`.hashgrid_triton`) share,
so that neither imports the other's module for it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

PRIMES = (1, 2654435761, 805459861)


@dataclass(frozen=True)
class HashGridSpec:
    """Level layout of a hash grid: resolutions, table sizes, offsets into one flat table."""
    levels: int
    features: int
    log2_table: int
    base_res: int
    max_res: int

    @property
    def growth(self) -> float:
        if self.levels <= 1:
            return 1.0
        return math.exp((math.log(self.max_res) - math.log(self.base_res)) / (self.levels - 1))

    @property
    def resolutions(self) -> list[int]:
        b = self.growth
        return [int(math.floor(self.base_res * b ** l + 1e-6)) for l in range(self.levels)]

    @property
    def sizes(self) -> list[int]:
        t = 2 ** self.log2_table
        out = []
        for r in self.resolutions:
            dense = (r + 1) ** 3
            out.append(min(t, (dense + 7) // 8 * 8))
        return out

    @property
    def hashed(self) -> list[bool]:
        return [(r + 1) ** 3 > 2 ** self.log2_table for r in self.resolutions]

    @property
    def offsets(self) -> list[int]:
        off, acc = [], 0
        for s in self.sizes:
            off.append(acc)
            acc += s
        return off + [acc]

    def tables(self) -> dict[str, Tensor]:
        """Per-level constants as tensors (int64): res, size, hashed, offset."""
        return {
            "res": torch.tensor(self.resolutions, dtype=torch.int64),
            "size": torch.tensor(self.sizes, dtype=torch.int64),
            "hashed": torch.tensor(self.hashed, dtype=torch.bool),
            "offset": torch.tensor(self.offsets[:-1], dtype=torch.int64),
        }
