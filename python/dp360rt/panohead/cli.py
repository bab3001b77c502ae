"""``dp360rt panohead verify`` and ``dp360rt conditions``, plus the PanoHead halves of
``dp360rt convert`` and ``dp360rt info --panohead``.

:func:`add_parsers` registers the verbs on the main CLI's subparsers; every verb sets ``fn``
(``args.fn(args)`` -> exit code). Bad input raises ``ValueError`` / ``OSError`` naming the fix.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from .pickle_reader import RELEASE_FILE


def is_panohead_file(path: str | Path) -> bool:
    """A PanoHead network pickle (``.pkl``, or a pickle naming StyleGAN's persistence helper)."""
    p = Path(path)
    if p.suffix == ".pkl":
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x80") and b"torch_utils.persistence" in head


def convert_pickle(src: str | Path, dst: str | Path, fp16: bool = False) -> dict:
    """PanoHead ``.pkl`` -> ``.safetensors`` of G_ema (the generator every script uses) with its spec
    (class, init kwargs, rendering attributes) and the embedded sources' SHA-256 in the header.
    Written to a temporary file and renamed: the output is complete or absent."""
    from .pickle_reader import read_network_pickle
    from .weights import check_state_dict, build_generator, save_safetensors
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {dst.name}. Fix: e.g. panohead.safetensors")
    snap = read_network_pickle(src)
    spec = snap.spec("G_ema")
    sd = check_state_dict(build_generator(spec, device="meta"), snap.state_dict("G_ema"), str(src))
    if fp16:
        sd = {k: v.half() for k, v in sd.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        save_safetensors(tmp, sd, spec, source=Path(src).name)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"kind": "PanoHead G_ema", "tensors": len(sd), "bytes": dst.stat().st_size,
            "sources": snap.source_hashes(), "neural_rendering_resolution": spec.get("neural_rendering_resolution")}


def cmd_verify(a: argparse.Namespace) -> int:
    from .verify import TABLE, verify
    skip = tuple(a.skip or ())
    print(f"verifying PanoHead fixture set {a.fixture_dir}" + (f" (skipping {', '.join(skip)})" if skip else ""))
    print(TABLE.header)
    rows = verify(a.fixture_dir, skip=skip, on_row=lambda r: print(TABLE.row(r), flush=True))
    failed = [r.name for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)}/{len(rows)} rows passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed or not rows else 0


def _generator(a: argparse.Namespace):
    from .configs import load_spec
    from .weights import build_generator, load_generator
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.panohead and a.random:
        raise ValueError("pass either --panohead FILE or --random CONFIG, not both")
    if a.panohead:
        return load_generator(a.panohead, device=dev)
    if a.random:
        torch.manual_seed(a.weights_seed)
        g = build_generator(load_spec(a.random), device="cpu")
        return g.to(dev)
    raise ValueError(f"pass --panohead FILE ({RELEASE_FILE} or its converted .safetensors), or --random tiny for "
                     "random weights")


def _floats(text: str, n: int, flag: str) -> list[float]:
    try:
        v = [float(x) for x in text.split(",")]
    except ValueError:
        v = []
    if len(v) != n:
        raise ValueError(f"{flag} {text!r}: expected {n} comma-separated numbers. Fix: e.g. {flag} "
                         + ",".join(["0"] * n))
    return v


def cmd_conditions(a: argparse.Namespace) -> int:
    from .cameras import orbit
    from .conditions import render_conditions
    if not a.orbit:
        raise ValueError("say which cameras to render. Fix: pass --orbit (with --count, --yaw-range, --elevation, "
                         "--radius, --lookat as needed)")
    yaw = a.yaw_range or (None, None)
    cams = orbit(a.count, yaw[0], yaw[1], a.elevation, a.radius, _floats(a.lookat, 3, "--lookat"), a.focal)
    g = _generator(a)
    t = time.perf_counter()
    out = render_conditions(g, cams, a.out, seed=a.seed, truncation_psi=a.truncation, render_seed=a.render_seed,
                            ray_start=a.ray_start,
                            progress=lambda i, n: print(f"\rrendered {i}/{n}", end="", flush=True))
    dt = time.perf_counter() - t
    print(f"\nwrote {len(cams)} condition images (512x512) + cameras.json to {out} in {dt:.1f} s "
          f"({dt / len(cams):.2f} s per view); `dp360rt generate PORTRAIT --conditions {out} ...` uses them and "
          "their cameras")
    return 0


def info_lines(spec_name: str = "full") -> tuple[list[str], dict]:
    """Per-module key and element counts of a PanoHead spec (built on the meta device)."""
    from .configs import load_spec
    from .weights import build_generator
    g = build_generator(load_spec(spec_name), device="meta")
    sd = g.state_dict()
    params = {k for k, _ in g.named_parameters()}
    per: dict[str, list[int]] = {}
    for k, v in sd.items():
        top = k.split(".")[0] if "." in k else "<top-level buffer>"
        e = per.setdefault(top, [0, 0])
        e[0] += 1
        e[1] += v.numel()
    summary = {"num_keys": len(sd), "num_elements": sum(v.numel() for v in sd.values()),
               "num_parameters": sum(v.numel() for k, v in sd.items() if k in params),
               "keys_per_prefix": {p: n[0] for p, n in sorted(per.items())},
               "elements_per_prefix": {p: n[1] for p, n in sorted(per.items())}}
    lines = [f"\nPanoHead generator (G_ema), config {spec_name}:", f"  {'module':<26} {'keys':>6} {'elements':>15}"]
    lines += [f"  {p:<26} {n[0]:>6} {n[1]:>15,}" for p, n in sorted(per.items())]
    lines.append(f"  {'total':<26} {summary['num_keys']:>6} {summary['num_elements']:>15,}  "
                 f"({summary['num_parameters']:,} parameters)")
    return lines, summary


def add_parsers(subparsers) -> None:
    """Register ``panohead`` (verb ``verify``) and ``conditions`` on the main CLI's ``subparsers``."""
    p = subparsers.add_parser("panohead", help="PanoHead generator: verify a fixture set")
    sub = p.add_subparsers(dest="panohead_cmd", required=True)
    v = sub.add_parser("verify", help="recompute a PanoHead fixture set's golden cases; exit 1 on any failure")
    v.add_argument("fixture_dir")
    v.add_argument("--skip", action="append", metavar="CASE",
                   help="leave a case out (e.g. --skip projector, the slowest case)")
    v.set_defaults(fn=cmd_verify)

    c = subparsers.add_parser("conditions", help="render pose-hint images for a camera orbit with PanoHead "
                                                 "(a sphere32-style folder + cameras.json)")
    c.add_argument("--orbit", action="store_true", help="render an orbit (defaults: the authors' sphere32 cameras)")
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--panohead", metavar="FILE", help=f"{RELEASE_FILE} or its converted .safetensors")
    c.add_argument("--random", metavar="CONFIG", help="random weights of a PanoHead config (tiny, full) instead")
    c.add_argument("--weights-seed", type=int, default=0, help="seed of --random weights (default 0)")
    c.add_argument("--count", type=int, default=32, help="views (default 32)")
    c.add_argument("--yaw-range", type=float, nargs=2, metavar=("START", "END"),
                   help="degrees, END excluded; 0 = front, 90 = +x side (default: the authors' 0..360 orbit)")
    c.add_argument("--elevation", type=float, default=0.0, help="degrees above the horizon (default 0)")
    c.add_argument("--radius", type=float, default=2.7)
    c.add_argument("--lookat", default="0,0,0", help="x,y,z the cameras look at (default 0,0,0)")
    c.add_argument("--focal", type=float, default=4.2647, help="normalized focal length (default 4.2647)")
    c.add_argument("--seed", type=int, default=0, help="identity seed (z), default 0")
    c.add_argument("--truncation", type=float, default=0.7, help="truncation psi (default 0.7)")
    c.add_argument("--render-seed", type=int, default=0, help="seed of the renderer's depth samples (view k: +k)")
    c.add_argument("--ray-start", type=float, default=2.35, help="near plane (default 2.35, as DiffPortrait360)")
    c.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    c.set_defaults(fn=cmd_conditions)
