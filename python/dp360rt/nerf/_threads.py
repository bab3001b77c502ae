"""CPU thread count for the NeRF's many small PyTorch ops.

On an idle machine all cores help; on a shared one, OpenMP threads waiting at barriers for a
descheduled sibling can make every op many times slower than one thread. :func:`pick_threads`
times a small fixed workload both ways (a few milliseconds) and returns the faster count;
:func:`threads` applies it for the duration of a block.
"""
from __future__ import annotations

import contextlib
import time

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
