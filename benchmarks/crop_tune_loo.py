"""Leave-one-subject-out for the fit's tuned constants on the synthetic turned heads of
``crop_heldout.py``: BROW_WEIGHT (the brows' weight in the pose fit) and DEPTH_GAIN (the generic
face's depth scale in the fit). For each subject, the pair that minimises the mean camera error
(deg) plus the mean framing shift (%) (yaw <= 40, renders and mirrors; 10 per failed render) on
the *other* subjects is applied to it, and its figures are printed beside those of the defaults.

The renders are cropped once: step (b)'s inputs (dlib's landmarks of the upright crop, step (a)'s
quad) are recorded, and each pair of constants only re-runs step (b).

With ``--scan OBJ`` the head scan of ``crop_heldout.py --scan`` is a fourth subject (its
reference quad: our crop of its frontal render with the shipped constants).

Usage: ``python benchmarks/crop_tune_loo.py CROP_SAMPLES_IMG_DIR [--scan OBJ] [--json OUT]``."""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

import dp360rt.crop.face3d as face3d
import dp360rt.crop.portrait as portrait
from dp360rt.crop import crop_portrait
from dp360rt.crop.recipe import quad_corners, refine_quad
sys.path.insert(0, str(Path(__file__).parent))
import crop_heldout as ho  # noqa: E402

BROW_WEIGHTS = [1.0, 0.5, 0.3, 0.0]
GAINS = [0.8, 0.9, 1.0]
POSES = [(0, 0), (15, 0), (30, 0), (40, 0), (-30, 0), (0, 20), (0, -20), (25, 15), (-25, -15), (40, -20)]


def step_b_inputs(folder: Path | None, scan: Path | None = None) -> list[dict]:
    """Per render (and mirror): the subject, turn, photo-frame label and reference quad, and the
    landmarks and quad that crop_portrait hands to step (b) (absent: the crop failed)."""
    seen = []
    real = portrait.refine_quad

    def spy(up, c, x, y):
        seen.append((np.array(up), c.copy(), x.copy(), y.copy()))
        return real(up, c, x, y)

    out = []
    portrait.refine_quad = spy
    try:
        for r in itertools.chain(ho.synth_renders(folder, POSES), ho.scan_renders(scan, POSES) if scan else ()):
            name, (yaw, pitch), img, R_true, ref = r.name, r.pose, r.img, r.R_true, r.ref
            cases = [(img, R_true, ref)]
            if yaw:
                mref = ref.copy()
                mref[:, 0] = img.shape[1] - 1 - mref[:, 0]
                cases.append((img[:, ::-1].copy(), ho.mirror_rotation(R_true), mref[[3, 2, 1, 0]]))
            for im, R, rq in cases:
                seen.clear()
                row = {"image": name, "turn": (yaw, pitch), "R_true": R, "ref": rq}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        crop_portrait(im)
                        row["step_b"] = seen[-1]
                    except ValueError:
                        pass
                out.append(row)
    finally:
        portrait.refine_quad = real
    return out


def errors(rows: list[dict]) -> list[dict | None]:
    """Step (b) with the current constants: camera error (crop frame) and framing shift per row."""
    res = []
    for r in rows:
        if "step_b" not in r:
            res.append(None)
            continue
        c, x, y, pose, _ = refine_quad(*r["step_b"])
        centre, side, angle = ho.quad_stats(quad_corners(c, x, y))
        rc, rside, _ = ho.quad_stats(r["ref"])
        res.append({"cam": ho.rotation_angle_deg(pose.rotation, ho.roll_z(angle) @ r["R_true"]),
                    "shift": float(np.hypot(*(centre - rc)) / rside * 100)})
    return res


def score(res: list[dict | None]) -> float:
    ok = [x for x in res if x is not None]
    if not ok:
        return math.inf
    return float(np.mean([x["cam"] for x in ok]) + np.mean([x["shift"] for x in ok])) + 10.0 * (len(res) - len(ok))


def figures(res: list[dict | None]) -> dict:
    ok = [x for x in res if x is not None]
    return {"n": len(ok), "median_camera_err_deg": float(np.median([x["cam"] for x in ok])),
            "max_camera_err_deg": max(x["cam"] for x in ok), "median_shift_pct": float(np.median([x["shift"] for x in ok])),
            "max_shift_pct": max(x["shift"] for x in ok)}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path, nargs="?")
    p.add_argument("--scan", type=Path, help="a head scan's OBJ (crop_heldout.py --scan): a fourth subject, real 3D")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = step_b_inputs(a.folder, a.scan)
    defaults = (face3d.BROW_WEIGHT, face3d.DEPTH_GAIN)
    table = {}
    try:
        for bw, g in itertools.product(BROW_WEIGHTS, GAINS):
            face3d.BROW_WEIGHT, face3d.DEPTH_GAIN = bw, g
            table[(bw, g)] = errors(rows)
            print(f"brow weight {bw} depth gain {g}: all subjects score {score(table[(bw, g)]):.2f}", flush=True)
    finally:
        face3d.BROW_WEIGHT, face3d.DEPTH_GAIN = defaults
    out = []
    for s in sorted({r["image"] for r in rows}):
        mine = [i for i, r in enumerate(rows) if r["image"] == s]
        best = min(table, key=lambda k: score([v for i, v in enumerate(table[k]) if i not in mine]))
        line = {"held_out": s, "tuned_on_others": {"BROW_WEIGHT": best[0], "DEPTH_GAIN": best[1]},
                "held_out_figures": figures([table[best][i] for i in mine]),
                "with_defaults": {"constants": list(defaults), **figures([table[defaults][i] for i in mine])}
                if defaults in table else None,
                "with_old_fit (1.0, 1.0)": figures([table[(1.0, 1.0)][i] for i in mine])}
        out.append(line)
        print(json.dumps(line))
    allbest = min(table, key=lambda k: score(table[k]))
    print("tuned on all:", allbest)
    if a.json:
        a.json.write_text(json.dumps({"loo": out, "all": allbest,
                                      "grid": {f"{k[0]},{k[1]}": score(v) for k, v in table.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
