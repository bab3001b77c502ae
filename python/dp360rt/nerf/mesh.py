"""Meshes of a fitted field: :func:`extract_mesh` samples the density on a regular grid over the
occupied box and extracts the ``level`` iso-surface with marching cubes
(``skimage.measure.marching_cubes`` when scikit-image is installed, else the built-in
:func:`marching_tetrahedra`: same surface, more triangles); vertex colours are the field's colour
seen along the inward normal. :func:`write_ply` (binary) and :func:`write_obj`
(``v x y z r g b``) write it; :func:`write_mesh` picks by file suffix.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from .model import Nerf


MAX_MESH_RESOLUTION = 1024          # cells per side of the marching grid


# The cube's 8 corners (x, y, z offsets) and its split into 6 tetrahedra around the main diagonal 0-7.
_CORNERS = np.array([[x, y, z] for z in (0, 1) for y in (0, 1) for x in (0, 1)])
_TETS = np.array([[0, 1, 3, 7], [0, 3, 2, 7], [0, 2, 6, 7], [0, 6, 4, 7], [0, 4, 5, 7], [0, 5, 1, 7]])
_TET_EDGES = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def _tet_case_table() -> list[list[tuple[int, int, int]]]:
    """Triangles (as tet-edge indices) for each of the 16 inside/outside patterns of a tetrahedron,
    oriented so that the normal points from inside (value >= level) to outside."""
    table: list[list[tuple[int, int, int]]] = []
    for case in range(16):
        inside = [(case >> i) & 1 for i in range(4)]
        cut = [e for e, (a, b) in enumerate(_TET_EDGES) if inside[a] != inside[b]]
        if len(cut) == 3:
            table.append([(cut[0], cut[1], cut[2])])
        elif len(cut) == 4:
            # quad: order the 4 cut edges around the loop (edges sharing a vertex are adjacent)
            e0 = cut[0]
            loop = [e0]
            rest = cut[1:]
            while rest:
                last = set(_TET_EDGES[loop[-1]])
                nxt = next(e for e in rest if len(last & set(_TET_EDGES[e])) == 1)
                loop.append(nxt)
                rest.remove(nxt)
            table.append([(loop[0], loop[1], loop[2]), (loop[0], loop[2], loop[3])])
        else:
            table.append([])
    return table


_TET_TABLE = _tet_case_table()


def marching_tetrahedra(vol: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of ``vol`` [Z, Y, X] at ``level`` -> (vertices [V, 3] in (x, y, z) voxel units,
    triangles [T, 3] int). Vertices on shared edges are merged."""
    vol = np.asarray(vol, dtype=np.float32)
    nz, ny, nx = vol.shape
    inside = vol >= level
    # cubes that straddle the level
    any_in = np.zeros((nz - 1, ny - 1, nx - 1), bool)
    all_in = np.ones((nz - 1, ny - 1, nx - 1), bool)
    for x, y, z in _CORNERS:
        sl = inside[z:z + nz - 1, y:y + ny - 1, x:x + nx - 1]
        any_in |= sl
        all_in &= sl
    cz, cy, cx = np.nonzero(any_in & ~all_in)
    if cz.size == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    base = np.stack([cx, cy, cz], 1)                                            # [C, 3]
    corner_pos = base[:, None, :] + _CORNERS[None]                               # [C, 8, 3]
    flat = lambda p: (p[..., 2] * ny + p[..., 1]) * nx + p[..., 0]               # noqa: E731
    corner_id = flat(corner_pos)                                                 # [C, 8] global vertex ids
    corner_val = vol.reshape(-1)[corner_id]
    tris_keys = []                                                               # per triangle: 3 x (a, b) grid-vertex pairs
    for tet in _TETS:
        ids = corner_id[:, tet]                                                  # [C, 4]
        vals = corner_val[:, tet]
        case = ((vals >= level).astype(np.int64) * (1 << np.arange(4))).sum(1)
        for c in range(16):
            tris = _TET_TABLE[c]
            if not tris:
                continue
            sel = np.nonzero(case == c)[0]
            if sel.size == 0:
                continue
            for tri in tris:
                keys = []
                for e in tri:
                    a, b = _TET_EDGES[e]
                    keys.append(np.stack([ids[sel, a], ids[sel, b]], 1))
                tris_keys.append(np.stack(keys, 1))                              # [S, 3, 2]
    keys = np.concatenate(tris_keys, 0)                                          # [T, 3, 2]
    pairs = np.sort(keys.reshape(-1, 2), axis=1)
    uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
    va, vb = vol.reshape(-1)[uniq[:, 0]], vol.reshape(-1)[uniq[:, 1]]
    t = np.clip((level - va) / np.where(np.abs(vb - va) < 1e-12, 1e-12, vb - va), 0.0, 1.0)[:, None]

    def pos(i: np.ndarray) -> np.ndarray:
        return np.stack([i % nx, (i // nx) % ny, i // (nx * ny)], 1).astype(np.float32)

    verts = pos(uniq[:, 0]) * (1 - t) + pos(uniq[:, 1]) * t
    faces = inv.reshape(-1, 3)
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    return verts.astype(np.float32), faces.astype(np.int64)


@torch.no_grad()
def extract_mesh(nerf: "Nerf", resolution: int = 128, level: float = 10.0, chunk: int = 1 << 16,
                 method: str = "auto") -> dict[str, np.ndarray]:
    """Iso-surface ``density == level`` (per world unit) over the occupied box ->
    {"vertices" [V, 3] world, "faces" [T, 3], "colors" [V, 3] uint8, "normals" [V, 3]}.
    ``method``: "auto" (scikit-image when installed), "skimage" or "tetra"."""
    from ..io.checks import positive_int
    resolution = positive_int(resolution, "resolution", MAX_MESH_RESOLUTION, minimum=2)
    if nerf.field is None or nerf.occ is None:
        raise RuntimeError("the field is not fitted. Fix: fit or load a model first")
    b = nerf.config.bound
    lo01, hi01 = nerf.occ.bbox01()
    if bool((lo01 > hi01).any()):
        return {"vertices": np.zeros((0, 3), np.float32), "faces": np.zeros((0, 3), np.int64),
                "colors": np.zeros((0, 3), np.uint8), "normals": np.zeros((0, 3), np.float32)}
    pad = 2.0 / resolution
    lo01 = (lo01 - pad).clamp(0, 1).cpu()
    hi01 = (hi01 + pad).clamp(0, 1).cpu()
    n = [max(2, int(round(float(hi01[i] - lo01[i]) * resolution)) + 1) for i in range(3)]   # x, y, z
    axes = [torch.linspace(float(lo01[i]), float(hi01[i]), n[i]) for i in range(3)]
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    pts = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    field = nerf.field
    field.eval()
    dens = []
    for s in range(0, pts.shape[0], chunk):
        p = pts[s:s + chunk].to(nerf.device)
        sig = field.density(p).float()
        sig = torch.where(nerf.occ.lookup(p), sig, torch.zeros_like(sig))
        dens.append(sig.cpu())
    vol = torch.cat(dens).reshape(n[2], n[1], n[0]).numpy()
    verts = faces = None
    if method in ("auto", "skimage"):
        try:
            from skimage.measure import marching_cubes
            if vol.max() >= level >= vol.min():
                v, f, _, _ = marching_cubes(vol, level=level)
                verts, faces = v[:, ::-1].astype(np.float32).copy(), f.astype(np.int64)   # (z,y,x) -> (x,y,z)
            else:
                verts, faces = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
        except ImportError:
            if method == "skimage":
                raise ImportError("method='skimage' needs scikit-image. Fix: pip install scikit-image") from None
    if verts is None:
        verts, faces = marching_tetrahedra(vol, level)
    step = np.array([(float(hi01[i] - lo01[i])) / (n[i] - 1) for i in range(3)], np.float32)
    world = (verts * step + lo01.numpy()) * (2 * b) - b
    # normals: minus the density gradient (finite differences on the sampled grid)
    gz, gy, gx = np.gradient(vol)
    vi = np.clip(np.round(verts).astype(np.int64), 0, np.array([n[0] - 1, n[1] - 1, n[2] - 1]))
    g = np.stack([gx[vi[:, 2], vi[:, 1], vi[:, 0]], gy[vi[:, 2], vi[:, 1], vi[:, 0]], gz[vi[:, 2], vi[:, 1], vi[:, 0]]], 1)
    g = g / step
    normals = -g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    if faces.shape[0]:                              # wind every triangle outward (along -grad density)
        fn = np.cross(world[faces[:, 1]] - world[faces[:, 0]], world[faces[:, 2]] - world[faces[:, 0]])
        flip = (fn * normals[faces].mean(1)).sum(1) < 0
        faces[flip] = faces[flip][:, ::-1]
    colors = np.zeros((verts.shape[0], 3), np.uint8)
    if verts.shape[0]:
        cols = []
        x01 = torch.from_numpy((world + b) / (2 * b)).float()
        nd = torch.from_numpy(-normals).float()
        for s in range(0, x01.shape[0], chunk):
            _, rgb = field(x01[s:s + chunk].to(nerf.device), nd[s:s + chunk].to(nerf.device))
            cols.append(rgb.float().cpu())
        colors = (torch.cat(cols).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    return {"vertices": world.astype(np.float32), "faces": faces, "colors": colors, "normals": normals.astype(np.float32)}


def write_ply(mesh: dict[str, Any], path: str | Path) -> Path:
    """Binary little-endian PLY with per-vertex colour."""
    p = Path(path)
    v = np.asarray(mesh["vertices"], np.float32)
    f = np.asarray(mesh["faces"], np.int32)
    c = np.asarray(mesh.get("colors", np.full((len(v), 3), 200, np.uint8)), np.uint8)
    header = ("ply\nformat binary_little_endian 1.0\ncomment dp360rt nerf mesh\n"
              f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\n"
              f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n")
    vert = np.empty(len(v), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    vert["x"], vert["y"], vert["z"] = v[:, 0], v[:, 1], v[:, 2]
    vert["r"], vert["g"], vert["b"] = c[:, 0], c[:, 1], c[:, 2]
    face = np.empty(len(f), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    face["n"] = 3
    face["i"] = f
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(vert.tobytes())
            fh.write(face.tobytes())
    except OSError as e:
        raise OSError(f"cannot write {p}: {e.strerror or e}. Fix: choose a writable output path") from e
    return p


def write_obj(mesh: dict[str, Any], path: str | Path) -> Path:
    """Wavefront OBJ with vertex colours as ``v x y z r g b`` (r, g, b in [0, 1])."""
    p = Path(path)
    v = np.asarray(mesh["vertices"], np.float32)
    f = np.asarray(mesh["faces"], np.int64) + 1
    c = np.asarray(mesh.get("colors", np.full((len(v), 3), 200, np.uint8)), np.float32) / 255.0
    lines = ["# dp360rt nerf mesh"]
    lines += [f"v {a:.6f} {b:.6f} {cc:.6f} {r:.4f} {g:.4f} {bb:.4f}" for (a, b, cc), (r, g, bb) in zip(v, c)]
    lines += [f"f {i} {j} {k}" for i, j, k in f]
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(lines) + "\n")
    except OSError as e:
        raise OSError(f"cannot write {p}: {e.strerror or e}. Fix: choose a writable output path") from e
    return p


def write_mesh(mesh: dict[str, Any], path: str | Path) -> Path:
    """Write a mesh from :func:`extract_mesh` as ``.ply`` (:func:`write_ply`) or ``.obj``
    (:func:`write_obj`), chosen by the suffix of ``path``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".ply":
        return write_ply(mesh, path)
    if suffix == ".obj":
        return write_obj(mesh, path)
    raise ValueError(f"unknown mesh format {suffix or '(none)'} for {path}. Fix: use a .ply or .obj file name")
