"""Instant-NeRF benchmarks (dp360rt.nerf).

CPU (always): fitting steps/s and field samples/s of the default model on the synthetic
``head`` scene (32 views at 64x64, sphere32 orbit), held-out PSNR after a fixed time, render
rays/s at 64x64 and 128x128, PyTorch hash-encoding throughput.

CUDA (when available): time to 30 dB held-out PSNR on 32 views at 512x512 (synthetic ``head``
scene, 4 views held out), render fps at 512x512, hash encoding (forward + backward) of the
PyTorch path, our Triton kernel and tiny-cuda-nn (when importable).

    python benchmarks/bench_nerf.py [--seconds 120] [--json out.json] [--skip-gpu] [--skip-cpu]
    python -m pytest benchmarks/bench_nerf.py --benchmark-json out.json         # 3 s CPU fit
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dp360rt.nerf.cameras import sphere32_cameras
from dp360rt.nerf.encoding import HashGrid, hash_encode_torch, tcnn_available
from dp360rt.nerf.model import Nerf, psnr
from dp360rt.nerf.synthetic import render_views

HOLD = [3, 11, 19, 27]
TRAIN = [i for i in range(32) if i not in HOLD]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_cpu_fit(seconds: float, scene: str = "head", size: int = 64) -> dict:
    imgs, cams = render_views(scene, size=size)
    nerf = Nerf(device="cpu")
    t = time.perf_counter()
    stats = nerf.fit([imgs[i] for i in TRAIN], cams[TRAIN], seconds=seconds, progress=False,
                     holdout=([imgs[i] for i in HOLD], cams[HOLD]))
    wall = time.perf_counter() - t
    return {"scene": scene, "size": size, "seconds": seconds, "wall_s": round(wall, 2), "steps": stats["steps"],
            "steps_per_s": stats["steps_per_second"], "samples_per_step": stats["samples_per_step"],
            "samples_per_s": round(stats["samples_per_step"] * stats["steps"] / stats["seconds"]),
            "train_psnr": stats["train_psnr"], "holdout_psnr": round(stats["holdout_psnr_mean"], 2),
            "grid_res": stats.get("grid_res"), "_nerf": nerf}


def bench_render(nerf: Nerf, sizes=(64, 128), repeats: int = 3) -> dict:
    out = {}
    cams = sphere32_cameras()
    dev = str(nerf.device)
    for s in sizes:
        nerf.render(cams[0], s, s)            # warm-up
        _sync(dev)
        best = float("inf")
        for r in range(repeats):
            t = time.perf_counter()
            for c in cams[::8]:
                nerf.render(c, s, s)
            _sync(dev)
            best = min(best, (time.perf_counter() - t) / 4)
        out[f"{s}x{s}"] = {"ms_per_frame": round(best * 1e3, 2), "fps": round(1 / best, 1),
                           "rays_per_s": round(s * s / best)}
    return out


def bench_hash_encoding(device: str, n: int, backends: list[str], repeats: int = 10) -> dict:
    res = {}
    x = torch.rand(n, 3, device=device)
    g = HashGrid(max_res=512).to(device)
    for b in backends:
        if b == "tcnn":
            if not tcnn_available():
                res[b] = "not importable"
                continue
            import tinycudann as tcnn
            s = g.spec
            enc = tcnn.Encoding(3, {"otype": "HashGrid", "n_levels": s.levels, "n_features_per_level": s.features,
                                    "log2_hashmap_size": s.log2_table, "base_resolution": s.base_res,
                                    "per_level_scale": s.growth}).to(device)
            fn = lambda: enc(x).float().sum().backward()                                        # noqa: E731
        elif b == "triton":
            from dp360rt.nerf.hashgrid_triton import hash_encode_triton
            fn = lambda: hash_encode_triton(x, g.table, g.spec).sum().backward()                # noqa: E731
        else:
            fn = lambda: hash_encode_torch(x, g.table, g.spec).sum().backward()                 # noqa: E731
        fn()
        _sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        dt = (time.perf_counter() - t) / repeats
        res[b] = {"points": n, "ms_fwd_bwd": round(dt * 1e3, 3), "points_per_s": round(n / dt)}
    return res


def bench_gpu_time_to_30db(size: int = 512, budget_s: float = 300.0, scene: str = "head") -> dict:
    imgs, cams = render_views(scene, size=size)
    hold_imgs, hold_cams = [imgs[i] for i in HOLD], cams[HOLD]
    nerf = Nerf(device="cuda")
    f = nerf.fitter(seconds=budget_s, progress=False)
    for i in TRAIN:
        f.add_view(imgs[i], cams[i])
    curve = []
    reached = None
    while not f.done:
        f.train(steps=100)
        torch.cuda.synchronize()
        p = sum(psnr(nerf.render(c, size, size)["rgb"], im) for c, im in zip(hold_cams, hold_imgs)) / len(HOLD)
        curve.append((f.step, round(f.elapsed, 2), round(p, 2)))
        if p >= 30.0 and reached is None:
            reached = f.elapsed
            break
    return {"size": size, "encoding": nerf.encoding, "seconds_to_30db": None if reached is None else round(reached, 2),
            "curve": curve, "_nerf": nerf}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="CPU fitting budget (default 120)")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-gpu", action="store_true")
    a = ap.parse_args(argv)
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "torch": torch.__version__,
                 "cpu_threads": torch.get_num_threads(),
                 "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if not a.skip_cpu:
        fit = bench_cpu_fit(a.seconds)
        nerf = fit.pop("_nerf")
        print(f"CPU fit ({fit['scene']}, 28 views {fit['size']}x{fit['size']}, {a.seconds:g} s): {fit['steps']} steps, "
              f"{fit['steps_per_s']} steps/s, {fit['samples_per_s']:,} samples/s, held-out PSNR {fit['holdout_psnr']} dB",
              flush=True)
        rend = bench_render(nerf)
        for k, v in rend.items():
            print(f"CPU render {k}: {v['ms_per_frame']} ms/frame, {v['rays_per_s']:,} rays/s", flush=True)
        enc = bench_hash_encoding("cpu", 1 << 14, ["torch"], repeats=3)
        print(f"CPU hash encoding (PyTorch, fwd+bwd): {enc['torch']['points_per_s']:,} points/s", flush=True)
        out["cpu"] = {"fit": fit, "render": rend, "hash_encoding": enc}
    if torch.cuda.is_available() and not a.skip_gpu:
        t30 = bench_gpu_time_to_30db()
        nerf = t30.pop("_nerf")
        print(f"GPU time to 30 dB (32 views at 512x512, {t30['encoding']}): {t30['seconds_to_30db']} s", flush=True)
        rend = bench_render(nerf, sizes=(512,), repeats=5)
        print(f"GPU render 512x512: {rend['512x512']['fps']} fps", flush=True)
        enc = bench_hash_encoding("cuda", 1 << 18, ["torch", "triton", "tcnn"])
        for k, v in enc.items():
            print(f"GPU hash encoding {k}: {v if isinstance(v, str) else format(v['points_per_s'], ',') + ' points/s'}")
        out["gpu"] = {"time_to_30db": t30, "render": rend, "hash_encoding": enc}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


# -- pytest-benchmark (pytest benchmarks --benchmark-json out.json): 3-second CPU fit, 64x64 frames -----
def test_nerf_cpu_fit_and_render(benchmark):
    r = benchmark.pedantic(bench_cpu_fit, args=(3.0,), kwargs={"size": 32}, rounds=1, iterations=1)
    render = bench_render(r.pop("_nerf"), sizes=(64,), repeats=1)
    benchmark.extra_info.update({k: v for k, v in r.items() if isinstance(v, (int, float, str))})
    benchmark.extra_info["render"] = render


if __name__ == "__main__":
    sys.exit(main())
