"""``dp360rt nerf ...``: fit a views folder, render cameras, orbit videos, meshes, and write a
built-in synthetic scene as a views folder (the acceptance recipe: ``nerf scene DIR`` then
``nerf fit DIR``).

Hook into a CLI with :func:`add_parser` (``sub`` = the object ``add_subparsers`` returned); every
verb sets ``fn`` (``args.fn(args)`` -> exit code). Bad input raises ``ValueError`` (a
:class:`~dp360rt.nerf.cameras.CameraError` for views, cameras and images) or ``OSError`` with a
message naming the problem and the fix. Standalone: ``python -m dp360rt.nerf ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..io.checks import arg, device_name, positive_float, positive_int, writable_dir
from .glb import DEFAULT_TRIANGLES

DEFAULT_SECONDS = 120.0
# Limits shared with the API (dp360rt.nerf.model / .video / .mesh), repeated here so `--help` needs no torch.
MAX_SIDE, GRID_RES, MAX_FRAMES, MAX_MESH_RES = 8192, (8, 1024), 100_000, 1024
SCENES = ("blobs", "blobs_wide", "sphere", "checker", "head")     # dp360rt.nerf.synthetic.SCENES
_DEVICE = arg(device_name, "--device", convert=str)


def _writable_file(path: str | Path) -> Path:
    p = Path(path)
    writable_dir(p.parent if str(p.parent) else Path("."))
    return p


def holdout_indices(n: int, k: int) -> list[int]:
    """``k`` views spread evenly over ``n`` (offset by half a spacing), for held-out evaluation."""
    if k <= 0:
        return []
    if k >= n:
        raise ValueError(f"--holdout {k} leaves no training views out of {n}. Fix: hold out fewer than {n} views")
    return sorted({int((i + 0.5) * n / k) % n for i in range(k)})


def cmd_fit(a: argparse.Namespace) -> int:
    from .cameras import load_views
    from .model import Nerf, NerfConfig

    out = writable_dir(a.out)
    images, cams, files = load_views(a.views)
    n = len(images)
    hold = holdout_indices(n, a.holdout or 0)
    train = [i for i in range(n) if i not in hold]
    seconds = a.seconds if (a.seconds is not None or a.steps is not None) else DEFAULT_SECONDS
    over = {k: v for k, v in {"encoding": a.encoding, "device": a.device, "seed": a.seed, "grid_res": a.grid_res,
                              "background": _background_arg(a.background), "bound": a.bound}.items() if v is not None}
    nerf = Nerf(NerfConfig(), **over)
    h, w = images[0].shape[:2]
    budget = (f"{seconds:g} s" if seconds is not None else "") + (" / " if seconds is not None and a.steps else "") + \
             (f"{a.steps} steps" if a.steps else "")
    print(f"nerf fit: {len(train)} training views ({w}x{h})" + (f", {len(hold)} held out {hold}" if hold else "")
          + f", encoding {nerf.encoding} on {nerf.device}, budget {budget}", flush=True)
    t0 = time.perf_counter()
    stats = nerf.fit([images[i] for i in train], cams[train], seconds=seconds, steps=a.steps, progress=not a.quiet,
                     holdout=([images[i] for i in hold], cams[hold]) if hold else None)
    print(f"trained {stats['steps']} steps in {stats['seconds']:.1f} s ({stats['steps_per_second']} steps/s), "
          f"training PSNR {stats['train_psnr']} dB, background {stats['background']} ({stats['background_mode']})")
    if hold:
        per = ", ".join(f"{files[i]} {p:.2f}" for i, p in zip(hold, stats["holdout_psnr"]))
        print(f"held-out PSNR: mean {stats['holdout_psnr_mean']:.2f} dB ({per})")
        stats["holdout_views"] = [files[i] for i in hold]
    nerf.stats = stats
    nerf.save(out)
    print(f"saved to {out} ({time.perf_counter() - t0:.1f} s in all)")
    if a.json:
        Path(a.json).write_text(json.dumps(stats, indent=1))
    return 0


def _background_arg(value: str | None):
    if value is None:
        return None
    if value in ("auto", "fit", "white", "black"):
        return value
    try:
        vals = [float(x) for x in value.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 3:
        raise ValueError(f"--background {value!r}: expected auto, fit, white, black or r,g,b in [0, 1]. Fix: e.g. --background 1,1,1")
    return vals


def cmd_render(a: argparse.Namespace) -> int:
    import numpy as np

    from .cameras import cameras_or_orbit, read_cameras_json, save_image, write_cameras_json
    from .model import Nerf

    out = writable_dir(a.out)                      # before the NeRF loads
    nerf = Nerf.load(a.model, device=a.device)
    files, cams = read_cameras_json(a.cameras)
    cams = cameras_or_orbit(cams, len(files), a.cameras)
    names = [Path(f).name for f in files] if all(files) else []
    if len(set(names)) != len(files) or not all(n.lower().endswith(".png") for n in names):
        names = [f"{i:03d}.png" for i in range(len(files))]
    w, h = a.width, a.height
    if (w is None) != (h is None):
        w = w or h
        h = h or w
    t0 = time.perf_counter()
    for name, cam in zip(names, cams):
        r = nerf.render(cam, w, h)
        save_image(r["rgb"], out / name)
        if a.depth:
            np.save(out / (Path(name).stem + "_depth.npy"), r["depth"].numpy())
    dt = time.perf_counter() - t0
    write_cameras_json(out / "cameras.json", cams, names)
    rw, rh = (w, h) if w else (nerf.image_size or (0, 0))
    print(f"rendered {len(names)} views ({rw}x{rh}) to {out} in {dt:.2f} s ({len(names) / max(dt, 1e-9):.1f} fps)")
    return 0


def cmd_video(a: argparse.Namespace) -> int:
    from .video import orbit_video
    from .model import Nerf

    out = _writable_file(a.out)                     # before the NeRF loads
    nerf = Nerf.load(a.model, device=a.device)
    t0 = time.perf_counter()
    p = orbit_video(nerf, out, frames=a.frames, fps=a.fps, width=a.width, height=a.height, radius=a.radius,
                    elevation_deg=a.elevation)
    print(f"wrote {a.frames} frames to {p} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_mesh(a: argparse.Namespace) -> int:
    from .mesh import extract_mesh, write_mesh
    from .model import Nerf

    if Path(a.out).suffix.lower() not in (".ply", ".obj"):
        raise ValueError(f"--out {a.out}: unknown mesh format. Fix: use a .ply or .obj file name")
    out = _writable_file(a.out)                     # before the NeRF loads
    nerf = Nerf.load(a.model, device=a.device)
    mesh = extract_mesh(nerf, resolution=a.resolution, level=a.level)
    write_mesh(mesh, out)
    print(f"wrote {len(mesh['vertices'])} vertices, {len(mesh['faces'])} triangles to {out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .assets import check_output_file, find_nerf, find_views
    from .glb import check_texture_size, check_triangles

    if not a.glb and not a.splat:
        raise ValueError("nothing to export. Fix: pass --glb OUT.glb and/or --splat OUT.ply")
    check_triangles(a.triangles)
    check_texture_size(a.texture_size)
    folder = find_nerf(a.run)                       # all checks before the NeRF loads
    if a.glb:
        check_output_file(a.glb, ".glb", a.overwrite)
    if a.splat:
        check_output_file(a.splat, ".ply", a.overwrite)
    views = a.views or find_views(a.run)
    from .model import Nerf
    nerf = Nerf.load(folder, device=a.device)
    if a.glb:
        r = nerf.export_glb(a.glb, triangles=a.triangles, texture_size=a.texture_size, resolution=a.resolution,
                            level=a.level, overwrite=a.overwrite)
        print(f"wrote {r['path']}: {r['triangles']} triangles, {r['texture_size']}^2 texture, "
              f"{r['bytes'] / 1e6:.2f} MB in {r['seconds']:.1f} s")
    if a.splat:
        if views is None and a.splat_steps:
            print("no views folder (cameras.json) found: writing the unrefined splat. Fix: pass --views DIR")
        level = {} if a.level is None else {"level": a.level}      # None: export_splat's own default
        r = nerf.export_splat(a.splat, views=views, steps=a.splat_steps, resolution=a.splat_resolution,
                              overwrite=a.overwrite, **level)
        print(f"wrote {r['path']}: {r['splats']} Gaussians, {r['bytes'] / 1e6:.2f} MB in {r['seconds']:.1f} s "
              f"({r['refine_seconds']:.1f} s refining {len(r['losses'])} steps against {views})")
    return 0


def cmd_scene(a: argparse.Namespace) -> int:
    from .synthetic import write_scene

    out = writable_dir(a.out)
    t0 = time.perf_counter()
    write_scene(out, a.scene, size=a.size)
    print(f"wrote the synthetic {a.scene!r} scene to {out}: 32 views ({a.size}x{a.size}, sphere32 orbit) and "
          f"cameras.json in {time.perf_counter() - t0:.1f} s. Fit it: dp360rt nerf fit {out} --out MODEL_DIR --holdout 4")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``nerf`` (verbs fit, render, video, mesh, export, scene) on ``subparsers``."""
    p = subparsers.add_parser("nerf", help="instant NeRF: fit a views folder, render cameras, videos, meshes",
                              description="Fit a radiance field to a views folder (PNG images + cameras.json) "
                                          "and render it.")
    sub = p.add_subparsers(dest="nerf_cmd", required=True)

    f = sub.add_parser("fit", help="fit a views folder (PNG + cameras.json) and save the field")
    f.add_argument("views", metavar="VIEWS_DIR", help="folder with PNG images and cameras.json")
    f.add_argument("--out", required=True, metavar="DIR", help="where to save the fitted field")
    f.add_argument("--seconds", type=arg(positive_float, "--seconds", convert=float),
                   help=f"training time budget (default {DEFAULT_SECONDS:g} s unless --steps)")
    f.add_argument("--steps", type=arg(positive_int, "--steps"), help="training steps (with --seconds: whichever comes first)")
    f.add_argument("--holdout", type=arg(positive_int, "--holdout", minimum=0), default=0, metavar="K",
                   help="hold out K evenly spread views and report their PSNR")
    f.add_argument("--encoding", choices=["auto", "grid", "hash"], help="auto: voxel grid on CPU, hash grid on CUDA")
    f.add_argument("--background", help="auto (default), fit, white, black or r,g,b")
    f.add_argument("--bound", type=arg(positive_float, "--bound", convert=float),
                   help="scene box half-size (default 0.5: [-0.5, 0.5]^3)")
    f.add_argument("--grid-res", type=arg(positive_int, "--grid-res", minimum=GRID_RES[0], maximum=GRID_RES[1]),
                   help=f"final voxel grid resolution ({GRID_RES[0]}..{GRID_RES[1]}, default 128)")
    f.add_argument("--device", type=_DEVICE, help="cpu, cuda, ... (default: cuda when available)")
    f.add_argument("--seed", type=int)
    f.add_argument("--json", help="also write the training statistics to this JSON file")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(fn=cmd_fit)

    r = sub.add_parser("render", help="render the cameras of a cameras.json to PNG files")
    r.add_argument("model", metavar="DIR", help="a folder written by `nerf fit`")
    r.add_argument("--cameras", required=True, metavar="CAMERAS.json", help='{"views": [{"camera": [25 numbers]}, ...]}')
    r.add_argument("--out", required=True, metavar="OUT_DIR")
    r.add_argument("--width", type=arg(positive_int, "--width", MAX_SIDE), help="default: the training views' width")
    r.add_argument("--height", type=arg(positive_int, "--height", MAX_SIDE), help="default: the training views' height")
    r.add_argument("--depth", action="store_true", help="also write <name>_depth.npy (distance along the ray)")
    r.add_argument("--device", type=_DEVICE)
    r.set_defaults(fn=cmd_render)

    v = sub.add_parser("video", help="orbit video (.mp4 needs imageio-ffmpeg; .gif; or a folder of PNG frames)")
    v.add_argument("model", metavar="DIR")
    v.add_argument("--out", required=True, help="file.mp4, file.gif or a folder for PNG frames")
    v.add_argument("--frames", type=arg(positive_int, "--frames", MAX_FRAMES), default=120)
    v.add_argument("--fps", type=arg(positive_int, "--fps", 1000), default=30)
    v.add_argument("--width", type=arg(positive_int, "--width", MAX_SIDE))
    v.add_argument("--height", type=arg(positive_int, "--height", MAX_SIDE))
    v.add_argument("--radius", type=float, help="default: the training cameras' mean distance")
    v.add_argument("--elevation", type=float, help="degrees; default: the training cameras' mean")
    v.add_argument("--device", type=_DEVICE)
    v.set_defaults(fn=cmd_video)

    m = sub.add_parser("mesh", help="marching-cubes mesh of the density (.ply or .obj)")
    m.add_argument("model", metavar="DIR")
    m.add_argument("--out", required=True, help="mesh.ply or mesh.obj")
    m.add_argument("--resolution", type=arg(positive_int, "--resolution", MAX_MESH_RES, minimum=2), default=128)
    m.add_argument("--level", type=float, default=10.0, help="density iso-level (per world unit), default 10")
    m.add_argument("--device", type=_DEVICE)
    m.set_defaults(fn=cmd_mesh)

    e = sub.add_parser("export", help="portable assets: textured GLB and/or 3D Gaussian splat .ply")
    e.add_argument("run", metavar="RUN_DIR", help="a run folder (views + nerf/) or the --out folder of `nerf fit`")
    e.add_argument("--glb", metavar="OUT.glb", help="write a textured glTF 2.0 binary")
    e.add_argument("--splat", metavar="OUT.ply", help="write a standard 3DGS .ply")
    e.add_argument("--triangles", type=int, default=DEFAULT_TRIANGLES, help=f"GLB triangle budget (default {DEFAULT_TRIANGLES})")
    e.add_argument("--texture-size", type=int, default=1024, help="GLB texture side, a power of two up to 8192")
    e.add_argument("--resolution", type=arg(positive_int, "--resolution", MAX_MESH_RES, minimum=2), default=128,
                   help="marching-cubes cells per side (default 128)")
    e.add_argument("--level", type=float, default=None,
                   help="density iso-level (per world unit); default: for the GLB the level whose silhouettes "
                        "match the NeRF's renders, for the splat 10")
    e.add_argument("--views", metavar="VIEWS_DIR", help="views to refine the splat against (default: the run's)")
    e.add_argument("--splat-steps", type=arg(positive_int, "--splat-steps", minimum=0), default=300,
                   help="refinement steps (one view each; default 300, 0: the field's initialisation)")
    e.add_argument("--splat-resolution", type=arg(positive_int, "--splat-resolution", 1024, minimum=4), default=64,
                   help="seed grid cells per side (default 64)")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files")
    e.add_argument("--device", type=_DEVICE)
    e.set_defaults(fn=cmd_export)

    s = sub.add_parser("scene", help="write a built-in synthetic scene (exact renders) as a views folder to fit")
    s.add_argument("out", metavar="DIR", help="the views folder to write (PNG images + cameras.json)")
    s.add_argument("--scene", choices=SCENES, default="head", help="default: head")
    s.add_argument("--size", type=arg(positive_int, "--size", MAX_SIDE), default=64,
                   help="view width and height in pixels (default 64)")
    s.set_defaults(fn=cmd_scene)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp360rt.nerf")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = parser.parse_args(["nerf", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"dp360rt nerf {args.nerf_cmd}: error: {e}", file=sys.stderr)
        return 2
