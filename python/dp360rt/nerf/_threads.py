"""CPU thread count and allocator tuning for the NeRF's many small PyTorch ops.

On an idle machine all cores help; on a shared one, OpenMP threads waiting at barriers for a
descheduled sibling can make every op many times slower than one thread. :func:`pick_threads`
times a small fixed workload both ways (a few milliseconds) and returns the faster count;
:func:`threads` applies it for the duration of a block (rendering); :class:`ThreadTuner` keeps
re-deciding from the measured cost of training steps. :func:`tune_allocator` keeps glibc from
returning every large temporary to the kernel.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch


def _probe(n: int, x: torch.Tensor, limit: float = float("inf")) -> float:
    """Best of 3 timings of a small elementwise workload; stops early once slower than ``limit``."""
    torch.set_num_threads(n)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(4):
            y = x * 1.0001 + 0.5
            y = torch.exp(-y)
        best = min(best, time.perf_counter() - t)
        if best > limit:
            break
    return best


_LAST: tuple[float, int, int] | None = None    # (time, threads available, choice)


def pick_threads(max_age: float = 5.0) -> int:
    """1 or ``torch.get_num_threads()``, whichever runs the probe workload faster right now
    (a decision younger than ``max_age`` seconds is reused)."""
    global _LAST
    n0 = torch.get_num_threads()
    if n0 <= 1:
        return n0
    now = time.monotonic()
    if _LAST is not None and _LAST[1] == n0 and now - _LAST[0] < max_age:
        return _LAST[2]
    x = torch.rand(1 << 16)
    try:
        t1 = _probe(1, x)
        tn = _probe(n0, x, limit=t1)
    finally:
        torch.set_num_threads(n0)
    choice = n0 if tn < t1 else 1
    _LAST = (now, n0, choice)
    return choice


@contextlib.contextmanager
def threads(device: torch.device | str = "cpu"):
    """Run the block with :func:`pick_threads` threads (CPU only), restoring the count after."""
    if torch.device(device).type != "cpu":
        yield
        return
    n0 = torch.get_num_threads()
    n = pick_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(n0)


class ThreadTuner:
    """Picks the CPU thread count (the default vs 1) by measured time per field sample, probing
    each for ``window`` steps now and then. On a shared machine two OpenMP threads waiting on
    each other can be many times slower than one; on an idle one two are faster."""

    def __init__(self, window: int = 12, every: int = 300):
        self.n0 = torch.get_num_threads()
        first = pick_threads()
        self.options = sorted({1, self.n0}, key=lambda n: n != first) if self.n0 > 1 else [self.n0]
        self.window, self.every = window, every
        self.cost: dict[int, float] = {}
        self._probe: list[int] = list(self.options) if len(self.options) > 1 else []
        self._buf: list[float] = []
        self._since = 0
        self._skip = 0
        self.current = self.n0
        if self._probe:
            self._set(self._probe[0])
            self._skip = 2

    def record(self, seconds: float, samples: int) -> None:
        if len(self.options) < 2:
            return
        if self._skip > 0:
            self._skip -= 1
            return
        self._buf.append(seconds / max(samples, 1))
        self._since += 1
        if self._probe:
            others = [c for n, c in self.cost.items() if n != self.current]
            hopeless = bool(others) and (float(np.median(self._buf)) > 2.0 * min(others)
                                         or self._buf[-1] > 4.0 * min(others))
            if len(self._buf) >= self.window or hopeless:
                self.cost[self.current] = float(np.median(self._buf))
                self._buf = []
                self._probe.pop(0)
                if self._probe:
                    self._set(self._probe[0])
                else:
                    self._set(min(self.cost, key=self.cost.get))     # type: ignore[arg-type]
                    self._since = 0
        elif self._since >= self.every:
            self.cost[self.current] = float(np.median(self._buf[-self.window:]))
            self._buf = []
            other = [n for n in self.options if n != self.current]
            self._probe = [other[0], self.current]
            self._set(other[0])

    def _set(self, n: int) -> None:
        self.current = n
        torch.set_num_threads(n)
        self._skip = 1

    def restore(self) -> None:
        torch.set_num_threads(self.n0)

    def resume(self) -> None:
        torch.set_num_threads(self.current)


_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """glibc only: serve allocations up to 32 MiB from the heap and keep freed memory, instead of
    mmap/munmap for every large temporary (each fresh page costs a fault: on CPU this halves
    the time of a training step). Process-wide, harmless elsewhere; a no-op off glibc."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes
        import sys
        if not sys.platform.startswith("linux"):
            return
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)      # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)               # M_TRIM_THRESHOLD
    except Exception:
        pass
