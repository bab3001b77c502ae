"""StyleGAN2 networks in PanoHead's state-dict layout: mapping, synthesis layers and blocks.

Module and parameter names equal NVlabs' (``fc0.weight``, ``b64.conv0.affine.bias``,
``noise_const``, ``resample_filter`` ...) so the released weights load strictly. Equalized
learning rate: a layer stores raw weights and scales them by ``lr_multiplier / sqrt(fan_in)``
when it runs. Noise: ``noise_mode`` 'const' (stored buffers), 'random' (drawn from a
``torch.Generator`` or a :class:`~dp360rt.panohead.draws.Draws`), 'none'.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .draws import Draws
from .ops import ACT_GAIN, bias_act, fir_filter, modulated_conv2d, upsample2d


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over ``dim``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalized learning rate; ``activation`` linear or lrelu. [N, in] -> [N, out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


class MappingNetwork(nn.Module):
    """z [N, z_dim] and camera label c [N, c_dim] -> w [N, num_ws, w_dim] (or [N, w_dim] when
    ``num_ws`` is None): normalized z and normalized embed(c) concatenated, ``num_layers`` layers,
    broadcast, truncation toward ``w_avg`` on rows [0, truncation_cutoff)."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None, activation: str = "lrelu",
                 last_activation: str | None = None, lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.998):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, c_dim, w_dim, num_ws, num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = w_dim if embed_features is None else embed_features
        if c_dim == 0:
            embed_features = 0
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for i in range(num_layers):
            act = last_activation if (i == num_layers - 1 and last_activation) else activation
            setattr(self, f"fc{i}", FullyConnectedLayer(features[i], features[i + 1], activation=act,
                                                        lr_multiplier=lr_multiplier))
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: Tensor, c: Tensor, truncation_psi: float = 1, truncation_cutoff: int | None = None,
                trace: dict | None = None) -> Tensor:
        x = None
        if self.z_dim > 0:
            _check_shape(z, self.z_dim, "z")
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            _check_shape(c, self.c_dim, "c")
            e = self.embed(c.to(torch.float32))
            if trace is not None:
                trace["c_embed"] = e
            y = normalize_2nd_moment(e)
            x = torch.cat([x, y], dim=1) if x is not None else y
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = torch.cat([self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi), x[:, truncation_cutoff:]], 1)
        return x


def _check_shape(t: Tensor, dim: int, name: str) -> None:
    if t.ndim != 2 or t.shape[1] != dim:
        raise ValueError(f"{name} must be [N, {dim}], got {tuple(t.shape)}")


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (optionally 2x up-sampling), noise, bias, lrelu:
    x [N, I, R/up, R/up], w [N, w_dim] -> [N, O, R, R]."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu", conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution, self.up = in_channels, out_channels, resolution, up
        self.use_noise, self.activation, self.conv_clamp = use_noise, activation, conv_clamp
        self.register_buffer("resample_filter", fir_filter())
        self.padding = kernel_size // 2
        self.act_gain = ACT_GAIN[activation]
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "random", fused_modconv: bool = True,
                draws: Draws | None = None) -> Tensor:
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode {noise_mode!r}: use 'const', 'random' or 'none'")
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = (draws or Draws()).randn([x.shape[0], 1, self.resolution, self.resolution], x.device) * self.noise_strength
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, fused=fused_modconv)
        clamp = self.conv_clamp if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution without demodulation, plus bias: [N, I, H, W] -> [N, O, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: Tensor, w: Tensor, fused_modconv: bool = True) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the skip-architecture synthesis network: (const or 2x up-sampling conv0),
    conv1, ToRGB added to the up-sampled running image. (x, img, ws [N, num_conv + num_torgb, w_dim])
    -> (x [N, O, R, R], img [N, img_channels, R, R])."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, architecture: str = "skip", conv_clamp: float | None = 256,
                 fused_modconv_default: bool | str = True, use_noise: bool = True, **_ignored):
        super().__init__()
        if architecture != "skip":
            raise ValueError(f"synthesis architecture {architecture!r} is not supported (PanoHead uses 'skip')")
        self.in_channels, self.resolution, self.img_channels, self.is_last = in_channels, resolution, img_channels, is_last
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer("resample_filter", fir_filter())
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp,
                                        use_noise=use_noise)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp,
                                    use_noise=use_noise)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_torgb += 1

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: str = "random",
                fused_modconv: bool | str | None = None, draws: Draws | None = None) -> tuple[Tensor, Tensor]:
        w_iter = iter(ws.unbind(dim=1))
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == "inference_only":
            fused_modconv = not self.training
        kw = dict(noise_mode=noise_mode, fused_modconv=fused_modconv, draws=draws)
        if self.in_channels == 0:
            x = self.const.to(torch.float32).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), **kw)
        else:
            x = self.conv0(x.to(torch.float32), next(w_iter), **kw)
            x = self.conv1(x, next(w_iter), **kw)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
        img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, img_channels, R, R]: blocks b4 ... bR, channels
    min(channel_base / res, channel_max). ``num_fp16_res`` is accepted and ignored (float32 throughout)."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 0, **block_kwargs):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"synthesis resolution {img_resolution} must be a power of two >= 4")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2 ** i for i in range(2, int(math.log2(img_resolution)) + 1)]
        ch = {r: min(channel_base // r, channel_max) for r in self.block_resolutions}
        self.num_ws = 0
        for r in self.block_resolutions:
            block = SynthesisBlock(ch[r // 2] if r > 4 else 0, ch[r], w_dim, r, img_channels,
                                   is_last=(r == img_resolution), **block_kwargs)
            self.num_ws += block.num_conv + (block.num_torgb if r == img_resolution else 0)
            setattr(self, f"b{r}", block)

    def forward(self, ws: Tensor, noise_mode: str = "random", fused_modconv: bool | str | None = None,
                draws: Draws | None = None) -> Tensor:
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        i = 0
        for r in self.block_resolutions:
            block = getattr(self, f"b{r}")
            x, img = block(x, img, ws.narrow(1, i, block.num_conv + block.num_torgb), noise_mode=noise_mode,
                           fused_modconv=fused_modconv, draws=draws)
            i += block.num_conv
        return img


class Backbone(nn.Module):
    """PanoHead's ``backbone``: a StyleGAN2 generator (``mapping`` + ``synthesis``) whose image is
    the tri-grid: [N, 96 * triplane_depth, T, T]."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: dict | None = None, **synthesis_kwargs):
        super().__init__()
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, **(mapping_kwargs or {}))
