"""Synthetic turned heads with an exact camera label, for the held-out crop checks.

:func:`render_turned` lifts a near-frontal photo onto a 2.5D head (a depth for every pixel) and
renders it, orthographically, turned by a known yaw and pitch about the head's centre, with a
z-buffer. The head is *not* the generic face the crop fits: an ellipsoid skull (its own width,
height, depth and centre per subject) with a face relief inside the landmarks' hull made from the
generic face's depths scaled and perturbed per subject (so the fit does not see its own model), and
a flat background of the photo's border colour. Used by ``benchmarks/crop_heldout.py`` and
``tests/test_crop.py``. Disocclusions are filled from the nearest rendered pixel.

Label: the source's head rotation ``R0`` (PanoHead's label for its samples, or a fit) turned by
``R_delta``: ``R_true = R_delta @ R0``. Framing reference: rotating about the head centre keeps
its projection, so the recipe's quad for the render is the source's quad (same centre and side).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .face3d import GENERIC_FACE, _rotation_from_vector


@dataclass
class SynthHead:
    """A synthetic subject: skull semi-axes (mm), the skull centre below / behind the inner eye
    corners (mm), a face-relief depth factor and per-landmark depth noise (mm) with its seed."""

    half_width: float = 92.0            # skull and hair
    half_height: float = 122.0
    half_depth: float = 96.0
    centre_down: float = 15.0
    centre_back: float = 85.0
    relief: float = 1.1
    noise_mm: float = 3.0
    seed: int = 0


def turn(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """The head rotation (viewer frame: x right, y up, z towards the viewer) that moves the camera
    to ``yaw_deg`` (positive: the subject's left) and ``pitch_deg`` (positive: above), as
    :func:`dp360rt.crop.recipe.yaw_pitch` reads it: the head turns the opposite way."""
    ry = _rotation_from_vector(np.array([0.0, -math.radians(yaw_deg), 0.0]))
    rx = _rotation_from_vector(np.array([math.radians(pitch_deg), 0.0, 0.0]))
    return rx @ ry


def _depth_map(shape, centre_px, px_per_mm, roll_axes, landmarks, head: SynthHead) -> np.ndarray:
    """Depth (mm, towards the viewer; 0 at the inner eye corners) of every pixel of the source."""
    from scipy.interpolate import LinearNDInterpolator
    H, W = shape
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    ex, ey = roll_axes
    d = np.stack([u - centre_px[0], v - centre_px[1]], -1)
    X = (d @ ex) / px_per_mm                        # mm, subject's left positive (image right)
    Y = -(d @ ey) / px_per_mm                       # mm, up
    # skull: ellipsoid centred below / behind the eye corners
    q = 1 - (X / head.half_width) ** 2 - ((Y + head.centre_down) / head.half_height) ** 2
    skull = np.where(q > 0, -head.centre_back + head.half_depth * np.sqrt(np.clip(q, 0, None)), np.nan)
    z = skull                                      # NaN: background
    # face relief inside the landmarks' hull: the generic face's depths, scaled and perturbed
    rng = np.random.default_rng(head.seed)
    lm_xy = np.stack([((landmarks - centre_px) @ ex) / px_per_mm, -((landmarks - centre_px) @ ey) / px_per_mm], -1)
    depth = GENERIC_FACE[:, 2] * head.relief + rng.normal(0, head.noise_mm, 68)
    interp = LinearNDInterpolator(lm_xy, depth)
    face = interp(X, Y)
    inside = ~np.isnan(face) & ~np.isnan(z)
    z[inside] = face[inside]
    return np.stack([X, Y, z], -1)


def render_turned(photo: np.ndarray, landmarks: np.ndarray, R_delta: np.ndarray, head: SynthHead = SynthHead(),
                  supersample: int = 2) -> np.ndarray:
    """The photo [H, W, 3] uint8, whose face has ``landmarks`` [68, 2] and is near frontal, turned
    by ``R_delta`` [3, 3] about the head centre of ``head`` -> a new [H, W, 3] uint8 photo.

    The image scale (px per mm) and in-plane axes come from the eye corners (inner eye corners 32 mm
    apart in the generic face); the head centre is ``head.centre_down`` below and
    ``head.centre_back`` behind their midpoint."""
    from PIL import Image
    from scipy.ndimage import distance_transform_edt
    lm = np.asarray(landmarks, float)
    inner = (lm[39] + lm[42]) / 2
    eye_vec = lm[42:48].mean(0) - lm[36:42].mean(0)
    px_per_mm = float(np.hypot(*eye_vec)) / float(GENERIC_FACE[42:48, 0].mean() - GENERIC_FACE[36:42, 0].mean())
    ex = eye_vec / np.hypot(*eye_vec)
    ey = np.array([-ex[1], ex[0]])
    n = supersample
    H, W = photo.shape[:2]
    big = np.asarray(Image.fromarray(photo).resize((W * n, H * n), Image.BILINEAR), np.float32)
    pts = _depth_map((H * n, W * n), (inner + 0.5) * n - 0.5, px_per_mm * n, (ex, ey), (lm + 0.5) * n - 0.5, head)
    centre = np.array([0.0, -head.centre_down, -head.centre_back])
    p = (pts.reshape(-1, 3) - centre) @ np.asarray(R_delta, float).T + centre
    # back to source pixels (same scale and in-plane axes), then the z-buffer
    keep = ~np.isnan(p[:, 2])
    p = p[keep]
    src = big.reshape(-1, 3)[keep]
    uv = inner + (p[:, :1] * ex + (-p[:, 1:2]) * ey) * px_per_mm
    cols = np.round(uv[:, 0]).astype(np.int64)
    rows = np.round(uv[:, 1]).astype(np.int64)
    ok = (cols >= 0) & (cols < W) & (rows >= 0) & (rows < H)
    idx = np.flatnonzero(ok)
    order = idx[np.argsort(p[idx, 2], kind="stable")]          # far to near: the nearest is written last
    out = np.zeros((H * W, 3), np.float32)
    filled = np.zeros(H * W, bool)
    flat = rows[order] * W + cols[order]
    out[flat] = src[order]
    filled[flat] = True
    out = out.reshape(H, W, 3)
    hole = ~filled.reshape(H, W)
    if hole.any():
        dist, (ri, ci) = distance_transform_edt(hole, return_indices=True)
        near = out[ri, ci]
        border = np.concatenate([photo[0], photo[-1], photo[:, 0], photo[:, -1]]).astype(np.float32)
        bg = np.median(border, 0)
        out = np.where((dist <= 2 * n)[..., None], near, bg)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
