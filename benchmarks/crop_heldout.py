"""Held-out check of the face crop and camera on turned and tilted heads with exact labels.

Sources: PanoHead's two published crops (``3DDFA_V2_cropping/crop_samples/img``, their camera
labels in ``dataset.json``; pass the folder) and scikit-image's ``astronaut`` (its head at 2x; its label: our fit
of the untouched photo). Each is rendered turned about its head centre by a known yaw (0 to 60 deg)
and pitch (-30 to +30 deg) on a 2.5D synthetic head (:mod:`dp360rt.crop.synth`; each source its
own skull, face depth and centre; the source's own head rotation, its label, is part of the
synthetic geometry, so the render's label is exact), then mirrored, and rescaled. Per render: framing shift (quad
centre vs the reference quad, % of its side), scale error %, roll (quad angle) deg, camera error
(angle between our rotation and the label), relative error (between our rotation and the
applied turn times our fit of the untouched source: what the fit adds on top of its frontal
error), exact-landmark error (steps (a)-(b) on the render's exact projected landmarks instead of
dlib's: the fit's own share of the camera error), yaw / pitch ours and label. The reference quad is the
source's own (rotating about the head centre keeps its projection): PanoHead's for its crops, our
crop of the untouched photo for the astronaut.

A second set, real 3D (``--scan OBJ``): a textured head scan with its 68 landmarks in 3D
(:mod:`dp360rt.crop.scan`; menpo3d's ``data/james.obj``, from its PyPI sdist), rendered with
perspective at 1 m at the same poses. Its geometry is not the generic face's, its nose occludes
its cheek, and its label is the pose itself (the scan is placed in the generic face's frame by
its landmarks); the framing reference is our crop of its frontal render. Reported apart.

Usage: ``python benchmarks/crop_heldout.py [CROP_SAMPLES_IMG_DIR] [--scan OBJ [--scan-only]] [--json OUT] [--md OUT [--before JSON]] [--quick]``
(``--load JSON`` reports a saved run). The latest table: ``benchmarks/RESULTS.md`` (issue 29).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from dp360rt.crop import crop_portrait, detect_faces, yaw_pitch
from dp360rt.io.results import write_text_atomic
from dp360rt.crop.face3d import rotation_angle_deg
from dp360rt.crop.recipe import HEAD_CENTRE, camera_from_rotation, canvas_geometry
from dp360rt.crop.scan import load_scan, render_scan
from dp360rt.crop.recipe import ffhq_quad, refine_quad, to_quad_frame
from dp360rt.crop.synth import SynthHead, render_turned, turn, turned_landmarks

POSES = [(0, 0), (15, 0), (30, 0), (40, 0), (60, 0), (-30, 0), (0, 20), (0, -20), (0, 30), (0, -30),
         (25, 15), (-25, -15), (40, 20), (40, -20)]
HEADS = {"man.jpg": SynthHead(centre_back=90, relief=1.2, seed=1, half_width=95),
         "woman.jpg": SynthHead(centre_back=80, relief=1.0, seed=2, half_width=90),
         "astronaut": SynthHead(centre_back=85, relief=1.1, seed=3, half_width=88, half_height=118)}


def head_rotation(label: torch.Tensor) -> np.ndarray:
    """PanoHead's label -> the head rotation (viewer frame) that camera_from_rotation maps to it."""
    c2w = label[:16].reshape(4, 4)[:3, :3].double().numpy()
    u, _, vt = np.linalg.svd(c2w)            # the labels are orthonormal to 0.7 % only (singular values 0.993-1.008)
    return (u @ vt @ np.diag([1.0, -1.0, -1.0])).T


def roll_z(deg: float) -> np.ndarray:
    """Rotation by ``deg`` about the viewing axis: a photo-frame head rotation R is
    ``roll_z(quad angle) @ R`` in the frame of a crop whose quad is at that angle."""
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])


def photo_rotation(result) -> np.ndarray:
    """A crop's head rotation (fitted in its quad's frame) in the photo's frame."""
    return roll_z(-quad_stats(result.quad)[2]) @ result.pose.rotation


def quad_stats(q: np.ndarray) -> tuple[np.ndarray, float, float]:
    return q.mean(0), float(np.linalg.norm(q[3] - q[0])), math.degrees(math.atan2(q[3][1] - q[0][1], q[3][0] - q[0][0]))


def mirror_rotation(R: np.ndarray) -> np.ndarray:
    M = np.diag([-1.0, 1.0, 1.0])
    return M @ R @ M


def sources(folder: Path | None) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, photo, head rotation label, reference quad [4, 2])."""
    out = []
    if folder is not None:
        labels = dict(json.loads((folder / "dataset.json").read_text())["labels"])
        _, _, left, top = canvas_geometry()
        ref = np.array([[left, top], [left, top + 511], [left + 511, top + 511], [left + 511, top]], float)
        for name, lab in sorted(labels.items()):
            photo = np.asarray(Image.open(folder / name).convert("RGB"))
            out.append((name, photo, head_rotation(torch.tensor([float(v) for v in lab])), ref))
    from skimage import data
    # the astronaut's head at 2x (its face is 90 px wide in the 512² photo; 185 px here)
    a = np.asarray(Image.fromarray(data.astronaut()[0:300, 70:370]).resize((600, 600), Image.LANCZOS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = crop_portrait(a)
    out.append(("astronaut", a, photo_rotation(r), r.quad))
    return out


def exact_fit_err(landmarks, R_true) -> float:
    """Camera error (deg) of steps (a)-(b) run on exact landmarks [68, 2] (no detector), in the
    crop's frame."""
    c, x, y = ffhq_quad(landmarks)
    to_crop = roll_z(math.degrees(math.atan2(x[1], x[0])))
    return rotation_angle_deg(refine_quad(to_quad_frame(landmarks, c, x, y), c, x, y)[3].rotation, to_crop @ R_true)


def one(photo, R_true, ref_quad, label_src, R_rel=None, ref_roll=None):
    """Crop one render and score it. The camera is compared in the crop's own frame (the recipe
    fits it there: the label rotated by our quad's angle), so a tilted eye line counts once, as
    roll: our quad's angle minus ``ref_roll``, step (a)'s angle on the render's exact landmarks
    (a yaw and pitch together tilt the eye line; default: the reference quad's angle)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            r = crop_portrait(photo)
        except ValueError as e:
            return {"error": type(e).__name__}
    c, side, angle = quad_stats(r.quad)
    rc, rside, rangle = quad_stats(ref_quad)
    to_crop = roll_z(angle)
    label = camera_from_rotation(to_crop @ R_true)
    ly, lp = yaw_pitch(label)
    return {"shift_pct": float(np.hypot(*(c - rc)) / rside * 100), "shift_xy_pct": [float(v) for v in (c - rc) / rside * 100],
            "scale_pct": (side / rside - 1) * 100, "roll_deg": angle - (rangle if ref_roll is None else ref_roll),
            "camera_err_deg": rotation_angle_deg(r.pose.rotation, to_crop @ R_true), "yaw": [r.yaw_deg, ly], "pitch": [r.pitch_deg, lp],
            "rel_err_deg": rotation_angle_deg(r.pose.rotation, to_crop @ R_rel) if R_rel is not None else None,
            "sigma_deg": r.camera_sigma_deg, "label": label_src, "R": r.pose.rotation.tolist(),
            "detector": r.detector, "mirror_disagreement_deg": r.mirror_disagreement_deg,
            "mirror_kept": r.pose is r.readings[1],
            "readings_err_deg": [None if q is None else rotation_angle_deg(q.rotation, to_crop @ R_true) for q in r.readings],
            "readings_R": [None if q is None else q.rotation.tolist() for q in r.readings],
            "warnings": sorted({type(x.message).__name__ for x in w if issubclass(x.category, UserWarning)})}


class Render(NamedTuple):
    """One held-out render: its subject, turn (yaw, pitch), image, photo-frame label, reference
    quad [4, 2], the exact landmarks [68, 2], the label for the relative error (the turn times our
    fit of the untouched source) and where the label comes from."""

    name: str
    pose: tuple[int, int]
    img: np.ndarray
    R_true: np.ndarray
    ref: np.ndarray
    exact: np.ndarray
    R_rel: np.ndarray
    label_src: str


def synth_renders(folder: Path | None, poses=POSES):
    """The 2.5D renders of each source (see the module docstring) -> :class:`Render`s."""
    for name, photo, R0, ref in sources(folder):
        lm = detect_faces(photo)[0].landmarks
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            R_src = photo_rotation(crop_portrait(photo))      # our fit of the untouched source
        label_src = "PanoHead label" if name != "astronaut" else "fit of the photo"
        for yaw, pitch in poses:
            Rd = turn(yaw, pitch)
            yield Render(name, (yaw, pitch), render_turned(photo, lm, Rd, HEADS[name], R_source=R0), Rd @ R0, ref,
                         turned_landmarks(lm, Rd, HEADS[name], R0), Rd @ R_src, label_src)


def scan_renders(obj_path: Path, poses=POSES):
    """A textured head scan (:mod:`dp360rt.crop.scan`; its 68 landmarks in ``<stem>.ljson`` beside
    the OBJ) rendered with perspective at 1 m at each pose -> :class:`Render`s. Label: the pose
    itself (the scan is placed in the generic face's frame); framing reference: our crop of the
    frontal render."""
    scan = load_scan(obj_path, obj_path.with_suffix(".ljson"))
    name = f"{obj_path.stem} (scan)"
    print(f"{name}: placed in the head frame with a landmark residual of {scan.fit_rms_mm:.1f} mm rms", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        front = crop_portrait(render_scan(scan, np.eye(3), HEAD_CENTRE)[0])
    R_src = photo_rotation(front)
    for yaw, pitch in poses:
        Rd = turn(yaw, pitch)
        img, exact = render_scan(scan, Rd, HEAD_CENTRE)
        yield Render(name, (yaw, pitch), img, Rd, front.quad, exact, Rd @ R_src, "scan in the head frame")


def _variants(r: Render, mirror: bool, rescale: bool) -> list[dict]:
    """The rows of one render: itself, its mirror image (turned renders) and a x0.6 copy (two poses)."""
    yaw, pitch = r.pose
    x_axis = ffhq_quad(r.exact)[1]
    roll0 = math.degrees(math.atan2(x_axis[1], x_axis[0]))         # step (a)'s quad angle on the exact landmarks
    row = {"image": r.name, "turn": [yaw, pitch], "variant": "render",
           **one(r.img, r.R_true, r.ref, r.label_src, r.R_rel, roll0), "exact_lm_err_deg": exact_fit_err(r.exact, r.R_true)}
    rows = [row]
    if mirror and yaw != 0 and "error" not in row:
        W = r.img.shape[1]
        mref = r.ref.copy()
        mref[:, 0] = W - 1 - mref[:, 0]
        mref = mref[[3, 2, 1, 0]]
        m = {"image": r.name, "turn": [yaw, pitch], "variant": "mirror",
             **one(r.img[:, ::-1].copy(), mirror_rotation(r.R_true), mref, r.label_src, mirror_rotation(r.R_rel), -roll0)}
        if "R" in m:
            m["mirror_consistency_deg"] = rotation_angle_deg(np.array(m["R"]), mirror_rotation(np.array(row["R"])))
        rows.append(m)
    if rescale and (yaw, pitch) in ((30, 0), (0, 20)):
        s = 0.6
        small = np.asarray(Image.fromarray(r.img).resize((round(r.img.shape[1] * s), round(r.img.shape[0] * s)), Image.LANCZOS))
        rows.append({"image": r.name, "turn": [yaw, pitch], "variant": "x0.6",
                     **one(small, r.R_true, (r.ref + 0.5) * s - 0.5, r.label_src, r.R_rel, roll0)})
    return rows


def measure(renders, mirror=True, rescale=True) -> list[dict]:
    """Rows of every :class:`Render` of ``renders`` (:func:`synth_renders`, :func:`scan_renders`)."""
    return [row for r in renders for row in _variants(r, mirror, rescale)]


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    def band(lo, hi):
        b = [r for r in ok if lo <= max(abs(r["turn"][0]), 0) <= hi]
        if not b:
            return {}
        med = lambda k: float(np.median([abs(r[k]) for r in b]))  # noqa: E731
        return {"n": len(b), "median_shift_pct": med("shift_pct"), "median_abs_scale_pct": med("scale_pct"),
                "median_abs_roll_deg": med("roll_deg"), "median_camera_err_deg": med("camera_err_deg"),
                "median_rel_err_deg": med("rel_err_deg"), "max_rel_err_deg": max(r["rel_err_deg"] for r in b),
                "max_shift_pct": max(r["shift_pct"] for r in b), "max_abs_scale_pct": max(abs(r["scale_pct"]) for r in b),
                "max_abs_roll_deg": max(abs(r["roll_deg"]) for r in b), "max_camera_err_deg": max(r["camera_err_deg"] for r in b)}
    exact = [r["exact_lm_err_deg"] for r in rows if r.get("exact_lm_err_deg") is not None and abs(r["turn"][0]) <= 40]
    side = [r for r in ok if abs(r["yaw"][1]) >= 15]
    sweep = mirror_sweep(rows)
    return {"yaw<=40": band(0, 40), "exact_landmarks_yaw<=40": {"n": len(exact), "median_camera_err_deg": float(np.median(exact)),
                                                                  "max_camera_err_deg": max(exact)}, "yaw 60": band(41, 90), "failed": [f"{r['image']} {r['turn']} {r['variant']}: {r['error']}" for r in rows if "error" in r],
            "wrong_side": [f"{r['image']} {r['turn']} {r['variant']}" for r in side if np.sign(r["yaw"][0]) != np.sign(r["yaw"][1])],
            "median_mirror_deg": float(np.median([r["mirror_consistency_deg"] for r in ok if "mirror_consistency_deg" in r])),
            "max_mirror_deg": max([r["mirror_consistency_deg"] for r in ok if "mirror_consistency_deg" in r], default=None),
            "mirror_rule": sweep}


MIRROR_SWEEP = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 15.0, math.inf)


def _kept_error(row: dict, threshold: float) -> float:
    """A row's camera error had the mirror rule used ``threshold``: the mirror image's reading
    kept when the two differ by more than it and it is the further from facing the camera."""
    err, Rs = row["readings_err_deg"], row["readings_R"]
    if Rs[1] is None or row["mirror_disagreement_deg"] <= threshold:
        return err[0]
    turned = [rotation_angle_deg(np.array(R), np.eye(3)) for R in Rs]
    return err[1] if turned[1] > turned[0] else err[0]


def mirror_sweep(rows: list[dict]) -> dict:
    """Camera error (median / max, yaw <= 40; max at yaw 60) for each MIRROR_SWEEP threshold,
    and leave-one-subject-out: the threshold with the least mean error (yaw <= 40) on the other
    subjects, scored on the held-out one."""
    ok = [r for r in rows if "error" not in r and "readings_err_deg" in r]
    def score(sel, t):
        return float(np.mean([_kept_error(r, t) for r in sel if abs(r["turn"][0]) <= 40]))
    table = {}
    for t in MIRROR_SWEEP:
        e40 = [_kept_error(r, t) for r in ok if abs(r["turn"][0]) <= 40]
        e60 = [_kept_error(r, t) for r in ok if abs(r["turn"][0]) > 40]
        table[str(t)] = {"median": float(np.median(e40)), "max": max(e40), "mean": float(np.mean(e40)),
                         "max_60": max(e60, default=None), "median_60": float(np.median(e60)) if e60 else None}
    loo = {}
    for held in sorted({r["image"] for r in ok}):
        train = [r for r in ok if r["image"] != held]
        test = [r for r in ok if r["image"] == held]
        best = min(MIRROR_SWEEP, key=lambda t: score(train, t))
        loo[held] = {"picked": best, "held_out_mean": score(test, best), "shipped_mean": score(test, 6.0),
                     "never_mean": score(test, math.inf)}
    return {"thresholds": table, "leave_one_subject_out": loo}


GOALS = [("framing shift, % of the side", "shift_pct", "<= 3"), ("scale error, %", "abs_scale_pct", "<= 5"),
         ("roll, deg", "abs_roll_deg", "<= 3"), ("camera error, deg", "camera_err_deg", "<= 5 (<= 8 at yaw 60)"),
         ("relative camera error, deg", "rel_err_deg", "")]


def markdown(s: dict, rows: list[dict], before: dict | None = None) -> str:
    """The summary of the 2.5D renders and of the scan renders (per goal: median / max, yaw <= 40;
    beside ``before``'s when given) and every row."""
    out = []
    for title, summ, prev in (("2.5D renders", {k: v for k, v in s.items() if k != "scan"}, before),
                              ("scan renders", s.get("scan"), (before or {}).get("scan"))):
        if summ:
            out += [f"**{title}**", "", goal_table(summ, prev or None), ""]
    out += ["| image | turn yaw/pitch | variant | shift % | scale % | roll deg | cam err deg | rel err deg | exact-landmark cam err deg "
            "| yaw ours/label | pitch ours/label | warnings |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = f"{r['turn'][0]:+d}/{r['turn'][1]:+d}"
        ex = "" if r.get("exact_lm_err_deg") is None else f"{r['exact_lm_err_deg']:.2f}"
        if "error" in r:
            out.append(f"| {r['image']} | {t} | {r['variant']} | {r['error']} | | | | | {ex} | | | |")
            continue
        out.append(f"| {r['image']} | {t} | {r['variant']} | {r['shift_pct']:.2f} | {r['scale_pct']:+.2f} | {r['roll_deg']:+.2f} | "
                   f"{r['camera_err_deg']:.2f} | {r['rel_err_deg']:.2f} | {ex} | {r['yaw'][0]:.1f}/{r['yaw'][1]:.1f} | "
                   f"{r['pitch'][0]:.1f}/{r['pitch'][1]:.1f} | {', '.join(r['warnings'])} |")
    return "\n".join(out) + "\n"


def goal_table(s: dict, before: dict | None = None) -> str:
    """One set's summary as markdown: the goals (median / max, yaw <= 40), yaw 60, the mirror rule's
    sweep and the named errors."""
    def mm(summ, key):
        b = summ.get("yaw<=40", {})
        med = b.get(f"median_{key}")
        return "" if med is None else f"{med:.2f} / {b[f'max_{key}']:.2f}"
    head = "| goal (yaw <= 40) | target | median / max |" + (" before: median / max |" if before else "")
    out = [head, "|---|---|---|" + ("---|" if before else "")]
    for name, key, target in GOALS:
        out.append(f"| {name} | {target} | {mm(s, key)} |" + (f" {mm(before, key)} |" if before else ""))
    ex = s["exact_landmarks_yaw<=40"]
    exb = before["exact_landmarks_yaw<=40"] if before else None
    out.append(f"| camera error on the exact landmarks (no detector), deg | | {ex['median_camera_err_deg']:.2f} / "
               f"{ex['max_camera_err_deg']:.2f} |" + (f" {exb['median_camera_err_deg']:.2f} / {exb['max_camera_err_deg']:.2f} |" if exb else ""))
    out.append(f"| mirror consistency, deg | <= 3 | {s['median_mirror_deg']:.2f} / {s['max_mirror_deg']:.2f} |"
               + (f" {before['median_mirror_deg']:.2f} / {before['max_mirror_deg']:.2f} |" if before else ""))
    out.append(f"| renders cropped (yaw <= 40) | all | {s['yaw<=40'].get('n', 0)} |" + (f" {before['yaw<=40'].get('n', 0)} |" if before else ""))
    out.append(f"| wrong side (abs(yaw) >= 15) | 0 | {len(s['wrong_side'])} |" + (f" {len(before['wrong_side'])} |" if before else ""))
    def sixty(summ):
        b = summ.get("yaw 60", {})
        return f"{b.get('n', 0)}; " + (f"{b['median_camera_err_deg']:.2f} / {b['max_camera_err_deg']:.2f}" if b else "")
    if s.get("yaw 60"):
        out.append(f"| yaw 60: renders cropped; camera error median / max, deg | <= 8 | {sixty(s)} |"
                   + (f" {sixty(before)} |" if before else ""))
    sweep = s.get("mirror_rule")
    if sweep:
        out += ["", "Mirror rule: camera error for each threshold (the mirror image's reading kept when the two differ "
                "by more and it is the more turned; inf = never), deg:", "",
                "| threshold | yaw <= 40: median / mean / max | yaw 60: median / max |", "|---|---|---|"]
        for t, v in sweep["thresholds"].items():
            sixty = "" if v["max_60"] is None else f"{v['median_60']:.2f} / {v['max_60']:.2f}"
            out.append(f"| {t} | {v['median']:.2f} / {v['mean']:.2f} / {v['max']:.2f} | {sixty} |")
        out += ["", "| held-out subject | threshold picked on the others | its mean error, deg | shipped (6) | never |",
                "|---|---|---|---|---|"]
        for name, v in sweep["leave_one_subject_out"].items():
            out.append(f"| {name} | {v['picked']} | {v['held_out_mean']:.2f} | {v['shipped_mean']:.2f} | {v['never_mean']:.2f} |")
    out += ["", "Failed (named errors): " + ("; ".join(s["failed"]) or "none") + "."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, nargs="?")
    p.add_argument("--json", type=Path)
    p.add_argument("--scan", type=Path, help="a textured head scan's OBJ (its texture and <stem>.ljson of 68 3D landmarks "
                   "beside it): its renders are a second held-out set (menpo3d's data/james.obj)")
    p.add_argument("--scan-only", action="store_true", help="with --scan: leave the 2.5D renders out")
    p.add_argument("--quick", action="store_true", help="yaw 0/30/60 only, no mirror or rescale")
    p.add_argument("--md", type=Path, help="write the summary and the table as markdown")
    p.add_argument("--before", type=Path, help="a --json of an earlier run: its summary beside this one's in --md")
    p.add_argument("--load", type=Path, help="a --json of an earlier run: report it instead of measuring")
    a = p.parse_args(argv)
    poses = [(0, 0), (30, 0), (60, 0)] if a.quick else POSES
    if a.load:
        rows = json.loads(a.load.read_text())["rows"]
    else:
        rows = [] if a.scan_only else measure(synth_renders(a.folder, poses), mirror=not a.quick, rescale=not a.quick)
        if a.scan:
            rows += measure(scan_renders(a.scan, poses), mirror=not a.quick, rescale=not a.quick)
    print(f"{'image':<10} {'turn':>9} {'variant':<7} {'shift %':>7} {'scale %':>7} {'roll':>6} {'cam err':>7} {'rel err':>7} {'yaw ours/label':>15} "
          f"{'pitch ours/label':>16} {'sigma':>5} {'exact':>6} warnings")
    for r in rows:
        t = f"{r['turn'][0]:+d}/{r['turn'][1]:+d}"
        if "error" in r:
            ex = f" (exact landmarks: cam err {r['exact_lm_err_deg']:.2f})" if r.get("exact_lm_err_deg") is not None else ""
            print(f"{r['image']:<10} {t:>9} {r['variant']:<7} {r['error']}{ex}")
            continue
        print(f"{r['image']:<10} {t:>9} {r['variant']:<7} {r['shift_pct']:>7.2f} {r['scale_pct']:>7.2f} {r['roll_deg']:>6.2f} "
              f"{r['camera_err_deg']:>7.2f} {r['rel_err_deg']:>7.2f} {r['yaw'][0]:>7.1f}/{r['yaw'][1]:<7.1f} {r['pitch'][0]:>7.1f}/{r['pitch'][1]:<7.1f} "
              f"{r['sigma_deg']:>5.1f} {r.get('exact_lm_err_deg') or float('nan'):>6.2f} {','.join(r['warnings'])}")
    synth = [r for r in rows if not r["image"].endswith("(scan)")]
    s = summary(synth) if synth else {}
    if len(synth) < len(rows):
        s["scan"] = summary([r for r in rows if r["image"].endswith("(scan)")])
    print(json.dumps(s, indent=1))
    if a.json:
        write_text_atomic(a.json, json.dumps({"rows": rows, "summary": s}, indent=1))
    if a.md:
        before = json.loads(a.before.read_text())["summary"] if a.before else None
        write_text_atomic(a.md, markdown(s, rows, before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
