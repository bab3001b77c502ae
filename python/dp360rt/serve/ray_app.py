"""``dp360rt serve --ray``: the same app on Ray Serve.

One ingress replica runs :func:`~dp360rt.serve.app.create_app` (so admission, the store, the
listeners and the global metrics live in one process) over :class:`RayBackend`, which streams each
generation from one of N :class:`GenerationReplica` replicas (one per GPU with ``num_gpus=1``, or
fractional CPUs) through Ray Serve's streaming handles. Each replica runs the plain
:class:`~dp360rt.serve.backend.LocalBackend`; Ray only carries its event dicts. A replica that dies
ends its streams with an ``error`` event at once (Ray reports the dead actor to the handle), and Ray
restarts it; a request whose replica died before it started is sent again, to another replica.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

try:
    import ray
    from ray import serve
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("dp360rt serve --ray needs Ray Serve, which is not installed. "
                      "Fix: pip install 'dp360rt[serve]' (or pip install 'ray[serve]')") from e

log = logging.getLogger("dp360rt.serve")

START_ATTEMPTS = 3      # sends of a request whose replica died before it started


@serve.deployment(max_ongoing_requests=64, health_check_period_s=2, health_check_timeout_s=10)
class GenerationReplica:
    """A generation replica: one pipeline, its step loop batching every request routed here."""

    def __init__(self, spec: dict[str, Any]):
        from .parts import backend_from_spec
        ctx = serve.get_replica_context()
        self.backend = backend_from_spec(spec, replica=f"{ctx.deployment}#{ctx.replica_tag}")
        self.backend.load()
        self.viewer = None
        if spec.get("viewer"):
            from .ray_viewer import ReplicaViewer
            self.viewer = ReplicaViewer(spec.get("nerf_seconds"), spec.get("nerf_steps"), spec.get("nerf", "on_view"))

    async def generate(self, portrait: bytes, options: dict[str, Any]):
        """Stream one generation's events (see :mod:`dp360rt.serve.backend`); cancelled with the stream.
        With the viewer, this replica's NeRF sessions hear them too, and the start event says
        where its viewer server is (``viewer``: url and token)."""
        job = self.backend.start(portrait, options)
        viewer, gen_id = self.viewer, options.get("id")
        ended = False
        try:
            while (ev := await job.next()) is not None:
                if viewer is not None and gen_id:
                    if ev["type"] == "start":
                        ev = {**ev, "viewer": viewer.address}
                    viewer.on_event(gen_id, options, ev)
                    ended = ended or ev["type"] in ("done", "failed", "cancelled")
                yield ev
        finally:
            job.cancel()
            if viewer is not None and gen_id and not ended:
                viewer.on_event(gen_id, options, {"type": "cancelled"})

    def check_health(self) -> None:
        if not self.backend.ready:
            raise RuntimeError("the pipeline is not loaded")

    def __del__(self) -> None:
        for part in (getattr(self, "viewer", None), getattr(self, "backend", None)):   # absent when __init__ failed
            if part is not None:
                part.close()


class RayJob:
    """One generation streamed from a replica through a Ray Serve streaming handle."""

    def __init__(self, handle: Any, args: tuple):
        self._handle, self._args = handle, args
        self._attempt = 1
        self._gen = self._call()
        self._replica: str | None = None
        self._ended = self._cancelled = False

    def _call(self) -> Any:
        return self._handle.options(stream=True, method_name="generate").remote(*self._args)

    async def next(self) -> dict[str, Any] | None:
        while not self._ended:
            try:
                ev = await self._gen.__anext__()
            except StopAsyncIteration:
                self._ended = True
                return None
            except Exception as e:  # noqa: BLE001 - Ray's errors: dead or unreachable replica, ...
                if self._cancelled:
                    self._ended = True
                    return {"type": "cancelled"}
                if self._replica is None and self._attempt < START_ATTEMPTS:
                    log.warning("generation request failed before it started (%s); sending it again", type(e).__name__)
                    self._attempt += 1
                    self._gen = self._call()
                    continue
                self._ended = True
                log.error("generation stream from %s ended with %s: %s", self._replica, type(e).__name__, e)
                if isinstance(e, ray.exceptions.RayActorError) or "died" in str(e).lower():
                    msg = (f"the replica {self._replica or ''} serving this generation died; Ray restarts it. "
                           "Retry the request")
                else:
                    msg = "the generation failed with a server error (logged)"
                return {"type": "failed", "message": msg}
            if ev.get("type") == "start":
                self._replica = ev["replica"]
            return ev
        return None

    def cancel(self) -> None:
        if not self._ended and not self._cancelled:
            self._cancelled = True
            self._gen.cancel()


class RayBackend:
    """The service's backend over the generation deployment's handle (ingress side)."""

    ready = True            # serve.run returns once every replica has loaded its pipeline

    def __init__(self, handle: Any):
        self.handle = handle

    def start(self, portrait: bytes, options: dict[str, Any]) -> RayJob:
        return RayJob(self.handle, (portrait, options))


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    """The HTTP ingress: :func:`create_app` over :class:`RayBackend` (one replica: global metrics)."""

    def __init__(self, generator: Any, options: dict[str, Any]):
        self.generator, self.options = generator, options

    def __serve_build_asgi_app__(self):
        from .app import create_app
        from .store import ResultStore
        o = self.options
        store = ResultStore(o["store"], o["store_max_bytes"])
        self.listeners, routes = [], []
        if o["viewer"]:
            from .ray_viewer import ViewerProxy
            proxy = ViewerProxy()
            self.listeners, routes = [proxy], proxy.routes()
        return create_app(RayBackend(self.generator), store=store, max_queue=o["max_queue"],
                          max_upload_mb=o["max_upload_mb"], token=o["token"], listeners=self.listeners,
                          extra_routes=routes, nerf=o.get("nerf", "on_view"))


def build_app(spec: dict[str, Any], *, replicas: int, max_queue: int = 16, max_upload_mb: float = 20,
              token: str | None = None, store: str | None = None, store_max_bytes: int = 2 << 30,
              viewer: bool = True, replica_cpus: float | None = None, ingress_cpus: float = 0.1,
              nerf: str = "on_view", nerf_seconds: float | None = None, nerf_steps: int | None = None):
    """The Ray Serve application: ingress + ``replicas`` generation replicas (``serve.run`` it).

    On CUDA each replica reserves one GPU; on CPU ``replica_cpus`` (default: the CPUs Ray sees,
    less the ingress's share, split over the replicas). ``viewer``: mount the browser viewer, its
    NeRF sessions on the replicas (:mod:`.ray_viewer`); ``nerf*``: their fit mode and budget."""
    if spec["device"].startswith("cuda"):
        actor = {"num_gpus": 1}
    else:
        total = ray.cluster_resources().get("CPU", os.cpu_count() or 1) if ray.is_initialized() else (os.cpu_count() or 1)
        actor = {"num_cpus": replica_cpus or max(0.1, (total - ingress_cpus) / replicas)}
    replica_spec = {**spec, "viewer": viewer, "nerf": nerf, "nerf_seconds": nerf_seconds, "nerf_steps": nerf_steps}
    gen = GenerationReplica.options(num_replicas=replicas, ray_actor_options=actor,
                                    max_ongoing_requests=max(max_queue, 1)).bind(replica_spec)
    options = {"viewer": viewer, "store": store, "store_max_bytes": store_max_bytes, "max_queue": max_queue,
               "max_upload_mb": max_upload_mb, "token": token, "nerf": nerf}
    return Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": ingress_cpus}).bind(gen, options)


def app_from_args(a: Any, spec: dict[str, Any]):
    """:func:`build_app` for the options of ``dp360rt serve --ray`` (parsed ``a``, ``spec`` from them)."""
    return build_app(spec, replicas=a.replicas, max_queue=a.max_queue, max_upload_mb=a.max_upload, token=a.token,
                     store=a.store, store_max_bytes=int(a.store_max_gb * 2**30), viewer=not a.no_viewer,
                     replica_cpus=a.replica_cpus, nerf=a.nerf, nerf_seconds=a.nerf_seconds, nerf_steps=a.nerf_steps)


def patient_proxy_start(seconds: float = 60.0) -> None:
    """Give Ray Serve's HTTP proxy ``seconds`` to start before its first readiness check fails
    (Ray's default, 5 s, then kills and restarts it: on a busy 2-core machine the proxy's worker
    takes longer than that to start, and serve.start fails). Only sets the environment variable
    ``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S`` when unset; call before ``ray.init``."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(seconds))


def run_ray(a: Any, spec: dict[str, Any]) -> int:
    """``dp360rt serve --ray``: join (or start) a Ray cluster, run the app, serve until Ctrl-C."""
    t0 = time.perf_counter()
    patient_proxy_start()
    ray.init(address=a.ray_address or None, include_dashboard=False)
    serve.start(http_options={"host": a.host, "port": a.port})
    app = app_from_args(a, spec)
    serve.run(app, name="dp360rt", route_prefix="/", blocking=False)
    print(f"dp360rt serve --ray: http://{a.host}:{a.port} ready in {time.perf_counter() - t0:.0f} s "
          f"({a.replicas} generation replicas); Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
