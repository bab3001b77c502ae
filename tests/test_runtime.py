"""The native scheduler: same views as the reference loop, planner limits, policies, cancel,
errors, backpressure."""
from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dp360rt._C as _C
from conftest import rel_err
from dp360rt import Pipeline
from dp360rt.io.images import synthetic_conditions, synthetic_portrait
from dp360rt.engine.runtime import RequestCancelled, Runtime
from dp360rt.engine.runtime.stream import NVS

COND, POR = synthetic_conditions(32, 64), synthetic_portrait(64)


@pytest.fixture(scope="module")
def pipe():
    p = Pipeline.random("tiny", seed=0)
    yield p
    p.close()


def test_pipeline_net_is_a_backend_for_every_model(pipe):
    """Without an exported backend, each model's networks run through TorchBackend (one interface
    for callers), and its text tower gives the module's own numbers."""
    from dp360rt.backends.torch_backend import TorchBackend
    for m in (pipe.nvs, pipe.backview):
        net = pipe.net(m)
        assert isinstance(net, TorchBackend) and net.model is m
        ids = torch.zeros(1, m.cfg.text.max_position_embeddings, dtype=torch.long)
        assert torch.equal(net.encode_text(ids), m.encode_text(ids))


def test_stream_equals_reference_loop(pipe):
    ref = Pipeline.random("tiny", seed=0, engine="reference")(POR, COND, steps=4, seed=11)
    views = list(pipe.stream(POR, COND, steps=4, seed=11))
    assert [v.index for v in views] == list(range(32))
    got = torch.stack([v.image for v in views])
    # decoded views in [0, 1]: the random tiny VAE amplifies fp32 rounding; 1e-3 is 1/4 of an 8-bit level
    assert (got - ref.views).abs().max() < 1e-3
    res = pipe.submit(POR, COND, steps=4, seed=11).result(timeout=300)
    assert rel_err(res.latents, ref.latents) < 1e-4
    # the back view is 8-bit quantized (as the authors save it): rounding may flip one level
    assert (res.back_view - ref.back_view).abs().max() <= 1 / 255 + 1e-6


def test_stream_with_half_weights_and_float32_arithmetic():
    """The step loop runs ``compute_dtype=float32`` pipelines as ``pipe()`` does: bfloat16 weights
    cast at each call, no autocast; the same views as the Python loop."""
    mixed = Pipeline.random("tiny", seed=0, dtype=torch.bfloat16, compute_dtype=torch.float32)
    want = mixed(POR, COND, steps=2, seed=3)
    got = torch.stack([v.image for v in mixed.stream(POR, COND, steps=2, seed=3)])
    err = (got - want.views).abs().max().item()
    print(f"stream vs pipe(), bf16 weights + fp32 arithmetic: max abs error {err:.2e}")
    assert err < 1e-3
    mixed.close()


def test_nerf_fitter_consumes_the_stream(pipe):
    """Views go into the NeRF fitter as they arrive, each with its camera (the default orbit here)."""
    from dp360rt.nerf import Nerf, sphere32_cameras
    fitter = Nerf().fitter(steps=6, progress=False)
    for v in pipe.stream(POR, COND, steps=2, seed=3):
        fitter.add_view(v)
    assert fitter.num_views == 32
    stats = fitter.train()
    assert stats["steps"] == 6 and np.isfinite(stats["train_psnr"])
    assert torch.equal(torch.stack([v.camera for v in fitter._views]), sphere32_cameras())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-1, 3), st.integers(0, 1), st.sampled_from([1, 8]),
                          st.integers(0, 5), st.integers(1, 5), st.integers(0, 1000), st.booleans()),
                min_size=0, max_size=30),
       st.sampled_from(["throughput", "latency"]), st.integers(1, 40), st.integers(0, 20000), st.integers(0, 3000))
def test_planner_respects_limits(rows, policy, max_rows, budget, fixed):
    tasks = [_C.TaskInfo(i, r, w, m, n, min(d, t), t, b, ready) for i, (r, w, m, n, d, t, b, ready) in enumerate(rows)]
    ids = _C.plan_batch(tasks, policy, max_rows, budget, fixed)
    by_id = {t.id: t for t in tasks}
    picked = [by_id[i] for i in ids]
    assert len(set(ids)) == len(ids)
    assert sum(t.rows for t in picked) <= max_rows
    if budget > 0 and picked:
        assert fixed + sum(t.rows * t.bytes_per_row for t in picked) <= budget
    assert len({t.model for t in picked}) <= 1
    assert all(t.ready and t.steps_done < t.steps_total for t in picked)
    if policy == "latency":   # only each request's earliest unfinished task
        for t in picked:
            earlier = [u for u in tasks if u.request == t.request and u.steps_done < u.steps_total and u.window < t.window]
            assert not earlier
    runnable = [t for t in tasks if t.ready and t.steps_done < t.steps_total and t.rows <= max_rows
                and (budget <= 0 or fixed + t.rows * t.bytes_per_row <= budget)]
    if runnable and policy == "throughput":
        assert ids, "a runnable task fits but nothing was planned"


def test_latency_streams_window0_before_window3_starts(pipe):
    rt = Runtime(pipe, policy="latency", queue_size=1)
    try:
        h = rt.submit(POR, COND, steps=4, seed=0)
        it = iter(h)
        first = next(it)
        assert first.index == 0
        assert h._req.window_tasks[3].step == 0          # window 3 has not taken a step yet
        rest = list(it)
        assert [v.index for v in rest] == list(range(1, 32))
    finally:
        rt.shutdown()


def test_back_view_streams_first_when_asked(pipe):
    """``back_view=True``: the back view comes out first (index -1, the back-view hint's camera),
    before any window has finished; ``result()`` still holds the 32 orbit views only."""
    from dp360rt.nerf import sphere32_cameras
    rt = Runtime(pipe, policy="latency", queue_size=1)
    try:
        h = rt.submit(POR, COND, steps=2, seed=5, back_view=True)
        it = iter(h)
        back = next(it)
        assert back.is_back_view and back.index == -1
        assert torch.equal(back.camera, sphere32_cameras()[18])
        assert not h._req.latents                              # no window finished yet
        views = list(it)
        assert [v.index for v in views] == list(range(32))
        assert back.t_ready <= views[0].t_ready
        res = h.result(timeout=60)
        assert res.views.shape[0] == 32 and torch.equal(res.back_view, back.image)
    finally:
        rt.shutdown()


def test_throughput_runs_windows_in_lockstep(pipe):
    rt = Runtime(pipe, policy="throughput", queue_size=1)
    try:
        h = rt.submit(POR, COND, steps=4, seed=0)
        it = iter(h)
        next(it)
        assert h._req.window_tasks[3].step >= 3          # the other windows moved with window 0
        list(it)
    finally:
        rt.shutdown()


def test_submit_cancel_cycles_do_not_leak(pipe):
    rt = Runtime(pipe, policy="throughput")
    try:
        threads = threading.active_count()
        gc.collect()
        before = len(gc.get_objects())
        for i in range(1000):
            h = rt.submit(POR, COND, steps=4, seed=i)
            h.cancel()
            with pytest.raises(RequestCancelled):
                h.result(timeout=10)
        assert rt.wait_idle(30)
        gc.collect()
        assert rt._requests == {} and rt._tasks == {}
        assert rt._loop.pending == 0
        assert threading.active_count() == threads
        assert len(gc.get_objects()) - before < 2000
    finally:
        rt.shutdown()


class Injected(ValueError):
    pass


def test_backend_error_surfaces_and_others_continue(pipe):
    """The failing request gets the original exception; a request sharing its batches goes on."""
    rt = Runtime(pipe, policy="throughput", max_rows=16)
    backend = rt._backends[NVS]
    real = backend.unet

    def flaky(x, t, ctx, bank, res, cond_rows):
        if bool((t == 801).any()):        # only the 5-step request visits t=801
            raise Injected("injected backend failure")
        return real(x, t, ctx, bank, res, cond_rows)

    backend.unet = flaky
    try:
        good = rt.submit(POR, COND, steps=4, seed=1)
        bad = rt.submit(POR, COND, steps=5, seed=2)
        with pytest.raises(Injected, match="injected backend failure"):
            bad.result(timeout=300)
        assert bad.status == "failed"
        assert good.result(timeout=300).views.shape[0] == 32
        assert rt.wait_idle(30) and rt._requests == {}
    finally:
        backend.unet = real
        rt.shutdown()


def test_slow_consumer_blocks_without_losing_views(pipe):
    rt = Runtime(pipe, policy="throughput", queue_size=2)
    try:
        got = []
        h = rt.submit(POR, COND, steps=4, seed=3)
        time.sleep(2.0)                        # the consumer is away: the loop must wait, not drop
        assert len(h._req.queue) <= 2
        for v in h:
            time.sleep(0.01)
            got.append(v.index)
        assert got == list(range(32))
    finally:
        rt.shutdown()


# A stream left open at interpreter exit, a pipeline garbage-collected mid-stream, a consumer that
# raises: before the loop stopped and joined on every path, leaving Python here aborted with
# "terminate called without an active exception" (a joinable std::thread destroyed, or the loop
# thread asking a finalizing interpreter for the GIL) in 3 runs of 4.
_EXIT_PATHS = r'''
import gc, sys, time, weakref
from dp360rt import Pipeline
from dp360rt.io.images import synthetic_conditions, synthetic_portrait
POR, COND = synthetic_portrait(64), synthetic_conditions(32, 64)
pipe = Pipeline.random("tiny", seed=0)
if sys.argv[1] == "all":
    gen = pipe.stream(POR, COND, steps=1, seed=0, back_view=True)
    next(gen)
    rt = weakref.ref(pipe.runtime("latency"))
    del gen, pipe
    deadline = time.monotonic() + 60
    while rt() is not None and time.monotonic() < deadline:   # the loop may finish a step first
        gc.collect()
        time.sleep(0.05)
    assert rt() is None, "a dropped pipeline's runtime was never collected"
    pipe = Pipeline.random("tiny", seed=0)
    try:
        for v in pipe.stream(POR, COND, steps=1, seed=0, back_view=True):
            raise KeyError("consumer failed")
    except KeyError:
        pass
    pipe.submit(POR, COND, steps=1, seed=0)          # still running at exit
for v in pipe.stream(POR, COND, steps=1, seed=0, back_view=True):
    break
print("reached the end")
'''


def test_loop_stops_on_every_exit_path(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "exit_paths.py"
    script.write_text(_EXIT_PATHS)
    runs = [subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for mode in ("all", "break")]
    for p in runs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        assert "reached the end" in out and "terminate called" not in err
