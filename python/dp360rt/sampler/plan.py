"""Memory planner of the fast engine: how many windows and guidance branches share a UNet call.

Estimates are analytic (weights + the activations a UNet call keeps alive), deliberately on the
safe side; ``plan_batches`` picks the largest batch that fits the budget and says why.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class BatchPlan:
    """``windows_per_call`` windows of F frames per UNet call; ``batch_cfg``: conditional and
    unconditional rows in the same call (else two calls). ``one_model_resident`` (edge mode):
    the two diffusion models take turns in memory, the idle one offloaded; ``decode_frames``:
    frames per VAE decode call (None: a whole window at once); ``weights_bytes``: the weights
    held while a step runs."""

    windows_per_call: int
    batch_cfg: bool
    estimated_bytes: int = 0
    budget_bytes: int | None = None
    one_model_resident: bool = False
    decode_frames: int | None = None
    weights_bytes: int = 0

    def describe(self, windows: int, frames: int) -> str:
        calls = -(-windows // self.windows_per_call) * (1 if self.batch_cfg else 2)
        rows = self.windows_per_call * frames * (2 if self.batch_cfg else 1)
        budget = f" within {self.budget_bytes / 2**30:.2f} GiB" if self.budget_bytes else ""
        return (f"{calls} UNet call(s) per step of {rows} rows ({self.windows_per_call} window(s) x {frames} frames"
                f"{' x 2 guidance branches' if self.batch_cfg else ''}); estimated peak "
                f"{self.estimated_bytes / 2**30:.2f} GiB{budget}"
                f"{'; one diffusion model resident at a time (the other offloaded)' if self.one_model_resident else ''}"
                f"{f'; VAE decode {self.decode_frames} frame(s) at a time' if self.decode_frames else ''}")


class MemoryBudgetError(ValueError):
    """Even the smallest batch does not fit ``max_memory``."""


# Measured peak RSS over the live tensors the two estimates below count: the UNet step at full
# size 1.46x, the VAE decode 1.33x (CPU, float32 arithmetic; benchmarks/RESULTS.md, "Edge mode
# memory"): temporaries between the counted tensors and the allocator's slack. Both estimates
# carry this factor so the plan bounds what is measured.
SLACK_NUM, SLACK_DEN = 3, 2


def weight_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    from ..model import build_model
    m = build_model(cfg.kind, cfg, device="meta")
    return sum(p.numel() for p in m.parameters()) * dtype_bytes


def activation_bytes(cfg: ModelConfig, rows: int, h: int, w: int, dtype_bytes: int,
                     fused_attention: bool = False) -> int:
    """Activations of one UNet call over ``rows`` latents of h x w: all skip tensors kept for the
    decoder, plus the largest transient (the GEGLU intermediate and the attention working set at
    the top level, with the shared bank of 2*HW tokens), doubled for the call's temporaries.
    ``fused_attention``: the attention never holds a score matrix (CPU flash attention, the CUDA
    kernels); otherwise 1024-query chunks of float32 scores count."""
    u = cfg.unet
    skips, hh, ww, ch = 0, h, w, u.model_channels
    skips += ch * hh * ww
    for level, mult in enumerate(u.channel_mult):
        ch = mult * u.model_channels
        skips += u.num_res_blocks * ch * hh * ww
        if level != len(u.channel_mult) - 1:
            hh, ww = (hh + 1) // 2, (ww + 1) // 2
            skips += ch * hh * ww
    c0, n0 = u.model_channels, h * w
    ff = 8 * c0 * n0 + 4 * c0 * n0
    attn = 3 * c0 * n0 * 3
    if not fused_attention:
        attn += min(n0, 1024) * 3 * n0 * u.num_heads * 4 // dtype_bytes
    per_row = skips + 2 * max(ff, attn) + 6 * c0 * n0
    return rows * per_row * dtype_bytes * SLACK_NUM // SLACK_DEN


def vae_decode_bytes(cfg: ModelConfig, frames: int, h: int, w: int, dtype_bytes: int) -> int:
    """Activations of one VAE decode call over ``frames`` latents of h x w: about six tensors of
    the decoder's widest full-resolution level alive at once."""
    v = cfg.vae
    f = cfg.downsample_factor
    return frames * 6 * v.ch * v.ch_mult[0] * (h * f) * (w * f) * dtype_bytes * SLACK_NUM // SLACK_DEN


def plan_batches(cfg: ModelConfig, windows: int, frames: int, h: int, w: int, dtype_bytes: int,
                 max_memory: int | None = None, max_windows_per_call: int | None = None,
                 backview: ModelConfig | None = None, shared_bytes: int = 0,
                 fused_attention: bool = False, compute_bytes: int | None = None) -> BatchPlan:
    """The largest batch (all windows, both branches, preferred) within ``max_memory`` bytes
    (None: no limit) and ``max_windows_per_call``. Raises :class:`MemoryBudgetError` with the
    minimum needed otherwise. Weights count ``dtype_bytes`` per element, activations
    ``compute_bytes`` (default the same; 4 for half-precision weights run in float32).

    With ``backview`` (its config; ``shared_bytes`` of weights both models hold as one copy) the
    back-view model's weights count too, and when no batch fits with both models resident the
    plan keeps one at a time (edge mode: the back-view step's own need counts then). Views are
    decoded in as few frames per VAE call as the budget asks for (in either mode); the estimate
    is the largest need of a UNet step and a VAE decode."""
    weights = weight_bytes(cfg, dtype_bytes)
    other = weight_bytes(backview, dtype_bytes) - shared_bytes if backview is not None else 0
    compute_bytes = compute_bytes or dtype_bytes

    def act(c: ModelConfig, rows: int) -> int:
        return activation_bytes(c, rows, h, w, compute_bytes, fused_attention)

    bank = act(cfg, 2)  # appearance net on 2 references
    bv_step = 0
    if backview is not None:    # back view: appearance net on 1 reference, both branches of 1 row
        bv_step = weight_bytes(backview, dtype_bytes) + act(backview, 1) + act(backview, 2)
    top = min(windows, max_windows_per_call or windows)
    options = [(wpc, cfg_b) for wpc in range(top, 0, -1) for cfg_b in (True, False)]
    smallest = None
    for one_resident in ((False, True) if backview is not None else (False,)):
        held = weights if one_resident else weights + other
        decode = _decode_frames(cfg, frames, h, w, compute_bytes, max_memory, held)
        decode_need = held + vae_decode_bytes(cfg, decode, h, w, compute_bytes)
        for wpc, cfg_b in options:
            rows = wpc * frames * (2 if cfg_b else 1)
            need = max(held + bank + act(cfg, rows), decode_need)
            if one_resident:
                need = max(need, bv_step)
            smallest = need
            if max_memory is None or need <= max_memory:
                return BatchPlan(wpc, cfg_b, need, max_memory, one_resident, decode if decode < frames else None, held)
    raise MemoryBudgetError(
        f"max_memory={max_memory / 2**30:.2f} GiB is too small: one window of {frames} frames needs about "
        f"{smallest / 2**30:.2f} GiB ({weights / 2**30:.2f} GiB of weights). Fix: raise max_memory or use fp16")


def _decode_frames(cfg: ModelConfig, frames: int, h: int, w: int, dtype_bytes: int, max_memory: int | None,
                   held: int) -> int:
    """The most frames (a divisor of ``frames``) one VAE decode call may take within the budget."""
    for n in range(frames, 0, -1):
        if frames % n == 0 and (max_memory is None or held + vae_decode_bytes(cfg, n, h, w, dtype_bytes) <= max_memory):
            return n
    return 1


def default_plan(cfg: ModelConfig, device: str, dtype_bytes: int, max_memory: int | None = None,
                 windows: int = 4, backview: ModelConfig | None = None, shared_bytes: int = 0,
                 compute_bytes: int | None = None) -> BatchPlan:
    """The engine's choice: on a GPU the largest batch that fits (throughput grows with batch);
    on a CPU one window per call (a bigger batch adds memory traffic, not throughput: measured
    in benchmarks/RESULTS.md). Both devices run fused attention (no score matrix)."""
    frames = cfg.motion.video_length if cfg.motion else 1
    lat = cfg.latent_size
    cap = None if str(device).startswith("cuda") else 1
    return plan_batches(cfg, windows, frames, lat, lat, dtype_bytes, max_memory, cap, backview, shared_bytes,
                        fused_attention=True, compute_bytes=compute_bytes)
