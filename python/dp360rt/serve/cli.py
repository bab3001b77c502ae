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
    from ..engine.pipeline_args import add_backend_args, add_compute_dtype_arg
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
    s.add_argument("--nerf", default="on_view", choices=["none", "on_view", "always"],
                   help="a request's NeRF fit when it does not say: on_view (default) when the page or a download "
                        "first asks for it, always while the views arrive, none never")
    s.add_argument("--orbit", action="append", default=[], metavar="NAME=DIR",
                   help="another condition folder a request may choose with orbit=NAME (repeatable; the "
                        "--conditions folder is orbit 'default')")
    s.add_argument("--nerf-seconds", type=float, default=None,
                   help="viewer: NeRF training time per generation (default 30 s)")
    s.add_argument("--nerf-steps", type=int, default=None,
                   help="viewer: NeRF training steps per generation (with --nerf-seconds: whichever ends first)")
    s.add_argument("--splat-steps", type=int, default=None,
                   help="viewer: refinement steps of a generation's head.ply, the splat the page draws in the "
                        "browser (default 300; 0: the field's initialisation, made at once)")
    s.add_argument("--ray", action="store_true", help="run on Ray Serve: one ingress, --replicas generation replicas")
    s.add_argument("--replicas", type=int, default=1, help="generation replicas with --ray (one per GPU)")
    s.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default $RAY_ADDRESS; none: start a local one)")
    s.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs reserved per replica on a CPU machine (default: the machine's CPUs / (replicas + 1))")
    add_backend_args(s)
    from ..invert.cli import add_noise3d_args
    add_noise3d_args(s)           # --panohead/--vgg (or --random ... --3d-noise): requests may ask noise=3d
    s.set_defaults(fn=cmd_serve)


def check_args(a: argparse.Namespace) -> None:
    """The argument errors that must stop the server before it starts (nothing is loaded yet)."""
    from ..config import ConfigError
    from ..io.images import ImageError
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
    if a.splat_steps is not None and a.splat_steps < 0:
        raise ValueError(f"--splat-steps {a.splat_steps}: must be 0 or more. Fix: pass e.g. --splat-steps 300")
    if a.max_upload <= 0:
        raise ValueError(f"--max-upload {a.max_upload}: must be positive. Fix: pass a size in MB, e.g. 20")
    if not 0 < a.port < 65536:
        raise ValueError(f"--port {a.port} is not a TCP port. Fix: pass 1..65535")
    from .parts import parse_orbits
    parse_orbits(a.orbit)
    from ..invert.cli import check_noise3d_files
    check_noise3d_files(a)


def _imports() -> None:
    for mod in ("starlette", "uvicorn", "multipart"):
        if importlib.util.find_spec(mod) is None:
            raise ImportError(f"dp360rt serve needs {mod!r}, which is not installed. {INSTALL_FIX}")


def cmd_serve(a: argparse.Namespace) -> int:
    check_args(a)
    _imports()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .parts import WS_MAX_BYTES, backend_from_spec, pipeline_spec, viewer_parts
    spec = pipeline_spec(a)
    if a.ray:
        from .ray_app import run_ray
        return run_ray(a, spec)
    import uvicorn
    from .app import create_app
    from .store import ResultStore
    store = ResultStore(a.store, int(a.store_max_gb * 2**30))
    if store.removed_at_start:
        print(f"dp360rt serve: removed {store.removed_at_start} unfinished generation folder(s) left in {store.root} "
              "by a server that stopped mid-run", file=sys.stderr, flush=True)
    listeners, routes = viewer_parts(not a.no_viewer, a.nerf_seconds, a.nerf_steps, store=store, mode=a.nerf,
                                     splat_steps=a.splat_steps)
    app = create_app(backend_from_spec(spec), store=store, max_queue=a.max_queue, max_upload_mb=a.max_upload,
                     token=a.token, listeners=listeners, extra_routes=routes, nerf=a.nerf)
    print(f"dp360rt serve: http://{a.host}:{a.port}  (POST /v1/generations; models load in the background, "
          "GET /readyz says when they are ready; the log says how long loading took)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info", timeout_graceful_shutdown=5, ws_max_size=WS_MAX_BYTES)
    for listener in listeners:
        close = getattr(listener, "close", None)
        if close:
            close()
    return 0
