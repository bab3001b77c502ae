"""Where the generator's random numbers come from: a seeded ``torch.Generator`` or recorded draws.

PanoHead draws uniform numbers for the coarse depth jitter and the importance samples of every
render, and normal numbers for per-layer noise when ``noise_mode='random'``. A :class:`Draws`
hands them out in call order, so a render is reproducible (same generator seed) or replays the
reference's recorded draws exactly (a fixture's ``draws`` list).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class Draws:
    """Random numbers in call order. ``generator``: a ``torch.Generator`` or an int seed (numbers
    drawn on the CPU, then moved: the same seed gives the same render on every device); None uses
    torch's global generator, as the reference does. ``recorded``: a list of tensors or of
    ``{"fn": name, "value": tensor}`` entries replayed in order (shapes are checked)."""

    def __init__(self, generator: torch.Generator | int | None = None, recorded: Sequence | None = None):
        if isinstance(generator, int):
            g = torch.Generator()
            g.manual_seed(generator)
            generator = g
        self.generator = generator
        self.recorded = None if recorded is None else list(recorded)
        self.used = 0

    def _next(self, kind: str, shape: Sequence[int], device) -> Tensor:
        shape = tuple(int(s) for s in shape)
        if self.recorded is not None:
            if self.used >= len(self.recorded):
                raise ValueError(f"recorded draws exhausted: {len(self.recorded)} given, a {kind} draw of shape "
                                 f"{shape} was requested. Fix: record every draw of the run")
            d = self.recorded[self.used]
            fn, value = (d.get("fn"), d["value"]) if isinstance(d, dict) else (None, d)
            if tuple(value.shape) != shape or (fn is not None and fn not in (kind, kind + "_like")):
                raise ValueError(f"recorded draw {self.used} is {fn or 'a tensor'} {tuple(value.shape)}, but a {kind} "
                                 f"draw of shape {shape} was requested. Fix: replay the draws of the same call")
            self.used += 1
            return value.to(device=device, dtype=torch.float32)
        fn = torch.rand if kind == "rand" else torch.randn
        if self.generator is None:
            return fn(shape, device=device)
        return fn(shape, generator=self.generator).to(device)

    def rand(self, shape: Sequence[int], device="cpu") -> Tensor:
        """Uniform [0, 1) float32 of ``shape``."""
        return self._next("rand", shape, device)

    def randn(self, shape: Sequence[int], device="cpu") -> Tensor:
        """Standard normal float32 of ``shape``."""
        return self._next("randn", shape, device)

    @property
    def remaining(self) -> int:
        return 0 if self.recorded is None else len(self.recorded) - self.used


def as_draws(source: "Draws | torch.Generator | int | Sequence | None") -> Draws:
    """Accept a :class:`Draws`, a generator, a seed, a recorded list, or None (torch's global RNG)."""
    if isinstance(source, Draws):
        return source
    if isinstance(source, (list, tuple)):
        return Draws(recorded=source)
    return Draws(source)
