"""``crop_portrait``: a raw photo -> PanoHead's 512² crop, its 25-number camera, the landmarks."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..images import ImageError, open_image, to_rgb
from .face3d import FacePose
from .landmarks import MIN_SCORE, detect_faces
from .recipe import (FIT_SIZE, camera_from_rotation, ffhq_quad, from_quad_frame, quad_corners, quad_crop, refine_quad,
                     to_quad_frame, warp_canvas, yaw_pitch)

OUTPUT_SIZE = 512
REDO_PX = 12            # landmark disagreement (px of the 512² crop) that makes step (a) run again
MIN_QUAD = 256          # the authors skip faces whose quad is smaller; we crop them and warn


class FaceNotFoundError(ImageError):
    """No face was found in the photo (a ``ValueError``); the message names the photo and the fix."""


@dataclass
class CropResult:
    """A face crop in PanoHead's framing.

    image: the 512² RGB crop (PIL), the projector's input; canvas: the 563² canvas before the
    resize [563, 563, 3] uint8; camera: PanoHead's 25-number label [25] float64 (radius 2.7,
    looking at the origin, focal 4.2647); yaw_deg / pitch_deg: the camera's azimuth and elevation
    (0/0 in front; positive yaw is on the subject's left, positive pitch above); landmarks: the
    chosen face's 68 points [68, 2] (column, row) in the photo; quad: the final quad's corners
    [4, 2] in the photo (top-left, bottom-left, bottom-right, top-right); ffhq_quad: step (a)'s
    quad; faces_found: how many faces the detector found (the largest is cropped)."""

    image: Image.Image
    canvas: np.ndarray
    camera: torch.Tensor
    yaw_deg: float
    pitch_deg: float
    landmarks: np.ndarray
    quad: np.ndarray
    ffhq_quad: np.ndarray
    faces_found: int
    pose: FacePose
    photo: np.ndarray
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def tensor(self) -> torch.Tensor:
        """The crop as [3, 512, 512] float32 in [0, 1]."""
        return torch.from_numpy(np.asarray(self.image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def camera_json(self) -> dict[str, Any]:
        return {"camera": [float(v) for v in self.camera], "yaw_deg": self.yaw_deg, "pitch_deg": self.pitch_deg,
                "landmarks": self.landmarks.tolist(), "quad": self.quad.tolist(), "faces_found": self.faces_found,
                "landmark_rms_px": self.pose.rms, "notes": self.notes}

    def overlay(self) -> Image.Image:
        """The photo with the 68 landmarks (green), step (a)'s quad (yellow) and the final quad
        (red; its top edge drawn thicker)."""
        img = Image.fromarray(self.photo)
        d = ImageDraw.Draw(img)
        w = max(1, round(max(img.size) / 400))
        for quad, colour in ((self.ffhq_quad, (255, 220, 0)), (self.quad, (255, 40, 40))):
            pts = [tuple(p) for p in quad]
            d.line(pts + [pts[0]], fill=colour, width=w)
        d.line([tuple(self.quad[0]), tuple(self.quad[3])], fill=(255, 40, 40), width=3 * w)
        r = 1.5 * w
        for px, py in self.landmarks:
            d.ellipse((px - r, py - r, px + r, py + r), fill=(40, 255, 80))
        return img

    def save(self, out_dir: str | Path) -> Path:
        """Write ``crop.png``, ``camera.json`` and ``overlay.png`` into ``out_dir``, all or none:
        the files are written to a temporary folder beside it and moved in last."""
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".crop-", dir=out))
        except OSError as e:
            raise OSError(f"cannot write results to {out}: {e.strerror or e}. Fix: pass a writable --out directory") from e
        try:
            self.image.save(tmp / "crop.png")
            (tmp / "camera.json").write_text(json.dumps(self.camera_json(), indent=1))
            self.overlay().save(tmp / "overlay.png")
            for name in ("crop.png", "camera.json", "overlay.png"):
                os.replace(tmp / name, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def _photo(source: Any) -> tuple[np.ndarray, str]:
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ImageError(f"photo array must be [H, W, 3] uint8 RGB, got {source.shape} {source.dtype}. "
                             "Fix: pass an image file or a PIL image")
        return np.ascontiguousarray(source), "the photo"
    if isinstance(source, Image.Image):
        return np.asarray(to_rgb(source)), "the photo"
    return np.asarray(to_rgb(open_image(source))), str(source)


def _upright_landmarks(photo: np.ndarray, landmarks: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray,
                       min_score: float) -> np.ndarray:
    """Landmarks [68, 2] for step (b), in the quad's 512² frame: detected again on the upright
    crop, as the recipe does (the face is then large and without roll, where dlib's landmarks are
    at their best); the face nearest the crop's centre. Falls back to the photo's ``landmarks``
    mapped into the frame when the crop shows no face."""
    faces = detect_faces(quad_crop(photo, c, x, y), upsample=0, min_score=min_score)
    if not faces:
        return to_quad_frame(landmarks, c, x, y)
    centre = (FIT_SIZE - 1) / 2
    best = min(faces, key=lambda f: np.hypot((f.box[0] + f.box[2]) / 2 - centre, (f.box[1] + f.box[3]) / 2 - centre))
    return best.landmarks


def crop_portrait(source: Any, *, min_score: float = MIN_SCORE) -> CropResult:
    """Crop a raw photo to PanoHead's framing and estimate its camera (PanoHead's recipe, steps
    (a)-(c) in :mod:`dp360rt.crop.recipe`).

    ``source``: an image path, a PIL image or an RGB array [H, W, 3] uint8. With several faces the
    largest is cropped (``faces_found`` says how many there were). Raises
    :class:`FaceNotFoundError` when there is none, :class:`CropDependencyError` without dlib.
    Returns a :class:`CropResult` (crop 512² RGB, camera [25], yaw/pitch, landmarks [68, 2])."""
    t0 = time.perf_counter()
    photo, name = _photo(source)
    faces = detect_faces(photo, min_score=min_score)
    if not faces:
        raise FaceNotFoundError(f"no face found in {name} ({photo.shape[1]}x{photo.shape[0]}). Fix: pass a photo "
                                "with a face at least 80 px wide, upright (rolled less than about 40 degrees), seen from the "
                                "front or partly turned (dlib's detector misses profiles)")
    face = faces[0]
    notes = []
    if len(faces) > 1:
        notes.append(f"{len(faces)} faces found: cropped the largest ({face.box[2] - face.box[0]} px wide)")
    landmarks = face.landmarks
    c, x, y = ffhq_quad(landmarks)
    upright = _upright_landmarks(photo, landmarks, c, x, y, min_score)
    moved = float(np.sqrt(((upright - to_quad_frame(landmarks, c, x, y)) ** 2).sum(1).mean()))
    if moved > REDO_PX:
        # dlib's landmarks on the photo were poor (typically a strongly rolled head) and those of
        # the upright crop differ: redo step (a) with the latter (the authors run it once)
        landmarks = from_quad_frame(upright, c, x, y)
        c, x, y = ffhq_quad(landmarks)
        upright = _upright_landmarks(photo, landmarks, c, x, y, min_score)
        notes.append(f"step (a) redone with the landmarks of the upright crop (they moved {moved:.0f} px of 512)")
    first = quad_corners(c, x, y)
    c, x, y, pose, scale = refine_quad(upright, c, x, y)
    if not 0.7 <= scale <= 1.3:     # the authors drop such photos: the landmarks do not fit a head
        notes.append(f"step (b) rescaled the quad by {scale:.2f} (the authors' recipe keeps 0.7 to 1.3 only): "
                     "check overlay.png")
    side = 2 * float(np.hypot(*x))
    if side < MIN_QUAD:
        notes.append(f"the face is small (quad {side:.0f} px < {MIN_QUAD}): the crop is upsampled and blurry")
    for n in notes:
        warnings.warn(n)
    canvas = warp_canvas(photo, c, x, y)
    image = Image.fromarray(canvas).resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.LANCZOS)
    camera = camera_from_rotation(pose.rotation)
    yaw, pitch = yaw_pitch(camera)
    return CropResult(image, canvas, camera, yaw, pitch, landmarks, quad_corners(c, x, y), first, len(faces),
                      pose, photo, time.perf_counter() - t0, notes)
