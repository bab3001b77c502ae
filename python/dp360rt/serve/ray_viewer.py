"""The browser viewer under Ray Serve: a generation's NeRF session lives on the replica that made it.

Each generation replica runs a small viewer server of its own (the viewer's routes over its own
:class:`~dp360rt.viewer.NerfSessions`, fed by the generations it runs) on its node's address,
behind a token of its own; the address and token ride the generation's ``start`` event. The
ingress serves the page and its assets and forwards everything else about a generation (NeRF
status, fit, downloads, the frame WebSocket) to that replica, routed by generation id. A replica
that died (or was restarted: a new address, a new token) takes its sessions with it: the ingress
then answers 503 and the WebSocket an error message and a close, never a hang.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import threading
from typing import Any
from urllib.parse import urlencode

import httpx
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from .errors import error_response
from .parts import WS_MAX_BYTES

log = logging.getLogger("dp360rt.serve")

GONE = ("the replica that made generation {gen_id!r} is gone (it died or was restarted), and its NeRF session "
        "with it. Fix: generate again")
PROXY_TIMEOUT = 300.0           # an orbit video or a mesh is made on demand: minutes on a CPU


class ReplicaViewer:
    """A replica's viewer server: NeRF sessions over the views this replica generates.

    ``seconds`` / ``steps``: the NeRF budget per generation; ``mode``: the fit when a request
    does not say (see :mod:`dp360rt.viewer.sessions`); ``host``: the address other nodes reach
    this one at (default: Ray's node address)."""

    def __init__(self, seconds: float | None = None, steps: int | None = None, mode: str = "on_view",
                 host: str | None = None):
        import uvicorn
        from starlette.applications import Starlette
        from dp360rt.viewer import NerfSessions, viewer_routes
        from .app import TokenAuth
        if host is None:
            import ray
            host = ray.util.get_node_ip_address()
        self.sessions = NerfSessions(seconds=seconds, steps=steps, mode=mode)
        self.token = secrets.token_urlsafe(24)
        app = Starlette(routes=viewer_routes(self.sessions, upload=False, standalone=True))
        app.add_middleware(TokenAuth, token=self.token)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws_max_size=WS_MAX_BYTES,
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="dp360rt-replica-viewer", daemon=True)
        self._thread.start()

    @property
    def address(self) -> dict[str, str]:
        """What the ingress needs to reach this server (travels in the start event)."""
        return {"url": self.url, "token": self.token}

    def on_event(self, gen_id: str, options: dict[str, Any], ev: dict[str, Any]) -> None:
        """Feed one of a generation's backend events to the sessions."""
        kind = ev["type"]
        if kind == "start":
            self.sessions.on_start(gen_id, options)
        elif kind == "view":
            self.sessions.on_view(gen_id, ev["index"], ev["camera"], ev["image"])
        elif kind in ("done", "failed", "cancelled"):
            self.sessions.on_end(gen_id, kind)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.sessions.close()


class ViewerProxy:
    """The ingress side: a generation listener that remembers which replica viewer made each
    generation, and the routes that serve the page and forward the rest there."""

    def __init__(self, upload: bool = True):
        self.upload = upload
        self._where: dict[str, dict[str, str]] = {}       # generation id -> {"url", "token"}
        self._client: httpx.AsyncClient | None = None

    # -- GenerationListener ---------------------------------------------------------------------------
    def on_start(self, gen_id: str, options: dict[str, Any]) -> None:
        where = options.get("viewer")
        if where:
            self._where[gen_id] = where

    def on_delete(self, gen_id: str) -> None:
        self._where.pop(gen_id, None)

    def close(self) -> None:
        self._where.clear()

    # -- routes -----------------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        from dp360rt.viewer.routes import STATIC_DIR

        async def page(request: Request) -> Response:
            return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

        async def config(request: Request) -> Response:
            return JSONResponse({"upload": self.upload, "generations": []})

        return [
            Route("/", page, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=str(STATIC_DIR)), name="static"),
            Route("/v1/viewer/config", config, methods=["GET"]),
            WebSocketRoute("/v1/generations/{gen_id}/nerf", self._socket),
            # after the service's own routes: the stored views' PNGs are served by the ingress
            Route("/v1/generations/{gen_id}/{rest:path}", self._forward, methods=["GET", "POST"]),
        ]

    def _unknown(self, gen_id: str) -> Response:
        return error_response(404, f"no generation {gen_id!r} is known to the viewer",
                              "use the id of a generation of this server (POST /v1/generations)")

    async def _forward(self, request: Request) -> Response:
        gen_id, rest = request.path_params["gen_id"], request.path_params["rest"]
        where = self._where.get(gen_id)
        if where is None:
            return self._unknown(gen_id)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=PROXY_TIMEOUT)
        query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
        url = f"{where['url']}/v1/generations/{gen_id}/{rest}" + (f"?{query}" if query else "")
        try:
            r = await self._client.request(request.method, url, content=await request.body(),
                                           headers={"Authorization": f"Bearer {where['token']}"})
        except httpx.HTTPError as e:
            log.warning("viewer request for %s to %s failed: %s", gen_id, where["url"], e)
            return self._gone(gen_id)
        if r.status_code == 401:             # another process on that address now: a restarted replica
            return self._gone(gen_id)
        keep = {k: v for k, v in r.headers.items() if k.lower() in ("content-type", "content-disposition", "retry-after")}
        return Response(r.content, status_code=r.status_code, headers=keep)

    def _gone(self, gen_id: str) -> Response:
        msg, fix = GONE.format(gen_id=gen_id).split(". Fix: ")
        return error_response(503, msg, fix)

    async def _socket(self, ws: WebSocket) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake
        gen_id = ws.path_params["gen_id"]
        await ws.accept()
        where = self._where.get(gen_id)
        if where is None:
            await ws.send_json({"type": "error", "message": f"no generation {gen_id!r} is known to the viewer. "
                                "Fix: use an id from POST /v1/generations"})
            await ws.close(code=4404)
            return
        url = where["url"].replace("http://", "ws://", 1) + f"/v1/generations/{gen_id}/nerf"
        try:
            async with connect(url, additional_headers={"Authorization": f"Bearer {where['token']}"},
                               max_size=2**26, open_timeout=10) as upstream:
                await _pump(ws, upstream)
                return
        except (OSError, InvalidHandshake, ConnectionClosed, asyncio.TimeoutError) as e:
            log.warning("viewer socket for %s to %s ended: %s", gen_id, where["url"], e)
        try:
            await ws.send_json({"type": "error", "message": GONE.format(gen_id=gen_id)})
            await ws.close(code=1011)
        except (RuntimeError, WebSocketDisconnect):
            pass                                  # the page left first


async def _pump(ws: WebSocket, upstream: Any) -> None:
    """Copy messages both ways until one side ends: returns when the page hung up or the replica
    closed the socket cleanly (the page's socket is closed with the same code); raises
    ``ConnectionClosed`` when the replica's side broke."""

    async def to_replica() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            await upstream.send(msg["text"] if msg.get("text") is not None else msg.get("bytes", b""))

    async def to_page() -> None:
        async for msg in upstream:           # ends on a clean close, raises ConnectionClosedError otherwise
            if isinstance(msg, str):
                await ws.send_text(msg)
            else:
                await ws.send_bytes(msg)
        await ws.close(code=upstream.close_code or 1000)

    tasks = [asyncio.create_task(to_replica()), asyncio.create_task(to_page())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
    for t in done:
        exc = t.exception()
        if exc is not None and not isinstance(exc, WebSocketDisconnect):
            raise exc                             # the replica's side broke (or the page's, then nobody hears)
