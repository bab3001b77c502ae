"""Portable-asset benchmarks (dp360rt.nerf.assets): quality, size and export time of the GLB and
the 3D Gaussian splat of a fitted NeRF.

Two scenes: the synthetic ``head`` (exact renders, sphere32 orbit) and a generated run (the tiny
random-weight pipeline: meaningless pictures, a real pipeline). Each: fit a NeRF on 28 views,
export both assets (the splat refined against those 28), and score the NeRF, the splat (our
PyTorch rasterizer) and the GLB (the numpy z-buffer renderer of dp360rt.nerf.mesh_render)
against the 4 held-out views. Also seconds per refinement pass over 32 views at larger sizes.

    python benchmarks/bench_assets.py [--size 64] [--fit-steps 600] [--splat-steps 600] [--skip-glb | --skip-splat] [--json out.json]
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
from dp360rt.nerf.glb import DEFAULT_TRIANGLES, read_glb
from dp360rt.nerf.mesh_render import render_textured_mesh
from dp360rt.nerf.model import Nerf, psnr
from dp360rt.nerf.splat import read_splat_ply
from dp360rt.nerf.splat_render import render_splat
from dp360rt.nerf.synthetic import render_views

HOLD = [3, 11, 19, 27]


def generated_views(size: int, out: Path) -> tuple[list, torch.Tensor]:
    from dp360rt.io.images import synthetic_conditions, synthetic_portrait
    from dp360rt.engine.pipeline import Pipeline
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
    g = s = None
    if not getattr(a, "skip_glb", False):
        g = nerf.export_glb(tmp / f"{name}.glb", triangles=a.triangles, texture_size=a.texture,
                            resolution=a.mesh_res, overwrite=True)
    if not getattr(a, "skip_splat", False):
        s = nerf.export_splat(tmp / f"{name}.ply", views=([imgs[i] for i in train], cams[train]),
                              steps=a.splat_steps, resolution=a.splat_res, overwrite=True)
    mesh = read_glb(g["path"]) if g else None
    sp = read_splat_ply(s["path"]) if s else None
    bg = nerf.background.detach().cpu().float()
    h, w = imgs[0].shape[:2]
    p_n, p_s, p_g, p_st = [], [], [], []
    with torch.no_grad():
        for i in HOLD:
            p_n.append(psnr(nerf.render(cams[i], w, h)["rgb"], imgs[i]))
            if sp is not None:
                p_s.append(psnr(render_splat(sp, cams[i], w, h, bg), imgs[i]))
            if mesh is not None:
                p_g.append(psnr(render_textured_mesh(mesh, cams[i], w, h, bg.tolist()), imgs[i]))
        if sp is not None:
            for i in train:        # the splat on its own training views: over- or under-fitting
                p_st.append(psnr(render_splat(sp, cams[i], w, h, bg), imgs[i]))
    r = {"views": f"{len(train)} train + {len(HOLD)} held out, {w}x{h}", "fit_steps": a.fit_steps,
         "fit_seconds": round(fit_s, 1), "psnr_nerf": round(float(np.mean(p_n)), 2)}
    print(f"{name}: NeRF {r['psnr_nerf']} dB (held out)", flush=True)
    if g is not None:
        r["psnr_glb"] = round(float(np.mean(p_g)), 2)
        r["glb"] = {"triangles": g["triangles"], "texture": g["texture_size"], "bytes": g["bytes"],
                    "level": g.get("level"), "seconds": round(g["seconds"], 2)}
        print(f"{name}: GLB {r['psnr_glb']} dB (held out), {g['triangles']} tris {g['bytes'] / 1e6:.2f} MB "
              f"{g['seconds']:.1f} s", flush=True)
    if s is not None:
        r["psnr_splat"] = round(float(np.mean(p_s)), 2)
        r["psnr_splat_train_views"] = round(float(np.mean(p_st)), 2)
        r["splat"] = {"gaussians": s["splats"], "bytes": s["bytes"], "steps": a.splat_steps,
                      "seconds": round(s["seconds"], 2), "init_seconds": round(s["init_seconds"], 2),
                      "refine_seconds": round(s["refine_seconds"], 2)}
        print(f"{name}: splat {r['psnr_splat']} dB (held out; {r['psnr_splat_train_views']} dB on its training "
              f"views), {s['splats']} Gaussians {s['bytes'] / 1e6:.2f} MB {s['seconds']:.1f} s "
              f"(init {s['init_seconds']:.1f} s, refine {s['refine_seconds']:.1f} s)", flush=True)
    return r


def refine_pass_seconds(sizes: list[int], gaussians: int = 20000) -> dict:
    """Seconds for one refinement pass over 32 views (forward + backward per view) with
    ``gaussians`` Gaussians on the head's surface, at each view size; timed on 2 views, x16."""
    from dp360rt.nerf.splat_refine import refine_splat
    out = {}
    for size in sizes:
        imgs, cams = render_views("head", size=size)
        g = torch.Generator().manual_seed(0)
        d = torch.randn(gaussians, 3, generator=g)
        params = {"means": 0.2 * d / d.norm(dim=-1, keepdim=True), "log_scales": torch.full((gaussians, 3), -4.5),
                  "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(gaussians, 1),
                  "logit_opacity": torch.zeros(gaussians), "f_dc": torch.zeros(gaussians, 3)}
        t = time.perf_counter()
        refine_splat(params, imgs[:2], cams[:2], steps=2, densify=False)
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
    ap.add_argument("--triangles", type=int, default=DEFAULT_TRIANGLES)
    ap.add_argument("--texture", type=int, default=1024)
    ap.add_argument("--mesh-res", type=int, default=128)
    ap.add_argument("--pass-sizes", default="256,512", help="view sizes for the refinement-pass timing ('' = skip)")
    ap.add_argument("--skip-generated", action="store_true")
    ap.add_argument("--skip-glb", action="store_true", help="score the NeRF and the splat only (saves the GLB's minutes)")
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
                           texture=64, mesh_res=48, skip_glb=False)
    imgs, cams = render_views("head", size=32)
    r = benchmark.pedantic(score_scene, args=("head", imgs, cams, a, tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update(r)
    assert r["glb"]["triangles"] <= 2000


if __name__ == "__main__":
    sys.exit(main())
