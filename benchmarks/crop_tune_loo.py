"""Leave-one-subject-out for the fit's tuned constants on the synthetic turned heads of
``crop_heldout.py``: DEPTH_GAIN (the generic face's depth scale in the fit) and the head centre's
depth (HEAD_CENTRE z). For each subject, the pair that minimises the mean camera error (deg) plus the
mean framing shift (%), 10 per failed render, (yaw <= 40) on the *other* subjects is applied to it.

Usage: ``python benchmarks/crop_tune_loo.py CROP_SAMPLES_IMG_DIR [--json OUT]``."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

import dp360rt.crop.face3d as face3d
import dp360rt.crop.recipe as recipe
sys.path.insert(0, str(Path(__file__).parent))
import crop_heldout as ho  # noqa: E402

GAINS = [0.85, 1.0, 1.15]
DEPTHS = [-60.0, -85.0]
POSES = [(0, 0), (15, 0), (30, 0), (40, 0), (0, 20), (0, -20)]


def score(rows):
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return float("inf")
    return float(np.mean([r["camera_err_deg"] for r in ok]) + np.mean([r["shift_pct"] for r in ok])) + 10.0 * (len(rows) - len(ok))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    g0, c0 = face3d.DEPTH_GAIN, recipe.HEAD_CENTRE.copy()
    table = {}
    try:
        for g, z in itertools.product(GAINS, DEPTHS):
            face3d.DEPTH_GAIN = g
            recipe.HEAD_CENTRE = np.array([c0[0], c0[1], z])
            rows = ho.measure(a.folder, POSES, mirror=False, rescale=False)
            table[(g, z)] = rows
            print(f"gain {g} z {z}: all subjects score {score(rows):.2f}", flush=True)
    finally:
        face3d.DEPTH_GAIN, recipe.HEAD_CENTRE = g0, c0
    subjects = sorted({r["image"] for r in next(iter(table.values()))})
    out = []
    for s in subjects:
        best = min(table, key=lambda k: score([r for r in table[k] if r["image"] != s]))
        held = [r for r in table[best] if r["image"] == s and "error" not in r]
        line = {"held_out": s, "tuned_on_others": {"DEPTH_GAIN": best[0], "HEAD_CENTRE_z": best[1]},
                "mean_camera_err_deg": float(np.mean([r["camera_err_deg"] for r in held])),
                "mean_shift_pct": float(np.mean([r["shift_pct"] for r in held])),
                "max_camera_err_deg": max(r["camera_err_deg"] for r in held), "max_shift_pct": max(r["shift_pct"] for r in held),
                "max_abs_scale_pct": max(abs(r["scale_pct"]) for r in held), "n": len(held)}
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
