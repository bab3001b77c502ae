"""The three UNet-shaped networks of DiffPortrait360, in the authors' key layout.

* :class:`UNet` - the denoiser (``model.diffusion_model``): reads the reference bank in its
  self-attention, takes pose residuals on its skips, and (360° model) runs temporal motion modules.
* :class:`AppearanceNet` - ``control_model``: a UNet copy without output head that only writes the bank.
* :class:`PoseControlNet` - ``pose_control_model``: encoder half + hint encoder + zero convs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import MotionConfig, UNetConfig
from .attention import Bank, SpatialTransformer
from .layers import Downsample, GroupNorm32, ResBlock, Upsample, time_embed_mlp, timestep_embedding
from .motion import MotionModule


class EmbedSequential(nn.ModuleList):
    """A UNet block: layers applied in order, each given what it needs (emb, context, bank)."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, bank: Bank | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, bank)
            else:
                h = layer(h)
        return h


@dataclass(frozen=True)
class BlockPlan:
    """Where things sit in a UNet of a given config (shared by the three networks)."""

    input_channels: tuple[int, ...]     # output channels of each input block (the skips)
    input_is_res: tuple[bool, ...]      # input block holds a ResBlock (gets a motion module)
    middle_channels: int


def _transformer(cfg: UNetConfig, ch: int) -> SpatialTransformer:
    return SpatialTransformer(ch, cfg.num_heads, ch // cfg.num_heads, cfg.context_dim, cfg.transformer_depth)


def build_encoder(cfg: UNetConfig) -> tuple[nn.ModuleList, EmbedSequential, BlockPlan]:
    """Input blocks and middle block of an SD1.5 UNet; returns them and the skip channel plan."""
    mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
    blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
    chans, is_res = [mc], [False]
    ch, ds = mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(_transformer(cfg, ch))
            blocks.append(EmbedSequential(layers))
            chans.append(ch)
            is_res.append(True)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(EmbedSequential([Downsample(ch)]))
            chans.append(ch)
            is_res.append(False)
            ds *= 2
    middle = EmbedSequential([ResBlock(ch, emb_dim, ch), _transformer(cfg, ch), ResBlock(ch, emb_dim, ch)])
    return blocks, middle, BlockPlan(tuple(chans), tuple(is_res), ch)


def build_decoder(cfg: UNetConfig, plan: BlockPlan) -> nn.ModuleList:
    """Output blocks: each consumes ``cat([h, skip])``, skips popped in reverse."""
    mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
    skips = list(plan.input_channels)
    ch = plan.middle_channels
    ds = 2 ** (len(cfg.channel_mult) - 1)
    blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            layers: list[nn.Module] = [ResBlock(ch + skips.pop(), emb_dim, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(_transformer(cfg, ch))
            if level and i == cfg.num_res_blocks:
                layers.append(Upsample(ch))
                ds //= 2
            blocks.append(EmbedSequential(layers))
    return blocks


def check_latent(x: Tensor, cfg: UNetConfig, what: str = "latent") -> None:
    """Raise a clear error when a latent cannot pass through the UNet's down/up path."""
    if x.dim() != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"{what} must be [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
    f = 2 ** (len(cfg.channel_mult) - 1)
    if x.shape[2] % f or x.shape[3] % f:
        raise ValueError(f"{what} spatial size {tuple(x.shape[2:])} must be divisible by {f} "
                         f"(the UNet downsamples {len(cfg.channel_mult) - 1} times)")


class UNet(nn.Module):
    """The denoiser. ``forward(x, t, context, bank=None, pose_residuals=None) -> eps``.

    x: [B, 4, h, w] noisy latents (360° model: B = windows x frames, frames consecutive);
    t: [B] timesteps; context: [B, 77, Cc]; bank: a reader of the reference bank (conditional
    branch) or None (unconditional branch: plain self-attention); pose_residuals: the 13 pose
    ControlNet outputs (conditional branch) or None; they may cover only the first rows of the
    batch (conditional rows of a batched guidance pass). Returns eps [B, 4, h, w].
    """

    def __init__(self, cfg: UNetConfig, motion: MotionConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.time_embed = time_embed_mlp(cfg.model_channels)
        self.input_blocks, self.middle_block, self.plan = build_encoder(cfg)
        self.output_blocks = build_decoder(cfg, self.plan)
        self.out = nn.Sequential(GroupNorm32(cfg.model_channels), nn.SiLU(),
                                 nn.Conv2d(cfg.model_channels, cfg.out_channels, 3, padding=1))
        self.motion = motion
        if motion is not None:
            mm = lambda ch: MotionModule(ch, motion.num_attention_heads, motion.video_length, motion.max_len)  # noqa: E731
            self.input_blocks_motion_module = nn.ModuleList(
                mm(ch) for ch, res in zip(self.plan.input_channels, self.plan.input_is_res) if res)
            self.output_blocks_motion_module = nn.ModuleList(
                mm(blk[0].out_layers[-1].out_channels) for blk in self.output_blocks)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, bank: Bank | None = None,
                pose_residuals: list[Tensor] | None = None) -> Tensor:
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        h, hs, m = x, [], 0
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, bank)
            if self.motion is not None and self.plan.input_is_res[i]:
                h = self.input_blocks_motion_module[m](h)
                m += 1
            hs.append(h)
        h = self.middle_block(h, emb, context, bank)
        res = list(pose_residuals) if pose_residuals is not None else None
        if res is not None:
            h = _add_rows(h, res.pop())
        for k, block in enumerate(self.output_blocks):
            skip = hs.pop()
            if res is not None:
                skip = _add_rows(skip, res.pop())
            h = block(torch.cat([h, skip], dim=1), emb, context, bank)
            if self.motion is not None:
                h = self.output_blocks_motion_module[k](h)
        return self.out(h)


def _add_rows(h: Tensor, r: Tensor) -> Tensor:
    """``h + r`` where ``r`` may cover only the first rows of the batch (the conditional rows of a
    batched guidance pass; the unconditional rows take no pose residuals)."""
    if r.shape[0] == h.shape[0]:
        return h + r
    return torch.cat([h[: r.shape[0]] + r, h[r.shape[0]:]])


class _StopAfterLastWrite(Exception):
    pass


class AppearanceNet(nn.Module):
    """``control_model``: runs a UNet body on a reference latent only to fill a bank writer.

    ``forward(x, t, context, writer, stop_early=False)``; x: [B, 4, h, w]. With ``stop_early`` it
    stops right after the last transformer block wrote its entry (what follows is discarded by
    the reference anyway); the bank entries are identical either way.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = time_embed_mlp(cfg.model_channels)
        self.input_blocks, self.middle_block, self.plan = build_encoder(cfg)
        self.output_blocks = build_decoder(cfg, self.plan)
        self.num_bank_entries = sum(
            len(layer.transformer_blocks) for layer in self.modules() if isinstance(layer, SpatialTransformer))

    def forward(self, x: Tensor, t: Tensor, context: Tensor, writer, stop_early: bool = False) -> None:
        if stop_early:
            writer = _EarlyStopWriter(writer, self.num_bank_entries)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        h, hs = x, []
        try:
            for block in self.input_blocks:
                h = block(h, emb, context, writer)
                hs.append(h)
            h = self.middle_block(h, emb, context, writer)
            for block in self.output_blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb, context, writer)
        except _StopAfterLastWrite:
            pass


class _EarlyStopWriter:
    def __init__(self, writer, total: int):
        self.writer, self.total, self.count = writer, total, 0

    def self_attention(self, attn, x_norm: Tensor) -> Tensor:
        self.writer.record(x_norm)
        self.count += 1
        if self.count == self.total:
            raise _StopAfterLastWrite
        return attn(x_norm)


class PoseControlNet(nn.Module):
    """``pose_control_model``: ``forward(x, hint, t, context) -> 13 residuals``.

    x: [B, 4, h, w]; hint: [B, 3, 8h, 8w] camera condition images in [-1, 1]. Returns the zero-conv
    outputs of the input blocks (12 at SD1.5 layout) and of the middle block, in that order.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        self.time_embed = time_embed_mlp(mc)
        hint_layers: list[nn.Module] = []
        for cin, cout, stride in ((cfg.hint_channels, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1),
                                  (32, 96, 2), (96, 96, 1), (96, 256, 2)):
            hint_layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.SiLU()]
        hint_layers.append(nn.Conv2d(256, mc, 3, padding=1))
        self.input_hint_block = EmbedSequential(hint_layers)
        self.input_blocks, self.middle_block, self.plan = build_encoder(cfg)
        self.zero_convs = nn.ModuleList(EmbedSequential([nn.Conv2d(ch, ch, 1)]) for ch in self.plan.input_channels)
        self.middle_block_out = EmbedSequential([nn.Conv2d(self.plan.middle_channels, self.plan.middle_channels, 1)])

    def forward(self, x: Tensor, hint: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        guided = self.input_hint_block(hint, emb, context)
        if guided.shape[2:] != x.shape[2:]:
            raise ValueError(f"hint {tuple(hint.shape)} must be 8x the latent size {tuple(x.shape[2:])}")
        outs, h = [], x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs
