"""Portable-asset benchmarks (dp360rt.nerf.assets): quality, size and export time of the GLB and
the 3D Gaussian splat of a fitted NeRF.

Two scenes: the synthetic ``head`` (exact renders, sphere32 orbit) and a generated run (the tiny
random-weight pipeline: meaningless pictures, a real pipeline). Each: fit a NeRF on 28 views,
export both assets (the splat refined against those 28), and score the NeRF, the splat (our
PyTorch rasterizer) and the GLB (the numpy z-buffer renderer of dp360rt.nerf.mesh_render)
against the 4 held-out views. Also seconds per refinement pass over 32 views at larger sizes.

    python benchmarks/bench_assets.py [--size 64] [--fit-steps 600] [--splat-steps 600] [--skip-splat] [--json out.json]
    python -m pytest benchmarks/bench_assets.py --benchmark-json out.json       # tiny settings
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dp360rt.nerf.cameras import load_views
from dp360rt.nerf.glb import read_glb
from dp360rt.nerf.mesh_render import render_textured_mesh
from dp360rt.nerf.model import Nerf, psnr
from dp360rt.nerf.splat import read_splat_ply
from dp360rt.nerf.splat_render import render_splat
from dp360rt.nerf.synthetic import render_views

HOLD = [3, 11, 19, 27]


def generated_views(size: int, out: Path) -> tuple[list, torch.Tensor]:
    from dp360rt.demo import synthetic_conditions, synthetic_portrait
    from dp360rt.pipeline import Pipeline
    pipe = Pipeline.random("tiny", seed=0)
    s = pipe.image_size
    res = pipe(synthetic_portrait(s), synthetic_conditions(32, s), steps=2, seed=0)
    res.save(out)
    imgs, cams, _ = load_views(out)
    if imgs[0].shape[0] != size:
        imgs = [torch.nn.functional.interpolate(i.permute(2, 0, 1)[None], size=(size, size), mode="area")[0]
                .permute(1, 2, 0).contiguous() for i in imgs]
    return imgs, cams


def score_scene(name: str, imgs: list, cams: torch.Tensor, a: argparse.Namespace, tmp: Path) -> dict:
    train = [i for i in range(len(imgs)) if i not in HOLD]
    nerf = Nerf(device="cpu", grid_res=a.grid_res)
    t0 = time.perf_counter()
    nerf.fit([imgs[i] for i in train], cams[train], steps=a.fit_steps, progress=False)
    fit_s = time.perf_counter() - t0
    g = nerf.export_glb(tmp / f"{name}.glb", triangles=a.triangles, texture_size=a.texture, resolution=a.mesh_res,
                        overwrite=True)
    splat = not getattr(a, "skip_splat", False)
    if splat:
        s = nerf.export_splat(tmp / f"{name}.ply", views=([imgs[i] for i in train], cams[train]),
                              steps=a.splat_steps, resolution=a.splat_res, overwrite=True)
        sp = read_splat_ply(s["path"])
    mesh = read_glb(g["path"])
    bg = nerf.background.detach().cpu().float()
    h, w = imgs[0].shape[:2]
    p_n, p_s, p_g = [], [], []
    with torch.no_grad():
        for i in HOLD:
            p_n.append(psnr(nerf.render(cams[i], w, h)["rgb"], imgs[i]))
            if splat:
                p_s.append(psnr(render_splat(sp, cams[i], w, h, bg), imgs[i]))
            p_g.append(psnr(render_textured_mesh(mesh, cams[i], w, h, bg.tolist()), imgs[i]))
    r = {"views": f"{len(train)} train + {len(HOLD)} held out, {w}x{h}", "fit_steps": a.fit_steps,
         "fit_seconds": round(fit_s, 1),
         "psnr_nerf": round(float(np.mean(p_n)), 2), "psnr_glb": round(float(np.mean(p_g)), 2),
         "glb": {"triangles": g["triangles"], "texture": g["texture_size"], "bytes": g["bytes"],
                 "seconds": round(g["seconds"], 2)}}
    msg = (f"{name}: NeRF {r['psnr_nerf']} dB, GLB {r['psnr_glb']} dB (held out); "
           f"GLB {g['triangles']} tris {g['bytes'] / 1e6:.2f} MB {g['seconds']:.1f} s")
    if splat:
        r["psnr_splat"] = round(float(np.mean(p_s)), 2)
        r["splat"] = {"gaussians": s["splats"], "bytes": s["bytes"], "steps": a.splat_steps,
                      "init_seconds": round(s["init_seconds"], 2), "refine_seconds": round(s["refine_seconds"], 2)}
        msg += (f"; splat {r['psnr_splat']} dB, {s['splats']} Gaussians {s['bytes'] / 1e6:.2f} MB "
                f"{s['seconds']:.1f} s")
    print(msg, flush=True)
    return r


def refine_pass_seconds(sizes: list[int], gaussians: int = 20000) -> dict:
    """Seconds for one refinement pass over 32 views (forward + backward per view) with
    ``gaussians`` Gaussians on the head's surface, at each view size; timed on 2 views, x16."""
    from dp360rt.nerf.splat_render import refine_splat
    out = {}
    for size in sizes:
        imgs, cams = render_views("head", size=size)
        g = torch.Generator().manual_seed(0)
        d = torch.randn(gaussians, 3, generator=g)
        params = {"means": 0.2 * d / d.norm(dim=-1, keepdim=True), "log_scales": torch.full((gaussians, 3), -4.5),
                  "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(gaussians, 1),
                  "logit_opacity": torch.zeros(gaussians), "f_dc": torch.zeros(gaussians, 3)}
        t = time.perf_counter()
        refine_splat(params, imgs[:2], cams[:2], steps=2)
        out[f"{size}"] = round((time.perf_counter() - t) * 16, 1)
        print(f"refinement pass over 32 views at {size}x{size}, {gaussians} Gaussians: {out[f'{size}']} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--grid-res", type=int, default=128)
    ap.add_argument("--fit-steps", type=int, default=600)
    ap.add_argument("--splat-steps", type=int, default=600)
    ap.add_argument("--splat-res", type=int, default=64)
    ap.add_argument("--triangles", type=int, default=100_000)
    ap.add_argument("--texture", type=int, default=1024)
    ap.add_argument("--mesh-res", type=int, default=128)
    ap.add_argument("--pass-sizes", default="256,512", help="view sizes for the refinement-pass timing ('' = skip)")
    ap.add_argument("--skip-generated", action="store_true")
    ap.add_argument("--skip-splat", action="store_true", help="score the NeRF and the GLB only (no splat export)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    out: dict = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        imgs, cams = render_views("head", size=a.size)
        out["head"] = score_scene("head", imgs, cams, a, tmp)
        if not a.skip_generated:
            imgs, cams = generated_views(a.size, tmp / "run")
            out["generated_tiny"] = score_scene("generated", imgs, cams, a, tmp)
    sizes = [int(s) for s in a.pass_sizes.split(",") if s]
    if sizes:
        out["refine_pass_seconds_32_views"] = refine_pass_seconds(sizes)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


# -- pytest-benchmark (pytest benchmarks --benchmark-json out.json): tiny settings ----------------------
def test_assets_tiny(benchmark, tmp_path):
    a = argparse.Namespace(size=32, grid_res=48, fit_steps=60, splat_steps=10, splat_res=32, triangles=2000,
                           texture=64, mesh_res=48)
    imgs, cams = render_views("head", size=32)
    r = benchmark.pedantic(score_scene, args=("head", imgs, cams, a, tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update(r)
    assert r["glb"]["triangles"] <= 2000


if __name__ == "__main__":
    sys.exit(main())
