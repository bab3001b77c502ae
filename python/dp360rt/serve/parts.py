"""What a serving process is built from, shared by ``dp360rt serve`` and its Ray Serve replicas:
the pipeline's spec (plain values that travel to a replica), the generation backend built from it,
and the viewer's listener and routes."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

WS_MAX_BYTES = 1 << 20          # uvicorn's WebSocket message cap (a frame request is a few hundred bytes)


def parse_orbits(items: list[str]) -> dict[str, str]:
    """``--orbit NAME=DIR`` values -> {name: folder}; each folder must exist (checked before loading)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--orbit {item!r}: expected NAME=DIR (a name of letters, digits, - and _). "
                             "Fix: e.g. --orbit wide=cond/wide")
        if name == "default" or name in out:
            raise ValueError(f"--orbit {name}: the name is taken ('default' is --conditions). Fix: pick another name")
        if not Path(folder).is_dir():
            raise ValueError(f"--orbit {name}={folder}: no such folder. Fix: pass a folder of condition images "
                             "(dp360rt conditions --orbit ... --out DIR writes one)")
        out[name] = folder
    return out


def pipeline_spec(a: argparse.Namespace) -> dict[str, Any]:
    """Everything a process needs to build the pipeline (plain values: it travels to Ray replicas)."""
    import torch
    cuda = torch.cuda.is_available()
    return {"nvs": a.nvs, "backview": a.backview, "random": a.random, "config": a.config, "conditions": a.conditions,
            "device": a.device or ("cuda" if cuda else "cpu"), "dtype": a.dtype or ("fp16" if cuda else "fp32"),
            "compute_dtype": a.compute_dtype, "engine": a.engine, "max_memory": a.max_memory, "backend": a.backend, "export_dir": a.export_dir,
            "policy": a.policy, "orbits": parse_orbits(getattr(a, "orbit", [])),
            **{k: getattr(a, k, None) for k in ("panohead", "vgg", "noise3d", "no_noise3d", "w_steps", "pti_steps")}}


def backend_from_spec(spec: dict[str, Any], replica: str | None = None):
    """A :class:`~dp360rt.serve.backend.LocalBackend` for a :func:`pipeline_spec` (not loaded yet)."""
    from ..engine.pipeline_args import pipeline_from_args
    from .backend import LocalBackend
    ns = argparse.Namespace(**spec)
    return LocalBackend(lambda: pipeline_from_args(ns), conditions=spec["conditions"], policy=spec["policy"],
                        replica=replica, orbits=spec.get("orbits"))


def viewer_parts(enabled: bool = True, nerf_seconds: float | None = None, nerf_steps: int | None = None,
                 store: Any = None, mode: str = "on_view", splat_steps: int | None = None
                 ) -> tuple[list[Any], list[Any]]:
    """The viewer's listener and routes when ``dp360rt.viewer`` is present (else nothing); the
    NeRF budget per generation is ``nerf_seconds`` / ``nerf_steps`` (default: the viewer's 30 s),
    fitted as ``mode`` says unless a request says otherwise; views are read back from ``store``;
    ``splat_steps``: refinement steps of ``head.ply`` (default: the exporter's)."""
    if not enabled or importlib.util.find_spec("dp360rt.viewer") is None:
        return [], []
    from dp360rt.viewer import NerfSessions, viewer_routes
    export = {"splat": {"steps": splat_steps}} if splat_steps is not None else None
    sessions = NerfSessions(seconds=nerf_seconds, steps=nerf_steps, mode=mode, store=store, export_options=export)
    return [sessions], list(viewer_routes(sessions, upload=True))


