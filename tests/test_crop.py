"""Face crop and camera from a raw photo (dp360rt.crop): PanoHead's recipe on a real photo that
scikit-image ships (``astronaut``), its mirror image, rolled copies, a photo without a face and
one with two faces. Needs the ``crop`` extra (dlib and its landmark model), part of ``test``."""
from __future__ import annotations

import importlib.util
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("dlib", reason="the crop extra is not installed: pip install 'dp360rt[crop]'")
if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("the crop extra is not installed: pip install 'dp360rt[crop]'", allow_module_level=True)

from dp360rt.cli.main import main  # noqa: E402
from dp360rt.crop import (GENERIC_FACE, FaceNotFoundError, camera_from_rotation, crop_portrait, fit_pose,  # noqa: E402
                          yaw_pitch)
from crop_helpers import quad_side, quiet_crop  # noqa: E402
from dp360rt.crop.face3d import FIT_INDICES, _P, _rotation_from_vector  # noqa: E402
from dp360rt.nerf.cameras import orbit_cameras, split_camera  # noqa: E402


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data
    return data.astronaut()


@pytest.fixture(scope="module")
def astronaut_crop(astronaut):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the face is small: "the crop is upsampled"
        return crop_portrait(astronaut)


def test_fit_recovers_a_known_pose():
    """Landmarks projected from the generic face at a known pose give that pose back (exact data,
    so to 1e-6)."""
    R = _rotation_from_vector(np.array([0.15, -0.6, 0.1]))
    lm = 2.3 * GENERIC_FACE @ R.T @ _P.T + np.array([250.0, 270.0])
    pose = fit_pose(lm)
    assert pose.rms < 1e-6
    assert np.allclose(pose.rotation, R, atol=1e-6) and abs(pose.scale - 2.3) < 1e-6
    assert len(FIT_INDICES) == 52


def test_camera_convention_matches_the_orbit():
    """The identity rotation is camera 0 of the orbit (front, radius 2.7, focal 4.2647); a head
    turned to its right shows the camera on its left (positive yaw, as orbit camera 8 on +x)."""
    assert torch.allclose(camera_from_rotation(np.eye(3)), orbit_cameras(1)[0], atol=1e-12)
    R = _rotation_from_vector(np.array([0.0, -math.radians(30), 0.0]))    # head turned about its vertical axis
    cam = camera_from_rotation(R)
    yaw, pitch = yaw_pitch(cam)
    assert abs(yaw - 30) < 1e-9 and abs(pitch) < 1e-9
    c2w, K = split_camera(cam)
    assert abs(float(c2w[:3, 3].norm()) - 2.7) < 1e-12 and float(K[0, 0]) == pytest.approx(4.2647)
    # looking at the origin: the optical axis points from the camera centre to (0, 0, 0)
    assert torch.allclose(c2w[:3, 2], -c2w[:3, 3] / 2.7, atol=1e-12)
    yaw, pitch = yaw_pitch(orbit_cameras(32, elevation_deg=10)[8])
    assert abs(yaw - 90) < 1e-9 and abs(pitch - 10) < 1e-9


def test_astronaut_crop(astronaut_crop, tmp_path):
    """A real photo: one face, a 512² RGB crop with the roll removed, a frontal camera (the
    astronaut faces the camera: |yaw| < 10 deg), and the three files."""
    r = astronaut_crop
    assert r.faces_found == 1 and r.image.size == (512, 512) and r.image.mode == "RGB"
    assert r.canvas.shape == (563, 563, 3)
    assert abs(r.yaw_deg) < 10 and -5 < r.pitch_deg < 30
    assert 5 <= r.camera_sigma_deg < 10                # frontal: the floor, below the turned head's
    assert r.pose.rms < 20                            # px in the 512² fit frame
    # the eye line is horizontal in the crop: map the eye centres through the quad
    x_axis = r.quad[3] - r.quad[0]
    eyes = r.landmarks[42:48].mean(0) - r.landmarks[36:42].mean(0)
    tilt_photo = math.degrees(math.atan2(eyes[1], eyes[0]))
    tilt_quad = math.degrees(math.atan2(x_axis[1], x_axis[0]))
    assert abs(tilt_photo - tilt_quad) < 3
    # the eye centres land in the canvas's upper middle, level with each other
    from dp360rt.crop.recipe import to_quad_frame
    q = r.quad
    eyes_in_canvas = to_quad_frame(np.stack([r.landmarks[36:42].mean(0), r.landmarks[42:48].mean(0)]),
                                   q.mean(0), (q[3] - q[0]) / 2, (q[1] - q[0]) / 2) + (25, 51)
    assert ((eyes_in_canvas[:, 0] > 0.3 * 563) & (eyes_in_canvas[:, 0] < 0.7 * 563)).all()
    assert ((eyes_in_canvas[:, 1] > 0.3 * 563) & (eyes_in_canvas[:, 1] < 0.6 * 563)).all()
    assert abs(eyes_in_canvas[0, 1] - eyes_in_canvas[1, 1]) < 0.02 * 563
    out = r.save(tmp_path / "c")
    assert sorted(p.name for p in out.iterdir()) == ["camera.json", "crop.png", "overlay.png"]
    meta = json.loads((out / "camera.json").read_text())
    assert len(meta["camera"]) == 25 and len(meta["landmarks"]) == 68 and meta["yaw_deg"] == r.yaw_deg
    assert Image.open(out / "crop.png").size == (512, 512)


def test_mirror_image_mirrors_the_crop(astronaut, astronaut_crop):
    """The mirrored photo gives the mirrored quad (within 2 % of its side), the same pitch and the
    yaw of opposite sign (within 3 deg: dlib's landmarks are not exactly mirror-symmetric)."""
    r, w = astronaut_crop, astronaut.shape[1]
    m = quiet_crop(astronaut[:, ::-1].copy())
    mq = m.quad.copy()
    mq[:, 0] = w - 1 - mq[:, 0]
    mq = mq[[3, 2, 1, 0]]                           # left and right corners swap
    assert np.abs(mq - r.quad).max() < 0.02 * quad_side(r.quad)
    assert abs(m.yaw_deg + r.yaw_deg) < 3 and abs(m.pitch_deg - r.pitch_deg) < 3
    assert m.yaw_deg * r.yaw_deg < 0
    diff = np.abs(np.asarray(m.image, float)[:, ::-1] - np.asarray(r.image, float)).mean()
    # 8-bit levels; an unrelated crop differs by > 40. Was < 10 with the head centre 60 mm deep:
    # at 85 mm dlib's slightly asymmetric landmarks (yaw -2.5 vs +2.4 deg) move the quads apart more
    assert diff < 14


@pytest.mark.parametrize("angle", [25, -30])
def test_rolled_photo_gives_the_same_crop(astronaut, astronaut_crop, angle):
    """Rolling the photo in-plane moves the quad with it (within 2 % of the side, once rotated
    back) and leaves the camera's yaw and pitch (within 3 deg) and the crop's pixels alike."""
    r = astronaut_crop
    centre = (220.0, 130.0)
    rolled = np.asarray(Image.fromarray(astronaut).rotate(angle, resample=Image.BICUBIC, center=centre))
    q = quiet_crop(rolled)
    t = math.radians(angle)
    unroll = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    back = (q.quad - centre) @ unroll.T + centre
    assert np.abs(back - r.quad).max() < 0.02 * quad_side(r.quad)
    assert abs(q.yaw_deg - r.yaw_deg) < 3 and abs(q.pitch_deg - r.pitch_deg) < 3
    assert np.abs(np.asarray(q.image, float) - np.asarray(r.image, float)).mean() < 15   # unrelated: > 40


def test_no_face_is_a_named_error_and_writes_nothing(tmp_path, capsys):
    photo = tmp_path / "wall.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((240, 320, 3)) * 40 + 100).astype(np.uint8)).save(photo)
    with pytest.raises(FaceNotFoundError, match="no face found in .*Fix:"):
        crop_portrait(photo)
    out = tmp_path / "out"
    assert main(["crop", str(photo), "--out", str(out)]) == 1
    assert "no face found" in capsys.readouterr().err
    assert not out.exists()


def test_missing_dlib_is_a_named_error(monkeypatch, astronaut):
    import sys
    from dp360rt.crop import CropDependencyError, landmarks
    landmarks._models.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)            # as if it were not installed
    try:
        with pytest.raises(CropDependencyError, match=r"needs dlib .*Fix: pip install 'dp360rt\[crop\]'"):
            crop_portrait(astronaut)
    finally:
        landmarks._models.cache_clear()


def test_two_faces_crop_the_largest(astronaut, astronaut_crop, tmp_path, capsys):
    """Two faces pasted on one canvas: both are found, the larger one is cropped and the count is
    reported (API and command line)."""
    head = Image.fromarray(astronaut[30:230, 120:320])               # 200 x 200 around the face
    canvas = Image.new("RGB", (760, 420), (128, 128, 128))
    canvas.paste(head.resize((140, 140), Image.BICUBIC), (40, 140))  # small face, left
    canvas.paste(head.resize((300, 300), Image.BICUBIC), (400, 60))  # large face, right
    r = quiet_crop(np.asarray(canvas))
    assert r.faces_found == 2
    assert r.landmarks[:, 0].min() > 400                               # the large face's landmarks
    assert any("2 faces found" in n for n in r.notes)
    photo = tmp_path / "two.png"
    canvas.save(photo)
    assert main(["crop", str(photo), "--out", str(tmp_path / "o")]) == 0
    assert "2 faces found, cropped the largest" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "camera.json").read_text())["faces_found"] == 2


def test_pipeline_crop_auto(tmp_path, astronaut, astronaut_crop, monkeypatch):
    """``crop="auto"``: the pipeline hands the 512² crop (not the photo) to its preprocessing, and a
    result saves the crop beside the views; a bad mode is a named error. (A whole generation on
    tiny weights is covered by test_cli; here preprocessing is stopped once it has the portrait.)"""
    import dp360rt.engine.pipeline as pl
    from dp360rt.io.images import synthetic_conditions
    from dp360rt.engine.generation import GenerationResult
    with pytest.raises(ValueError, match="not a crop mode. Fix"):
        pl.Pipeline.random("tiny", crop="yes")
    pipe = pl.Pipeline.random("tiny", crop="auto")
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    seen = []

    class Stop(Exception):
        pass

    def spy(portrait, size):
        seen.append(portrait)
        raise Stop

    monkeypatch.setattr(pl, "load_portrait", spy)
    conditions = synthetic_conditions(32, pipe.image_size)
    with warnings.catch_warnings(), pytest.raises(Stop):
        warnings.simplefilter("ignore")
        pipe(photo, conditions, steps=1)
    assert isinstance(seen[0], Image.Image) and seen[0].size == (512, 512)
    assert np.array_equal(np.asarray(seen[0]), np.asarray(astronaut_crop.image))
    with pytest.raises(Stop):
        pipe(photo, conditions, steps=1, crop=None)                   # per-call override: the photo itself
    assert seen[1] == photo
    with pytest.raises(ValueError, match="needs the raw photo"):
        pipe(torch.zeros(1, 3, pipe.image_size, pipe.image_size), conditions, steps=1)
    res = GenerationResult(back_view=torch.rand(3, 8, 8), views=torch.rand(32, 3, 8, 8), crop=astronaut_crop)
    out = res.save(tmp_path / "gen")
    assert sorted(p.name for p in (out / "crop").iterdir()) == ["camera.json", "crop.png", "overlay.png"]


# --- issue 29: face choice, named errors, pose warning, detector retry (turned heads: test_crop_turned.py) ---

from dp360rt.crop import (FaceCutByBorderError, FaceError, FaceIndexError, FaceTooSmallError,  # noqa: E402
                          PoseBeyondFitWarning, SeveralFacesWarning)


def _two_faces(astronaut) -> np.ndarray:
    head = Image.fromarray(astronaut[30:230, 120:320])
    canvas = Image.new("RGB", (760, 420), (128, 128, 128))
    canvas.paste(head.resize((200, 200), Image.BICUBIC), (20, 110))   # smaller face, left
    canvas.paste(head.resize((300, 300), Image.BICUBIC), (400, 60))   # larger face, right
    return np.asarray(canvas)


def test_face_k_picks_another_face(astronaut, tmp_path, capsys):
    photo = _two_faces(astronaut)
    with pytest.warns(SeveralFacesWarning, match="cropped the largest"):
        big = crop_portrait(photo)
    with pytest.warns(SeveralFacesWarning, match=r"cropped face 1 \(by size"):
        small = crop_portrait(photo, face=1)
    assert big.landmarks[:, 0].min() > 400 and small.landmarks[:, 0].max() < 220
    assert small.face_index == 1 and big.face_index == 0
    with pytest.raises(FaceIndexError, match=r"face=2 but .* has 2 face\(s\).*Fix: pass --face between 0 and 1"):
        crop_portrait(photo, face=2)
    path = tmp_path / "two.png"
    Image.fromarray(photo).save(path)
    assert main(["crop", str(path), "--face", "1", "--out", str(tmp_path / "o")]) == 0
    assert "2 faces found, cropped face 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "camera.json").read_text())["face_index"] == 1
    assert main(["crop", str(path), "--face", "5", "--out", str(tmp_path / "p")]) == 1
    assert "Fix: pass --face" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_small_and_cut_faces_are_named_errors(astronaut, tmp_path, capsys):
    head = Image.fromarray(astronaut[30:230, 120:320])
    canvas = Image.new("RGB", (760, 420), (128, 128, 128))
    canvas.paste(head.resize((140, 140), Image.BICUBIC), (40, 140))   # a face about 62 px wide
    canvas.paste(head.resize((300, 300), Image.BICUBIC), (400, 60))
    with pytest.raises(FaceTooSmallError, match=r"px wide \(< 64\).*Fix:"):
        quiet_crop(np.asarray(canvas), face=1)
    cut = np.ascontiguousarray(astronaut[:, 195:])                      # the face's left edge is cut off
    with pytest.raises(FaceCutByBorderError, match="cut by the photo's border.*Fix:") as e:
        crop_portrait(cut)
    assert isinstance(e.value, FaceError) and isinstance(e.value, ValueError)
    path = tmp_path / "cut.png"
    Image.fromarray(cut).save(path)
    assert main(["crop", str(path), "--out", str(tmp_path / "o")]) == 1
    assert "cut by the photo's border" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_pose_beyond_the_fit_warns_with_its_uncertainty(astronaut, monkeypatch):
    """A pose outside the checked range is a named warning carrying the camera's 1-sigma
    uncertainty, not a silent guess (the limit is lowered here to trigger it on a frontal photo)."""
    import dp360rt.crop.portrait as portrait
    monkeypatch.setattr(portrait, "MAX_YAW_DEG", 1.0)
    with pytest.warns(PoseBeyondFitWarning, match=r"1-sigma \d+ deg") as w:
        r = crop_portrait(astronaut)
    assert r.camera_sigma_deg > 0 and r.camera_json()["camera_sigma_deg"] == r.camera_sigma_deg
    assert any(issubclass(x.category, PoseBeyondFitWarning) for x in w)


def test_detector_retries_without_upsampling(astronaut, monkeypatch):
    """A face that scores below the threshold on the upsampled pyramid (as turned faces can) is
    looked for once more without upsampling; a photo with a face found at once is searched once."""
    import dlib
    from dp360rt.crop import detect_faces, landmarks
    real_detector, predictor = landmarks._models()
    calls = []

    class Detector:
        def __init__(self, blind_upsampled: bool):
            self.blind = blind_upsampled

        def run(self, img, upsample, threshold):
            calls.append(upsample)
            if upsample and self.blind:
                return dlib.rectangles(), [], []
            return real_detector.run(img, upsample, threshold)

    monkeypatch.setattr(landmarks, "_models", lambda: (Detector(True), predictor))
    faces = detect_faces(astronaut)
    assert calls == [1, 0] and len(faces) == 1 and faces[0].score >= landmarks.MIN_SCORE
    calls.clear()
    monkeypatch.setattr(landmarks, "_models", lambda: (Detector(False), predictor))
    assert len(detect_faces(astronaut)) == 1 and calls == [1]


def test_detection_from_several_threads_is_serialised(astronaut):
    """The service crops in one thread per request; dlib's detectors are not thread-safe and
    release the GIL, so concurrent calls are serialised: four threads at once get the serial
    result (and the process survives)."""
    import threading
    from dp360rt.crop import detect_faces
    want = detect_faces(astronaut)
    got, errors = [], []

    def run():
        try:
            got.append(detect_faces(astronaut))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 4
    for faces in got:
        assert len(faces) == len(want) and all(np.array_equal(a.landmarks, b.landmarks) for a, b in zip(faces, want))
