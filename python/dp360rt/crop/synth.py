"""Synthetic turned heads with an exact camera label, for the held-out crop checks.

:func:`render_turned` builds a 3D head in the head's own frame (the generic face's axes: x to
the subject's left, y up, z out of the face; mm), paints it with the photo, and renders it,
orthographically and with a z-buffer, turned by a known rotation about the head's centre. The
head is *not* the generic face the crop fits: an ellipsoid skull (its own width, height, depth and
centre per subject) with a face relief inside the landmarks' hull made from the generic face's
depths scaled and perturbed per subject (so the fit does not see its own model), and a flat
background of the photo's border colour. Disocclusions are filled from the nearest rendered pixel.

The source photo's own head rotation ``R_source`` (PanoHead's label for its samples, or a fit) is
part of the geometry: the surface point ``X`` (head frame) shows in the photo at
``s * P @ R_source @ X + t``, so each landmark's head-frame position is solved from its photo
position and its (synthetic) depth, and the skull is placed in the head frame. The render shows
the same head at ``R_true = R_delta @ R_source``: its label, exact by construction (before issue
29's second pass the photo was lifted as if it were frontal, so a source with 23 deg of pitch
gave renders whose geometry disagreed with their label by up to 29 deg).

Framing reference: rotating about the head centre keeps its projection, so the recipe's quad for
the render is the source's quad (same centre and side). Used by ``benchmarks/crop_heldout.py``
and ``tests/test_crop_turned.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .face3d import _P, GENERIC_FACE, _rotation_from_vector


@dataclass
class SynthHead:
    """A synthetic subject: skull semi-axes (mm), the skull centre below / behind the inner eye
    corners (mm), a face-relief depth factor and per-landmark depth noise (mm) with its seed."""

    half_width: float = 92.0            # skull and hair
    half_height: float = 122.0
    half_depth: float = 78.0            # its front lies just behind the face relief's (see _surface)
    centre_down: float = 15.0
    centre_back: float = 85.0
    relief: float = 1.1
    noise_mm: float = 3.0
    seed: int = 0

    @property
    def centre(self) -> np.ndarray:
        """The head centre (the turn's pivot) in the head frame, mm."""
        return np.array([0.0, -self.centre_down, -self.centre_back])


def turn(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """The head rotation (viewer frame: x right, y up, z towards the viewer) that moves the camera
    to ``yaw_deg`` (positive: the subject's left) and ``pitch_deg`` (positive: above), as
    :func:`dp360rt.crop.recipe.yaw_pitch` reads it: the head turns the opposite way."""
    ry = _rotation_from_vector(np.array([0.0, -math.radians(yaw_deg), 0.0]))
    rx = _rotation_from_vector(np.array([math.radians(pitch_deg), 0.0, 0.0]))
    return rx @ ry


def _placement(landmarks: np.ndarray, R0: np.ndarray) -> tuple[float, np.ndarray]:
    """(px per mm, image position of the head-frame origin) of a photo whose head has rotation
    ``R0``: the origin (between the inner eye corners, depth 0) projects to their midpoint, and the
    eye centres are as far apart as the generic face's, foreshortened by ``R0``."""
    lm = np.asarray(landmarks, float)
    eye = GENERIC_FACE[42:48].mean(0) - GENERIC_FACE[36:42].mean(0)
    s = float(np.hypot(*(lm[42:48].mean(0) - lm[36:42].mean(0)))) / float(np.linalg.norm(_P @ R0 @ eye))
    return s, (lm[39] + lm[42]) / 2


def head_landmarks(landmarks: np.ndarray, head: SynthHead, R_source: np.ndarray) -> np.ndarray:
    """The synthetic head's 68 landmarks [68, 3] in its frame (mm): each photo landmark [68, 2]
    lifted to its synthetic depth (the generic face's x ``head.relief`` plus noise)."""
    R0 = np.asarray(R_source, float)
    s, t = _placement(landmarks, R0)
    z = GENERIC_FACE[:, 2] * head.relief + np.random.default_rng(head.seed).normal(0, head.noise_mm, 68)
    M = s * _P @ R0                                   # [2, 3]: head frame -> image offset
    xy = np.linalg.solve(M[:, :2], (np.asarray(landmarks, float) - t - np.outer(z, M[:, 2])).T).T
    return np.concatenate([xy, z[:, None]], 1)


def turned_landmarks(landmarks: np.ndarray, R_delta: np.ndarray, head: SynthHead = SynthHead(),
                     R_source: np.ndarray | None = None) -> np.ndarray:
    """The exact image positions [68, 2] of the landmarks in :func:`render_turned`'s render (the
    synthetic head's 3D landmarks turned and projected): what a perfect landmark detector finds."""
    R0 = np.eye(3) if R_source is None else np.asarray(R_source, float)
    s, t = _placement(landmarks, R0)
    X = head_landmarks(landmarks, head, R0)
    return _project(X, R0, np.asarray(R_delta, float), head, s, t)[0]


def _project(X, R0, Rd, head, s, t):
    """Head-frame points [N, 3] -> (image points [N, 2], depth towards the viewer [N]) at R_delta @ R0
    turned about the head centre."""
    c = R0 @ head.centre                              # viewer frame; the pivot does not move
    v = (X @ R0.T - c) @ Rd.T + c
    return s * v @ _P.T + t, v[:, 2]


def _surface(landmarks_3d: np.ndarray, head: SynthHead, step_mm: float) -> np.ndarray:
    """The head's front surface [N, 3] (head frame, mm) on a grid of ``step_mm``: the skull
    ellipsoid, and inside the landmarks' hull the face relief wherever it stands in front of the
    skull. The skull then forms the cheeks and jaw line, whose landmarks (the generic face's, far
    back at the ears) lie behind it: a face relief pasted over the whole hull left a wall of up to
    50 mm at its edge that hid the far cheek of a turned head."""
    from scipy.interpolate import LinearNDInterpolator
    X, Y = np.meshgrid(np.arange(-head.half_width, head.half_width, step_mm),
                       np.arange(-head.centre_down - head.half_height, head.half_height - head.centre_down, step_mm))
    q = 1 - (X / head.half_width) ** 2 - ((Y + head.centre_down) / head.half_height) ** 2
    z = np.where(q > 0, -head.centre_back + head.half_depth * np.sqrt(np.clip(q, 0, None)), np.nan)
    face = LinearNDInterpolator(landmarks_3d[:, :2], landmarks_3d[:, 2])(X, Y)
    z = np.where(np.isnan(face), z, np.fmax(face, z))
    keep = ~np.isnan(z)
    return np.stack([X[keep], Y[keep], z[keep]], 1)


def render_turned(photo: np.ndarray, landmarks: np.ndarray, R_delta: np.ndarray, head: SynthHead = SynthHead(),
                  supersample: int = 2, R_source: np.ndarray | None = None) -> np.ndarray:
    """The photo [H, W, 3] uint8, whose face has ``landmarks`` [68, 2] and head rotation
    ``R_source`` [3, 3] (default: frontal), turned by ``R_delta`` [3, 3] about the head centre of
    ``head`` -> a new [H, W, 3] uint8 photo whose head rotation is ``R_delta @ R_source``.

    The image scale (px per mm) comes from the eye centres, the head-frame origin from the inner
    eye corners (see :func:`head_landmarks`); the surface is sampled ``supersample`` times per
    pixel per axis and painted with the photo (bilinear) where ``R_source`` projects it."""
    from scipy.ndimage import distance_transform_edt, map_coordinates
    R0 = np.eye(3) if R_source is None else np.asarray(R_source, float)
    s, t = _placement(landmarks, R0)
    surface = _surface(head_landmarks(landmarks, head, R0), head, 1.0 / (s * supersample))
    H, W = photo.shape[:2]
    src = surface @ (s * _P @ R0).T + t               # where the photo shows each surface point
    colour = np.stack([map_coordinates(photo[..., k].astype(np.float32), [src[:, 1], src[:, 0]], order=1, mode="nearest")
                       for k in range(3)], 1)
    uv, depth = _project(surface, R0, np.asarray(R_delta, float), head, s, t)
    cols, rows = np.round(uv[:, 0]).astype(np.int64), np.round(uv[:, 1]).astype(np.int64)
    idx = np.flatnonzero((cols >= 0) & (cols < W) & (rows >= 0) & (rows < H))
    order = idx[np.argsort(depth[idx], kind="stable")]          # far to near: the nearest is written last
    out = np.zeros((H * W, 3), np.float32)
    filled = np.zeros(H * W, bool)
    flat = rows[order] * W + cols[order]
    out[flat] = colour[order]
    filled[flat] = True
    out = out.reshape(H, W, 3)
    hole = ~filled.reshape(H, W)
    if hole.any():
        dist, (ri, ci) = distance_transform_edt(hole, return_indices=True)
        near = out[ri, ci]
        border = np.concatenate([photo[0], photo[-1], photo[:, 0], photo[:, -1]]).astype(np.float32)
        out = np.where((dist <= 2 * supersample)[..., None], near, np.median(border, 0))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
