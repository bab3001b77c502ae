"""The service's metrics in the Prometheus text exposition format (no client library needed).

Kept by the process that serves HTTP (the single ingress replica under Ray), so they are global.
"""
from __future__ import annotations

import bisect
import threading

STATUSES = ("done", "failed", "cancelled", "rejected")
TTFV_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TOTAL_BUCKETS = (0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 1200)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.sum += x
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Gauges (active generations, queue depth), generations by final status, time-to-first-view
    and total-time histograms; :meth:`render` gives the ``/metrics`` text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.queued = 0
        self.totals = {s: 0 for s in STATUSES}
        self.ttfv = Histogram(TTFV_BUCKETS)
        self.total_time = Histogram(TOTAL_BUCKETS)
        self.recent_totals: list[float] = []     # the last few done generations' seconds (Retry-After)

    def count(self, status: str) -> None:
        with self._lock:
            self.totals[status] += 1

    def first_view(self, seconds: float) -> None:
        with self._lock:
            self.ttfv.observe(seconds)

    def done(self, seconds: float) -> None:
        with self._lock:
            self.total_time.observe(seconds)
            self.recent_totals = (self.recent_totals + [seconds])[-20:]

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP dp360rt_active_generations Generations admitted and not finished.",
                "# TYPE dp360rt_active_generations gauge",
                f"dp360rt_active_generations {self.active}",
                "# HELP dp360rt_queue_depth Admitted generations whose sampling has not started yet.",
                "# TYPE dp360rt_queue_depth gauge",
                f"dp360rt_queue_depth {self.queued}",
                "# HELP dp360rt_generations_total Generations by final status (rejected: refused with a 4xx/5xx).",
                "# TYPE dp360rt_generations_total counter",
                *(f'dp360rt_generations_total{{status="{s}"}} {n}' for s, n in self.totals.items()),
                "# HELP dp360rt_time_to_first_view_seconds Request to the first image (the back view).",
                "# TYPE dp360rt_time_to_first_view_seconds histogram",
                *self.ttfv.lines("dp360rt_time_to_first_view_seconds"),
                "# HELP dp360rt_generation_seconds Request to the last view, generations that finished.",
                "# TYPE dp360rt_generation_seconds histogram",
                *self.total_time.lines("dp360rt_generation_seconds"),
            ]
        return "\n".join(lines) + "\n"
