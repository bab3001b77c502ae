"""The ``dp360rt`` command line (also ``python -m dp360rt``)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..io.checks import arg, device_name, gib_budget, positive_int
from ..engine.pipeline_args import add_backend_args, add_compute_dtype_arg, pipeline_from_args
from ..io.progress import progress_bar
from ..version import __version__


def cmd_verify(a: argparse.Namespace) -> int:
    from ..verify import TABLE, verify
    engine = "fast" if a.backend != "torch" else a.engine      # exported networks run the fast engine's schedule
    print(f"verifying {a.fixture_dir} (engine: {engine}, backend: {a.backend})")
    if a.backend != "torch" and not a.export_dir:
        print("exporting the fixture's models to ONNX first (a minute for a tiny config) ...", flush=True)
    print(TABLE.header)
    results = verify(a.fixture_dir, engine=engine, backend=a.backend, export_dir=a.export_dir,
                     on_result=lambda r: print(TABLE.row(r), flush=True))
    failed = [r.name for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} cases passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed or not results else 0


def cmd_info(a: argparse.Namespace) -> int:
    from ..config import load_config
    from ..model import build_model, state_summary
    print(f"dp360rt {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    from ..capabilities import capabilities
    caps = capabilities()
    for k, v in caps.items():
        if k != "torch":
            print(f"  {k:<22} {v if v is not None else 'not available'}")
    cfgs = load_config(a.config)
    summary: dict = {"capabilities": caps}
    for kind, cfg in cfgs.items():
        s = state_summary(build_model(kind, cfg, device="meta"))
        summary[kind] = s
        print(f"\n{kind} ({'360° view generator' if kind == 'nvs' else 'back-view generator'}), config {a.config}:")
        print(f"  {'module':<26} {'keys':>6} {'elements':>15}")
        for p, n in s["elements_per_prefix"].items():
            print(f"  {p:<26} {s['keys_per_prefix'][p]:>6} {n:>15,}")
        print(f"  {'total':<26} {s['num_keys']:>6} {s['num_elements']:>15,}  ({s['num_parameters']:,} parameters)")
    if a.flops:
        from ..flops import format_flops, per_window, run_flops
        print(f"\nFLOPs (convolutions, matmuls, attention; 2 per multiply-add), config {a.config}, {a.steps} steps:")
        for engine in ("reference", "fast"):
            r = run_flops(a.config, engine, a.steps)
            summary[f"flops_{engine}"] = r
            print(f"  {engine:<9} per step per window: {format_flops(per_window(r['nvs_step'], 4))}")
            print(f"  {'':<9} per run (back view + 32 views): {format_flops(r['run'], 1e15, 'PFLOP')}")
        ratio = summary["flops_fast"]["run"]["total"] / summary["flops_reference"]["run"]["total"]
        print(f"  fast / reference per run: {ratio:.3f}")
    if a.panohead:
        from ..panohead.cli import info_lines
        lines, summary["panohead"] = info_lines("full")
        print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from ..checkpoint import convert
    from ..panohead.cli import convert_pickle, is_panohead_file
    t = time.perf_counter()
    if is_panohead_file(a.input):
        s = convert_pickle(a.input, a.output, fp16=a.fp16)
        print(f"wrote {a.output}: {s['kind']}, {s['tensors']} tensors, {s['bytes'] / 2**20:.1f} MiB, neural rendering "
              f"resolution {s['neural_rendering_resolution']} ({time.perf_counter() - t:.1f} s; nothing in the pickle "
              "was executed)")
        return 0
    s = convert(a.input, a.output, fp16=a.fp16)
    print(f"wrote {a.output}: {s['kind']} checkpoint, {s['tensors']} tensors, {s['bytes'] / 2**20:.1f} MiB "
          f"({time.perf_counter() - t:.1f} s)")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from ..io.results import check_output_dir, save_or_keep
    check_output_dir(a.out, a.overwrite)            # before the models load, not after the generation
    pipe = pipeline_from_args(a)
    if pipe.shared["tensors"]:
        print(f"{pipe.shared['tensors']} tensors ({pipe.shared['bytes'] / 2**20:.0f} MiB) are identical in both "
              "checkpoints: kept once")
    if pipe.plan is not None:
        print("plan: " + pipe.plan.describe(4, pipe.nvs.frames))
    features = None
    if a.features:
        from ..io.images import load_frames
        features = load_frames(a.features, pipe.image_size)
    res = pipe(a.portrait, _conditions(a, pipe.image_size), features=features, cameras=a.cameras, steps=a.steps,
               seed=a.seed, progress=progress_bar(), crop=a.crop)
    if res.crop is not None:
        print(_crop_summary(res.crop))
    out = save_or_keep(lambda d: res.save(d, overwrite=a.overwrite), a.out)
    print(f"wrote back view + {len(res.views)} views to {out}; timings (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
    return 0


def _conditions(a: argparse.Namespace, size: int):
    """--conditions, or synthetic condition images for random weights (see :func:`dp360rt.engine.pipeline_args.pipeline_from_args`)."""
    if a.conditions:
        return a.conditions
    from ..io.images import synthetic_conditions
    return synthetic_conditions(32, size)


def cmd_stream(a: argparse.Namespace) -> int:
    from ..io.images import save_png
    from ..nerf.cameras import write_cameras_json
    from ..io.results import ResultDir
    # Views go into a fresh folder beside --out, moved into place when all are there: an
    # interrupted stream (Ctrl-C) leaves an earlier result in --out as it was.
    with ResultDir(a.out, kind="views", overwrite=a.overwrite) as rd:
        pipe = pipeline_from_args(a)
        tmp = rd.path
        views = {}
        try:
            prepared = pipe.prepare(a.portrait, crop=a.crop, progress=progress_bar())
            if prepared.crop is not None:
                print(_crop_summary(prepared.crop))
            prepared.save_extras(tmp)               # crop/ and inversion/, as generate saves them
            for v in pipe.stream(prepared, _conditions(a, pipe.image_size), policy=a.policy, steps=a.steps,
                                 seed=a.seed, cameras=a.cameras, back_view=True):
                name = "back_view.png" if v.is_back_view else f"{v.index:03d}.png"
                save_png(v.image, tmp / name)
                what = "back view" if v.is_back_view else f"view {v.index:3d}"
                print(f"{what} ready at {v.t_ready:7.2f} s -> {name}", flush=True)
                if not v.is_back_view:
                    views[v.index] = v.camera
        finally:
            pipe.close()
        order = sorted(views)
        write_cameras_json(tmp / "cameras.json", [views[i] for i in order], [f"{i:03d}.png" for i in order])
        out = rd.commit(views=len(views))
    print(f"{len(views)} views streamed to {out} (with cameras.json: `dp360rt nerf fit {out}` fits them)")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench
    from ..io.results import check_output_dir
    check_output_dir(a.out, a.overwrite)            # before the models load
    pipe = pipeline_from_args(a)
    try:
        run_bench(pipe, a.out, steps=a.steps, repeats=a.repeats, warmup=a.warmup,
                  conditions=_conditions(a, pipe.image_size), portrait=a.portrait, nerf_steps=a.nerf_steps,
                  overwrite=a.overwrite)
    finally:
        pipe.close()
    return 0


_CAMERAS_HELP = ("cameras.json with the views' 25-number PanoHead cameras (default: the condition folder's "
                 "cameras.json, else the default 32-view orbit)")


def _add_model_args(p: argparse.ArgumentParser, random_default: str | None = None) -> None:
    p.add_argument("--nvs", help="model_state-340000.th (or .safetensors)")
    p.add_argument("--backview", help="back_head-230000.th (or .safetensors)")
    p.add_argument("--random", default=random_default, metavar="CONFIG",
                   help="random weights of a config (tiny, medium, full, or a config.json) instead of checkpoints")
    p.add_argument("--config", default="full")
    p.add_argument("--conditions", help="the authors' cam_condition/sphere32 folder")
    p.add_argument("--cameras", help=_CAMERAS_HELP)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   type=arg(device_name, "--device", convert=str), help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp16" if torch.cuda.is_available() else "fp32", choices=["fp32", "fp16", "bf16"])
    add_compute_dtype_arg(p)
    p.add_argument("--engine", default="fast", choices=["fast", "reference"],
                   help="fast: same numbers, shared-bank schedule (default); reference: the authors' loop")
    p.add_argument("--max-memory", type=arg(gib_budget, "--max-memory", convert=float),
                   help="GiB the fast engine may plan for (default, or 0: no limit)")
    add_backend_args(p)
    _add_overwrite_arg(p)


def _add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier result in --out (as a whole, when the new one is complete)")


def _add_crop_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crop", default="none", choices=["none", "auto"],
                   help="auto: crop the raw photo to PanoHead's framing first (as `dp360rt crop`; needs the crop extra)")


def _crop_summary(r) -> str:
    which = "the largest" if getattr(r, "face_index", 0) == 0 else f"face {r.face_index}"
    found = f"{r.faces_found} faces found, cropped {which}" if r.faces_found > 1 else "1 face found"
    by = " by the CNN detector" if getattr(r, "detector", "hog") == "cnn" else ""
    return (f"{found}{by}: yaw {r.yaw_deg:+.1f} deg, pitch {r.pitch_deg:+.1f} deg (1-sigma {r.camera_sigma_deg:.1f} deg), "
            f"landmark fit rms {r.pose.rms:.1f} px (of 512), {r.seconds:.2f} s")


def cmd_crop(a: argparse.Namespace) -> int:
    from ..crop import FaceError, crop_portrait
    try:
        r = crop_portrait(a.photo, min_score=a.min_score, face=a.face, detector=a.detector)
    except FaceError as e:           # nothing was written
        print(f"dp360rt crop: error: {e}", file=sys.stderr)
        return 1
    out = r.save(a.out)
    print(_crop_summary(r))
    print(f"wrote {out / 'crop.png'} (512x512), {out / 'camera.json'}, {out / 'overlay.png'}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(a.out, steps=a.steps, seed=a.seed, nerf_seconds=a.nerf_seconds, synthetic_seconds=a.synthetic_seconds,
             overwrite=a.overwrite)
    return 0


def cmd_view(a: argparse.Namespace) -> int:
    # Starlette and uvicorn (the serve extra) load here only, so the rest of the CLI works without them
    if not a.paths and not a.synthetic:
        raise ValueError("nothing to show. Fix: pass a views or NeRF folder, or --synthetic head")
    try:
        import uvicorn
        from ..viewer.app import build_app, load_path, load_synthetic
        from ..viewer.sessions import NerfSessions
    except ImportError as e:
        raise ImportError(f"dp360rt view needs Starlette and uvicorn ({e}). Fix: pip install 'dp360rt[serve]'") from None
    if a.splat_steps < 0:
        raise ValueError(f"--splat-steps {a.splat_steps}: must be 0 or more. Fix: pass e.g. --splat-steps 300")
    sessions = NerfSessions(seconds=a.seconds, export_options={"splat": {"steps": a.splat_steps}})
    try:
        if a.synthetic:
            load_synthetic(sessions, a.synthetic, a.size, mode=a.nerf)
        for p in a.paths:
            load_path(sessions, p, mode=a.nerf)
    except BaseException:
        sessions.close()
        raise
    host = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
    print(f"dp360rt view: open http://{host}:{a.port}/ ({len(sessions.preloaded())} result(s); Ctrl-C stops)",
          flush=True)
    from ..serve.parts import WS_MAX_BYTES
    uvicorn.run(build_app(sessions), host=a.host, port=a.port, log_level="warning", ws_max_size=WS_MAX_BYTES)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dp360rt", description="Fast, exact DiffPortrait360 inference.")
    sub = p.add_subparsers(dest="cmd", required=True)

    v = sub.add_parser("verify", help="recompute a fixture set's golden cases and compare")
    v.add_argument("fixture_dir")
    v.add_argument("--engine", default="reference", choices=["reference", "fast"])
    v.add_argument("--backend", default="torch", choices=["torch", "ort", "trt"],
                   help="run the networks on exported ONNX files (ort: ONNX Runtime, trt: TensorRT engines)")
    v.add_argument("--export-dir", help="an export of this fixture set (python -m dp360rt.export --fixture DIR ...); "
                                        "default: export to a temporary directory first")
    v.set_defaults(fn=cmd_verify)

    i = sub.add_parser("info", help="versions, devices, per-module parameter counts of a config")
    i.add_argument("--config", default="full", help="'full', 'tiny' or a config.json (default: full)")
    i.add_argument("--json", help="also write the counts to this JSON file")
    i.add_argument("--flops", action="store_true", help="also count FLOPs per step and per run, both engines")
    i.add_argument("--steps", type=int, default=50, help="DDIM steps for --flops (default 50)")
    i.add_argument("--panohead", action="store_true", help="also the PanoHead generator's key/element counts")
    i.set_defaults(fn=cmd_info)

    c = sub.add_parser("convert", help="convert a checkpoint (or a PanoHead .pkl) to .safetensors")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--fp16", action="store_true", help="store float32 weights as float16")
    c.set_defaults(fn=cmd_convert)

    g = sub.add_parser("generate", help="portrait -> back view + 32 views (official checkpoints, or --random CONFIG)")
    g.add_argument("portrait")
    g.add_argument("--out", required=True)
    g.add_argument("--features", help="32 feature frames (PNG/JPEG, name order) for the 3D-aware start "
                                      "(the authors' --denoise_from_guidance renders)")
    _add_model_args(g)
    _add_crop_arg(g)
    from ..invert.cli import add_noise3d_args
    add_noise3d_args(g)
    g.set_defaults(fn=cmd_generate)

    st = sub.add_parser("stream", help="print and save views as they finish, the back view first (C++ step loop)")
    st.add_argument("portrait")
    st.add_argument("--out", required=True)
    st.add_argument("--policy", default="latency", choices=["latency", "throughput"])
    _add_model_args(st)
    _add_crop_arg(st)
    add_noise3d_args(st)
    st.set_defaults(fn=cmd_stream)

    b = sub.add_parser("bench", help="per-stage latency with warm-up and repeats; JSON + PNG")
    b.add_argument("--out", default="dp360rt_bench")
    b.add_argument("--portrait", help="portrait image (default: a synthetic one)")
    b.add_argument("--repeats", type=arg(positive_int, "--repeats"), default=3)
    b.add_argument("--nerf-steps", type=arg(positive_int, "--nerf-steps"), default=200,
                   help="NeRF fitting steps timed per repeat")
    b.add_argument("--warmup", type=arg(positive_int, "--warmup", minimum=0), default=1)
    _add_model_args(b)
    b.set_defaults(fn=cmd_bench)

    cr = sub.add_parser("crop", help="raw photo -> PanoHead's 512² face crop, its camera (camera.json), overlay.png")
    cr.add_argument("photo")
    cr.add_argument("--out", required=True)
    cr.add_argument("--min-score", type=float, default=0.25,
                    help="drop face detections scoring below this (dlib's detector score; default 0.25)")
    cr.add_argument("--face", type=arg(positive_int, "--face", minimum=0), default=0,
                    help="which face to crop when there are several, by size: 0 (default) is the largest")
    cr.add_argument("--detector", default="auto", choices=["auto", "all"],
                    help="auto (default): dlib's frontal (HOG) detector, its CNN detector only when HOG finds no face; "
                         "all: the CNN's faces too (a head turned beyond about 40 deg beside a frontal one; ~2 s more)")
    cr.set_defaults(fn=cmd_crop)

    d = sub.add_parser("demo", help="the whole pipeline on a tiny random-weight model (no checkpoints needed)")
    d.add_argument("--out", default="dp360rt_demo")
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--nerf-seconds", type=float, default=20.0, help="NeRF fitting budget (default 20 s)")
    _add_overwrite_arg(d)
    d.add_argument("--synthetic-seconds", type=float, default=10.0,
                   help="NeRF budget for the built-in synthetic head scene (default 10 s; 0 skips it)")
    d.set_defaults(fn=cmd_demo)

    # the offline export toolchain: argparse only here; onnx / torch.onnx load inside its handler
    from ..export.cli import add_parser as add_export_parser
    add_export_parser(sub)
    from ..nerf.cli import add_parser as add_nerf_parser
    add_nerf_parser(sub)
    from ..serve.cli import add_parser as add_serve_parser
    add_serve_parser(sub)

    vw = sub.add_parser("view", help="browser viewer for a saved result, a fitted NeRF or --synthetic head")
    vw.add_argument("paths", nargs="*", metavar="VIEWS_DIR_OR_NERF_DIR",
                    help="a views folder (generate/demo --out) or a fitted NeRF folder (nerf fit --out)")
    vw.add_argument("--synthetic", metavar="SCENE", help="also show a built-in synthetic scene, fitted now (e.g. head)")
    vw.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    vw.add_argument("--port", type=int, default=8360)
    vw.add_argument("--seconds", type=float, default=30.0, help="NeRF fitting budget per unfitted folder (default 30)")
    vw.add_argument("--nerf", default="on_view", choices=["on_view", "always"],
                    help="fit an unfitted folder when the page first shows it (on_view, default) or all at start")
    vw.add_argument("--size", type=int, default=64, help="synthetic scene view size in pixels (default 64)")
    vw.add_argument("--splat-steps", type=int, default=300,
                    help="refinement steps of head.ply, the splat the page draws in the browser once the fit is "
                         "done (default 300; 0: the field's initialisation, made at once)")
    vw.set_defaults(fn=cmd_view)
    from ..panohead.cli import add_parsers as add_panohead_parsers
    add_panohead_parsers(sub)
    from ..invert.cli import add_parser as add_invert_parser
    add_invert_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:       # bad input: every message names the problem and the fix
        print(f"dp360rt {_verb(args)}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:      # an optional dependency (onnx, onnxruntime, tensorrt, imageio-ffmpeg)
        fix = "" if "Fix:" in str(e) else (". Fix: install the optional dependency "
                                            "(e.g. pip install 'dp360rt[export]' for ONNX)")
        print(f"dp360rt {_verb(args)}: error: {e}{fix}", file=sys.stderr)
        return 2


def _verb(args: argparse.Namespace) -> str:
    return " ".join(v for v in (args.cmd, getattr(args, "nerf_cmd", None), getattr(args, "panohead_cmd", None)) if v)


if __name__ == "__main__":
    sys.exit(main())
