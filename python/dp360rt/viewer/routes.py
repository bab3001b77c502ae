"""The viewer's HTTP and WebSocket routes (Starlette), mounted by ``dp360rt serve`` next to the
service's routes, or alone by ``dp360rt view``.

* ``GET /`` the page, ``/static/*`` its assets (no CDN: the page works on an offline LAN);
* ``GET /v1/viewer/config``: ``{"upload": bool, "generations": [{"id", "label"}]}`` (preloaded ones);
* ``GET /v1/generations/{id}/nerf/status``: see :meth:`NerfSession.status`;
* ``POST /v1/generations/{id}/nerf/fit``: start fitting a ``nerf=on_view`` generation (the page
  does when it shows one; the WebSocket and the field's downloads do too); 409 for ``nerf=none``;
* ``WS /v1/generations/{id}/nerf``: the client sends frame requests (:mod:`.frames`), the server
  answers each rendered frame with a JSON text message ``{"type": "frame", "id", "width", "height",
  "format", "render_ms", "dropped", "step", "psnr", "version"}`` followed by the binary image.
  Requests that arrive while a frame renders replace each other: only the newest is rendered
  (``dropped`` counts the others), so the view never lags behind the pointer. A bad request gets
  ``{"type": "error", "message"}``; a request before the field is renderable ``{"type": "waiting"}``;
* downloads ``views.zip``, ``nerf.zip`` (the ``Nerf.save`` folder), ``orbit.mp4``, ``mesh.ply``,
  ``head.glb`` (textured glTF) and ``head.ply`` (3D Gaussian splat refined against the views)
  of the latest snapshot (made on demand, cached per snapshot; the two heads of a finished fit are
  also kept in the service's result store, so they are made once per generation);
* ``standalone=True`` (``dp360rt view``) also serves the views at ``/v1/generations/{id}/{name}.png``
  (the service serves them from its store otherwise).
"""
from __future__ import annotations

import asyncio
import io
import json
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from .frames import FrameRequestError, encode_frame, parse_frame_request
from .sessions import NerfSession, NerfSessions

STATIC_DIR = Path(__file__).parent / "static"
ORBIT_FRAMES = 60


def error_response(status: int, message: str, fix: str) -> JSONResponse:
    """The service's error body: ``{"error": {"message", "fix"}}``."""
    return JSONResponse({"error": {"message": message, "fix": fix}}, status_code=status)


NERF_NONE = ("generation {gen_id!r} was made with nerf=none, so it has no NeRF. Fix: generate with nerf=on_view "
             "(the default: fitted when the page or a download asks) or nerf=always")


def _not_fitted(gen_id: str) -> JSONResponse:
    msg, fix = NERF_NONE.format(gen_id=gen_id).split(". Fix: ")
    return error_response(409, msg, fix)


def _unknown(gen_id: str) -> JSONResponse:
    return error_response(404, f"no generation {gen_id!r} is known to the viewer",
                          "use the id of a generation of this server (POST /v1/generations) or a preloaded one "
                          "(GET /v1/viewer/config)")


# made from the final fit and kept in the service's result store (ResultStore.write_asset), so a
# restarted server or a reopened generation serves them without fitting or exporting again
STORED = ("head.glb", "head.ply")


class _Downloads:
    """Files made from a session's latest snapshot, cached per (generation, kind, snapshot version).
    One request makes a file; others asking for it meanwhile wait for that one (a splat takes a
    minute on a CPU). ``store``: where the :data:`STORED` files of a finished fit are kept."""

    def __init__(self, store: Any = None) -> None:
        self.store = store
        self._cache: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def kept(self, gen_id: str, kind: str) -> bytes | None:
        """The stored copy of a :data:`STORED` file, or None."""
        return self.store.read_asset(gen_id, kind) if self.store is not None and kind in STORED else None

    def get(self, s: NerfSession, kind: str, make: Callable[[NerfSession], bytes]) -> bytes:
        with self._guard:
            lock = self._locks.setdefault((s.id, kind), threading.Lock())
        with lock:
            hit = self._cache.get((s.id, kind))
            if hit is not None and hit[0] == s.version:
                return hit[1]
            version, final = s.version, s.state == "ready"
            data = make(s)
            self._cache[(s.id, kind)] = (version, data)
            if final and self.store is not None and kind in STORED:
                self.store.write_asset(s.id, kind, data)
            return data


def _views_zip(s: NerfSession) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    entries = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for r in sorted(s.views.values(), key=lambda r: r.index):
            png = io.BytesIO()
            Image.fromarray(r.pixels()).save(png, format="PNG")
            z.writestr(f"{r.name}.png", png.getvalue())
            if r.index >= 0:
                entries.append({"file": f"{r.name}.png", "camera": r.camera})
        z.writestr("cameras.json", json.dumps({"views": entries}, indent=1))
    return buf.getvalue()


def _nerf_zip(s: NerfSession) -> bytes:
    snap = s.snapshot
    assert snap is not None
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="dp360rt-nerf-") as tmp:
        folder = snap.save(Path(tmp) / "nerf")
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.iterdir()):
                z.write(f, f"nerf/{f.name}")
    return buf.getvalue()


def _render_size(s: NerfSession) -> int:
    snap = s.snapshot
    size = snap.image_size[0] if snap is not None and snap.image_size else 256
    return int(min(max(size, 64), 512))          # the views' size: finer adds no detail


def _orbit_mp4(s: NerfSession) -> bytes:
    from ..nerf.video import orbit_video
    snap = s.snapshot
    assert snap is not None
    with tempfile.TemporaryDirectory(prefix="dp360rt-orbit-") as tmp:
        size = _render_size(s)
        path = orbit_video(snap, Path(tmp) / "orbit.mp4", frames=ORBIT_FRAMES, fps=30, width=size, height=size)
        return path.read_bytes()


def _mesh_ply(s: NerfSession) -> bytes:
    from ..nerf.mesh import extract_mesh, write_ply
    snap = s.snapshot
    assert snap is not None
    with tempfile.TemporaryDirectory(prefix="dp360rt-mesh-") as tmp:
        return write_ply(extract_mesh(snap), Path(tmp) / "mesh.ply").read_bytes()


def _head_glb(s: NerfSession) -> bytes:
    snap = s.snapshot
    assert snap is not None
    with tempfile.TemporaryDirectory(prefix="dp360rt-glb-") as tmp:
        snap.export_glb(Path(tmp) / "head.glb", **s.export_options.get("glb", {}))
        return (Path(tmp) / "head.glb").read_bytes()


def _head_splat(s: NerfSession) -> bytes:
    snap = s.snapshot
    assert snap is not None
    recs = [r for i, r in sorted(s.views.items()) if i >= 0]
    views = ([r.pixels() for r in recs], [r.camera for r in recs]) if recs else None
    with tempfile.TemporaryDirectory(prefix="dp360rt-splat-") as tmp:
        snap.export_splat(Path(tmp) / "head.ply", views=views, **s.export_options.get("splat", {}))
        return (Path(tmp) / "head.ply").read_bytes()


DOWNLOADS: dict[str, tuple[Callable[[NerfSession], bytes], str, bool]] = {
    # name: (maker, media type, needs a fitted field)
    "views.zip": (_views_zip, "application/zip", False),
    "nerf.zip": (_nerf_zip, "application/zip", True),
    "orbit.mp4": (_orbit_mp4, "video/mp4", True),
    "mesh.ply": (_mesh_ply, "application/octet-stream", True),
    "head.glb": (_head_glb, "model/gltf-binary", True),            # textured mesh, any engine
    "head.ply": (_head_splat, "application/octet-stream", True),   # 3D Gaussian splat (standard 3DGS layout)
}


def viewer_routes(sessions: NerfSessions, upload: bool = True, standalone: bool = False,
                  render_threads: int = 2) -> list[BaseRoute]:
    """The viewer's routes over ``sessions`` (see the module doc). ``upload``: the page offers the
    portrait upload (the service is there); ``standalone``: also serve the views' PNGs."""
    pool = ThreadPoolExecutor(max_workers=render_threads, thread_name_prefix="nerf-render")
    downloads = _Downloads(sessions.store)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def config(request: Request) -> Response:
        gens = [{"id": s.id, "label": s.label} for s in sessions.preloaded()]
        return JSONResponse({"upload": upload, "generations": gens})

    async def status(request: Request) -> Response:
        gen_id = request.path_params["gen_id"]
        s = await asyncio.to_thread(sessions.open, gen_id)
        return _unknown(gen_id) if s is None else JSONResponse(s.status())

    async def view_png(request: Request) -> Response:
        gen_id, name = request.path_params["gen_id"], request.path_params["name"]
        s = sessions.get(gen_id)
        if s is None:
            return _unknown(gen_id)
        rec = next((r for r in list(s.views.values()) if r.name == name), None)
        if rec is None:
            return error_response(404, f"generation {gen_id!r} has no view {name!r}",
                                  "use a name from nerf/status view_list (back_view, 000 ... 031)")
        data = await asyncio.get_running_loop().run_in_executor(pool, lambda: encode_frame(rec.pixels(), "png"))
        return Response(data, media_type="image/png")

    async def download(request: Request) -> Response:
        gen_id, name = request.path_params["gen_id"], request.path_params["file"]
        s = await asyncio.to_thread(sessions.open, gen_id)
        if s is None:
            return _unknown(gen_id)
        maker, media, needs_field = DOWNLOADS[name]
        headers = {"Content-Disposition": f'attachment; filename="{gen_id}-{name}"'}
        kept = await asyncio.to_thread(downloads.kept, gen_id, name)
        if kept is not None:
            return Response(kept, media_type=media, headers=headers)
        if needs_field and not sessions.activate(s):
            return _not_fitted(gen_id)
        if needs_field and s.snapshot is None:
            r = error_response(202, f"the NeRF of generation {gen_id!r} is being fitted (state {s.state}); "
                               f"{name} is made from it", "download again after the Retry-After seconds, or when "
                               "nerf/status says renderable")
            r.headers["Retry-After"] = str(int(max(1, min(30, (s.seconds or 10) / 3))))
            return r
        if not s.views and not needs_field:
            return error_response(409, f"generation {gen_id!r} has no views yet", "wait for the first view")
        data = await asyncio.get_running_loop().run_in_executor(pool, downloads.get, s, name, maker)
        return Response(data, media_type=media, headers=headers)

    async def fit(request: Request) -> Response:
        gen_id = request.path_params["gen_id"]
        s = await asyncio.to_thread(sessions.open, gen_id)
        if s is None:
            return _unknown(gen_id)
        if not sessions.activate(s):
            return _not_fitted(gen_id)
        return JSONResponse(s.status(), status_code=202)

    async def nerf_socket(ws: WebSocket) -> None:
        gen_id = ws.path_params["gen_id"]
        await ws.accept()
        s = await asyncio.to_thread(sessions.open, gen_id)
        if s is None:
            await ws.send_json({"type": "error", "message": f"no generation {gen_id!r} is known to the viewer. "
                                "Fix: use an id from POST /v1/generations or GET /v1/viewer/config"})
            await ws.close(code=4404)
            return
        if not sessions.activate(s):           # the page looks: an on_view generation starts fitting now
            await ws.send_json({"type": "error", "message": NERF_NONE.format(gen_id=gen_id)})
            await ws.close(code=4409)
            return
        await _serve_frames(ws, s, pool)

    def download_route(name: str) -> Route:
        async def endpoint(request: Request) -> Response:
            request.path_params["file"] = name
            return await download(request)
        return Route(f"/v1/generations/{{gen_id}}/{name}", endpoint, methods=["GET"])

    routes: list[BaseRoute] = [
        Route("/", page, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=str(STATIC_DIR)), name="static"),
        Route("/v1/viewer/config", config, methods=["GET"]),
        Route("/v1/generations/{gen_id}/nerf/status", status, methods=["GET"]),
        Route("/v1/generations/{gen_id}/nerf/fit", fit, methods=["POST"]),
        WebSocketRoute("/v1/generations/{gen_id}/nerf", nerf_socket),
        *[download_route(n) for n in DOWNLOADS],
    ]
    if standalone:
        routes.append(Route("/v1/generations/{gen_id}/{name}.png", view_png, methods=["GET"]))
    return routes


async def _serve_frames(ws: WebSocket, s: NerfSession, pool: ThreadPoolExecutor) -> None:
    """Render the newest request, drop the ones it replaced, until the client hangs up."""
    slot: dict[str, Any] = {"req": None, "error": None, "dropped": 0}
    wake = asyncio.Event()

    async def receive() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            try:
                if text is None:
                    raise FrameRequestError("a frame request must be a JSON text message, got a binary one. "
                                            'Fix: send e.g. {"azimuth": 30, "width": 256} as text')
                req = parse_frame_request(text)
            except FrameRequestError as e:
                slot["error"] = str(e)
            else:
                if slot["req"] is not None:
                    slot["dropped"] += 1            # a newer camera replaces one not rendered yet
                slot["req"] = req
            wake.set()

    reader = asyncio.create_task(receive())
    loop = asyncio.get_running_loop()
    try:
        while True:
            waiter = asyncio.create_task(wake.wait())
            done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                waiter.cancel()
                return                              # the client hung up (or the socket broke)
            wake.clear()
            if slot["error"] is not None:
                err, slot["error"] = slot["error"], None
                await ws.send_json({"type": "error", "message": err})
            req, slot["req"] = slot["req"], None
            if req is None:
                continue
            t0 = time.perf_counter()
            try:
                rgb = await loop.run_in_executor(pool, s.render, req)
            except LookupError:
                await ws.send_json({"type": "waiting", "id": req.id, "state": s.state})
                continue
            data = await loop.run_in_executor(pool, encode_frame, rgb, req.fmt, req.quality)
            await ws.send_json({"type": "frame", "id": req.id, "width": req.width, "height": req.height,
                                "format": req.fmt, "render_ms": round((time.perf_counter() - t0) * 1000, 2),
                                "dropped": slot["dropped"], **s.progress()})
            await ws.send_bytes(data)
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        reader.cancel()
        if reader.done() and not reader.cancelled():
            reader.exception()                      # the hang-up, retrieved so asyncio does not log it
