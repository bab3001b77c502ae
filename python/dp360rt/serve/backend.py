"""Where generations run: one :class:`~dp360rt.engine.pipeline.Pipeline` in this process.

The service core talks to a backend through two calls, the same for every deployment: ``start``
returns a :class:`Job`, whose ``next()`` gives plain, picklable event dicts and whose ``cancel()``
stops the work. :class:`LocalBackend` runs the pipeline here (``dp360rt serve``, and inside each
Ray replica); :mod:`.ray_app` forwards the same events through Ray Serve's streaming handles, and
a Triton Python backend could wrap :class:`LocalBackend` the same way.

``start(portrait, options)`` takes the upload's bytes and a plain dict of
:data:`DEFAULT_OPTIONS`' keys (steps, seed, crop ``none|auto``, noise ``random|3d``, orbit: a
name the server was started with). Events, in order: ``{"type": "start", "replica": "NAME/PID"}``
or ``{"type": "rejected", "status", "message", "fix"}`` (bad input, nothing started); then any
number of ``{"type": "progress", "progress": 0..1, "status": "queued"|"running", "stage":
"crop"|"invert"|"back_view"|"window k"|"decode", "fraction": 0..1}`` (at least every
``heartbeat`` seconds), ``{"type": "files", "files": {"crop/crop.png": bytes, ...}}`` (the crop
and the inversion, once they exist) and ``{"type": "view", "index", "camera": [25 floats],
"image": uint8 [H, W, 3]}`` (back view, index -1, first); finally one of ``{"type": "done",
"timings"}``, ``{"type": "failed", "message"}``, ``{"type": "cancelled"}``; then ``next()``
returns None.
"""
from __future__ import annotations

import asyncio
import importlib.util
import io
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, UnidentifiedImageError

from ..io.images import MAX_PIXELS, ImageError, to_uint8

log = logging.getLogger("dp360rt.serve")

DEFAULT_OPTIONS = {"steps": 50, "seed": 0, "crop": "none", "noise": "random", "orbit": "default"}
CHOICES = {"crop": ("none", "auto"), "noise": ("random", "3d")}


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
    try:
        with warnings.catch_warnings():            # Pillow's own limit only warns below twice it; ours refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))     # the header only: the size is checked before decoding
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


class _Cancelled(Exception):
    """Raised inside the preparation stages when the client went away."""


class LocalJob:
    """One generation on the local pipeline. A thread runs the preparation stages (crop, PanoHead
    inversion) and then drains the runtime's handle into an asyncio queue, so the event loop never
    blocks on the models."""

    def __init__(self, backend: "LocalBackend", image: Image.Image, options: dict[str, Any]):
        self._backend, self._options = backend, options
        self._heartbeat = backend.heartbeat
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._queue.put_nowait({"type": "start", "replica": backend.replica})
        self._ended = self._cancelled = False
        self._handle: Any = None
        self._progress = 0.0
        self._stage = ("crop", 0.0) if options["crop"] == "auto" else \
            ("invert", 0.0) if options["noise"] == "3d" else ("back_view", 0.0)
        self._thread = threading.Thread(target=self._run, args=(image,), name="dp360rt-serve-job", daemon=True)
        self._thread.start()

    def _put(self, ev: dict[str, Any] | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)
        except RuntimeError:        # the event loop is gone (server shutting down)
            self.cancel()

    def _on_stage(self, name: str, i: int, n: int) -> None:
        """The preparation's progress callback: stage and fraction; stops the work of a cancelled job."""
        if self._cancelled:
            raise _Cancelled()
        if name == "crop":
            self._stage = ("crop", 1.0)
            return
        inv = self._backend.pipe.inverter
        w, pti = getattr(inv, "w_steps", 0), getattr(inv, "pti_steps", 0)
        done = i if "W projection" in name else w + i if "pivotal" in name else w + pti + 32 * i / max(n, 1)
        self._stage = ("invert", min(1.0, done / max(1, w + pti + 32)))

    def _run(self, image: Image.Image) -> None:
        from ..engine.runtime import RequestCancelled
        b, o = self._backend, self._options
        timings: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            prepared = b.pipe.prepare(image, crop=o["crop"], noise3d=o["noise"] == "3d", progress=self._on_stage)
            if self._cancelled:
                raise _Cancelled()
            if prepared.crop is not None or prepared.inversion is not None:
                timings["prepare"] = time.perf_counter() - t0
                self._put({"type": "files", "files": _extras(prepared)})
            self._stage = ("back_view", 0.0)
            cond, cams = b.orbits[o["orbit"]]
            self._handle = b.pipe.submit(prepared, cond, policy=b.policy, steps=o["steps"], seed=o["seed"],
                                         cameras=cams, back_view=True)
            if self._cancelled:
                self._handle.cancel()
            frames = b.pipe.nvs.frames
            for v in self._handle:
                # every stage is named at least once, however short: the one this view ends
                self._put({**self._progress_event(), "stage": "back_view" if v.index < 0 else f"window {v.index // frames}",
                           "fraction": 1.0})
                image = to_uint8(v.image).permute(1, 2, 0).contiguous().numpy()
                self._put({"type": "view", "index": int(v.index), "camera": [float(x) for x in v.camera],
                           "image": image})
            self._put({"type": "done", "timings": {**timings, **self._handle.result(timeout=30).timings}})
        except (RequestCancelled, _Cancelled):
            self._put({"type": "cancelled"})
        except ImageError as e:          # the crop's named errors (no face, face too small, ...) say their fix
            log.info("generation refused: %s", e)
            self._put({"type": "failed", "message": str(e)})
        except Exception:  # noqa: BLE001 - logged here, the client gets no traceback
            log.exception("generation failed")
            self._put({"type": "failed", "message": "the generation failed with a server error (logged)"})
        finally:
            self._put(None)

    def _progress_event(self) -> dict[str, Any]:
        h = self._handle
        status = "running"
        if h is not None:
            try:       # read while the loop thread updates the request: a torn read keeps the last value
                self._progress = float(h.progress)
                self._stage = h.stage
            except Exception:  # noqa: BLE001
                pass
            status = "queued" if h.status == "queued" else "running"
        return {"type": "progress", "progress": round(self._progress, 4), "status": status,
                "stage": self._stage[0], "fraction": round(self._stage[1], 4)}

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
        self._cancelled = True
        h = self._handle
        if h is not None and not h.done:
            h.cancel()


def _extras(prepared: Any) -> dict[str, bytes]:
    """The crop's and the inversion's files, as ``generate`` saves them: relative path -> bytes."""
    with tempfile.TemporaryDirectory(prefix="dp360rt-extras-") as tmp:
        prepared.save_extras(tmp)
        root = Path(tmp)
        return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


class LocalBackend:
    """Generations on one pipeline in this process, batched by its C++ step loop.

    ``pipeline``: a :class:`~dp360rt.engine.pipeline.Pipeline` or a function building one (called by
    :meth:`load`, e.g. in a thread while the server already answers ``/healthz``);
    ``conditions``: the sphere32 folder or a tensor [32, 3, S, S] (default: synthetic conditions,
    for random weights): the orbit named ``default``; ``orbits``: more named condition folders a
    request may choose (``orbit=NAME``); ``policy``: the runtime's ``latency`` (default) or
    ``throughput``."""

    def __init__(self, pipeline: Any, conditions: str | Path | Any = None, policy: str = "latency",
                 replica: str | None = None, heartbeat: float = 0.5, orbits: dict[str, str | Path] | None = None):
        self._make = pipeline if callable(pipeline) and not hasattr(pipeline, "submit") else (lambda: pipeline)
        self._sources: dict[str, Any] = {"default": conditions, **(orbits or {})}
        self.policy = policy
        self.replica = f"{replica or 'local'}/{os.getpid()}"
        self.heartbeat = heartbeat
        self.pipe: Any = None
        self.error: str | None = None
        self.loading: dict[str, Any] = {"stage": "not started", "step": 0, "steps": 3, "since": time.monotonic()}
        self.orbits: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def _stage(self, step: int, stage: str) -> None:
        self.loading = {**self.loading, "stage": stage, "step": step}

    def load(self) -> None:
        """Build the pipeline and read the orbits' conditions once (blocking; idempotent)."""
        with self._lock:
            if self.pipe is not None:
                return
            try:
                t0 = time.monotonic()
                self.loading = {"stage": "loading the models", "step": 0, "steps": 3, "since": t0}
                pipe = self._make()
                self._stage(1, "reading the condition images")
                from ..io.images import load_conditions
                from ..nerf.cameras import resolve_cameras
                orbits = {}
                for name, src in self._sources.items():
                    if src is None:
                        from ..io.images import synthetic_conditions
                        cond = synthetic_conditions(32, pipe.image_size)
                    else:
                        cond = src if not isinstance(src, (str, Path)) else load_conditions(src, pipe.image_size)
                    orbits[name] = (cond, resolve_cameras(None, cond.shape[0], src if isinstance(src, (str, Path)) else None))
                self._stage(2, "checking the step counts")
                T = self.train_steps = pipe.nvs.alphas_cumprod.numel()
                self.valid_steps = [n for n in range(1, T + 1) if len(range(0, T, T // n)) == n
                                    and (n - 1) * (T // n) + 1 < T]      # what ddim_tables accepts
                self.orbits = orbits
                self.loading = {**self.loading, "stage": "ready", "step": 3, "seconds": round(time.monotonic() - t0, 2)}
                log.info("models loaded in %.1f s", time.monotonic() - t0)      # before /readyz says so
                self.pipe = pipe
            except Exception as e:
                self.error = str(e)
                raise

    @property
    def ready(self) -> bool:
        return self.pipe is not None

    def capabilities(self) -> dict[str, Any]:
        """What a request may ask of this backend (for /readyz and the errors)."""
        return {"orbits": sorted(self.orbits), "noise": ["random", "3d"] if self.pipe.inverter is not None else ["random"],
                "crop": ["none", "auto"] if importlib.util.find_spec("dlib") is not None else ["none"]}

    def check(self, options: dict[str, Any]) -> tuple[int, str, str] | None:
        """(status, message, fix) when this backend cannot run ``options``, else None."""
        steps = options["steps"]
        if steps not in self.valid_steps:
            good = [n for n in self.valid_steps if n <= 100]
            return (400, f"steps={steps} is out of range: the DDIM schedule over {self.train_steps} training steps "
                    "cannot take it", f"use one of {good} (or more, up to {self.valid_steps[-1]})")
        if options["orbit"] not in self.orbits:
            return (400, f"orbit={options['orbit']!r} is not an orbit of this server",
                    f"use one of {sorted(self.orbits)} (the server's --conditions is 'default'; more with --orbit NAME=DIR)")
        if options["noise"] == "3d" and self.pipe.inverter is None:
            return (400, "noise=3d needs the PanoHead inversion, which this server was started without",
                    "start the server with --panohead FILE --vgg FILE (or --random CONFIG --3d-noise), or send noise=random")
        if options["crop"] == "auto" and importlib.util.find_spec("dlib") is None:
            return (400, "crop=auto needs the face detector (dlib), which this server does not have",
                    "install it on the server (pip install 'dp360rt[crop]'), or send an already cropped portrait with crop=none")
        return None

    def start(self, portrait: bytes, options: dict[str, Any]) -> Job:
        """Submit one generation (must run on the event loop that will read the job)."""
        options = {**DEFAULT_OPTIONS, **options}
        refused = self.check(options)
        if refused is not None:
            return _Rejected(*refused)
        try:
            img = decode_portrait(portrait)
        except BadInput as e:
            return _Rejected(e.status, e.message, e.fix)
        return LocalJob(self, img, options)

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
