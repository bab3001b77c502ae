"""Where generations run: one :class:`~dp360rt.pipeline.Pipeline` in this process.

The service core talks to a backend through two calls, the same for every deployment: ``start``
returns a :class:`Job`, whose ``next()`` gives plain, picklable event dicts and whose ``cancel()``
stops the work. :class:`LocalBackend` runs the pipeline here (``dp360rt serve``, and inside each
Ray replica); :mod:`.ray_app` forwards the same events through Ray Serve's streaming handles, and
a Triton Python backend could wrap :class:`LocalBackend` the same way.

Events, in order: ``{"type": "start", "replica": "NAME/PID"}`` or ``{"type": "rejected", "status",
"message", "fix"}`` (bad input, nothing started); then any number of ``{"type": "progress",
"progress": 0..1, "status": "queued"|"running"}`` (at least every ``heartbeat`` seconds) and
``{"type": "view", "index", "camera": [25 floats], "image": uint8 [H, W, 3]}`` (back view, index
-1, first); finally one of ``{"type": "done", "timings"}``, ``{"type": "failed", "message"}``,
``{"type": "cancelled"}``; then ``next()`` returns None.
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, UnidentifiedImageError

from ..images import MAX_PIXELS, to_uint8

log = logging.getLogger("dp360rt.serve")


class Job(Protocol):
    async def next(self) -> dict[str, Any] | None: ...

    def cancel(self) -> None: ...


class BadInput(ValueError):
    """Input the service refuses; ``status`` is the HTTP code (400, 413)."""

    def __init__(self, message: str, fix: str, status: int = 400):
        super().__init__(f"{message}. Fix: {fix}")
        self.message, self.fix, self.status = message, fix, status


def decode_portrait(data: bytes) -> Image.Image:
    """Uploaded bytes -> a decoded PIL image, or :class:`BadInput` saying what is wrong."""
    if not data:
        raise BadInput("the portrait file is empty (0 bytes)", "upload a PNG or JPEG image")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        img = Image.open(io.BytesIO(data))         # the header only: the size is checked before decoding
        if img.width * img.height > MAX_PIXELS:    # Pillow itself only warns up to twice its limit
            raise BadInput(f"the portrait is {img.width}x{img.height}, more than {MAX_PIXELS // 1_000_000} MP",
                           "downscale it", status=413)
        img.load()
    except BadInput:
        raise
    except UnidentifiedImageError:
        raise BadInput("the portrait is not an image Pillow can read", "upload a PNG or JPEG file") from None
    except Image.DecompressionBombError:
        raise BadInput(f"the portrait has more than {MAX_PIXELS} pixels", "downscale it", status=413) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"the portrait could not be decoded ({e}); it may be truncated",
                       "upload the complete PNG or JPEG file") from None
    if img.width < 1 or img.height < 1:
        raise BadInput("the portrait has 0 pixels", "upload a real image")
    return img


class _Rejected:
    """A job refused before it started: one ``rejected`` event."""

    def __init__(self, status: int, message: str, fix: str):
        self._event: dict[str, Any] | None = {"type": "rejected", "status": status, "message": message, "fix": fix}

    async def next(self) -> dict[str, Any] | None:
        ev, self._event = self._event, None
        return ev

    def cancel(self) -> None:
        pass


class LocalJob:
    """One generation on the local pipeline: a thread drains the runtime's handle into an asyncio
    queue, so the event loop never blocks on the step loop."""

    def __init__(self, handle: Any, replica: str, heartbeat: float):
        self._handle = handle
        self._heartbeat = heartbeat
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._queue.put_nowait({"type": "start", "replica": replica})
        self._ended = False
        self._progress = 0.0
        threading.Thread(target=self._pump, name=f"dp360rt-serve-job-{handle.id}", daemon=True).start()

    def _put(self, ev: dict[str, Any] | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)
        except RuntimeError:        # the event loop is gone (server shutting down)
            self._handle.cancel()

    def _pump(self) -> None:
        from ..runtime import RequestCancelled
        try:
            for v in self._handle:
                image = to_uint8(v.image).permute(1, 2, 0).contiguous().numpy()
                self._put({"type": "view", "index": int(v.index), "camera": [float(x) for x in v.camera],
                           "image": image})
            self._put({"type": "done", "timings": dict(self._handle.result(timeout=30).timings)})
        except RequestCancelled:
            self._put({"type": "cancelled"})
        except Exception:  # noqa: BLE001 - logged here, the client gets no traceback
            log.exception("generation %s failed", self._handle.id)
            self._put({"type": "failed", "message": "the generation failed with a server error (logged)"})
        finally:
            self._put(None)

    def _progress_event(self) -> dict[str, Any]:
        try:       # read while the loop thread updates the request: a torn read keeps the last value
            self._progress = float(self._handle.progress)
        except Exception:  # noqa: BLE001
            pass
        status = self._handle.status
        return {"type": "progress", "progress": round(self._progress, 4),
                "status": "queued" if status == "queued" else "running"}

    async def next(self) -> dict[str, Any] | None:
        if self._ended:
            return None
        try:
            ev = await asyncio.wait_for(self._queue.get(), self._heartbeat)
        except asyncio.TimeoutError:
            return self._progress_event()
        if ev is None:
            self._ended = True
        return ev

    def cancel(self) -> None:
        if not self._handle.done:
            self._handle.cancel()


class LocalBackend:
    """Generations on one pipeline in this process, batched by its C++ step loop.

    ``pipeline``: a :class:`~dp360rt.pipeline.Pipeline` or a function building one (called by
    :meth:`load`, e.g. in a thread while the server already answers ``/healthz``);
    ``conditions``: the sphere32 folder or a tensor [32, 3, S, S] (default: synthetic conditions,
    for random weights); ``policy``: the runtime's ``latency`` (default) or ``throughput``."""

    def __init__(self, pipeline: Any, conditions: str | Path | Any = None, policy: str = "latency",
                 replica: str | None = None, heartbeat: float = 0.5):
        self._make = pipeline if callable(pipeline) and not hasattr(pipeline, "submit") else (lambda: pipeline)
        self._conditions_src = conditions
        self.policy = policy
        self.replica = f"{replica or 'local'}/{os.getpid()}"
        self.heartbeat = heartbeat
        self.pipe: Any = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Build the pipeline and read the conditions once (blocking; idempotent)."""
        with self._lock:
            if self.pipe is not None:
                return
            try:
                pipe = self._make()
                from ..images import load_conditions
                from ..nerf.cameras import resolve_cameras
                src = self._conditions_src
                if src is None:
                    from ..demo import synthetic_conditions
                    cond = synthetic_conditions(32, pipe.image_size)
                else:
                    cond = src if not isinstance(src, (str, Path)) else load_conditions(src, pipe.image_size)
                T = self.train_steps = pipe.nvs.alphas_cumprod.numel()
                self.valid_steps = [n for n in range(1, T + 1) if len(range(0, T, T // n)) == n
                                    and (n - 1) * (T // n) + 1 < T]      # what ddim_tables accepts
                self.cameras = resolve_cameras(None, cond.shape[0], src if isinstance(src, (str, Path)) else None)
                self.conditions = cond
                self.pipe = pipe
            except Exception as e:
                self.error = str(e)
                raise

    @property
    def ready(self) -> bool:
        return self.pipe is not None

    def start(self, portrait: bytes, steps: int, seed: int) -> Job:
        """Submit one generation (must run on the event loop that will read the job)."""
        if steps not in self.valid_steps:
            good = [n for n in self.valid_steps if n <= 100]
            return _Rejected(400, f"steps={steps} is out of range: the DDIM schedule over {self.train_steps} "
                             "training steps cannot take it", f"use one of {good} (or more, up to {self.valid_steps[-1]})")
        try:
            img = decode_portrait(portrait)
            handle = self.pipe.submit(img, self.conditions, policy=self.policy, steps=steps, seed=seed,
                                      cameras=self.cameras, back_view=True)
        except BadInput as e:
            return _Rejected(e.status, e.message, e.fix)
        except ValueError as e:        # the runtime's own input checks (steps, ...): "... Fix: ..."
            from .errors import split_fix
            msg, fix = split_fix(str(e), "change the request")
            return _Rejected(400, msg, fix)
        return LocalJob(handle, self.replica, self.heartbeat)

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
