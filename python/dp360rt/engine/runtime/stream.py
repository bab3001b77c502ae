"""Streaming generation over the native step loop (``dp360rt._C.StepLoop``).

A request is one portrait: a back-view task (1 row), then one task per 8-frame window (the
windows depend on the back view). The C++ loop plans which tasks share the next step (policy
``throughput``: lockstep, fill; ``latency``: each request's windows in order, other requests fill),
calls :meth:`Runtime._run_batch` for the tensor work, and hands finished tasks to
:meth:`Runtime._on_done`, which decodes windows and pushes :class:`View` objects into the
request's bounded queue (a slow consumer pauses the loop; no view is dropped). Numbers equal the
reference loop's: every task keeps its own timesteps, tables and recorded noises.

Time to the first view: every window reads the finished back view, so the first of the orbit's
views cannot come before the back view plus one whole window; with equal windows its share of
the total is at least ``b + (1 - b) / 4`` (``b``: the back view's share), above a quarter. The
``latency`` policy gets close to that bound (window 0 alone, its first frame decoded alone), and
``back_view=True`` streams the back view itself (a real view of the head, at the back-view
hint's camera) as soon as it exists, before any window.

Edge mode (the pipeline's plan keeps one diffusion model resident, see :mod:`dp360rt.engine.offload`):
requests are admitted in waves. A request submitted while others run waits until they have
finished; then the waiting requests start together: the back-view model is reloaded for their
back views, the 360° model for their windows. So each wave costs two reloads, and the loop
never alternates models step by step.
"""
from __future__ import annotations

import atexit
import itertools
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from ... import _C   # first: its atexit hook (join every loop) then runs after ours (cancel every request)
from ..generation import GenerationResult
from ...model import autocast, dtype_bytes
from ...io.images import (BACK_CONDITION_INDEX, CONDITION_COUNT, check_conditions, load_conditions, load_frames, load_portrait,
                      quantize8, to_unit)
from ...sampler.ddim import ddim_tables
from ...sampler.fast import window_task
from ...sampler.noise import RecordedNoise, as_noise
from ...sampler.params import check_finite_latents, check_sampler_params
from ...sampler.plan import activation_bytes, weight_bytes
from ...sampler.tasks import BankCache, Task, step_tasks
from ...sampler.windows import Window, prepare_windows
from .host import RuntimeHost

BACKVIEW, NVS = 0, 1


class RequestCancelled(RuntimeError):
    """The request was cancelled; its views stop and its memory is freed."""


BACK_VIEW_INDEX = -1


@dataclass
class View:
    """One finished view: index in the orbit, camera ([25] PanoHead numbers), image
    [3, H, W] in [0, 1] (CPU), t_ready seconds after submit. The back view, streamed only when
    asked for (``back_view=True``), has index :data:`BACK_VIEW_INDEX` (-1) and the camera of the
    back-view hint (condition 18); it is not one of the orbit's views and not in ``result()``."""

    index: int
    camera: Tensor
    image: Tensor
    t_ready: float

    @property
    def is_back_view(self) -> bool:
        return self.index == BACK_VIEW_INDEX


@dataclass
class _Request:
    id: int
    portrait: Tensor
    conditions: Tensor
    features: Tensor | None
    steps: int
    noise: Any
    queue: Any
    t0: float
    cameras: Tensor | None = None      # [N, 25], set by submit
    stream_back_view: bool = False
    bv_task: Task | None = None
    window_tasks: dict[int, Task] = field(default_factory=dict)
    task_ids: dict[int, int] = field(default_factory=dict)     # native task id -> window (-1: back view)
    back_view: Tensor | None = None
    latents: dict[int, Tensor] = field(default_factory=dict)
    views_pushed: int = 0
    status: str = "queued"
    error: BaseException | None = None
    done_event: threading.Event = field(default_factory=threading.Event)
    timings: dict[str, float] = field(default_factory=dict)
    unet_calls: int = 0


class Handle:
    """A submitted request: iterate it for views as they finish, or call :meth:`result`."""

    def __init__(self, runtime: "Runtime", req: _Request):
        self._rt, self._req = runtime, req
        self._consumed: list[View] = []

    @property
    def id(self) -> int:
        return self._req.id

    @property
    def status(self) -> str:
        """queued, waiting (edge mode: for the running wave to finish), running, done, failed or cancelled."""
        return self._req.status

    @property
    def done(self) -> bool:
        return self._req.done_event.is_set()

    @property
    def progress(self) -> float:
        """Fraction of denoising steps taken (back view and all windows)."""
        r = self._req
        total = r.steps * (1 + r.conditions.shape[0] // self._rt.frames)
        taken = (r.bv_task.step if r.bv_task is not None else 0) + sum(t.step for t in r.window_tasks.values())
        if r.bv_task is None and r.back_view is not None:
            taken += r.steps
        return min(1.0, taken / total) if r.status != "done" else 1.0

    @property
    def stage(self) -> tuple[str, float]:
        """(stage, fraction of its steps taken): ``back_view``, then ``window k`` for the lowest
        window still denoising (windows may share steps), then ``decode`` for the last decodes."""
        r = self._req
        if r.back_view is None:
            t = r.bv_task
            return "back_view", (t.step / r.steps if t is not None else 0.0)
        live = sorted(r.window_tasks.items())
        if not live:
            return "decode", 1.0
        w, t = live[0]
        return f"window {w}", min(1.0, t.step / r.steps)

    def cancel(self) -> None:
        """Stop the request now: its tasks leave the loop, its queue closes, its memory is freed."""
        self._rt._cancel(self._req, RequestCancelled(f"request {self._req.id} was cancelled"))

    def __iter__(self) -> Iterator[View]:
        while True:
            item = self._req.queue.pop(0.1)
            if item is None:
                if self._req.queue.closed and len(self._req.queue) == 0:
                    break
                continue
            self._consumed.append(item)
            yield item
        if self._req.error is not None:
            raise self._req.error

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for every view; raises the request's error (or :class:`RequestCancelled`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            item = self._req.queue.pop(wait)
            if item is not None:
                self._consumed.append(item)
            elif self._req.queue.closed and len(self._req.queue) == 0:
                break
            elif deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {self._req.id} not finished after {timeout} s")
        if self._req.error is not None:
            raise self._req.error
        views = sorted((v for v in self._consumed if not v.is_back_view), key=lambda v: v.index)
        r = self._req
        return GenerationResult(back_view=to_unit(r.back_view[0]).cpu(), views=torch.stack([v.image for v in views]),
                                cameras=r.cameras,
                                latents=torch.cat([r.latents[w] for w in sorted(r.latents)]).cpu(),
                                timings=dict(r.timings), unet_calls=r.unet_calls)


class Runtime:
    """Serves generation requests on one pipeline through the native step loop.

    pipeline: a :class:`~dp360rt.engine.pipeline.Pipeline` (what is used of it: :class:`RuntimeHost`);
    policy: ``throughput`` or ``latency``; max_rows: latents per UNet call (default: the
    pipeline's plan, i.e. all windows on GPU, one window on CPU); queue_size: views buffered per
    request before the loop waits for the consumer. ``eta`` and ``cfg_scale`` are per runtime.
    """

    def __init__(self, pipeline: RuntimeHost, policy: str = "throughput", max_rows: int | None = None,
                 max_memory: int | None = None, queue_size: int = 32, eta: float = 0.5, cfg_scale: float = 3.0):
        from ...io.checks import max_memory_bytes
        max_memory = max_memory_bytes(max_memory)       # None and 0: no limit (the loop's 0)
        check_sampler_params(eta=eta, cfg_scale=cfg_scale)
        self.pipe = pipeline
        self.policy = policy
        self.frames = pipeline.nvs.frames
        self.eta, self.cfg_scale = eta, cfg_scale
        self.queue_size = queue_size
        plan = pipeline.plan
        self.max_rows = max_rows or (plan.windows_per_call * self.frames if plan else self.frames)
        self.batch_cfg = plan.batch_cfg if plan else True
        wbytes, abytes = dtype_bytes(pipeline.dtype), dtype_bytes(pipeline.compute_dtype)
        cfg = pipeline.nvs.cfg
        lat = cfg.latent_size
        fixed = (plan.weights_bytes if plan and plan.weights_bytes else
                 weight_bytes(cfg, wbytes) + weight_bytes(pipeline.backview.cfg, wbytes))
        self._edge = pipeline.swap is not None
        self._waiting: list[Any] = []          # edge mode: admissions of requests waiting for the next wave
        self._admit_lock = threading.Lock()
        per_row = activation_bytes(cfg, 2 if self.batch_cfg else 1, lat, lat, abytes, fused_attention=True)
        self._backends = {BACKVIEW: pipeline.net(pipeline.backview), NVS: pipeline.net(pipeline.nvs)}
        self._caches = {BACKVIEW: BankCache(), NVS: BankCache()}
        self._requests: dict[int, _Request] = {}
        self._tasks: dict[int, tuple[_Request, int]] = {}
        self._ids = itertools.count()
        # The loop gets weak callbacks: a strong pair would make runtime <-> loop a cycle the garbage
        # collector cannot see through (the loop is native), so a dropped pipeline would never stop.
        this = weakref.ref(self)

        def run_batch(ids: list[int]) -> tuple[list[int], list[int]]:
            rt = this()
            return rt._run_batch(ids) if rt is not None else ([], [])

        def on_done(tid: int) -> None:
            rt = this()
            if rt is not None:
                rt._on_done(tid)

        self._loop = _C.StepLoop(policy, self.max_rows, int(max_memory or 0), fixed if max_memory else 0,
                                 run_batch, on_done)
        self._per_row = per_row
        self._loop.start()
        _LIVE.add(self)

    # -- public ------------------------------------------------------------------------------
    def submit(self, portrait: Any, conditions: Any, *, steps: int = 50, seed: Any = 0,
               features: Tensor | None = None, cameras: Any = None, back_view: bool = False) -> Handle:
        """Queue one portrait; returns at once with a :class:`Handle` (inputs are validated here).
        ``back_view=True``: also stream the back view (index -1) the moment it is decoded."""
        check_sampler_params(steps=steps, seed=seed, conditions=conditions)
        s = self.pipe.image_size
        img = load_portrait(portrait, s)
        cond = conditions if isinstance(conditions, Tensor) else load_conditions(conditions, s)
        if isinstance(features, (str, Path)):
            features = load_frames(features, s, cond.shape[0] if cond.dim() == 4 else CONDITION_COUNT)
        check_conditions(cond, s, self.frames, features)      # here, not after the back view
        from ...nerf.cameras import resolve_cameras
        cameras = resolve_cameras(cameras, cond.shape[0], conditions)
        ddim_tables(self.pipe.nvs.alphas_cumprod, steps, self.eta)          # validates the step count
        rid = next(self._ids)
        req = _Request(rid, img, cond, features, steps, as_noise(seed), _C.ViewQueue(self.queue_size),
                       time.perf_counter(), cameras=cameras, stream_back_view=back_view)
        self._requests[rid] = req
        bv_id = next(self._ids)
        req.task_ids[bv_id] = -1
        self._tasks[bv_id] = (req, -1)
        wins = []
        for w in range(cond.shape[0] // self.frames):
            tid = next(self._ids)
            req.task_ids[tid] = w
            self._tasks[tid] = (req, w)
            wins.append((tid, w))
        def admit() -> None:
            self._loop.add_task(bv_id, rid, -1, BACKVIEW, 1, steps, self._per_row, [])
            for tid, w in wins:
                self._loop.add_task(tid, rid, w, NVS, self.frames, steps, self._per_row, [bv_id])

        with self._admit_lock:
            running = [r for r in self._requests.values() if r is not req and r.status != "waiting"]
            if self._edge and (running or self._waiting):
                req.status = "waiting"
                self._waiting.append((req, admit))
                return Handle(self, req)
        admit()
        return Handle(self, req)

    def stream(self, portrait: Any, conditions: Any, **kw: Any) -> Iterator[View]:
        """Submit and yield views as they finish (cancels the request if the caller stops early)."""
        h = self.submit(portrait, conditions, **kw)
        try:
            yield from h
        finally:
            if not h.done:
                h.cancel()

    def wait_idle(self, timeout: float = -1) -> bool:
        return self._loop.wait_idle(timeout)

    @property
    def stats(self):
        return self._loop.stats

    def shutdown(self) -> None:
        """Cancel what is left and join the loop thread."""
        for req in list(self._requests.values()):
            self._cancel(req, RequestCancelled("runtime shut down"))
        self._loop.shutdown()
        _LIVE.discard(self)

    def __del__(self) -> None:
        # Garbage-collected without shutdown(): unblock a loop waiting on a full view queue; the
        # native loop's destructor then stops and joins its thread.
        try:
            for req in list(self._requests.values()):
                req.queue.close()
        except Exception:  # noqa: BLE001 - half-built runtime or interpreter teardown
            pass

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- the loop's callbacks (loop thread, GIL held) -----------------------------------------
    def _task(self, req: _Request, window: int) -> Task:
        if window < 0:
            if req.bv_task is None:
                self._start_backview(req)
            return req.bv_task
        return req.window_tasks[window]

    def _autocast(self):
        return autocast(self.pipe.device, self.pipe.compute_dtype)

    @torch.no_grad()
    def _start_backview(self, req: _Request) -> None:
        """The reference's first draws: portrait posterior, then the back view's start and step noises."""
        req.status = "running"
        bv, dev, s = self.pipe.use(self.pipe.backview), self.pipe.device, self.pipe.image_size
        with self._autocast():
            mean, logvar = self.pipe.net(bv).encode_image(req.portrait.to(dev))
            ref = bv.sample_latent(mean, logvar, req.noise(mean.shape, dev))
            shape = (1, bv.cfg.unet.in_channels, s // 8, s // 8)
            win = Window(0, req.conditions[BACK_CONDITION_INDEX:BACK_CONDITION_INDEX + 1].to(dev), None,
                         RecordedNoise([req.noise(shape, dev) for _ in range(req.steps + 1)]))
            tables = ddim_tables(bv.alphas_cumprod, req.steps, self.eta)
            req.bv_task = window_task(bv, win, (req.id, BACKVIEW), [ref], self.pipe.text_context(bv), tables)

    @torch.no_grad()
    def _start_windows(self, req: _Request) -> None:
        m, dev = self.pipe.nvs, self.pipe.device
        with self._autocast():
            bv = self.pipe.use(self.pipe.backview)
            check_finite_latents(req.bv_task.x, "the back view")
            back = quantize8(self.pipe.net(bv).decode_latent(req.bv_task.x).float())
            req.back_view = back.cpu()
            if req.stream_back_view:
                req.queue.push(View(BACK_VIEW_INDEX, req.cameras[BACK_CONDITION_INDEX], to_unit(req.back_view[0]),
                                    time.perf_counter() - req.t0))
            self.pipe.use(m)
            ctx = self.pipe.text_context(m)
            mean, logvar = self.pipe.net(m).encode_image(req.portrait.to(dev))
            ref_front = m.sample_latent(mean, logvar, req.noise(mean.shape, dev))
            mean, logvar = self.pipe.net(m).encode_image(back.to(dev))
            ref_back = m.sample_latent(mean, logvar, req.noise(mean.shape, dev))
            feats = req.features.to(dev) if req.features is not None else None
            windows = prepare_windows(m, req.conditions.to(dev), feats, req.steps, req.noise)
            tables = ddim_tables(m.alphas_cumprod, req.steps, self.eta)
            for w in windows:
                req.window_tasks[w.index] = window_task(m, w, (req.id, NVS), [ref_front, ref_back], ctx, tables)
        req.bv_task = None   # its latent is no longer needed
        req.timings["back_view"] = time.perf_counter() - req.t0

    def _run_batch(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """One step of the planned tasks -> (finished task ids, failed request ids). A failure in a
        batch shared by several requests is isolated by retrying request by request (a failed
        step changes no task, see :func:`~dp360rt.sampler.tasks.step_tasks`)."""
        entries = [(tid, *self._tasks[tid]) for tid in ids if tid in self._tasks]
        by_request: dict[int, list] = {}
        for e in entries:
            by_request.setdefault(e[1].id, []).append(e)
        try:
            return self._step(entries), []
        except Exception as e:  # noqa: BLE001 - the request gets the original exception
            if len(by_request) == 1:
                self._cancel(entries[0][1], e)
                return [], [entries[0][1].id]
        finished, failed = [], []
        for group in by_request.values():
            try:
                finished += self._step(group)
            except Exception as e:  # noqa: BLE001
                failed.append(group[0][1].id)
                self._cancel(group[0][1], e)
        return finished, failed

    def _step(self, group: list) -> list[int]:
        model = BACKVIEW if group[0][2] < 0 else NVS
        self.pipe.use(self.pipe.backview if model == BACKVIEW else self.pipe.nvs)
        tasks = [self._task(req, w) for _, req, w in group]
        with torch.no_grad(), self._autocast():
            calls = step_tasks(self._backends[model], tasks, self.cfg_scale, self.batch_cfg, self._caches[model])
        for _, req, _ in group:
            req.unet_calls += calls
        cache = self._caches[model]
        for req in {id(r): r for _, r, _ in group}.values():
            live = [t for t in ([req.bv_task] if model == BACKVIEW else req.window_tasks.values())
                    if t is not None and not t.done]
            cache.drop((req.id, model), max(t.timestep for t in live) if live else None)
        return [tid for (tid, _, _), t in zip(group, tasks) if t.done]

    def _on_done(self, tid: int) -> None:
        if tid not in self._tasks:
            return
        req, w = self._tasks.pop(tid)
        try:
            if w < 0:
                self._start_windows(req)
                return
            self._finish_window(req, w)
        except Exception as e:  # noqa: BLE001
            self._cancel(req, e)

    @torch.no_grad()
    def _finish_window(self, req: _Request, w: int) -> None:
        task = req.window_tasks.pop(w)
        m = self.pipe.use(self.pipe.nvs)
        check_finite_latents(task.x, f"window {w} (views {w * self.frames}-{(w + 1) * self.frames - 1})")
        req.latents[w] = task.x.cpu()
        # Latency: the window's first frame is decoded (and streamed) before the other seven.
        parts = [slice(0, 1), slice(1, None)] if self.policy == "latency" else [slice(None)]
        for part in parts:
            with self._autocast():
                images = to_unit(self.pipe.decode(m, task.x[part]).float()).cpu()
            for j, img in zip(range(self.frames)[part], images):
                idx = w * self.frames + j
                if not req.queue.push(View(idx, req.cameras[idx], img, time.perf_counter() - req.t0)):
                    return                              # cancelled while waiting
                req.views_pushed += 1
        if not req.window_tasks and len(req.latents) == req.conditions.shape[0] // self.frames:
            req.timings["total"] = time.perf_counter() - req.t0
            req.status = "done"
            self._release(req)
            req.queue.close()
            req.done_event.set()

    def _cancel(self, req: _Request, error: BaseException) -> None:
        if req.done_event.is_set():
            return
        req.status = "cancelled" if isinstance(error, RequestCancelled) else "failed"
        req.error = error
        self._loop.cancel(req.id)
        self._release(req)
        req.queue.close()
        req.done_event.set()

    def _release(self, req: _Request) -> None:
        for tid in list(req.task_ids):
            self._tasks.pop(tid, None)
        self._requests.pop(req.id, None)
        for model, cache in self._caches.items():
            cache.drop((req.id, model))
        req.bv_task = None
        req.window_tasks.clear()
        req.portrait = req.conditions = req.features = None  # type: ignore[assignment]
        self._admit_next_wave(req)

    def _admit_next_wave(self, gone: _Request) -> None:
        """Edge mode: once no admitted request is left, start every waiting one together."""
        with self._admit_lock:
            self._waiting = [(r, a) for r, a in self._waiting if r is not gone]
            admitted = [r for r in self._requests.values() if r.status != "waiting"]
            if admitted or not self._waiting:
                return
            wave, self._waiting = self._waiting, []
        for req, admit in wave:
            req.status = "queued"
            admit()


# Runtimes not shut down yet. At interpreter exit each is shut down (requests cancelled, queues
# closed, loop joined) before the interpreter finalizes: a loop thread still running then would
# ask a finalizing interpreter for the GIL and abort the process.
_LIVE: "weakref.WeakSet[Runtime]" = weakref.WeakSet()


@atexit.register
def _shutdown_live_runtimes() -> None:
    for rt in list(_LIVE):
        try:
            rt.shutdown()
        except Exception:  # noqa: BLE001 - exit must go on
            pass
