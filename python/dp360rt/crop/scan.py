"""Renders of a textured 3D head scan at known head rotations, for the held-out crop checks.

The 2.5D heads of :mod:`dp360rt.crop.synth` take their face relief from the generic face the
crop fits, so they cannot show where that face is wrong, and they have no real nose occluding
a cheek. A scan can: a triangle mesh with a texture (Wavefront OBJ + image) and its 68 landmarks
in 3D (menpo's LJSON, iBUG order by group), rendered with perspective and a z-buffer.

The head frame is the generic face's (:mod:`dp360rt.crop.face3d`: x to the subject's left, y up,
z out of the face, mm): :func:`load_scan` finds it by a similarity fit (Procrustes) of the generic
face's fitted landmarks to the scan's, so a render at head rotation ``R`` has the camera label
``R`` up to that fit's own error (its residual is reported). The turn's pivot is the recipe's head
centre in that frame, so its projection never moves and the framing reference of every render is
the frontal render's.

Used by ``benchmarks/crop_heldout.py --scan`` (menpo3d's ``james`` scan, BSD-3) and its test.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .face3d import FIT_INDICES, GENERIC_FACE

# iBUG 68 order: jaw, the two brows, nose, the two eyes, mouth (each pair image-left first)
_GROUP_SIZES = {"jaw": 17, "brow": 5, "nose": 9, "eye": 6, "mouth": 20}


@dataclass
class HeadScan:
    """A textured mesh in the generic face's head frame (mm) and its 68 landmarks [68, 3].

    ``vertices`` [V, 3], ``faces`` [F, 3] vertex indices, ``uv`` [T, 2] texture coordinates,
    ``face_uv`` [F, 3] indices into ``uv``, ``texture`` [H, W, 3] float32 0-255, ``fit_rms_mm``
    the residual of the similarity fit that placed the scan in the head frame (in generic-face mm)."""

    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    face_uv: np.ndarray
    texture: np.ndarray
    landmarks: np.ndarray
    fit_rms_mm: float


def _read_obj(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    V, T, F, FT = [], [], [], []
    for line in path.read_text().splitlines():
        if line.startswith("v "):
            V.append([float(a) for a in line.split()[1:4]])
        elif line.startswith("vt "):
            T.append([float(a) for a in line.split()[1:3]])
        elif line.startswith("f "):
            corners = [c.split("/") for c in line.split()[1:]]
            if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                raise ValueError(f"{path}: only textured triangles ('f v/vt v/vt v/vt') are read; triangulate "
                                 "the mesh and give it texture coordinates")
            F.append([int(c[0]) - 1 for c in corners])
            FT.append([int(c[1]) - 1 for c in corners])
    if not V or not F or not T:
        raise ValueError(f"{path}: no vertices, texture coordinates or faces: not a textured Wavefront OBJ")
    return np.array(V), np.array(T), np.array(F), np.array(FT)


def _read_ljson_68(path: Path) -> np.ndarray:
    """menpo's LJSON (v2 or v3) with 68 points labelled by parts -> [68, 3] in iBUG order. The
    parts are recognised by name (jaw or chin, brow, nose, eye, mouth) and the two brows and eyes
    ordered by their x, image-left first, as iBUG numbers them."""
    d = json.loads(path.read_text())
    group = d["groups"][next(iter(d["groups"]))] if "groups" in d else d
    points = np.array(group["landmarks"]["points"], float)
    if points.shape != (68, 3):
        raise ValueError(f"{path}: {points.shape[0]} landmarks of dimension {points.shape[1]}; the 68-point iBUG set in 3D is needed")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _GROUP_SIZES}
    for lab in group["labels"]:
        name = lab["label"].lower()
        kind = "jaw" if ("jaw" in name or "chin" in name) else "brow" if "brow" in name else \
            "nose" if "nose" in name else "eye" if "eye" in name else "mouth" if ("mouth" in name or "lip" in name) else None
        if kind is None:
            raise ValueError(f"{path}: landmark group {lab['label']!r} is not a part of the iBUG 68")
        parts[kind].append(np.asarray(lab["mask"], int))
    order = []
    for kind in ("jaw", "brow", "nose", "eye", "mouth"):
        masks = sorted(parts[kind], key=lambda m: points[m, 0].mean())
        want = 2 if kind in ("brow", "eye") else 1
        if len(masks) != want or any(len(m) != _GROUP_SIZES[kind] for m in masks):
            raise ValueError(f"{path}: expected {want} '{kind}' group(s) of {_GROUP_SIZES[kind]} points, "
                             f"found sizes {[len(m) for m in masks]}")
        order += [int(i) for m in masks for i in m]
    return points[order]


def similarity_fit(X: np.ndarray, Y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The least-squares similarity ``Y ~ s R X + t`` of point sets [N, 3] -> (s, R [3, 3], t [3])."""
    xm, ym = X.mean(0), Y.mean(0)
    U, S, Vt = np.linalg.svd((Y - ym).T @ (X - xm))
    d = np.array([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ np.diag(d) @ Vt
    s = float((S * d).sum() / ((X - xm) ** 2).sum())
    return s, R, ym - s * R @ xm


def load_scan(obj_path: str | Path, landmarks_path: str | Path, texture_path: str | Path | None = None) -> HeadScan:
    """Read a scan (OBJ, its texture: ``texture_path`` or the image next to the OBJ with its stem,
    and an LJSON of its 68 landmarks) and move it into the generic face's head frame -> :class:`HeadScan`."""
    from PIL import Image
    obj_path, landmarks_path = Path(obj_path), Path(landmarks_path)
    V, T, F, FT = _read_obj(obj_path)
    L = _read_ljson_68(landmarks_path)
    if texture_path is None:
        found = [p for p in (obj_path.with_suffix(e) for e in (".jpg", ".jpeg", ".png")) if p.exists()]
        if not found:
            raise ValueError(f"{obj_path}: no texture image beside it ({obj_path.stem}.jpg or .png); pass texture_path")
        texture_path = found[0]
    texture = np.asarray(Image.open(texture_path).convert("RGB"), np.float32)
    s, R, t = similarity_fit(GENERIC_FACE[FIT_INDICES], L[FIT_INDICES])
    to_head = lambda P: (P - t) @ R / s                      # noqa: E731  (scan -> head frame, generic-face mm)
    Lh = to_head(L)
    rms = float(np.sqrt(((Lh[FIT_INDICES] - GENERIC_FACE[FIT_INDICES]) ** 2).sum(1).mean()))
    return HeadScan(to_head(V), F, T, FT, texture, Lh, rms)


def _project(points: np.ndarray, R: np.ndarray, pivot: np.ndarray, distance_mm: float, focal_px: float,
             size: int) -> tuple[np.ndarray, np.ndarray]:
    """Head-frame points [N, 3] -> (pixel column/row [N, 2], distance from the camera [N])."""
    v = (points - pivot) @ R.T
    z = distance_mm - v[:, 2]
    return np.stack([focal_px * v[:, 0] / z + size / 2, size / 2 - focal_px * v[:, 1] / z], 1), z


def render_scan(scan: HeadScan, R: np.ndarray, pivot: np.ndarray, size: int = 768, distance_mm: float = 1000.0,
                focal_px: float | None = None, supersample: int = 2, background: tuple[int, int, int] = (120, 120, 120)
                ) -> tuple[np.ndarray, np.ndarray]:
    """The scan at head rotation ``R`` [3, 3] (viewer frame: x right, y up, z towards the camera)
    about ``pivot`` [3] (head frame, mm), seen by a pinhole camera ``distance_mm`` in front of the
    pivot, which projects to the image centre -> (image [size, size, 3] uint8, the 68 landmarks'
    pixel positions [68, 2]). ``focal_px`` defaults to 1.9 x size (a portrait lens: the head spans
    about a third of the frame at 1 m); texture bilinear, ``supersample`` per axis."""
    from scipy.ndimage import map_coordinates
    W = size * supersample
    f = (1.9 * size if focal_px is None else focal_px) * supersample
    uvp, z = _project(scan.vertices, np.asarray(R, float), np.asarray(pivot, float), distance_mm, f, W)
    zbuf = np.full((W, W), np.inf)
    tri = np.full((W, W), -1)
    bary = np.zeros((W, W, 2))
    P = uvp[scan.faces]                                      # [F, 3, 2]
    lo = np.clip(np.floor(P.min(1)).astype(int), 0, W - 1)
    hi = np.clip(np.ceil(P.max(1)).astype(int), 0, W - 1)
    for k in np.flatnonzero((hi >= lo).all(1) & (z[scan.faces] > 0).all(1)):
        (x0, y0), (x1, y1), (x2, y2) = P[k]
        den = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2)
        if abs(den) < 1e-12:
            continue
        gx, gy = np.meshgrid(np.arange(lo[k, 0], hi[k, 0] + 1) + 0.5, np.arange(lo[k, 1], hi[k, 1] + 1) + 0.5)
        a = ((y1 - y2) * (gx - x2) + (x2 - x1) * (gy - y2)) / den
        b = ((y2 - y0) * (gx - x2) + (x0 - x2) * (gy - y2)) / den
        depth = a * z[scan.faces[k, 0]] + b * z[scan.faces[k, 1]] + (1 - a - b) * z[scan.faces[k, 2]]
        win = (slice(lo[k, 1], hi[k, 1] + 1), slice(lo[k, 0], hi[k, 0] + 1))
        near = (a >= 0) & (b >= 0) & (a + b <= 1) & (depth < zbuf[win])
        zbuf[win][near] = depth[near]
        tri[win][near] = k
        bary[win][near] = np.stack([a[near], b[near]], 1)
    img = np.empty((W, W, 3), np.float32)
    img[:] = background
    hit = tri >= 0
    ft = scan.face_uv[tri[hit]]
    a, b = bary[hit][:, :1], bary[hit][:, 1:]
    uv = a * scan.uv[ft[:, 0]] + b * scan.uv[ft[:, 1]] + (1 - a - b) * scan.uv[ft[:, 2]]
    th, tw = scan.texture.shape[:2]
    rows, cols = (1 - uv[:, 1]) * (th - 1), uv[:, 0] * (tw - 1)             # OBJ texture v runs up
    img[hit] = np.stack([map_coordinates(scan.texture[..., c], [rows, cols], order=1, mode="nearest") for c in range(3)], 1)
    img = img.reshape(size, supersample, size, supersample, 3).mean((1, 3))
    landmarks = _project(scan.landmarks, np.asarray(R, float), np.asarray(pivot, float), distance_mm, f, W)[0] / supersample
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), landmarks

