"""Building a :class:`~dp360rt.engine.pipeline.Pipeline` from command-line arguments: the options that
``dp360rt generate``, ``stream``, ``bench`` and ``dp360rt serve`` share."""
from __future__ import annotations

import argparse

import torch

from ..config import ConfigError
from ..io.images import ImageError


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _backend_kw(a: argparse.Namespace) -> dict:
    if a.backend != "torch" and not a.export_dir:
        raise ConfigError(f"--backend {a.backend} runs exported networks. Fix: pass --export-dir DIR "
                          "(made by `dp360rt export ... --out DIR`)")
    if a.backend == "trt":
        from ..backends.trt_backend import import_trt
        import_trt()          # TensorRT and a GPU, before any weights load
    return {"backend": a.backend, "export_dir": a.export_dir} if a.backend != "torch" else {}


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="torch", choices=["torch", "ort", "trt"],
                   help="torch (default), or exported networks on ONNX Runtime / TensorRT")
    p.add_argument("--export-dir", help="the export --backend ort|trt runs (dp360rt export ... --out DIR)")


def add_compute_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compute-dtype", choices=["fp32", "fp16", "bf16"],
                   help="arithmetic dtype (default: --dtype's); fp32 with --dtype bf16/fp16 keeps half-precision weights "
                        "(half the memory) and computes in float32: for CPUs without native bf16/fp16")


def pipeline_from_args(a: argparse.Namespace):
    """The pipeline a verb asks for: official checkpoints, or random weights (--random CONFIG)."""
    from .pipeline import Pipeline
    max_mem = int(a.max_memory * 2**30) if getattr(a, "max_memory", None) else None
    compute = getattr(a, "compute_dtype", None)
    kw = dict(device=a.device, dtype=_dtype(a.dtype), compute_dtype=_dtype(compute) if compute else None, engine=a.engine,
              max_memory=max_mem, **_backend_kw(a))
    if hasattr(a, "no_noise3d"):
        from ..invert.cli import check_noise3d_files
        check_noise3d_files(a)               # a missing PanoHead / VGG16 file, before any weights load
    if a.random:
        check_inputs_early(a)
        return Pipeline.random(a.random, seed=0, inverter=_inverter(a), **kw)
    if not (a.nvs and a.backview):
        raise ConfigError("pass both --nvs and --backview checkpoints, or --random CONFIG for random weights")
    if not a.conditions:        # checked before the checkpoints load
        raise ImageError("--conditions DIR (the authors' sphere32 folder) is required with real checkpoints")
    check_inputs_early(a)
    return Pipeline.from_checkpoints(a.nvs, a.backview, config=a.config, inverter=_inverter(a), **kw)


def _inverter(a: argparse.Namespace):
    """The 3D-aware-noise stage generate/stream ask for (None without --panohead/--vgg/--3d-noise)."""
    if not hasattr(a, "no_noise3d"):
        return None
    from ..invert.cli import inverter_from_args
    return inverter_from_args(a, a.device)


def check_inputs_early(a: argparse.Namespace) -> None:
    """Portrait and condition folder problems are named before any weights load (their pixels
    are decoded later, by the pipeline)."""
    from ..io.images import condition_files, open_image
    if getattr(a, "portrait", None):
        open_image(a.portrait)
    if getattr(a, "conditions", None):
        condition_files(a.conditions)
