"""Where random numbers come from: a seeded ``torch.Generator`` or a recorded list of draws."""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor


class NoiseSource(Protocol):
    def __call__(self, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """One standard-normal float32 draw of ``shape``, on ``device``."""


class GeneratorNoise:
    """Draws from a CPU ``torch.Generator`` (then moves to the device), as the reference draws
    the posterior noise; the same seed gives the same numbers on any device."""

    def __init__(self, generator: torch.Generator | int | None = None):
        if generator is None or isinstance(generator, int):
            g = torch.Generator()
            g.manual_seed(0 if generator is None else generator)
            generator = g
        self.generator = generator

    def __call__(self, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32).to(device)


class RecordedNoise:
    """Replays recorded draws in order (e.g. a fixture's ``noise`` list); checks every shape."""

    def __init__(self, draws: Sequence[Tensor]):
        self.draws = list(draws)
        self.used = 0

    def __call__(self, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        if self.used >= len(self.draws):
            raise ValueError(f"recorded noise exhausted: {len(self.draws)} draws given, draw {self.used + 1} "
                             f"of shape {tuple(shape)} requested")
        d = self.draws[self.used]
        if tuple(d.shape) != tuple(shape):
            raise ValueError(f"recorded draw {self.used} has shape {tuple(d.shape)}, expected {tuple(shape)}")
        self.used += 1
        return d.to(device=device, dtype=torch.float32)

    @property
    def remaining(self) -> int:
        return len(self.draws) - self.used


def as_noise(noise: NoiseSource | torch.Generator | int | Sequence[Tensor] | None) -> NoiseSource:
    """Accept a NoiseSource, a generator, a seed, a list of recorded draws, or None (seed 0)."""
    if noise is None or isinstance(noise, (int, torch.Generator)):
        return GeneratorNoise(noise)
    if isinstance(noise, (list, tuple)):
        return RecordedNoise(noise)
    return noise
