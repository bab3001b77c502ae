"""Where dlib's CNN (MMOD) face box sits against its HOG box: the constants of
``dp360rt.crop.landmarks`` (CNN_BOX_SHIFT, CNN_BOX_SCALE), with leave-one-subject-out.

The 68-point shape model was trained on HOG boxes, so a CNN box is moved to where HOG's would be
before the landmarks are read. On the held-out renders of ``crop_heldout.py`` (and their mirror
images) where both detectors find the face and HOG scores >= 0.8: the HOG box's centre minus the
CNN box's, and the width ratio, in units of the CNN box's width; medians. Leave-one-subject-out:
the medians of the other subjects' pairs, scored on the held-out subject as the mean distance
between the landmarks read from the moved CNN box and from the HOG box (% of the HOG box's width).

Usage: ``python benchmarks/crop_cnn_box.py CROP_SAMPLES_IMG_DIR`` (about 4 minutes on 2 CPU cores).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from crop_heldout import HEADS, POSES, sources
from dp360rt.crop import detect_faces
from dp360rt.crop.landmarks import _cnn_detector, _models
from dp360rt.crop.synth import render_turned, turn


def pairs(folder: Path) -> list[dict]:
    """One record per image where both detectors found the face and HOG scored >= 0.8."""
    hog, predictor = _models()
    out = []
    for name, photo, R0, _ in sources(folder):
        lm = detect_faces(photo)[0].landmarks
        for yaw, pitch in POSES:
            img = render_turned(photo, lm, turn(yaw, pitch), HEADS[name], R_source=R0)
            for im in (img, img[:, ::-1].copy()):
                rects, scores, _ = hog.run(im, 1, 0.0)
                cnn = _cnn_detector()(im, 0)
                if not len(rects) or not len(cnn) or max(scores) < 0.8:
                    continue
                h = rects[int(np.argmax(scores))]
                c = cnn[0].rect
                w = c.right() - c.left()
                out.append({"name": name, "image": im, "hog": h, "cnn": c, "predictor": predictor,
                            "dx": ((h.left() + h.right()) - (c.left() + c.right())) / 2 / w,
                            "dy": ((h.top() + h.bottom()) - (c.top() + c.bottom())) / 2 / w,
                            "k": (h.right() - h.left()) / w})
    return out


def landmark_gap_pct(p: dict, dx: float, dy: float, k: float) -> float:
    import dlib
    c, w = p["cnn"], p["cnn"].right() - p["cnn"].left()
    cx, cy, half = (c.left() + c.right()) / 2 + dx * w, (c.top() + c.bottom()) / 2 + dy * w, k * w / 2
    moved = dlib.rectangle(round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    read = lambda r: np.array([[q.x, q.y] for q in p["predictor"](p["image"], r).parts()], float)  # noqa: E731
    return float(np.linalg.norm(read(moved) - read(p["hog"]), axis=1).mean() / (p["hog"].right() - p["hog"].left()) * 100)


def main(argv: list[str]) -> int:
    ps = pairs(Path(argv[0]))
    med = lambda sel: tuple(float(np.median([p[key] for p in sel])) for key in ("dx", "dy", "k"))  # noqa: E731
    dx, dy, k = med(ps)
    print(f"{len(ps)} pairs: shift ({dx:.3f}, {dy:.3f}), scale {k:.3f} (CNN box widths)")
    print("held-out subject | constants from the others | landmark gap % of width: held out / all-pairs constants / unmoved box")
    for held in sorted({p["name"] for p in ps}):
        train, test = [p for p in ps if p["name"] != held], [p for p in ps if p["name"] == held]
        c = med(train)
        gap = [landmark_gap_pct(p, *c) for p in test]
        full = [landmark_gap_pct(p, dx, dy, k) for p in test]
        raw = [landmark_gap_pct(p, 0.0, 0.0, 1.0) for p in test]
        print(f"{held} ({len(test)}) | ({c[0]:.3f}, {c[1]:.3f}), {c[2]:.3f} | {np.mean(gap):.2f} (max {max(gap):.2f}) / "
              f"{np.mean(full):.2f} / {np.mean(raw):.2f} (max {max(raw):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
