"""The whole DiffPortrait360 model (``ControlLDMReferenceOnlyPose``) in the official key layout,
and its reference-semantics ``apply_model``."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, get_model_config
from .noise_schedule import schedule_buffers
from .text.clip import FrozenCLIPEmbedder
from .unet.bank import BankReader, BankWriter
from .unet.unet import AppearanceNet, PoseControlNet, UNet, check_latent
from .vae.autoencoder import AutoencoderKL


@dataclass
class ApplyOutput:
    """One ``apply_model`` call: eps [B, 4, h, w], plus the bank and pose residuals for inspection."""

    eps: Tensor
    bank: list[Tensor] | None
    pose_residuals: list[Tensor]


class DiffPortrait360(nn.Module):
    """Both checkpoints' model: ``kind`` is ``"nvs"`` (360° generator) or ``"backview"``.

    Submodules carry the official prefixes: ``model.diffusion_model`` (:class:`UNet`),
    ``control_model`` (:class:`AppearanceNet`), ``pose_control_model`` (:class:`PoseControlNet`),
    ``first_stage_model`` (:class:`AutoencoderKL`), ``cond_stage_model`` (CLIP text tower); the 12
    float16 schedule tables and ``logvar`` are buffers without prefix.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        self.model = nn.Module()
        self.model.diffusion_model = UNet(cfg.unet, cfg.motion)
        self.control_model = AppearanceNet(cfg.appearance)
        self.pose_control_model = PoseControlNet(cfg.pose)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = FrozenCLIPEmbedder(cfg.text)
        for k, v in schedule_buffers(cfg.timesteps, cfg.linear_start, cfg.linear_end).items():
            self.register_buffer(k, v)

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def frames(self) -> int:
        """Frames per window the temporal modules expect (1 for the back-view model)."""
        return self.cfg.motion.video_length if self.cfg.motion is not None else 1

    # -- text and VAE ------------------------------------------------------------------------
    def encode_text(self, token_ids: Tensor) -> Tensor:
        """[B, 77] int64 -> [B, 77, context_dim]."""
        return self.cond_stage_model(token_ids)

    def encode_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior of images [B, 3, H, W] in [-1, 1]: (mean, clamped logvar), each [B, 4, H/8, W/8]."""
        if image.dim() != 4 or image.shape[1] != self.cfg.vae.in_channels:
            raise ValueError(f"image must be [B, {self.cfg.vae.in_channels}, H, W], got {tuple(image.shape)}")
        f = self.cfg.downsample_factor
        if image.shape[2] % f or image.shape[3] % f:
            raise ValueError(f"image size {tuple(image.shape[2:])} must be divisible by {f}")
        return self.first_stage_model.encode(image)

    def sample_latent(self, mean: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
        """The reference's sampled posterior, scaled: ``scale_factor * (mean + exp(logvar/2) * noise)``."""
        return self.cfg.scale_factor * (mean + torch.exp(0.5 * logvar) * noise)

    def decode_latent(self, latent: Tensor) -> Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] (unclamped, about [-1, 1])."""
        return self.first_stage_model.decode(latent / self.cfg.scale_factor)

    # -- the denoiser call -------------------------------------------------------------------
    def write_bank(self, ref: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        """Run the appearance net on reference latents [B, 4, h, w]; returns its 16 bank entries."""
        writer = BankWriter()
        self.control_model(ref, t, context, writer)
        return writer.entries

    def apply_model(self, x: Tensor, t: Tensor, context: Tensor, hint: Tensor,
                    ref_front: Tensor | None = None, ref_back: list[Tensor] | None = None,
                    uc: bool = False) -> ApplyOutput:
        """The reference ``apply_model`` (SEMANTICS.md §3), waste included.

        x: [B, 4, h, w]; t: [B]; context: [B, 77, C]; hint: [B, 3, 8h, 8w]; ref_front and each
        ``ref_back`` latent: [B, 4, h, w] (already repeated over the batch). ``uc=True`` is the
        unconditional branch: no bank, pose residuals computed and discarded.
        """
        check_latent(x, self.cfg.unet, "x")
        if self.frames > 1 and x.shape[0] % self.frames:
            raise ValueError(f"360° model: batch {x.shape[0]} must be a multiple of {self.frames} frames")
        bank = None
        if ref_front is not None and not uc:
            bank = self.write_bank(ref_front, t, context)
            for ref in ref_back or []:
                more = self.write_bank(ref, t, context)
                bank = [torch.cat([a, b], dim=1) for a, b in zip(bank, more)]
        residuals = self.pose_control_model(x, hint, t, context)
        eps = self.unet(x, t, context,
                        bank=BankReader(bank) if bank is not None else None,
                        pose_residuals=None if (uc or bank is None) else residuals)
        return ApplyOutput(eps=eps, bank=bank, pose_residuals=residuals)


def build_model(kind: str, config: str | Path | Mapping[str, Any] | ModelConfig = "full",
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DiffPortrait360:
    """Build a DiffPortrait360 model of ``kind`` (``"nvs"`` or ``"backview"``) from a config.

    ``config`` is ``"full"`` (the official checkpoints' sizes), a path to a ``config.json`` in the
    fixtures' format, a parsed dict, or a :class:`ModelConfig`. On ``device="meta"`` no memory is
    allocated (useful for key/shape checks and FLOP counts). Weights are uninitialised random;
    load a checkpoint with :func:`dp360rt.load_checkpoint`.
    """
    cfg = get_model_config(kind, config)
    with torch.device(device):
        model = DiffPortrait360(cfg)
    if dtype is not None:
        for name, p in model.named_parameters():
            p.data = p.data.to(dtype)
    return model.eval().requires_grad_(False)


def init_random(model: DiffPortrait360) -> None:
    """Fill ``model``'s parameters in place from torch's global generator (seed it first) by the
    fixtures' recipe rule: norm weights ~N(1, 0.1), other 1-D parameters ~N(0, 0.1), matrices and
    kernels ~N(0, 1/fan_in). Random weights give real speed and meaningless pictures: demos, tests,
    benchmarks and ``dp360rt export --random``. Buffers (the schedule tables) are left as built."""
    norms = {id(m.weight) for m in model.modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None}
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0.0, p[0].numel() ** -0.5)
        else:
            p.normal_(1.0 if id(p) in norms else 0.0, 0.1)


# Modules whose weights autocast hands to its low-precision kernels (convolutions, matmuls).
LOW_PRECISION_MODULES = (nn.Conv2d, nn.Linear)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element the memory plan counts for ``dtype`` (2 for half precision, else 4)."""
    return 2 if dtype in HALF_DTYPES else 4


def store_half_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights and biases of ``model``'s convolutions and linear layers in ``dtype``
    (float16 or bfloat16), in place; returns the bytes saved.

    Autocast casts exactly these weights to ``dtype`` at every call, so a model run under autocast
    gives bit-identical numbers with its weights stored this way, in half the memory. Norms,
    embeddings and buffers keep float32 (autocast runs them in float32). A tensor two models hold
    as one copy is cast once. Works on 'meta' models (before loading a checkpoint into them).
    """
    if dtype not in HALF_DTYPES:
        raise ValueError(f"store_half_weights: dtype must be float16 or bfloat16, got {dtype}")
    saved = 0
    for mod in model.modules():
        if isinstance(mod, LOW_PRECISION_MODULES):
            for p in mod._parameters.values():
                if p is not None and p.dtype == torch.float32:
                    p.data = p.data.to(dtype)
                    saved += p.numel() * 2
    return saved


class _CastingConv2d(nn.Conv2d):
    """A convolution that casts its stored weights to its input's dtype at each call."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class _CastingLinear(nn.Linear):
    """A linear layer that casts its stored weights to its input's dtype at each call."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


_CASTING = {nn.Conv2d: _CastingConv2d, nn.Linear: _CastingLinear}


def cast_weights_at_call(model: nn.Module) -> None:
    """Make ``model``'s convolutions and linear layers cast their weights to their input's dtype at
    each call, in place: half-precision stored weights (:func:`store_half_weights`) then run float32
    arithmetic. That is the memory of half-precision weights at float32 speed on CPUs without native
    half-precision arithmetic, where torch's bfloat16 convolution is a reference loop hundreds of
    times slower (see :func:`cpu_half_is_native`). The numbers equal a float32 model whose weights
    were rounded to the half dtype. State dict keys and the weights' identity do not change."""
    for mod in model.modules():
        cls = _CASTING.get(type(mod))
        if cls is not None:
            mod.__class__ = cls


def autocast(device: torch.device, dtype: torch.dtype):
    """The autocast context the networks run under: ``dtype`` (float16/bfloat16) on CUDA and CPU,
    none for float32."""
    if dtype in HALF_DTYPES and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


PREFIXES = ("model.diffusion_model", "control_model", "pose_control_model", "first_stage_model", "cond_stage_model")


def state_summary(model: DiffPortrait360) -> dict[str, Any]:
    """Key and element counts per official prefix, in the layout of ``manifest_summary.json``."""
    sd = model.state_dict()
    params = dict(model.named_parameters())
    keys: dict[str, int] = {}
    elems: dict[str, int] = {}
    for k, v in sd.items():
        p = next((p for p in PREFIXES if k.startswith(p + ".")), "<schedule buffers>")
        keys[p] = keys.get(p, 0) + 1
        elems[p] = elems.get(p, 0) + v.numel()
    return {
        "num_keys": len(sd),
        "num_elements": sum(v.numel() for v in sd.values()),
        "num_parameters": sum(p.numel() for p in params.values()),
        "keys_per_prefix": keys,
        "elements_per_prefix": elems,
    }


def cpu_half_is_native(dtype: torch.dtype) -> bool:
    """Whether this CPU runs ``dtype`` (float16/bfloat16) convolutions and matmuls natively
    (oneDNN's answer: AVX512-BF16/FP16 or AMX). Without it torch falls back to a reference loop,
    hundreds of times slower than float32 (0.1 vs 33.6 GFLOP/s for one 3x3 convolution on an
    AVX2-only AMD EPYC)."""
    probe = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else \
        torch.ops.mkldnn._is_mkldnn_fp16_supported
    try:
        return bool(probe())
    except (AttributeError, RuntimeError):
        return False
