"""Textured glTF 2.0 binary (``.glb``) from a fitted field: surface level chosen from the renders'
silhouettes -> marching cubes (:func:`.mesh.extract_mesh`) with the vertices snapped onto the
field's own iso-surface -> quadric decimation to a triangle budget (``fast-simplification``) ->
UV atlas (``xatlas``) -> texture baked from the field -> one-mesh GLB written by trimesh.

Surface: the density level is the one at which "the mesh covers this ray" agrees best with "the
render shows something on this ray (opacity >= 0.5)" (:func:`.surface.silhouette_level`); a
fixed level (the old 10) put the surface about a pixel outside the rendered silhouette all round,
and a thin ring of surface colour where the render shows background costs more than any texture
error. Baking: each texel covered by a triangle in UV space is mapped to its 3D point on that
triangle; the texture holds what a render shows there, a short ray volume-rendered along the
inward normal (:func:`.surface.surface_colors`), not the field's raw colour at the point (a render
blends colours over the depth where opacity rises; the raw colour is over-contrasted). Texels no
triangle covers are filled from their neighbours so bilinear lookups at chart seams do not pull
in black. Diagnosis and figures: ``benchmarks/bench_assets.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from .model import Nerf

# The issue allows up to 100k; 30k because xatlas's UV charts grow superlinearly with the triangle count
# (a noisy generated head on 2 CPU cores: 10k in 1.7 s, 30k in 16 s, 100k over 180 s), while the synthetic
# head scores the same at 30k as undecimated at 34.5k (26.35 vs 26.23 dB; benchmarks/RESULTS.md, issue 28).
DEFAULT_TRIANGLES = 30_000
DEFAULT_TEXTURE = 1024
MAX_TEXTURE = 8192


def check_texture_size(size: Any) -> int:
    """``size`` must be a power of two from 16 to 8192 (GPUs and glTF viewers mip-map those)."""
    try:
        s = int(size)
        ok = s == size and 16 <= s <= MAX_TEXTURE and (s & (s - 1)) == 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"texture size {size!r} is not a power of two from 16 to {MAX_TEXTURE}. "
                         "Fix: pass e.g. --texture-size 1024")
    return s


def check_triangles(n: Any) -> int:
    """A triangle budget must be a positive integer."""
    try:
        v = int(n)
        ok = v == n and v > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"triangle budget {n!r} must be a positive integer. Fix: pass e.g. --triangles {DEFAULT_TRIANGLES}")
    return v


def decimate(vertices: np.ndarray, faces: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric-error decimation to at most ``target`` triangles -> (vertices [V, 3], faces [T, 3])."""
    if faces.shape[0] <= target:
        return vertices, faces
    import fast_simplification
    v, f = vertices.astype(np.float32), faces.astype(np.int64)
    ratio = 1.0 - target / faces.shape[0]
    for _ in range(4):     # the simplifier stops near, not always under, the target: tighten until it fits
        v2, f2 = fast_simplification.simplify(v, f, target_reduction=min(ratio, 0.999))
        if f2.shape[0] <= target:
            return np.asarray(v2, np.float32), np.asarray(f2, np.int64)
        ratio = 1.0 - (1.0 - ratio) * target / f2.shape[0] * 0.98
    return np.asarray(v2, np.float32), np.asarray(f2, np.int64)[:target]


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals [V, 3] of a mesh wound outward (as :func:`.mesh.extract_mesh`)."""
    fn = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    n = np.zeros_like(vertices, dtype=np.float64)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    return (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _raster_uv(uv: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per texel of a ``size``^2 image (row 0 at v = 1, as glTF and trimesh agree): the covering
    triangle (-1 for none) [S, S] and its barycentric weights [S, S, 3]."""
    tri_id = np.full((size, size), -1, np.int64)
    bary = np.zeros((size, size, 3), np.float32)
    px = np.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], 1)   # texel centres at integers
    for t, (a, b, c) in enumerate(faces):
        pa, pb, pc = px[a], px[b], px[c]
        x0, x1 = int(np.floor(min(pa[0], pb[0], pc[0]))), int(np.ceil(max(pa[0], pb[0], pc[0])))
        y0, y1 = int(np.floor(min(pa[1], pb[1], pc[1]))), int(np.ceil(max(pa[1], pb[1], pc[1])))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size - 1), min(y1, size - 1)
        if x1 < x0 or y1 < y0:
            continue
        gy, gx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
        d = (pb[1] - pc[1]) * (pa[0] - pc[0]) + (pc[0] - pb[0]) * (pa[1] - pc[1])
        if abs(d) < 1e-12:
            continue
        w0 = ((pb[1] - pc[1]) * (gx - pc[0]) + (pc[0] - pb[0]) * (gy - pc[1])) / d
        w1 = ((pc[1] - pa[1]) * (gx - pc[0]) + (pa[0] - pc[0]) * (gy - pc[1])) / d
        w2 = 1 - w0 - w1
        inside = (w0 >= -1e-4) & (w1 >= -1e-4) & (w2 >= -1e-4)
        yy, xx = gy[inside], gx[inside]
        tri_id[yy, xx] = t
        bary[yy, xx] = np.stack([w0[inside], w1[inside], w2[inside]], -1)
    return tri_id, bary


def _fill_empty(img: np.ndarray, covered: np.ndarray, iters: int = 8) -> np.ndarray:
    """Grow the covered texels' colours into empty ones, ``iters`` texels deep (seam padding)."""
    img, cov = img.copy(), covered.copy()
    for _ in range(iters):
        acc = np.zeros_like(img)
        cnt = np.zeros(cov.shape, np.float32)
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            acc += np.roll(np.roll(img * cov[..., None], dy, 0), dx, 1)
            cnt += np.roll(np.roll(cov.astype(np.float32), dy, 0), dx, 1)
        grow = (~cov) & (cnt > 0)
        img[grow] = acc[grow] / cnt[grow][:, None]
        cov = cov | grow
    return img


def build_textured_mesh(nerf: "Nerf", triangles: int = DEFAULT_TRIANGLES, texture_size: int = DEFAULT_TEXTURE,
                        resolution: int = 128, level: float | None = None) -> dict[str, Any]:
    """The field's surface as a UV-mapped mesh -> {"vertices" [V, 3] world, "faces" [T, 3] with
    T <= ``triangles``, "uv" [V, 2] in [0, 1], "texture" uint8 [S, S, 3], "level" (the density
    iso-level used: ``level``, or when None the one matching the renders' silhouettes)}. Raises
    :class:`~dp360rt.nerf.splat.EmptyFieldError` when the field has no surface."""
    from .mesh import extract_mesh
    from .splat import EmptyFieldError
    from .surface import silhouette_level, snap_to_level, surface_colors
    triangles = check_triangles(triangles)
    texture_size = check_texture_size(texture_size)
    if level is None:
        level = silhouette_level(nerf)
        if level is None:
            raise EmptyFieldError("the field has no surface (no ray through it reaches opacity 0.5): nothing "
                                  "to export. Fix: fit the NeRF longer")
    mesh = extract_mesh(nerf, resolution=resolution, level=level)
    if mesh["faces"].shape[0] == 0:
        raise EmptyFieldError(f"the field has no surface at density {level:g}: nothing to export. "
                              "Fix: fit the NeRF longer, or lower --level")
    v, f = decimate(mesh["vertices"], mesh["faces"], triangles)
    cell = 2 * nerf.config.bound / resolution
    v = snap_to_level(nerf, v, vertex_normals(v, f), level, reach=2.0 * cell)     # after decimation: fewer vertices
    import xatlas
    vmap, faces, uv = xatlas.parametrize(v, f.astype(np.uint32))
    verts = v[vmap].astype(np.float32)
    faces = faces.astype(np.int64)
    uv = np.clip(uv.astype(np.float32), 0.0, 1.0)
    tri_id, bary = _raster_uv(uv, faces, texture_size)
    cov = tri_id >= 0
    fn = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
    tid = tri_id[cov]
    pts = (bary[cov][:, :, None] * verts[faces[tid]]).sum(1)
    scale = max(cell, nerf.step_size)
    cols = surface_colors(nerf, pts, fn[tid], outside=scale, inside=4 * scale)
    img = np.zeros((texture_size, texture_size, 3), np.float32)
    img[cov] = cols
    img = _fill_empty(img, cov)
    return {"vertices": verts, "faces": faces, "uv": uv, "texture": (img * 255 + 0.5).astype(np.uint8),
            "level": float(level)}


def write_glb(mesh: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write a mesh from :func:`build_textured_mesh` as a glTF 2.0 binary (one mesh, one
    unlit-looking PBR material with the baked base colour texture), atomically."""
    import trimesh
    from PIL import Image

    from ..io.results import write_file_atomic
    mat = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(mesh["texture"]),
                                              metallicFactor=0.0, roughnessFactor=1.0, doubleSided=False)
    tm = trimesh.Trimesh(vertices=mesh["vertices"], faces=mesh["faces"], process=False,
                         visual=trimesh.visual.TextureVisuals(uv=mesh["uv"], material=mat))

    def write(tmp: Path) -> None:
        tmp.write_bytes(trimesh.Scene(tm).export(file_type="glb"))
    return write_file_atomic(path, write)


def read_glb(path: str | Path) -> dict[str, np.ndarray]:
    """Read a GLB written by :func:`write_glb` -> {"vertices", "faces", "uv", "texture"} (as
    trimesh loads them; tests and the benchmark render it)."""
    import trimesh
    scene = trimesh.load(str(path), force="scene")
    tm = list(scene.geometry.values())[0]
    img = tm.visual.material.baseColorTexture
    return {"vertices": np.asarray(tm.vertices, np.float32), "faces": np.asarray(tm.faces, np.int64),
            "uv": np.asarray(tm.visual.uv, np.float32), "texture": np.asarray(img.convert("RGB"))}
