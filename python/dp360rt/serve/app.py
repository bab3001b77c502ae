"""The HTTP service: a Starlette (ASGI) app over a generation backend.

Routes (docs/service.md is the contract): ``POST /v1/generations`` streams
server-sent events; ``GET /v1/generations/{id}/{name}.png`` serves stored views; ``DELETE
/v1/generations/{id}`` cancels; ``/healthz``, ``/readyz``, ``/metrics``. The app owns no model
logic: ``backend`` (:class:`~dp360rt.serve.backend.LocalBackend`, or the Ray one) runs the
generations, this module admits requests, stores views, emits events and keeps the metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .backend import CHOICES, BadInput, decode_portrait

CROP_MODES, NOISE_MODES = CHOICES["crop"], CHOICES["noise"]
from .errors import ServeError, error_response
from .events import notify
from .metrics import Metrics
from .store import ResultStore

log = logging.getLogger("dp360rt.serve")

MAX_SEED = 2**63 - 1
NERF_MODES = ("none", "on_view", "always")
PUBLIC_PATHS = ("/healthz", "/readyz")


@dataclass
class _Generation:
    id: str
    t0: float
    job: Any = None
    queued: bool = True
    cancel_requested: bool = False
    first_view: float | None = None
    cameras: dict[int, list[float]] = field(default_factory=dict)


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class TokenAuth:
    """ASGI middleware: every route but /healthz, /readyz, ``GET /`` and /static/* needs the token,
    as ``Authorization: Bearer TOKEN`` or ``?token=TOKEN`` (what a page or a WebSocket can send),
    compared in constant time. Refused HTTP requests get 401 JSON, WebSockets a 1008 close."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.token = token.encode()

    def _public(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if path in PUBLIC_PATHS or path.startswith("/static/"):
            return True
        return path == "/" and scope.get("method") in ("GET", "HEAD")

    def _given(self, scope: Scope) -> bytes | None:
        for k, v in scope.get("headers", []):
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                return v[7:].strip()
        from urllib.parse import parse_qs
        q = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        return q[0].encode("latin-1") if q else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._public(scope):
            await self.app(scope, receive, send)
            return
        given = self._given(scope)
        if given is not None and hmac.compare_digest(given, self.token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong token"})
            return
        what = "missing" if given is None else "wrong"
        resp = error_response(401, f"{what} token: this server was started with --token",
                              "send the header 'Authorization: Bearer TOKEN' (or ?token=TOKEN in the URL)",
                              {"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


def create_app(backend: Any, *, store: ResultStore | None = None, max_queue: int = 16, max_upload_mb: float = 20,
               token: str | None = None, listeners: Sequence[Any] = (), extra_routes: Sequence[BaseRoute] = (),
               stall_timeout: float = 120.0, close_backend: bool = True, nerf: str = "on_view") -> Starlette:
    """The service app over ``backend`` (see :mod:`dp360rt.serve.backend` for its two calls).

    ``store``: where views go (default: a temporary folder removed at shutdown); ``max_queue``:
    generations admitted at once (more get 429); ``max_upload_mb``: request size cap (413);
    ``token``: required on every route but health, the page and its assets; ``listeners``:
    :class:`~dp360rt.serve.events.GenerationListener` objects told about every generation;
    ``extra_routes``: more routes (the viewer's), matched after the service's; ``stall_timeout``:
    seconds without any event from the backend after which a stream fails instead of hanging;
    ``nerf``: a request's NeRF fit when it does not say (``none``, ``on_view``: when the page or a
    download first asks, ``always``: while the views arrive).
    The backend is loaded in a thread at startup (``/readyz`` says when) if it has ``load()``.
    """
    store = store or ResultStore()
    metrics = Metrics()
    listeners = list(listeners)
    active: dict[str, _Generation] = {}
    max_upload = int(max_upload_mb * 2**20)
    if nerf not in NERF_MODES:
        raise ValueError(f"nerf={nerf!r} is not a NeRF mode. Fix: use one of {', '.join(NERF_MODES)}")
    if max_queue < 1:
        raise ValueError(f"max_queue={max_queue}: at least 1 generation must be admitted. Fix: pass --max-queue 1 or more")

    def retry_after() -> str:
        recent = metrics.recent_totals
        est = sum(recent) / len(recent) if recent else 10.0
        return str(int(min(600, max(1, math.ceil(est)))))

    def reject(err: ServeError) -> Response:
        metrics.count("rejected")
        return err.response()

    def set_queued(g: _Generation, queued: bool) -> None:
        if g.queued != queued:
            g.queued = queued
            metrics.queued += -1 if not queued else 1

    # -- POST /v1/generations --------------------------------------------------------------------------
    async def read_form(request: Request) -> tuple[bytes, dict[str, Any]]:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ServeError(400, f"expected a multipart/form-data request, got {ctype or 'no content type'!r}",
                             "send the portrait as a form field: curl -F portrait=@face.png ...")
        length = request.headers.get("content-length")
        too_large = ServeError(413, f"the request is larger than the {max_upload_mb:g} MB upload limit",
                               "send a smaller portrait (a 512x512 JPEG is plenty), or start the server with "
                               "a larger --max-upload")
        if length is not None and length.isdigit() and int(length) > max_upload:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload:
                raise too_large
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=16, max_part_size=max_upload)
        except Exception as e:  # noqa: BLE001 - starlette's MultiPartException and parser errors
            raise ServeError(400, f"the multipart form could not be parsed ({getattr(e, 'message', e)})",
                             "send a well-formed multipart/form-data body (curl -F portrait=@face.png)") from None
        try:
            portrait = form.get("portrait")
            if not isinstance(portrait, UploadFile):
                raise ServeError(400, "missing field 'portrait' (an image file)",
                                 "send the portrait as a file field: curl -F portrait=@face.png ...")
            data = await portrait.read()
            options = {"steps": _int_field(form.get("steps"), "steps", 50, 1, 10**6),
                       "seed": _int_field(form.get("seed"), "seed", 0, 0, MAX_SEED),
                       "crop": _choice_field(form.get("crop"), "crop", CROP_MODES),
                       "noise": _choice_field(form.get("noise"), "noise", NOISE_MODES),
                       "orbit": _text_field(form.get("orbit"), "orbit", "default"),
                       "nerf": _choice_field(form.get("nerf"), "nerf", NERF_MODES, nerf)}
        finally:
            await form.close()
        return data, options

    async def create_generation(request: Request) -> Response:
        if not getattr(backend, "ready", True):
            return reject(ServeError(503, "the models are still loading", "retry when GET /readyz answers 200",
                                     {"Retry-After": "5"}))
        full = ServeError(429, f"the server is busy: {max_queue} generations are running or queued (--max-queue)",
                          "retry after the number of seconds in the Retry-After header",
                          {"Retry-After": retry_after()})
        if len(active) >= max_queue:
            return reject(full)
        try:
            data, options = await read_form(request)
            await asyncio.to_thread(decode_portrait, data)           # refuse non-images before any work
        except ServeError as e:
            return reject(e)
        except BadInput as e:
            return reject(ServeError(e.status, e.message, e.fix))
        if len(active) >= max_queue:            # other requests were admitted while this one uploaded
            return reject(full)
        g = _Generation(store.new(), time.perf_counter())
        active[g.id] = g
        metrics.active += 1
        metrics.queued += 1
        try:
            g.job = backend.start(data, {**options, "id": g.id})
            first = await asyncio.wait_for(g.job.next(), stall_timeout)
        except Exception:  # noqa: BLE001
            log.exception("starting generation %s failed", g.id)
            first = {"type": "failed"}
        if first is None or first["type"] != "start":
            _end(g, "rejected")
            if first is not None and first["type"] == "rejected":
                return reject(ServeError(first["status"], first["message"], first["fix"]))
            metrics.count("rejected")
            return error_response(503, (first or {}).get("message") or "the generation could not start",
                                  "retry the request; if it keeps failing, see the server log",
                                  {"Retry-After": "5"})
        notify(listeners, "on_start", g.id, {**options, "replica": first["replica"], "viewer": first.get("viewer")})
        headers = {"X-Replica": first["replica"], "X-Generation-Id": g.id, "Cache-Control": "no-cache",
                   "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(g, request.scope.get("root_path", "")), media_type="text/event-stream",
                                 headers=headers)

    def _end(g: _Generation, status: str) -> None:
        """Bookkeeping when a generation leaves (always runs; no awaits, so cancellation cannot skip it)."""
        if active.pop(g.id, None) is None:
            return
        metrics.active -= 1
        if g.queued:
            metrics.queued -= 1
        if status != "done":
            store.discard(g.id)
        if status != "rejected":
            metrics.count(status)
            notify(listeners, "on_end", g.id, status)

    async def stream(g: _Generation, root: str) -> AsyncIterator[bytes]:
        status = None
        job = g.job
        sent = (0.0, "queued", None, 0.0, time.monotonic())       # the last progress event sent
        try:
            yield sse("progress", {"id": g.id, "progress": 0.0, "status": "queued", "stage": None, "fraction": 0.0,
                                   "t": _since(g)})
            while status is None:
                if g.cancel_requested:
                    job.cancel()
                    status = "cancelled"
                    yield sse("cancelled", {"id": g.id, "t": _since(g)})
                    break
                try:
                    ev = await asyncio.wait_for(job.next(), stall_timeout)
                except asyncio.TimeoutError:
                    ev = {"type": "failed", "message": f"the generation backend sent nothing for {stall_timeout:g} s"}
                if ev is None:
                    ev = {"type": "failed", "message": "the generation ended without a result"}
                kind = ev["type"]
                if kind == "progress":
                    set_queued(g, ev.get("status") == "queued")
                    # now and then: on a change of 1 % (overall or of the stage) or of status or stage, else
                    # every 10 s (keeps proxies awake)
                    now = (ev["progress"], ev["status"], ev.get("stage"), ev.get("fraction", 0.0))
                    if (abs(now[0] - sent[0]) >= 0.01 or abs(now[3] - sent[3]) >= 0.01 or now[1:3] != sent[1:3]
                            or time.monotonic() - sent[4] > 10):
                        sent = (*now, time.monotonic())
                        yield sse("progress", {"id": g.id, "progress": now[0], "status": now[1], "stage": now[2],
                                               "fraction": now[3], "t": _since(g)})
                elif kind == "files":
                    await asyncio.to_thread(store.write_extra, g.id, ev["files"])
                    crop = _crop_event(ev["files"])
                    if crop is not None:
                        yield sse("crop", {"id": g.id, **crop, "t": _since(g)})
                elif kind == "view":
                    set_queued(g, False)
                    idx, image = ev["index"], ev["image"]
                    name = await asyncio.to_thread(store.write_view, g.id, idx, image)
                    g.cameras[idx] = ev["camera"]
                    t = _since(g)
                    if g.first_view is None:
                        g.first_view = t
                        metrics.first_view(t)
                    notify(listeners, "on_view", g.id, idx, ev["camera"], image)
                    yield sse("view", {"index": idx, "url": f"{root}/v1/generations/{g.id}/{name}", "t": t})
                elif kind == "done":
                    await asyncio.to_thread(store.finish, g.id, g.cameras)
                    total = _since(g)
                    metrics.done(total)
                    status = "done"
                    yield sse("done", {"id": g.id, "views": sum(1 for i in g.cameras if i >= 0),
                                       "timings": {"first_view": g.first_view, "total": total,
                                                   **{f"backend_{k}": v for k, v in ev.get("timings", {}).items()}},
                                       "t": total})
                elif kind == "cancelled":
                    status = "cancelled"
                    yield sse("cancelled", {"id": g.id, "t": _since(g)})
                else:
                    status = "failed"
                    job.cancel()
                    yield sse("error", {"id": g.id, "message": ev.get("message", "the generation failed"),
                                        "t": _since(g)})
        except Exception:  # noqa: BLE001 - logged; the client gets a message, never a traceback
            log.exception("generation %s failed in the service", g.id)
            status = "failed"
            job.cancel()
            yield sse("error", {"id": g.id, "message": "the generation failed with a server error (logged)",
                                "t": _since(g)})
        finally:
            if status is None:          # the client hung up (or the server is stopping): stop the work
                job.cancel()
                status = "cancelled"
            _end(g, status)

    # -- the other routes ------------------------------------------------------------------------------
    async def view_png(request: Request) -> Response:
        gen_id, name = request.path_params["gen_id"], request.path_params["name"]
        data = await asyncio.to_thread(store.read, gen_id, name)
        if data is None:
            return error_response(404, f"generation {gen_id!r} has no view {name!r} (yet)",
                                  "use a url from the stream's view events; finished generations are kept "
                                  "until the store's size cap evicts them")
        return Response(data, media_type="image/png")

    async def delete_generation(request: Request) -> Response:
        gen_id = request.path_params["gen_id"]
        g = active.get(gen_id)
        if g is not None:
            g.cancel_requested = True
            if g.job is not None:
                g.job.cancel()
            return JSONResponse({"id": gen_id, "status": "cancelling"}, status_code=202)
        if store.folder(gen_id) is not None:
            store.discard(gen_id)
            notify(listeners, "on_delete", gen_id)
            return JSONResponse({"id": gen_id, "status": "deleted"})
        return error_response(404, f"no generation {gen_id!r}", "use the id of a running or stored generation")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        err = getattr(backend, "error", None)
        if err:
            return JSONResponse({"status": "failed", "error": err}, status_code=503)
        if not getattr(backend, "ready", True):
            loading = dict(getattr(backend, "loading", {}))
            since = loading.pop("since", None)
            if since is not None:
                loading["elapsed"] = round(time.monotonic() - since, 1)
            return JSONResponse({"status": "loading", "reason": "the models are still loading",
                                 "progress": loading}, status_code=503, headers={"Retry-After": "5"})
        caps = backend.capabilities() if hasattr(backend, "capabilities") else {}
        return JSONResponse({"status": "ready", "active": len(active), **caps})

    async def metrics_route(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return error_response(code, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}",
                              "see docs/service.md for the routes")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error (logged on the server)",
                              "retry; if it keeps failing, report the server log")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if hasattr(backend, "load") and not getattr(backend, "ready", True):
            threading.Thread(target=_load_quietly, args=(backend,), name="dp360rt-serve-load", daemon=True).start()
        try:
            yield
        finally:
            for g in list(active.values()):
                if g.job is not None:
                    g.job.cancel()
            if close_backend and hasattr(backend, "close"):
                backend.close()
            store.close()

    routes = [
        Route("/v1/generations", create_generation, methods=["POST"]),
        Route("/v1/generations/{gen_id}/{name}.png", view_png, methods=["GET", "HEAD"]),
        Route("/v1/generations/{gen_id}", delete_generation, methods=["DELETE"]),
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics_route),
        *extra_routes,
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found, Exception: server_error})
    if token:
        app.add_middleware(TokenAuth, token=token)
    app.state.store, app.state.metrics, app.state.active, app.state.backend = store, metrics, active, backend
    return app


def _since(g: _Generation) -> float:
    return round(time.perf_counter() - g.t0, 4)


def _load_quietly(backend: Any) -> None:
    try:
        backend.load()
    except Exception:  # noqa: BLE001 - /readyz reports it
        log.exception("loading the models failed")


def _int_field(value: Any, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ServeError(400, f"field {name!r} must be a plain form value, not a file", f"send {name}=INTEGER")
    try:
        n = int(value.strip())
    except ValueError:
        raise ServeError(400, f"field {name!r} must be an integer, got {value[:40]!r}", f"send {name}=INTEGER") from None
    if not lo <= n <= hi:
        raise ServeError(400, f"{name}={n} is out of range [{lo}, {hi}]", f"send {name} between {lo} and {hi}")
    return n


def _text_field(value: Any, name: str, default: str) -> str:
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ServeError(400, f"field {name!r} must be a plain form value, not a file", f"send {name}=NAME")
    if len(value) > 64 or not value.replace("_", "").replace("-", "").isalnum():
        raise ServeError(400, f"field {name!r} = {value[:40]!r} is not a name", f"send {name}=NAME (letters, digits, - and _)")
    return value


def _choice_field(value: Any, name: str, choices: Sequence[str], default: str | None = None) -> str:
    v = _text_field(value, name, default or choices[0])
    if v not in choices:
        raise ServeError(400, f"field {name!r} = {v!r} is not one of {', '.join(choices)}",
                         f"send {name}={' or '.join(choices)}")
    return v


def _crop_event(files: dict[str, bytes]) -> dict[str, Any] | None:
    """What a client needs to judge a crop=auto crop, from its camera.json: the camera's yaw,
    pitch and 1-sigma, the detector, the faces found and the crop's warnings (named, e.g.
    ``PoseBeyondFitWarning: ...``); None without a crop."""
    raw = files.get("crop/camera.json")
    if raw is None:
        return None
    meta = json.loads(raw)
    keys = ("yaw_deg", "pitch_deg", "camera_sigma_deg", "detector", "faces_found", "face_index")
    return {**{k: meta.get(k) for k in keys}, "warnings": list(meta.get("notes", []))}
