"""Re-crop consistency on PanoHead's own crops (``3DDFA_V2_cropping/crop_samples/img`` of
SizheAn/PanoHead: 563² crops and their camera labels in ``dataset.json``).

A crop made by the recipe holds its final quad at a known place: the square of side 511 px with
its top-left corner at (25, 51). Re-cropping it must find that quad again and the label's camera.
Prints, per image, the centre shift and the scale error (in % of the quad side), the quad's
in-plane angle, and the angle between our camera rotation and the label's (and yaw / pitch
differences). Usage: ``python benchmarks/crop_recrop.py CROP_SAMPLES_IMG_DIR [--json OUT]``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from dp360rt.crop import crop_portrait, yaw_pitch
from dp360rt.crop.face3d import rotation_angle_deg
from dp360rt.crop.recipe import canvas_geometry, ffhq_quad


def measure(folder: Path) -> list[dict]:
    labels = dict(json.loads((folder / "dataset.json").read_text())["labels"])
    _, _, left, top = canvas_geometry()
    h = 511 / 2
    ref_c = np.array([left + h, top + h])
    rows = []
    for name, label in sorted(labels.items()):
        label = torch.tensor([float(v) for v in label], dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = crop_portrait(folder / name)
        q = r.quad
        c = q.mean(0)
        side = float(np.linalg.norm(q[3] - q[0]))
        angle = math.degrees(math.atan2(q[3][1] - q[0][1], q[3][0] - q[0][0]))
        fc, fx, _ = ffhq_quad(r.landmarks)
        ours = r.camera[:16].reshape(4, 4)[:3, :3].numpy()
        ref = label[:16].reshape(4, 4)[:3, :3].numpy()
        yaw0, pitch0 = yaw_pitch(label)
        rows.append({
            "image": name,
            "shift_pct": [float(v) for v in (c - ref_c) / 511 * 100],
            "scale_err_pct": (side / 511 - 1) * 100,
            "angle_deg": angle,
            "ffhq_shift_pct": [float(v) for v in (fc - ref_c) / 511 * 100],
            "ffhq_scale_err_pct": (2 * float(np.hypot(*fx)) / 511 - 1) * 100,
            "camera_angle_err_deg": rotation_angle_deg(ours, ref),
            "yaw_deg": [r.yaw_deg, yaw0], "pitch_deg": [r.pitch_deg, pitch0],
            "landmark_rms_px": r.pose.rms, "seconds": r.seconds,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = measure(a.folder)
    print(f"{'image':<10} {'shift x,y %':>14} {'scale %':>8} {'angle':>6} | {'FFHQ quad: shift %':>18} {'scale %':>8} | "
          f"{'cam err':>7} {'yaw ours/label':>15} {'pitch ours/label':>17}")
    for r in rows:
        print(f"{r['image']:<10} {r['shift_pct'][0]:>6.2f},{r['shift_pct'][1]:>6.2f} {r['scale_err_pct']:>8.2f} "
              f"{r['angle_deg']:>6.2f} | {r['ffhq_shift_pct'][0]:>8.2f},{r['ffhq_shift_pct'][1]:>8.2f} "
              f"{r['ffhq_scale_err_pct']:>8.2f} | {r['camera_angle_err_deg']:>7.2f} "
              f"{r['yaw_deg'][0]:>7.2f}/{r['yaw_deg'][1]:<7.2f} {r['pitch_deg'][0]:>8.2f}/{r['pitch_deg'][1]:<8.2f}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
