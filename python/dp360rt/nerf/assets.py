"""Portable assets of a fitted NeRF: a textured GLB (:func:`export_glb`) and a 3D Gaussian splat
``.ply`` (:func:`export_splat`). Every argument and the output path are checked before any work;
files are written under a temporary name and renamed when complete.

A *run folder* is what ``dp360rt demo`` / a generation writes (views PNGs + ``cameras.json``, the
fitted NeRF in ``nerf/``); a NeRF folder (``config.json`` + ``model.safetensors``, what
``nerf fit --out`` writes) is accepted directly too. :func:`find_nerf` resolves either.
"""
from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..io.results import OutputError
from .glb import DEFAULT_TEXTURE, DEFAULT_TRIANGLES, check_texture_size, check_triangles

if TYPE_CHECKING:  # pragma: no cover
    from .model import Nerf


class NoNerfError(ValueError):
    """The folder holds no fitted NeRF."""


def _is_nerf(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def find_nerf(folder: str | Path) -> Path:
    """The NeRF folder of a run folder (``RUN/nerf``) or ``folder`` itself when it is a NeRF
    folder. Raises :class:`NoNerfError` (with the fix) otherwise."""
    d = Path(folder)
    if not d.is_dir():
        raise NoNerfError(f"{d} is not a folder. Fix: pass a run folder (with nerf/) or the --out folder of `nerf fit`")
    for c in (d, d / "nerf"):
        if _is_nerf(c):
            return c
    raise NoNerfError(f"{d} holds no fitted NeRF (no config.json + model.safetensors in it or in {d / 'nerf'}). "
                      f"Fix: fit one first: dp360rt nerf fit {d} --out {d / 'nerf'}")


def find_views(folder: str | Path) -> Path | None:
    """The views folder (with ``cameras.json``) of a run: ``folder`` itself, or the parent of a
    NeRF folder; None when there is none."""
    d = Path(folder)
    for c in (d, d.parent):
        if (c / "cameras.json").is_file():
            return c
    return None


def check_output_file(path: str | Path, suffix: str, overwrite: bool = False) -> Path:
    """Check before any work that ``path`` (with ``suffix``) can be written: not an existing file
    unless ``overwrite``, not a folder, its folder writable. Creates nothing."""
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise ValueError(f"{p}: expected a {suffix} file name. Fix: name the output *{suffix}")
    if p.is_dir():
        raise OutputError(errno.EISDIR, f"{p} is a folder. Fix: pass a file name ending in {suffix}")
    if p.exists() and not overwrite:
        raise OutputError(errno.EEXIST, f"{p} already exists; refusing to replace it. Fix: pass another path, "
                          "or --overwrite (overwrite=True)")
    from ..io.checks import writable_dir
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(errno.ENOENT, f"cannot write {p}: folder {parent} does not exist. Fix: create it or pass another path")
    writable_dir(parent)
    return p


def export_glb(nerf: "Nerf", path: str | Path, triangles: int = DEFAULT_TRIANGLES,
               texture_size: int = DEFAULT_TEXTURE, resolution: int = 128, level: float | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Write the field's surface as a textured glTF 2.0 binary at ``path`` (see :mod:`.glb`):
    at most ``triangles`` triangles, a ``texture_size``^2 base-colour texture, marching cubes at
    ``resolution`` cells per side on the ``level`` density iso-surface (None: the level whose
    silhouettes match the renders', see :func:`.surface.silhouette_level`). Returns {"path",
    "triangles", "vertices", "texture_size", "level", "bytes", "seconds"}."""
    from .glb import build_textured_mesh, write_glb
    triangles = check_triangles(triangles)
    texture_size = check_texture_size(texture_size)
    p = check_output_file(path, ".glb", overwrite)
    t0 = time.perf_counter()
    mesh = build_textured_mesh(nerf, triangles, texture_size, resolution, level)
    write_glb(mesh, p)
    return {"path": str(p), "triangles": int(mesh["faces"].shape[0]), "vertices": int(mesh["vertices"].shape[0]),
            "texture_size": texture_size, "level": mesh["level"], "bytes": p.stat().st_size, "seconds": time.perf_counter() - t0}


def export_splat(nerf: "Nerf", path: str | Path, views: Any = None, steps: int = 300,
                 resolution: int = 64, level: float = 10.0, max_splats: int = 60_000, lr: float = 0.01,
                 overwrite: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write a 3D Gaussian splat ``.ply`` (see :mod:`.splat`) at ``path``. With ``views`` — a
    views folder (PNGs + cameras.json) or ``(images, cameras [N, 25])`` — the Gaussians are
    seeded on the field's expected surface along the views' rays (:func:`.splat.init_splat_from_views`)
    and refined against them for ``steps`` steps (:func:`.splat_refine.refine_splat`: per-group
    Adam, L1 + D-SSIM, clone / split / prune, at most ``max_splats`` Gaussians); without views
    they are seeded on the surface voxels of a ``resolution``^3 grid at density ``level`` and
    written unrefined. Returns {"path", "splats", "bytes", "seconds", "init_seconds",
    "refine_seconds", "losses", "params"}."""
    from ..io.checks import positive_int
    from .splat import init_splat, init_splat_from_views, write_splat_ply
    from .splat_refine import refine_splat
    steps = positive_int(steps, "steps", minimum=0)
    resolution = positive_int(resolution, "resolution", 1024, minimum=4)
    max_splats = positive_int(max_splats, "max_splats", 2_000_000)
    p = check_output_file(path, ".ply", overwrite)
    images = cams = None
    if views is not None:
        if isinstance(views, (str, Path)):
            from .cameras import load_views
            images, cams, _ = load_views(views)
        else:
            from .cameras import to_image
            images = [to_image(v) for v in views[0]]
            cams = torch.as_tensor(views[1], dtype=torch.float64)
    t0 = time.perf_counter()
    if images is not None:
        h, w = images[0].shape[:2]
        # leave room for densification: start from at most half the budget
        params = init_splat_from_views(nerf, cams, w, h, max(1, max_splats // 2))
    else:
        params = init_splat(nerf, resolution, level, max_splats, seed)
    t1 = time.perf_counter()
    losses: list[float] = []
    if images is not None and steps > 0:
        losses = refine_splat(params, images, cams, steps=steps, lr=lr, max_splats=max_splats,
                              background=nerf.background.detach().cpu().float(), seed=seed)
    t2 = time.perf_counter()
    write_splat_ply(params, p)
    return {"path": str(p), "splats": int(params["means"].shape[0]), "bytes": p.stat().st_size,
            "seconds": time.perf_counter() - t0, "init_seconds": t1 - t0, "refine_seconds": t2 - t1,
            "losses": losses, "params": params}
