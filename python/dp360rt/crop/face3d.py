"""A generic 3D face for the 68 dlib/iBUG landmarks, and its weak-perspective pose fit.

The face is ours: rough adult anthropometry in millimetres, written for this module (not taken
from a morphable model). Axes are PanoHead's world axes for a head looking at camera 0: **x to
the subject's left** (image right in a frontal photo), **y up**, **z out of the face** (towards
the viewer). The origin lies between the inner eye corners. Only the inner landmarks (brows,
eyes, nose, lips; index 17 to 67) and the chin (8) are fitted: the jaw contour slides along the
silhouette as the head turns, so its 3D position is not a fixed point of the head.

The fit is scaled orthographic (3DDFA_V2, which PanoHead's recipe uses, fits the same model of
the camera): ``p_image = s * P @ R @ X + t`` with ``P = [[1, 0, 0], [0, -1, 0]]`` (image rows
grow downwards), ``R`` the head's rotation in the viewer's frame (x right, y up, z towards the
viewer) and ``s`` pixels per millimetre.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Landmarks of the subject's right half (image left in a frontal photo) and the midline, in mm.
_RIGHT_AND_MIDLINE = {
    # jaw contour (only drawn, never fitted)
    0: (-70, -2, -75), 1: (-69, -18, -72), 2: (-66, -35, -66), 3: (-61, -51, -56), 4: (-54, -66, -45),
    5: (-45, -80, -31), 6: (-33, -91, -17), 7: (-18, -99, -6), 8: (0, -103, -2),
    # brow, outer to inner
    17: (-50, 22, -22), 18: (-42, 29, -11), 19: (-32, 32, -4), 20: (-22, 31, 0), 21: (-12, 27, 3),
    # nose bridge to tip, then the base of the nose
    27: (0, 4, 4), 28: (0, -7, 10), 29: (0, -18, 17), 30: (0, -29, 25),
    31: (-14, -34, 8), 32: (-7, -36, 12), 33: (0, -37, 14),
    # eye: outer corner, upper lid, inner corner, lower lid
    36: (-45, 1, -17), 37: (-38, 5, -7), 38: (-25, 5, -2), 39: (-16, 0, 0), 40: (-25, -4, -3), 41: (-38, -4, -8),
    # lips: outer contour then inner contour
    48: (-25, -58, -8), 49: (-17, -52, 2), 50: (-8, -49, 8), 51: (0, -50, 10),
    57: (0, -68, 8), 58: (-9, -67, 6), 59: (-17, -64, 0),
    60: (-21, -58, -4), 61: (-8, -57, 6), 62: (0, -57, 8), 66: (0, -59, 8), 67: (-8, -59, 6),
}
# dlib's 68-point mirror pairs (subject's right index -> left index)
_MIRROR = {**{i: 16 - i for i in range(8)}, 17: 26, 18: 25, 19: 24, 20: 23, 21: 22, 31: 35, 32: 34,
           36: 45, 37: 44, 38: 43, 39: 42, 40: 47, 41: 46, 48: 54, 49: 53, 50: 52, 59: 55, 58: 56,
           60: 64, 61: 63, 67: 65}


def _mirror_permutation() -> np.ndarray:
    perm = np.arange(68)
    for a, b in _MIRROR.items():
        perm[a], perm[b] = b, a
    return perm


# landmarks of a mirrored photo, indexed by MIRROR_ORDER, are in the order of the photo's (the
# subject's right eye of the mirror image is the photo's left eye)
MIRROR_ORDER = _mirror_permutation()


def _build_face() -> np.ndarray:
    face = np.full((68, 3), np.nan)
    for i, p in _RIGHT_AND_MIDLINE.items():
        face[i] = p
        if i in _MIRROR:
            face[_MIRROR[i]] = (-p[0], p[1], p[2])
    assert not np.isnan(face).any()
    return face


GENERIC_FACE = _build_face()                                   # [68, 3] mm
FIT_INDICES = np.array([8, *range(17, 68)])                    # landmarks the pose is fitted to
# The brows (17-26) count half in the fit: they are the least rigid points (their height varies
# between people and with expression; our face has one guess of it) and dlib places the far brow
# of a turned head worst. At full weight they pulled the yaw read on synthetic turned heads to 0.80
# of the label (0.93 at half). benchmarks/crop_tune_loo.py: 0.5 is best on its three subjects
# together; each subject held out gets 0.3 or 0.5 from the other two.
BROW_WEIGHT = 0.5
_P = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
DEPTH_GAIN = 1.0        # the generic face's depths are multiplied by this in the fit (see fit_pose)
HUBER_PX = 10.0         # Huber threshold, px of a face at the fit frame's scale (step (b): 512² quad crop)
_FIT_FRAME_SCALE = 2.3  # px per mm of the generic face in that frame (PanoHead's samples: 2.3)


@dataclass
class FacePose:
    """A weak-perspective fit: ``image = scale * P @ rotation @ X + translation`` (pixels; see
    the module docstring). ``rms`` is the root-mean-square landmark residual in pixels."""

    scale: float
    rotation: np.ndarray        # [3, 3], head -> viewer frame (x right, y up, z towards the viewer)
    translation: np.ndarray     # [2], image position (column, row) of the model origin
    rms: float
    rotation_sigma_deg: float = 0.0   # 1-sigma uncertainty of the rotation (largest axis), degrees

    def project(self, points: np.ndarray) -> np.ndarray:
        """Model points [N, 3] (mm) -> image points [N, 2] (column, row)."""
        return self.scale * (np.asarray(points, float) @ self.rotation.T @ _P.T) + self.translation


def _rotation_from_vector(w: np.ndarray) -> np.ndarray:
    theta = float(np.linalg.norm(w))
    if theta < 1e-12:
        return np.eye(3)
    k = w / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """The angle (deg) of the rotation between rotation matrices ``a`` and ``b`` [3, 3]."""
    return float(np.degrees(np.arccos(np.clip((np.trace(np.asarray(a).T @ np.asarray(b)) - 1) / 2, -1.0, 1.0))))


def _vector_from_rotation(R: np.ndarray) -> np.ndarray:
    c = np.clip((np.trace(R) - 1) / 2, -1.0, 1.0)
    theta = float(np.arccos(c))
    if theta < 1e-9:
        return np.zeros(3)
    v = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    return v * theta / (2 * np.sin(theta))


def fit_pose(landmarks: np.ndarray) -> FacePose:
    """Fit the generic face to 68 image landmarks [68, 2] (column, row) -> :class:`FacePose`.

    A closed-form affine fit, projected onto the nearest scaled rotation, starts a Gauss-Newton
    refinement of (rotation vector, log scale, translation) by ``scipy.optimize.least_squares``
    with a Huber loss (``HUBER_PX``: landmarks off by more, e.g. on an occluded eye or a jaw point
    that slid along the silhouette, count linearly, not squared); the brows' residuals are scaled
    by ``BROW_WEIGHT``. ``rotation_sigma_deg`` is the 1-sigma rotation uncertainty from the Jacobian at the solution and the robust residual scale."""
    from scipy.optimize import least_squares
    x = np.asarray(landmarks, float)[FIT_INDICES]
    X = GENERIC_FACE[FIT_INDICES] * np.array([1.0, 1.0, DEPTH_GAIN])
    xm, Xm = x.mean(0), X.mean(0)
    A = np.linalg.lstsq(X - Xm, x - xm, rcond=None)[0].T        # [2, 3]: x - xm ~ A (X - Xm)
    A = _P.T[:2, :2] @ A                                         # undo the row flip: rows of s R
    U, S, Vt = np.linalg.svd(A, full_matrices=False)
    r12 = U @ Vt
    R0 = np.vstack([r12, np.cross(r12[0], r12[1])])
    s0 = float(S.mean())

    w = np.where((FIT_INDICES >= 17) & (FIT_INDICES <= 26), BROW_WEIGHT, 1.0)[:, None]

    def residual(p: np.ndarray) -> np.ndarray:
        R = _rotation_from_vector(p[:3])
        return (w * (np.exp(p[3]) * (X @ R.T @ _P.T) + p[4:6] - x)).ravel()

    t0 = xm - s0 * (Xm @ R0.T @ _P.T)
    p0 = np.concatenate([_vector_from_rotation(R0), [np.log(s0)], t0])
    f_scale = HUBER_PX * max(s0, 1e-9) / _FIT_FRAME_SCALE     # the same in mm of face at any image size
    sol = least_squares(residual, p0, loss="huber", f_scale=f_scale, x_scale="jac")
    R = _rotation_from_vector(sol.x[:3])
    r = sol.fun.reshape(-1, 2)
    rms = float(np.sqrt(np.mean(r ** 2) * 2))
    # covariance of the parameters: (J^T J)^-1 times the residual variance (a robust one: 1.4826 MAD)
    J = sol.jac
    dof = max(J.shape[0] - J.shape[1], 1)
    mad = 1.4826 * float(np.median(np.abs(sol.fun)))
    var = max(mad, float(np.sqrt(np.sum(sol.fun ** 2) / dof)) * 0.5) ** 2
    try:
        cov = np.linalg.inv(J.T @ J) * var
        sigma = float(np.degrees(np.sqrt(max(np.linalg.eigvalsh(cov[:3, :3]).max(), 0.0))))
    except np.linalg.LinAlgError:
        sigma = float("inf")
    return FacePose(float(np.exp(sol.x[3])), R, sol.x[4:6].copy(), rms, sigma)
