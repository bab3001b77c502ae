"""Triton attention kernels vs PyTorch at the full-size UNet levels (GPU only).

    python benchmarks/bench_kernels.py [--json out.json] [--dtype fp16] [--repeats 50]

Shared-KV self-attention (each of B frames attends to ``[own N tokens ; M shared bank tokens]``,
the bank held once):

* ``triton``      : :func:`dp360rt.kernels.shared_kv_attention_triton.shared_kv_attention_triton`
* ``torch_lse``   : the PyTorch twin (two partial attentions merged by log-sum-exp; the torch backend)
* ``sdpa_cat``    : ``scaled_dot_product_attention`` on ``cat([own, shared.expand(B)])``, the
                    concatenation included in the time (what a plain implementation must do)
* ``sdpa``        : the same SDPA call on a pre-built concatenation (attention alone)
* ``math``        : ``softmax(q k^T * scale) v`` on the concatenation (naive, materialized scores)

FLOPs ``4 * B * H * N * (N + M) * D``. Temporal attention (F frames of a window attend to each
other per token and head, hidden states ``[B*F, S, H*D]``):

* ``triton``      : :func:`dp360rt.kernels.temporal_attention_triton.temporal_attention_triton`
* ``permute_sdpa``: the motion module's path (permute to ``(B*S, H, F, D)``, SDPA, permute back)

Times: CUDA events, warm-up, median of ``--repeats``; the Triton kernels autotune during warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

LEVELS = [  # name, tokens N (64x64 latent -> 4096), head dim D (SD1.5: 320/640/1280/1280 channels, 8 heads)
    ("level0 64x64", 4096, 40),
    ("level1 32x32", 1024, 80),
    ("level2 16x16", 256, 160),
    ("level3 8x8", 64, 160),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE = "cuda"


def cuda_time(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` CUDA-event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _heads(b: int, n: int, h: int, d: int, dtype) -> torch.Tensor:
    """A [B, H, N, D] split_heads view of a [B, N, H*D] projection, as the UNet produces it."""
    return torch.randn(b, n, h * d, device=DEVICE, dtype=dtype).view(b, n, h, d).transpose(1, 2)


def bench_shared_kv(args, dtype) -> list[dict]:
    from dp360rt.kernels.shared_kv_attention import shared_kv_attention
    from dp360rt.kernels.shared_kv_attention_triton import flops, shared_kv_attention_triton
    rows = []
    b, h = args.frames * args.windows, args.heads
    for name, n, d in LEVELS:
        m = args.bank_factor * n
        q, k, v = (_heads(b, n, h, d, dtype) for _ in range(3))
        ks, vs = (_heads(1, m, h, d, dtype) for _ in range(2))
        kk = torch.cat([k, ks.expand(b, -1, -1, -1)], dim=2)
        vv = torch.cat([v, vs.expand(b, -1, -1, -1)], dim=2)
        scale = d ** -0.5

        def sdpa_cat():
            return F.scaled_dot_product_attention(q, torch.cat([k, ks.expand(b, -1, -1, -1)], dim=2),
                                                  torch.cat([v, vs.expand(b, -1, -1, -1)], dim=2))

        def math():
            return torch.softmax(torch.matmul(q, kk.transpose(-1, -2)) * scale, dim=-1) @ vv

        impls = {"triton": lambda: shared_kv_attention_triton(q, k, v, ks, vs),
                 "torch_lse": lambda: shared_kv_attention(q, k, v, ks, vs),
                 "sdpa_cat": sdpa_cat,
                 "sdpa": lambda: F.scaled_dot_product_attention(q, kk, vv),
                 "math": math}
        ref = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float())
        fl = flops(b, h, n, m, d)
        row = {"level": name, "B": b, "H": h, "N": n, "M": m, "D": d, "gflop": fl / 1e9, "ms": {}, "tflops": {},
               "max_abs_err_vs_fp32": {}}
        for impl, fn in impls.items():
            try:
                out = fn()
                row["max_abs_err_vs_fp32"][impl] = (out.float() - ref).abs().max().item()
                del out
                ms = cuda_time(fn, args.warmup, args.repeats)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                row["ms"][impl] = None
                continue
            row["ms"][impl] = ms
            row["tflops"][impl] = fl / (ms * 1e-3) / 1e12
        t = row["ms"].get("triton")
        row["speedup_triton_vs"] = {impl: (ms / t if ms and t else None)
                                    for impl, ms in row["ms"].items() if impl != "triton"}
        rows.append(row)
        del q, k, v, ks, vs, kk, vv, ref
        torch.cuda.empty_cache()
    return rows


def bench_temporal(args, dtype) -> list[dict]:
    from dp360rt.kernels.temporal_attention import temporal_attention_reference
    from dp360rt.kernels.temporal_attention_triton import temporal_attention_triton
    rows = []
    f, h = args.frames, args.heads
    bf = f * args.windows
    for name, s, d in LEVELS:
        c = h * d
        q, k, v = (torch.randn(bf, s, c, device=DEVICE, dtype=dtype) for _ in range(3))
        impls = {"triton": lambda: temporal_attention_triton(q, k, v, f, h),
                 "permute_sdpa": lambda: temporal_attention_reference(q, k, v, f, h)}
        ref = temporal_attention_reference(q.float(), k.float(), v.float(), f, h)
        fl = 4 * (bf // f) * s * h * f * f * d
        io_bytes = 4 * bf * s * c * q.element_size()           # read q, k, v; write o
        row = {"level": name, "BF": bf, "F": f, "S": s, "H": h, "D": d, "gflop": fl / 1e9, "ms": {}, "tflops": {},
               "gbps": {}, "max_abs_err_vs_fp32": {}}
        for impl, fn in impls.items():
            out = fn()
            row["max_abs_err_vs_fp32"][impl] = (out.float() - ref).abs().max().item()
            ms = cuda_time(fn, args.warmup, args.repeats)
            row["ms"][impl] = ms
            row["tflops"][impl] = fl / (ms * 1e-3) / 1e12
            row["gbps"][impl] = io_bytes / (ms * 1e-3) / 1e9
        row["speedup_triton_vs"] = {"permute_sdpa": row["ms"]["permute_sdpa"] / row["ms"]["triton"]}
        rows.append(row)
    return rows


def _fmt(x, spec=".3f"):
    return "   -  " if x is None else format(x, spec)


def print_tables(res: dict) -> None:
    print(f"\nShared-KV attention ({res['dtype']}, B={res['args']['frames'] * res['args']['windows']}, "
          f"H={res['args']['heads']}, M={res['args']['bank_factor']}N), ms | TFLOP/s | triton speedup")
    impls = ["triton", "torch_lse", "sdpa_cat", "sdpa", "math"]
    print(f"{'level':14s} {'N':>5s} {'M':>5s} {'D':>4s} " + " ".join(f"{i:>22s}" for i in impls))
    for r in res["shared_kv"]:
        cells = []
        for i in impls:
            ms, tf = r["ms"].get(i), r["tflops"].get(i)
            sp = 1.0 if i == "triton" else r["speedup_triton_vs"].get(i)
            cells.append(f"{_fmt(ms)} |{_fmt(tf, '6.1f')} |{_fmt(sp, '5.2f')}x")
        print(f"{r['level']:14s} {r['N']:5d} {r['M']:5d} {r['D']:4d} " + " ".join(f"{c:>22s}" for c in cells))
    print(f"\nTemporal attention ({res['dtype']}, F={res['args']['frames']}, windows={res['args']['windows']}), "
          f"ms | GB/s")
    print(f"{'level':14s} {'S':>5s} {'D':>4s} {'triton':>18s} {'permute_sdpa':>18s} {'speedup':>8s}")
    for r in res["temporal"]:
        print(f"{r['level']:14s} {r['S']:5d} {r['D']:4d} "
              f"{_fmt(r['ms']['triton']):>8s} |{_fmt(r['gbps']['triton'], '7.0f')} "
              f"{_fmt(r['ms']['permute_sdpa']):>8s} |{_fmt(r['gbps']['permute_sdpa'], '7.0f')} "
              f"{r['speedup_triton_vs']['permute_sdpa']:7.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--frames", type=int, default=8, help="frames per window (B of the shared-KV benchmark)")
    ap.add_argument("--windows", type=int, default=1, help="windows per call (B = frames * windows)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--bank-factor", type=int, default=2, help="M = factor * N (front + back reference)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--only", choices=["shared_kv", "temporal"], help="run one benchmark")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (Triton kernels are timed with CUDA events); "
              "no CUDA device found - nothing measured.", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError as e:
        print(f"bench_kernels.py needs triton ({e})", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "dtype": args.dtype, "args": vars(args), "shared_kv": [], "temporal": []}
    if args.only in (None, "shared_kv"):
        res["shared_kv"] = bench_shared_kv(args, dtype)
    if args.only in (None, "temporal"):
        res["temporal"] = bench_temporal(args, dtype)
    print(f"{res['device']}  torch {res['torch']}  triton {res['triton']}")
    print_tables(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
        print(f"\nwrote {args.json}")
    return 0


# -- pytest-benchmark: a GPU benchmark; under pytest it runs only where CUDA is --------------------------
def test_kernels_gpu(benchmark):
    import pytest
    if not torch.cuda.is_available():
        pytest.skip("bench_kernels times CUDA kernels: no CUDA device here")
    rc = benchmark.pedantic(main, args=(["--repeats", "5", "--warmup", "2"],), rounds=1, iterations=1)
    assert rc in (0, None)


if __name__ == "__main__":
    sys.exit(main())
