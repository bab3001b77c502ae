"""ONNX Runtime vs torch, network by network, on this machine's CPU (or CUDA), in one run.

    python benchmarks/bench_backends.py --config tiny medium [--json out.json] [--repeats 5]
    python -m pytest benchmarks/bench_backends.py --benchmark-json out.json     # tiny, one repeat
    python benchmarks/bench_backends.py --config medium --export-dir /tmp/onnx_medium   # reuse an export

Per config: a random-weight 360° model is exported (profile ``window8x2cfg``: the UNet at 8
conditional + 8 unconditional rows, the pose net at 8, the appearance net on front + back, text
and VAE) unless ``--export-dir`` holds one, then every network is timed through the torch backend
and the ort backend with the same inputs (median of ``--repeats`` after a warm-up), plus one whole
denoising step of a 360° generation (4 windows, ``BatchPlan(1, batch_cfg=True)``) through the fast
sampler. Printed: milliseconds, ORT/torch ratio, max relative error. Random weights: speed does not
depend on the values. On a shared CPU compare ratios within one run, not absolute times.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


from dp360rt.backends.ort_backend import OrtBackend  # noqa: E402
from dp360rt.backends.torch_backend import TorchBackend  # noqa: E402
from dp360rt.model import build_model, init_random  # noqa: E402
from dp360rt.sampler.windows import prepare_windows  # noqa: E402
from dp360rt.sampler.fast import sample_windows_fast, write_shared_bank  # noqa: E402
from dp360rt.sampler.noise import GeneratorNoise  # noqa: E402
from dp360rt.sampler.plan import BatchPlan  # noqa: E402
from dp360rt.text.clip import empty_prompt_ids  # noqa: E402

PROFILE = "window8x2cfg"


def _median_ms(fn, repeats: int) -> tuple[float, list[float], object]:
    out = fn()                                            # warm-up (ORT session creation, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times, out


def _rel(a, b) -> float:
    a = [a] if isinstance(a, torch.Tensor) else list(a)
    b = [b] if isinstance(b, torch.Tensor) else list(b)
    return max(((x.double() - y.double()).abs().max() / y.double().abs().max()).item() for x, y in zip(a, b))


def bench_config(config: str, repeats: int, export_dir: str | None, device: str, threads: int | None) -> dict:
    from dp360rt.export.onnx_export import export_models
    from dp360rt.export.profiles import parse_profiles
    torch.manual_seed(0)
    m = build_model("nvs", config)
    with torch.no_grad():
        init_random(m)
    m = m.to(device)
    res: dict = {"config": config, "device": device, "profile": PROFILE, "rows": []}
    tmp = None
    if export_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"bench_onnx_{config}_")
        export_dir = tmp.name
        t0 = time.perf_counter()
        _, rows = export_models({"nvs": m.cpu()}, export_dir, parse_profiles([PROFILE]), progress=False,
                                sources={"nvs": "random seed 0"})
        m = m.to(device)
        res["export_seconds"] = time.perf_counter() - t0
        res["export"] = [{"file": r.file, "bytes": r.bytes, "seconds": r.seconds} for r in rows]
    try:
        ob = OrtBackend.from_model(m, export_dir=export_dir, profile=PROFILE, threads=threads)
        tb = TorchBackend(m)
        cfg = m.cfg
        h = cfg.latent_size
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8, 4, h, h, generator=g).to(device)
        hint = (torch.rand(8, 3, 8 * h, 8 * h, generator=g) * 2 - 1).to(device)
        refs = [torch.randn(1, 4, h, h, generator=g).to(device) for _ in range(2)]
        ids = empty_prompt_ids(cfg.text.max_position_embeddings).to(device)
        t = torch.full((8,), 500, device=device)
        img = (torch.rand(1, 3, 8 * h, 8 * h, generator=g) * 2 - 1).to(device)
        with torch.no_grad():
            ctx = m.encode_text(ids)
            c8, c16 = ctx.expand(8, -1, -1), ctx.expand(16, -1, -1)
            entries = write_shared_bank(tb, refs, t[:1], ctx)
            resid = tb.pose(x, hint, t, c8)
            x16, t16 = torch.cat([x, x]), torch.cat([t, t])
            cases = [
                ("text", "ids [1, 77]", lambda b: b.encode_text(ids)),
                ("vae_encoder", f"image [1, 3, {8 * h}, {8 * h}]", lambda b: b.encode_image(img)),
                ("vae_decoder", f"latent [1, 4, {h}, {h}]", lambda b: b.decode_latent(x[:1])),
                ("appearance", f"refs [2, 4, {h}, {h}]", lambda b: write_shared_bank(b, refs, t[:1], ctx)),
                ("pose", f"x [8, 4, {h}, {h}]", lambda b: b.pose(x, hint, t, c8)),
                ("unet", "16 rows (8 cond + 8 uncond)",
                 lambda b: b.unet(x16, t16, c16, b.bank(entries), resid, 8)),
                ("unet_nobank", "8 rows", lambda b: b.unet(x, t, c8, None, None, 0)),
            ]
            cond = (torch.rand(32, 3, 8 * h, 8 * h, generator=g) * 2 - 1).to(device)

            def step(b):
                wins = prepare_windows(m, cond, None, 1, GeneratorNoise(2))
                return torch.cat(sample_windows_fast(m, wins, context=ctx, ref_front=refs[0], ref_back=refs[1:],
                                                     steps=1, eta=0.5, cfg_scale=3.0,
                                                     plan=BatchPlan(1, batch_cfg=True), backend=b)[0])
            cases.append(("360° step", "4 windows, batched guidance", step))
            for name, shape, fn in cases:
                tt, t_all, ref = _median_ms(lambda: fn(tb), repeats)
                to, o_all, ours = _median_ms(lambda: fn(ob), repeats)
                res["rows"].append({"module": name, "shape": shape, "torch_ms": tt, "ort_ms": to, "ratio": to / tt,
                                    "max_rel_err": _rel(ours, ref), "torch_all_ms": t_all, "ort_all_ms": o_all})
                print_row(config, res["rows"][-1])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return res


HEADER = (f"{'config':<7} {'module':<12} {'shape':<30} {'torch ms':>10} {'ort ms':>10} {'ort/torch':>9} "
          f"{'max rel err':>12}")


def print_row(config: str, r: dict) -> None:
    print(f"{config:<7} {r['module']:<12} {r['shape']:<30} {r['torch_ms']:10.2f} {r['ort_ms']:10.2f} "
          f"{r['ratio']:9.2f} {r['max_rel_err']:12.1e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["tiny", "medium"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--export-dir", help="reuse an export (one config only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both torch and ORT (default: torch's default)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.export_dir and len(a.config) > 1:
        ap.error("--export-dir needs a single --config")
    import onnxruntime as ort
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": torch.get_num_threads(), "runs": []}
    print(f"torch {torch.__version__} / onnxruntime {ort.__version__}, {torch.get_num_threads()} threads")
    print(HEADER)
    for c in a.config:
        r = bench_config(c, a.repeats, a.export_dir, a.device, a.threads)
        if "export_seconds" in r:
            print(f"{c:<7} (export of {len(r['export'])} files: {r['export_seconds']:.1f} s)")
        out["runs"].append(r)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


# -- pytest-benchmark (pytest benchmarks --benchmark-json out.json): tiny, one repeat -----------------
def test_backends_tiny(benchmark):
    import pytest
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    r = benchmark.pedantic(bench_config, args=("tiny", 1, None, "cpu", 1), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in r.items() if isinstance(v, (int, float, str))})


if __name__ == "__main__":
    sys.exit(main())
