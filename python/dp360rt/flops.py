"""FLOP counters: per denoising step and per whole run, per module, for both engines.

Counted with ``torch.utils.flop_counter`` on meta tensors (no memory, no GPU, any size):
convolutions, matmuls and attention, 2 FLOP per multiply-add. :func:`unet_equivalent` is one plain
SD1.5 UNet pass at batch 1 on a 64x64 latent (counted: 0.803 TFLOP), the unit the design brief uses.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig, get_model_config
from .model import DiffPortrait360, build_model
from .backends.torch_backend import TorchBackend
from .noise_schedule import schedule_buffers
from .sampler.ddim import ddim_tables
from .sampler.noise import RecordedNoise
from .sampler.tasks import Task, step_tasks

MODULES = {"AppearanceNet": "appearance net", "PoseControlNet": "pose net", "UNet": "UNet",
           "AutoencoderKL": "VAE", "Encoder": "VAE", "Decoder": "VAE", "FrozenCLIPEmbedder": "text"}


def count(fn: Callable[[], object]) -> dict[str, float]:
    """FLOPs of ``fn()`` per top-level module (``total`` included)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    out: dict[str, float] = {}
    for name, ops in fc.get_flop_counts().items():
        if name == "Global":
            out["total"] = float(sum(ops.values()))
        elif "." not in name and name in MODULES:
            key = MODULES[name]
            out[key] = out.get(key, 0.0) + float(sum(ops.values()))
    out.setdefault("total", 0.0)
    return out


def _add(a: dict[str, float], b: dict[str, float], k: float = 1.0) -> dict[str, float]:
    out = dict(a)
    for key, v in b.items():
        out[key] = out.get(key, 0.0) + k * v
    return out


@lru_cache(maxsize=8)
def _meta_model(kind: str, cfg: ModelConfig) -> DiffPortrait360:
    return build_model(kind, cfg, device="meta")


@lru_cache(maxsize=1)
def unet_equivalent() -> float:
    """FLOPs of one plain SD1.5 UNet pass (the full-size back-view model's UNet: no motion modules,
    no reference bank, no pose residuals) at batch 1 on a [1, 4, 64, 64] latent with a [1, 77, 768]
    text context, counted on meta tensors (0.803e12)."""
    cfg = get_model_config("backview", "full")
    m = _meta_model("backview", cfg)
    x = torch.empty(1, 4, cfg.latent_size, cfg.latent_size, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    ctx = torch.empty(1, cfg.text.max_position_embeddings, cfg.unet.context_dim, device="meta")
    with torch.no_grad():
        return count(lambda: m.unet(x, t, ctx))["total"]


def step_flops(cfg: ModelConfig, engine: str, windows: int = 4, frames: int | None = None,
               batch_cfg: bool = True, cfg_scale: float = 3.0) -> dict[str, float]:
    """FLOPs of one denoising step over ``windows`` windows (back-view model: one sample).

    engine ``"reference"``: per window, the authors' two ``apply_model`` calls (appearance net on
    the references repeated over the frames, pose net twice); ``"fast"``: the shared-bank step.
    """
    m = _meta_model(cfg.kind, cfg)
    f = frames or m.frames
    s = cfg.latent_size
    refs = 2 if cfg.kind == "nvs" else 1
    dev = "meta"
    ctx = torch.empty(1, cfg.text.max_position_embeddings, cfg.unet.context_dim, device=dev)
    x = torch.empty(f, cfg.unet.in_channels, s, s, device=dev)
    hint = torch.empty(f, 3, 8 * s, 8 * s, device=dev)
    t = torch.full((f,), 981, dtype=torch.long, device=dev)
    if engine == "reference":
        def one_window():
            back = [x] * (refs - 1)
            m.apply_model(x, t, ctx.expand(f, -1, -1), hint, x, back)
            if cfg_scale != 1.0:
                m.apply_model(x, t, ctx.expand(f, -1, -1), hint, None, uc=True)
        per = count(one_window)
        return {k: v * windows for k, v in per.items()}
    if engine == "fast":
        # the fast step over all windows (GPU plan: one call), tasks of one request sharing the bank
        tables = ddim_tables(schedule_buffers(cfg.timesteps)["alphas_cumprod"], 1, 0.0)
        one = torch.empty(1, cfg.unet.in_channels, s, s, device=dev)

        def step():
            tasks = [Task(key=0, x=x, hint=hint, refs=[one] * refs, context=ctx, tables=tables,
                          noise=RecordedNoise([torch.empty_like(x)])) for _ in range(windows)]
            step_tasks(TorchBackend(m), tasks, cfg_scale, batch_cfg)
        return count(step)
    raise ValueError(f"unknown engine {engine!r}")


def run_flops(config: str | ModelConfig | dict = "full", engine: str = "reference", steps: int = 50,
              views: int = 32) -> dict[str, dict[str, float]]:
    """FLOPs of a whole generation: text, VAE encodes, back view, ``views`` views, VAE decodes.

    Returns ``{"nvs_step": ..., "backview_step": ..., "run": ...}``, each a per-module dict.
    """
    if isinstance(config, ModelConfig):   # the 360° model's config; the back-view model has the same sizes
        nvs = config
        bv = ModelConfig(**{**config.__dict__, "kind": "backview", "motion": None})
    else:
        nvs, bv = get_model_config("nvs", config), get_model_config("backview", config)
    windows = views // (nvs.motion.video_length if nvs.motion else 8)
    n_step = step_flops(nvs, engine, windows)
    b_step = step_flops(bv, engine, 1)
    m = _meta_model("nvs", nvs)
    s = nvs.image_size
    img = torch.empty(1, 3, s, s, device="meta")
    lat = torch.empty(1, nvs.unet.in_channels, nvs.latent_size, nvs.latent_size, device="meta")
    ids = torch.zeros(1, nvs.text.max_position_embeddings, dtype=torch.long, device="meta")
    enc = count(lambda: m.first_stage_model.encode(img))
    dec = count(lambda: m.first_stage_model.decode(lat))
    txt = count(lambda: m.cond_stage_model(ids))
    run = {k: v * steps for k, v in _add(n_step, b_step).items()}
    run = _add(run, enc, 3)            # portrait for each model, the back view for the 360° model
    run = _add(run, dec, views + 1)    # every view and the back view
    run = _add(run, txt, 2)
    return {"nvs_step": n_step, "backview_step": b_step, "run": run}


def per_window(step: dict[str, float], windows: int) -> dict[str, float]:
    return {k: v / windows for k, v in step.items()}


def format_flops(d: dict[str, float], unit: float = 1e12, suffix: str = "TFLOP") -> str:
    keys = [k for k in ("appearance net", "pose net", "UNet", "VAE", "text") if k in d]
    parts = [f"{k} {d[k] / unit:.2f}" for k in keys]
    return f"{d['total'] / unit:.2f} {suffix} ({', '.join(parts)}; {d['total'] / unet_equivalent():.1f} UNet-eq)"
