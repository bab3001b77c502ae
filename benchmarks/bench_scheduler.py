"""The native scheduler: its own overhead, time to first view by policy, concurrent requests.

    python benchmarks/bench_scheduler.py [--steps 10] [--json out.json]
    python -m pytest benchmarks/bench_scheduler.py --benchmark-json out.json    # overhead only

1. Overhead: a stub backend of fixed, sleep-free cost (it only counts calls and returns zeros)
   isolates the loop: planning and bookkeeping in C++ (``LoopStats.overhead_s``) and the Python
   glue per batch, per step and per view; compared with one tiny-model step.
2. Policies: the tiny model, ``latency`` vs ``throughput``: time to the streamed back view, to the
   first orbit view, and total, with the first view's lower bound (see :mod:`dp360rt.engine.runtime.stream`).
3. Two concurrent requests on one runtime vs the same two run one after the other.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from dp360rt import Pipeline
from dp360rt.io.images import synthetic_conditions, synthetic_portrait
from dp360rt.engine.runtime import Runtime
from dp360rt.engine.runtime.stream import BACKVIEW, NVS


class StubBackend:
    """Fixed-cost backend: no arithmetic, counts calls; shapes as the real one."""

    name = "stub"

    def __init__(self, model):
        self.model, self.calls = model, 0
        self._unet = model.cfg.unet

    def appearance(self, refs, t, context):
        self.calls += 1
        return [torch.zeros(refs.shape[0], 1, 1)] * 16

    def bank(self, entries):
        return entries

    def pose(self, x, hint, t, context):
        self.calls += 1
        return None

    def unet(self, x, t, context, bank, residuals, cond_rows):
        self.calls += 1
        return torch.zeros_like(x)


def overhead(pipe: Pipeline, steps: int) -> dict:
    rt = Runtime(pipe, policy="throughput", max_rows=32)
    rt._backends = {BACKVIEW: StubBackend(pipe.backview), NVS: StubBackend(pipe.nvs)}
    cond, por = synthetic_conditions(32, pipe.image_size), synthetic_portrait(pipe.image_size)
    t0 = time.perf_counter()
    h = rt.submit(por, cond, steps=steps, seed=0)
    n_views = len(list(h))
    wall = time.perf_counter() - t0
    st = rt.stats
    rt.shutdown()
    return {"batches": st.batches, "task_steps": st.task_steps, "views": n_views,
            "native_overhead_us_per_batch": 1e6 * st.overhead_s / max(1, st.batches),
            # the Python callback per batch (stub networks: the glue that runs a batch's tasks)
            "callback_us_per_batch": 1e6 * st.callback_s / max(1, st.batches),
            "overhead_with_callback_us_per_batch": 1e6 * (st.overhead_s + st.callback_s) / max(1, st.batches),
            "callback_s": st.callback_s, "wall_s": wall,
            "wall_us_per_step": 1e6 * wall / steps, "wall_us_per_view": 1e6 * wall / max(1, n_views)}


def tiny_step_seconds(pipe: Pipeline, steps: int) -> float:
    rt = Runtime(pipe, policy="throughput")
    cond, por = synthetic_conditions(32, pipe.image_size), synthetic_portrait(pipe.image_size)
    t0 = time.perf_counter()
    rt.submit(por, cond, steps=steps, seed=0).result()
    wall = time.perf_counter() - t0
    st = rt.stats
    rt.shutdown()
    return {"wall_s": wall, "per_batch_s": st.callback_s / max(1, st.batches),
            "native_overhead_s": st.overhead_s, "batches": st.batches}


def policies(pipe: Pipeline, steps: int, repeats: int = 3) -> dict:
    """Per policy (median of ``repeats``): back view streamed, first orbit view, total; and the
    lower bound of the first orbit view's share, ``b + (1 - b) / 4`` with ``b`` the back view's
    share (every window needs the back view; four equal windows)."""
    out = {}
    cond, por = synthetic_conditions(32, pipe.image_size), synthetic_portrait(pipe.image_size)
    for policy in ("latency", "throughput"):
        rt = Runtime(pipe, policy=policy)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            back = first = None
            for v in rt.submit(por, cond, steps=steps, seed=0, back_view=True):
                now = time.perf_counter() - t0
                if v.is_back_view:
                    back = now
                elif first is None:
                    first = now
            runs.append((back, first, time.perf_counter() - t0))
        rt.shutdown()
        back, first, total = sorted(runs, key=lambda r: r[2])[len(runs) // 2]
        b = back / total
        out[policy] = {"back_view_s": back, "first_view_s": first, "total_s": total,
                       "back_view_over_total": b, "first_over_total": first / total,
                       "first_over_total_bound": b + (1 - b) / 4}
    return out


def concurrency(pipe: Pipeline, steps: int) -> dict:
    cond, por = synthetic_conditions(32, pipe.image_size), synthetic_portrait(pipe.image_size)
    rt = Runtime(pipe, policy="throughput", max_rows=16)
    t0 = time.perf_counter()
    for seed in (1, 2):
        rt.submit(por, cond, steps=steps, seed=seed).result()
    seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    hs = [rt.submit(por, cond, steps=steps, seed=s) for s in (1, 2)]
    for h in hs:
        h.result()
    conc = time.perf_counter() - t0
    rt.shutdown()
    return {"sequential_s": seq, "concurrent_s": conc, "speedup": seq / conc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args()
    pipe = Pipeline.random("tiny", seed=0)
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": a.steps}
    res["overhead_stub"] = overhead(pipe, 50)
    res["tiny"] = tiny_step_seconds(pipe, a.steps)
    res["overhead_fraction_of_tiny_batch"] = (res["overhead_stub"]["native_overhead_us_per_batch"] * 1e-6
                                              / res["tiny"]["per_batch_s"])
    res["policies"] = policies(pipe, a.steps)
    res["concurrency"] = concurrency(pipe, a.steps)
    pipe.close()
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


# -- pytest-benchmark (pytest benchmarks --benchmark-json out.json): the stub-backend overhead ------------
def test_scheduler_overhead(benchmark):
    pipe = Pipeline.random("tiny", seed=0)
    try:
        r = benchmark.pedantic(overhead, args=(pipe, 10), rounds=1, iterations=1)
    finally:
        pipe.close()
    benchmark.extra_info.update(r)
    assert r["batches"] > 0


if __name__ == "__main__":
    main()
