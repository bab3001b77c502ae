"""NeRF sessions: one instant NeRF per generation, fitted in the background while its views arrive.

:class:`NerfSessions` is the service's generation listener (``on_start`` / ``on_view`` /
``on_end``, see ``dp360rt.serve.events``) and the viewer's store of fitted fields. The listener
methods only record the view and wake the worker: one background thread trains every session that
has work, in chunks of ``chunk_seconds``, round robin. After each chunk it publishes a frozen copy
of the field (:meth:`dp360rt.nerf.Nerf.snapshot`) that renders read without any lock, so a render
never waits for a training step and a training step never waits for a render.

A session's ``mode`` says when it fits (the request's ``nerf`` field): ``always`` from the first
view, ``on_view`` only once the page or a download asks for it (:meth:`NerfSessions.activate`;
until then a view is kept as a way to read its PNG from the result store, not as pixels), ``none``
never. A finished generation the sessions no longer hold (evicted, or stored by an earlier
server) is opened again from the store's folder (:meth:`NerfSessions.open`).

States (``status()["state"]``): ``idle`` (``on_view``: nobody asked yet), ``off`` (``none``),
``waiting`` (no view yet), ``fitting`` (training; ``renderable`` once the first snapshot exists),
``ready`` (budget used and the generation ended: the final field), ``failed`` (the generation
failed or was cancelled, or fitting raised; ``error`` says why).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..nerf import Nerf
from ..nerf.cameras import sphere32_cameras
from .frames import FrameRequest

BACK_VIEW_INDEX = -1
DEFAULT_SECONDS = 30.0         # NeRF training time per generation when no budget is given
BACK_VIEW_HINT = 18            # the back view is generated at the camera of condition image 18
NERF_MODES = ("none", "on_view", "always")


@dataclass
class ViewRecord:
    """One view of a generation: orbit index (-1: back view), 25-number camera, and either the
    image uint8 [H, W, 3] or ``path``, a function giving its stored PNG's path (read when needed)."""
    index: int
    camera: list[float]
    image: np.ndarray | None = None
    path: Callable[[], Path | None] | None = None

    @property
    def name(self) -> str:
        return "back_view" if self.index == BACK_VIEW_INDEX else f"{self.index:03d}"

    def pixels(self) -> np.ndarray:
        """The image uint8 [H, W, 3] (read from the store when only its path is kept)."""
        if self.image is not None:
            return self.image
        p = self.path() if self.path is not None else None
        if p is None:
            raise LookupError(f"view {self.name} is no longer in the result store (evicted or deleted). Fix: "
                              "generate again (the store keeps the newest generations up to --store-max-gb)")
        from .frames import read_png
        return read_png(p)

    def angles(self) -> tuple[float, float]:
        """(azimuth, elevation) in degrees of the camera position (azimuth 0 = front, +90 = +x)."""
        x, y, z = self.camera[3], self.camera[7], self.camera[11]
        r = max(math.sqrt(x * x + y * y + z * z), 1e-9)
        return math.degrees(math.atan2(x, z)) % 360.0, math.degrees(math.asin(max(-1.0, min(1.0, y / r))))


def to_uint8_image(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] from a uint8 array, a float array/tensor in [0, 1] ([H, W, 3] or [3, H, W])."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim != 3:
        raise ValueError(f"a view image must be [H, W, 3] or [3, H, W], got shape {a.shape}. Fix: pass one RGB image")
    if a.shape[-1] != 3 and a.shape[0] == 3:
        a = np.transpose(a, (1, 2, 0))
    if a.shape[-1] != 3:
        raise ValueError(f"a view image must have 3 colour channels, got shape {a.shape}. Fix: pass RGB images")
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a)


class NerfSession:
    """One generation's views, its fitter and the latest published snapshot (see the module doc)."""

    def __init__(self, gen_id: str, seconds: float | None, steps: int | None, nerf_options: dict[str, Any],
                 label: str | None = None, preloaded: bool = False, mode: str = "always",
                 export_options: dict[str, dict[str, Any]] | None = None):
        if mode not in NERF_MODES:
            raise ValueError(f"nerf={mode!r} is not a NeRF mode. Fix: use one of {', '.join(NERF_MODES)}")
        self.id = gen_id
        self.export_options = export_options or {}   # {"glb": {...}, "splat": {...}}: Nerf.export_* keywords
        self.mode = mode
        self.active = mode == "always"           # fitting may start (on_view: once someone asked)
        self.fit_times: dict[str, float] = {}    # monotonic clock: "started", "ready"
        self.label = label
        self.preloaded = preloaded
        self.seconds, self.steps = seconds, steps
        self.nerf_options = dict(nerf_options)
        self.views: dict[int, ViewRecord] = {}
        self.generation = "running"              # running | done | failed | cancelled
        self.state = "waiting" if self.active else "off" if mode == "none" else "idle"
        self.error: str | None = None
        self.created = time.monotonic()
        self.version = 0                         # bumped at every published snapshot
        self._pending: list[ViewRecord] = []
        self._lock = threading.Lock()
        self._nerf: Nerf | None = None
        self._fitter: Any = None
        self._snapshot: Nerf | None = None
        self._snapshot_stats: dict[str, Any] = {}
        self._trained_views = 0                  # views in the fitter when its budget last ran out

    # -- what the listener and the routes call (any thread) -------------------------------------------
    def add_view(self, index: int, camera: Sequence[float], image: Any = None,
                 path: Callable[[], Path | None] | None = None) -> None:
        """Record a view: its image, or (``path``) where its stored PNG is read from when needed."""
        cam = [float(x) for x in camera]
        if len(cam) != 25:
            raise ValueError(f"view {index} has a camera of {len(cam)} numbers, expected 25. Fix: pass the PanoHead camera")
        if image is None and path is None:
            raise ValueError(f"view {index} has neither an image nor a stored file. Fix: pass one")
        rec = ViewRecord(int(index), cam, to_uint8_image(image) if image is not None else None, path)
        with self._lock:
            self.views[rec.index] = rec
            if rec.index != BACK_VIEW_INDEX and self.active:   # the back view is another model's image: shown, not fitted
                self._pending.append(rec)

    def activate(self) -> bool:
        """Someone wants to look: start fitting (from the views so far) unless the mode is ``none``.
        Returns whether the session fits (now or already)."""
        with self._lock:
            if self.mode == "none":
                return False
            if not self.active and self.state != "failed":
                self.active = True
                self.fit_times["started"] = time.monotonic()
                self._pending = [r for i, r in sorted(self.views.items()) if i != BACK_VIEW_INDEX]
                self.state = "waiting"
            return True

    def end(self, status: str) -> None:
        with self._lock:
            self.generation = status
            if status in ("failed", "cancelled") and self.state not in ("ready", "off"):
                self.state = "failed"
                self.error = f"the generation was {status}, so its NeRF was not fitted"
                self._pending.clear()

    @property
    def snapshot(self) -> Nerf | None:
        """The latest published frozen field (None before the first training chunk)."""
        return self._snapshot

    def set_fitted(self, nerf: Nerf) -> None:
        """Adopt an already fitted field (``dp360rt view NERF_DIR``): ready at once."""
        with self._lock:
            self._snapshot = nerf
            self._snapshot_stats = dict(nerf.stats)
            self.generation = "done"
            self.state = "ready"
            self.mode, self.active = "always", True
            self.version += 1

    def view_list(self) -> list[dict[str, Any]]:
        with self._lock:
            recs = sorted(self.views.values(), key=lambda r: r.index)
        out = []
        for r in recs:
            az, el = r.angles()
            out.append({"index": r.index, "name": r.name, "url": f"/v1/generations/{self.id}/{r.name}.png",
                        "azimuth": round(az, 3), "elevation": round(el, 3)})
        return out

    def status(self) -> dict[str, Any]:
        """JSON status: state, views, steps, psnr (training PSNR in dB), renderable, error, ..."""
        st = self._snapshot_stats
        snap = self._snapshot
        with self._lock:
            n_views = len(self.views)
        fit = {"started": "started" in self.fit_times,
               "train_seconds": st.get("seconds", 0.0),
               "wall_seconds": (round(self.fit_times["ready"] - self.fit_times["started"], 3)
                                if {"ready", "started"} <= self.fit_times.keys() else None)}
        return {"id": self.id, "state": self.state, "nerf": self.mode, "fit": fit, "generation": self.generation,
                "views": n_views,
                "steps": st.get("steps", 0), "psnr": st.get("train_psnr"), "seconds": st.get("seconds", 0.0),
                "budget": {"seconds": self.seconds, "steps": self.steps}, "renderable": self._snapshot is not None,
                "version": self.version, "error": self.error, "label": self.label, "view_list": self.view_list(),
                "orbit": snap.camera_info if snap is not None else None}

    def progress(self) -> dict[str, Any]:
        """Steps, training PSNR and version of the latest snapshot (cheap: sent with every frame)."""
        st = self._snapshot_stats
        return {"step": st.get("steps", 0), "psnr": st.get("train_psnr"), "version": self.version}

    def render(self, req: FrameRequest) -> np.ndarray:
        """Render the latest snapshot for a frame request -> uint8 [height, width, 3]. Raises
        LookupError when nothing is renderable yet."""
        snap = self._snapshot
        if snap is None:
            raise LookupError(f"generation {self.id} has no fitted field yet (state {self.state}). "
                              "Fix: wait until nerf/status says renderable")
        cam = req.camera if req.camera is not None else req.orbit_camera(snap.camera_info or {})
        rgb = snap.render(cam, req.width, req.height)["rgb"]
        return (rgb.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)

    # -- what the worker thread calls ------------------------------------------------------------------
    def has_work(self) -> bool:
        if not self.active or self.state in ("ready", "failed"):
            return False
        if self._pending:
            return True
        f = self._fitter
        if f is None or f.num_views == 0:
            return False
        return not f.done or self.generation != "running"

    def work(self, chunk_seconds: float) -> None:
        """Add the arrived views, train one chunk, publish a snapshot; finish when due."""
        with self._lock:
            pending, self._pending = self._pending, []
        if self._fitter is None and pending:
            self.fit_times.setdefault("started", time.monotonic())
            self._nerf = Nerf(**self.nerf_options)
            self._fitter = self._nerf.fitter(seconds=self.seconds, steps=self.steps, progress=False)
        f = self._fitter
        for rec in pending:
            f.add_view(rec.pixels(), rec.camera)
        if f is None or f.num_views == 0:
            return
        if f.done and f.num_views > self._trained_views:
            self._extend_budget(f)              # views came after the budget ran out: train them in
        if not f.done:
            self.state = "fitting"
            before = f.step
            # the first call sets up (background, carving, thread probe) and may use up a short
            # chunk before any step: make it take one step whatever the clock says
            f.train(steps=1) if f.step == 0 else f.train(seconds=chunk_seconds)
            if f.step > before:
                self._publish(f)
        if f.done:
            self._trained_views = f.num_views
            if self.generation != "running" and self.state != "failed":
                self._publish(f)
                self.state = "ready"
                self.fit_times["ready"] = time.monotonic()
                # no view can come any more: free the training state (ray pool, optimizer), keep the snapshot
                self._fitter = self._nerf = None

    def _extend_budget(self, f: Any) -> None:
        if f.seconds is not None:
            f.seconds = f.elapsed + max(2.0, 0.1 * self.seconds)       # type: ignore[operator]
        if f.steps is not None:
            f.steps = f.step + max(20, self.steps // 10)                # type: ignore[operator]

    def _publish(self, f: Any) -> None:
        stats = f.stats()
        snap = self._nerf.snapshot()                                    # type: ignore[union-attr]
        self._snapshot_stats = stats
        self._snapshot = snap
        self.version += 1

    def fail(self, err: BaseException) -> None:
        self.state = "failed"
        self.error = f"fitting the NeRF failed: {type(err).__name__}: {err}"


class NerfSessions:
    """The viewer's NeRF store and the service's generation listener.

    ``seconds`` / ``steps``: the fitting budget per generation, whichever ends first (default
    ``DEFAULT_SECONDS`` of training; see :meth:`dp360rt.nerf.Nerf.fitter`);
    ``max_sessions``: how many generations are kept (the oldest finished ones are dropped first,
    preloaded ones never); ``nerf_options``: :class:`dp360rt.nerf.NerfConfig` overrides;
    ``chunk_seconds``: training time between two published snapshots; ``mode``: when a
    generation's NeRF is fitted if its request does not say (see the module doc); ``store``: the
    service's :class:`~dp360rt.serve.store.ResultStore`, where views are read from (``on_view``)
    and finished generations are opened again; ``export_options``: keywords of the ``head.glb`` /
    ``head.ply`` downloads (``{"glb": {"texture_size": 512}, "splat": {"steps": 100}}``)."""

    def __init__(self, seconds: float | None = None, steps: int | None = None, max_sessions: int = 16,
                 nerf_options: dict[str, Any] | None = None, chunk_seconds: float = 0.5, mode: str = "on_view",
                 store: Any = None, export_options: dict[str, dict[str, Any]] | None = None):
        if seconds is None and steps is None:
            seconds = DEFAULT_SECONDS
        if mode not in NERF_MODES:
            raise ValueError(f"nerf={mode!r} is not a NeRF mode. Fix: use one of {', '.join(NERF_MODES)}")
        self.mode, self.store = mode, store
        self.export_options = dict(export_options or {})
        self.seconds, self.steps = seconds, steps
        self.max_sessions = int(max_sessions)
        self.nerf_options = dict(nerf_options or {})
        self.chunk_seconds = float(chunk_seconds)
        self._sessions: dict[str, NerfSession] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nerf-sessions", daemon=True)
        self._thread.start()

    # -- GenerationListener ------------------------------------------------------------------------------
    def on_start(self, gen_id: str, options: dict[str, Any] | None = None) -> None:
        self._create(gen_id, mode=(options or {}).get("nerf", self.mode))

    def on_view(self, gen_id: str, index: int, camera: Sequence[float], image: Any) -> None:
        s = self._sessions.get(gen_id) or self._create(gen_id, mode=self.mode)
        if s.active or self.store is None:
            s.add_view(index, camera, image)
        else:               # kept as the store's file: nobody may ever look at it
            name = "back_view" if index == BACK_VIEW_INDEX else f"{index:03d}"
            s.add_view(index, camera, path=lambda: self.store.file(gen_id, name))
        self._wake()

    def on_delete(self, gen_id: str) -> None:
        with self._cond:
            self._sessions.pop(gen_id, None)

    def open(self, gen_id: str) -> NerfSession | None:
        """The session of ``gen_id``, or one opened from the store's complete folder (``on_view``,
        not fitting yet), or None."""
        s = self._sessions.get(gen_id)
        if s is not None or self.store is None:
            return s
        folder = self.store.folder(gen_id)
        if folder is None:
            return None
        import json
        try:
            views = json.loads((folder / "cameras.json").read_text())["views"]
        except (OSError, ValueError, KeyError):
            return None
        s = self._create(gen_id, mode="on_view")
        for v in views:
            name = Path(v["file"]).stem
            s.add_view(int(name), v["camera"], path=lambda n=name: self.store.file(gen_id, n))
        if self.store.file(gen_id, "back_view") is not None:
            s.add_view(BACK_VIEW_INDEX, sphere32_cameras()[BACK_VIEW_HINT].tolist(),
                       path=lambda: self.store.file(gen_id, "back_view"))
        s.end("done")
        return s

    def activate(self, s: NerfSession) -> bool:
        """Start fitting ``s`` if its mode allows (see :meth:`NerfSession.activate`)."""
        fits = s.activate()
        self._wake()
        return fits

    def on_end(self, gen_id: str, status: str) -> None:
        s = self._sessions.get(gen_id)
        if s is not None:
            s.end(status)
            self._wake()

    # -- preloading (dp360rt view) -------------------------------------------------------------------------
    def add_views(self, gen_id: str, images: Sequence[Any], cameras: Any, indices: Sequence[int] | None = None,
                  label: str | None = None, back_view: Any = None, mode: str = "always") -> NerfSession:
        """A finished generation from files: views (images, [N, 25] cameras) fitted in the background
        (``mode="on_view"``: once the page asks)."""
        s = self._create(gen_id, label=label, preloaded=True, mode=mode)
        cams = torch.as_tensor(cameras, dtype=torch.float64)
        idx = list(indices) if indices is not None else list(range(len(images)))
        if back_view is not None:
            s.add_view(BACK_VIEW_INDEX, sphere32_cameras()[BACK_VIEW_HINT].tolist(), back_view)
        for i, img, cam in zip(idx, images, cams):
            s.add_view(i, cam.tolist(), img)
        s.end("done")
        self._wake()
        return s

    def add_nerf(self, gen_id: str, nerf: Nerf, label: str | None = None, images: Sequence[Any] = (),
                 cameras: Any = None, back_view: Any = None) -> NerfSession:
        """A fitted NeRF (and optionally the views it was fitted to, shown but not refitted)."""
        s = self._create(gen_id, label=label, preloaded=True)
        if back_view is not None:
            s.add_view(BACK_VIEW_INDEX, sphere32_cameras()[BACK_VIEW_HINT].tolist(), back_view)
        if cameras is not None:
            for i, (img, cam) in enumerate(zip(images, torch.as_tensor(cameras, dtype=torch.float64))):
                s.add_view(i, cam.tolist(), img)
        with s._lock:
            s._pending.clear()
        s.set_fitted(nerf)
        return s

    def get(self, gen_id: str) -> NerfSession | None:
        return self._sessions.get(gen_id)

    def preloaded(self) -> list[NerfSession]:
        return [s for s in list(self._sessions.values()) if s.preloaded]

    def wait(self, gen_id: str, states: Sequence[str] = ("ready", "failed"), timeout: float = 60.0) -> NerfSession:
        """Block until the session reaches one of ``states`` (tests, CLI); TimeoutError otherwise."""
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            s = self._sessions.get(gen_id)
            if s is not None and s.state in states:
                return s
            time.sleep(0.02)
        s = self._sessions.get(gen_id)
        raise TimeoutError(f"generation {gen_id} is {s.state if s else 'unknown'} after {timeout:.0f} s")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # -- internals -------------------------------------------------------------------------------------------
    def _create(self, gen_id: str, label: str | None = None, preloaded: bool = False,
                mode: str = "always") -> NerfSession:
        with self._cond:
            s = NerfSession(gen_id, self.seconds, self.steps, self.nerf_options, label, preloaded, mode,
                            self.export_options)
            self._sessions[gen_id] = s
            self._evict()
            return s

    def _evict(self) -> None:
        removable = [s for s in self._sessions.values() if not s.preloaded]
        excess = len(self._sessions) - self.max_sessions
        if excess <= 0:
            return
        # finished ones first, oldest first; a running generation only when nothing else is left
        removable.sort(key=lambda s: (s.state not in ("ready", "failed"), s.created))
        for s in removable[:excess]:
            del self._sessions[s.id]

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                work = [s for s in self._sessions.values() if s.has_work()]
                if not work:
                    self._cond.wait(timeout=5.0)      # woken by every view, end and activation
                    continue
            for s in work:
                if self._closed:
                    return
                try:
                    s.work(self.chunk_seconds)
                except Exception as e:  # noqa: BLE001 - one bad generation must not stop the others
                    s.fail(e)


__all__ = ["NerfSessions", "NerfSession", "ViewRecord", "BACK_VIEW_INDEX"]
