"""``dp360rt serve``: argument parsing here; Starlette, uvicorn and Ray load inside the handler."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from typing import Any

INSTALL_FIX = "Fix: pip install 'dp360rt[serve]' (Starlette, uvicorn, python-multipart; Ray Serve for --ray)"


def add_parser(sub: Any) -> None:
    from ..cli_pipeline import add_backend_args, add_compute_dtype_arg
    s = sub.add_parser("serve", help="streaming HTTP service (SSE) over one pipeline; --ray: on Ray Serve")
    s.add_argument("--nvs", help="model_state-340000.th (or .safetensors)")
    s.add_argument("--backview", help="back_head-230000.th (or .safetensors)")
    s.add_argument("--conditions", help="the authors' cam_condition/sphere32 folder (required with checkpoints)")
    s.add_argument("--random", metavar="CONFIG", help="random weights of a config (tiny, medium, full, a config.json)")
    s.add_argument("--config", default="full")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8360)
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    s.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, else fp32")
    add_compute_dtype_arg(s)
    s.add_argument("--engine", default="fast", choices=["fast", "reference"])
    s.add_argument("--max-memory", type=float, help="GiB the fast engine may plan for (default: no limit)")
    s.add_argument("--policy", default="latency", choices=["latency", "throughput"],
                   help="step loop policy: latency (default) streams each request's first window first")
    s.add_argument("--max-queue", type=int, default=16, help="generations running or queued at once; more get 429")
    s.add_argument("--max-upload", type=float, default=20, metavar="MB", help="request size cap (default 20 MB)")
    s.add_argument("--token", default=os.environ.get("DP360RT_TOKEN"),
                   help="require this token (Authorization: Bearer TOKEN or ?token=); default $DP360RT_TOKEN")
    s.add_argument("--store", help="folder for the generated views (default: a temporary folder removed on exit)")
    s.add_argument("--store-max-gb", type=float, default=2.0, help="store size cap; oldest generations go first")
    s.add_argument("--no-viewer", action="store_true", help="do not mount the browser viewer (dp360rt.viewer)")
    s.add_argument("--nerf-seconds", type=float, default=None,
                   help="viewer: NeRF training time per generation (default 30 s)")
    s.add_argument("--nerf-steps", type=int, default=None,
                   help="viewer: NeRF training steps per generation (with --nerf-seconds: whichever ends first)")
    s.add_argument("--ray", action="store_true", help="run on Ray Serve: one ingress, --replicas generation replicas")
    s.add_argument("--replicas", type=int, default=1, help="generation replicas with --ray (one per GPU)")
    s.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default $RAY_ADDRESS; none: start a local one)")
    s.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs reserved per replica on a CPU machine (default: the machine's CPUs / (replicas + 1))")
    add_backend_args(s)
    s.set_defaults(fn=cmd_serve)


def check_args(a: argparse.Namespace) -> None:
    """The argument errors that must stop the server before it starts (nothing is loaded yet)."""
    from ..config import ConfigError
    from ..images import ImageError
    if not a.random and not (a.nvs and a.backview):
        raise ConfigError("pass both --nvs and --backview checkpoints, or --random CONFIG for random weights")
    if not a.random and not a.conditions:
        raise ImageError("--conditions DIR (the authors' sphere32 folder) is required with real checkpoints")
    for name in ("max_queue", "replicas"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be 1 or more. Fix: pass a positive count")
    for name in ("nerf_seconds", "nerf_steps"):
        v = getattr(a, name, None)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be positive. Fix: pass e.g. --nerf-seconds 30")
    if a.max_upload <= 0:
        raise ValueError(f"--max-upload {a.max_upload}: must be positive. Fix: pass a size in MB, e.g. 20")
    if not 0 < a.port < 65536:
        raise ValueError(f"--port {a.port} is not a TCP port. Fix: pass 1..65535")


def _imports() -> None:
    for mod in ("starlette", "uvicorn", "multipart"):
        if importlib.util.find_spec(mod) is None:
            raise ImportError(f"dp360rt serve needs {mod!r}, which is not installed. {INSTALL_FIX}")


def pipeline_spec(a: argparse.Namespace) -> dict[str, Any]:
    """Everything a process needs to build the pipeline (plain values: it travels to Ray replicas)."""
    import torch
    cuda = torch.cuda.is_available()
    return {"nvs": a.nvs, "backview": a.backview, "random": a.random, "config": a.config, "conditions": a.conditions,
            "device": a.device or ("cuda" if cuda else "cpu"), "dtype": a.dtype or ("fp16" if cuda else "fp32"),
            "compute_dtype": a.compute_dtype, "engine": a.engine, "max_memory": a.max_memory, "backend": a.backend, "export_dir": a.export_dir,
            "policy": a.policy}


def backend_from_spec(spec: dict[str, Any], replica: str | None = None):
    """A :class:`~dp360rt.serve.backend.LocalBackend` for a :func:`pipeline_spec` (not loaded yet)."""
    from ..cli_pipeline import pipeline_from_args
    from .backend import LocalBackend
    ns = argparse.Namespace(**spec)
    return LocalBackend(lambda: pipeline_from_args(ns), conditions=spec["conditions"], policy=spec["policy"], replica=replica)


def viewer_parts(enabled: bool = True, nerf_seconds: float | None = None,
                 nerf_steps: int | None = None) -> tuple[list[Any], list[Any]]:
    """The viewer's listener and routes when ``dp360rt.viewer`` is present (else nothing); the
    NeRF budget per generation is ``nerf_seconds`` / ``nerf_steps`` (default: the viewer's 30 s)."""
    if not enabled or importlib.util.find_spec("dp360rt.viewer") is None:
        return [], []
    from dp360rt.viewer import NerfSessions, viewer_routes
    sessions = NerfSessions(seconds=nerf_seconds, steps=nerf_steps)
    return [sessions], list(viewer_routes(sessions, upload=True))


def cmd_serve(a: argparse.Namespace) -> int:
    check_args(a)
    _imports()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = pipeline_spec(a)
    if a.ray:
        from .ray_app import run_ray
        return run_ray(a, spec)
    import uvicorn
    from .app import create_app
    from .store import ResultStore
    listeners, routes = viewer_parts(not a.no_viewer, a.nerf_seconds, a.nerf_steps)
    app = create_app(backend_from_spec(spec), store=ResultStore(a.store, int(a.store_max_gb * 2**30)),
                     max_queue=a.max_queue, max_upload_mb=a.max_upload, token=a.token, listeners=listeners,
                     extra_routes=routes)
    print(f"dp360rt serve: http://{a.host}:{a.port}  (POST /v1/generations; models load in the background, "
          "GET /readyz says when they are ready)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info", timeout_graceful_shutdown=5)
    for listener in listeners:
        close = getattr(listener, "close", None)
        if close:
            close()
    return 0
