"""PanoHead's tri-grid generator (``TriPlaneGenerator``) in its released state-dict layout.

``G = TriPlaneGenerator(**init_kwargs)`` takes the init kwargs the released pickle stores
(:mod:`dp360rt.panohead.weights` reads them). Three entry points, all differentiable:

* ``G.mapping(z, c, truncation_psi, truncation_cutoff)`` -> ws [N, num_ws, w_dim]
* ``G.synthesis(ws, c, neural_rendering_resolution=None, noise_mode='random', draws=None)`` ->
  ``{"image": [N, 3, 512, 512], "image_raw": [N, 3, R, R], "image_depth": [N, 1, R, R],
  "image_mask": [N, 1, R, R]}`` (images nominally in [-1, 1])
* ``G(z, c, ...)``: mapping, the learned camera shift (``apply_delta_c``), synthesis.

``draws`` (a :class:`~dp360rt.panohead.draws.Draws`, a ``torch.Generator``, a seed or a recorded
list) feeds every random number: the coarse depth jitter and the importance samples of each
render, and per-layer noise when ``noise_mode='random'``. Float32 throughout (the reference runs
its super-resolution in float16 on CUDA; this port does not).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .draws import Draws, as_draws
from .render import ray_bundle, render_trigrid
from .stylegan2 import Backbone, FullyConnectedLayer, MappingNetwork, SynthesisBlock, SynthesisNetwork, ToRGBLayer

SR_CLASS = "training.superresolution.SuperresolutionHybrid8XDC"


class GeneratorConfigError(ValueError):
    """Init kwargs this port cannot build; the message names the setting and the fix."""


class OSGDecoder(nn.Module):
    """Tri-grid features [N, 3, M, 32] -> averaged over planes -> MLP 32 -> 64 -> 1 + 32:
    ``{"sigma": [N, M, 1], "rgb": [N, M, 32]}`` (activation 'none' keeps features raw)."""

    def __init__(self, n_features: int, lr_mul: float = 1.0, output_dim: int = 32, activation: str = "none"):
        super().__init__()
        if activation not in ("none", "sigmoid", "lrelu"):
            raise GeneratorConfigError(f"decoder_activation {activation!r} is unknown. Fix: use 'none', 'sigmoid' or 'lrelu'")
        self.net = nn.Sequential(FullyConnectedLayer(n_features, 64, lr_multiplier=lr_mul), nn.Softplus(),
                                 FullyConnectedLayer(64, 1 + output_dim, lr_multiplier=lr_mul))
        self.activation = activation

    def forward(self, sampled: Tensor) -> dict[str, Tensor]:
        x = sampled.mean(1)
        n, m, c = x.shape
        x = self.net(x.reshape(n * m, c)).reshape(n, m, -1)
        rgb, sigma = x[..., 1:], x[..., 0:1]
        if self.activation == "sigmoid":
            rgb = torch.sigmoid(rgb) * (1 + 2 * 0.001) - 0.001
        elif self.activation == "lrelu":
            rgb = F.leaky_relu(rgb, 0.2) * (2 ** 0.5)
        return {"rgb": rgb, "sigma": sigma}


class SuperresolutionHybrid8XDC(nn.Module):
    """8x super-resolution: rgb [N, 3, R, R] and features [N, 32, R, R] resized to 128 (bilinear,
    antialiased), then two skip synthesis blocks (128 -> 256 -> 512) styled by the last row of ws,
    conv clamp 256. -> [N, 3, 512, 512]."""

    input_resolution = 128

    def __init__(self, channels: int, img_resolution: int, sr_num_fp16_res: int = 0, sr_antialias: bool = True,
                 num_fp16_res: int = 4, conv_clamp=None, channel_base=None, channel_max=None,
                 sr_widths: tuple[int, int] = (256, 128), **block_kwargs):
        super().__init__()
        if img_resolution != 512:
            raise GeneratorConfigError(f"SuperresolutionHybrid8XDC makes 512x512 images, img_resolution is "
                                       f"{img_resolution}. Fix: use img_resolution 512")
        clamp = 256 if sr_num_fp16_res > 0 else None
        self.sr_antialias = sr_antialias
        # PanoHead hard-codes the widths 256 and 128; ``sr_widths`` (a dp360rt addition, absent from
        # PanoHead's kwargs) only shrinks the tiny random-weight test configs
        w0, w1 = sr_widths
        self.block0 = SynthesisBlock(channels, w0, w_dim=512, resolution=256, img_channels=3, is_last=False,
                                     conv_clamp=clamp, **block_kwargs)
        self.block1 = SynthesisBlock(w0, w1, w_dim=512, resolution=512, img_channels=3, is_last=True,
                                     conv_clamp=clamp, **block_kwargs)

    def forward(self, rgb: Tensor, x: Tensor, ws: Tensor, noise_mode: str = "none", draws: Draws | None = None,
                trace: dict | None = None) -> Tensor:
        ws = ws[:, -1:, :].repeat(1, 3, 1)
        if x.shape[-1] != self.input_resolution:
            size = (self.input_resolution, self.input_resolution)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
        if trace is not None:
            trace["sr_rgb128"], trace["sr_x128"] = rgb, x
        x, rgb = self.block0(x, rgb, ws, noise_mode=noise_mode, draws=draws)
        if trace is not None:
            trace["sr_block0_img"] = rgb
        x, rgb = self.block1(x, rgb, ws, noise_mode=noise_mode, draws=draws)
        return rgb


class TriPlaneGenerator(nn.Module):
    """PanoHead's generator (see the module docstring for the API). Keys: ``backbone.*``,
    ``superresolution.*``, ``decoder.*``, ``torgb.*``, ``bcg_synthesis.*``, ``t_mapping.*`` and the
    training loop's unused ``dataset_label_std`` buffer."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 sr_num_fp16_res: int = 0, mapping_kwargs: dict | None = None, rendering_kwargs: dict | None = None,
                 sr_kwargs: dict | None = None, **synthesis_kwargs):
        super().__init__()
        rk = dict(rendering_kwargs or {})
        mapping_kwargs = dict(mapping_kwargs or {})
        for k in ("triplane_size", "triplane_depth", "superresolution_module", "sr_antialias", "decoder_activation"):
            if k not in rk:
                raise GeneratorConfigError(f"rendering_kwargs lacks {k!r}. Fix: pass the init kwargs stored in the "
                                           "PanoHead pickle (dp360rt convert writes them)")
        if rk["superresolution_module"] != SR_CLASS:
            raise GeneratorConfigError(f"superresolution_module {rk['superresolution_module']!r} is not supported. "
                                       f"Fix: only {SR_CLASS} (the released PanoHead) is ported")
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.init_kwargs = copy.deepcopy(dict(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution,
                                              img_channels=img_channels, sr_num_fp16_res=sr_num_fp16_res,
                                              mapping_kwargs=mapping_kwargs, rendering_kwargs=rk,
                                              sr_kwargs=dict(sr_kwargs or {}), **synthesis_kwargs))
        depth = rk["triplane_depth"]
        self.backbone = Backbone(z_dim, c_dim, w_dim, img_resolution=rk["triplane_size"], img_channels=32 * 3 * depth,
                                 mapping_kwargs=mapping_kwargs, **synthesis_kwargs)
        self.superresolution = SuperresolutionHybrid8XDC(32, img_resolution, sr_num_fp16_res, rk["sr_antialias"],
                                                         **(sr_kwargs or {}))
        self.decoder = OSGDecoder(32, rk.get("decoder_lr_mul", 1), 32, rk["decoder_activation"])
        self.torgb = ToRGBLayer(32, 3, w_dim) if rk.get("use_torgb_raw", False) else None
        bcg_kwargs = dict(synthesis_kwargs)
        bcg_kwargs["channel_base"] = bcg_kwargs.get("channel_base", 32768) // 2
        self.bcg_synthesis = (SynthesisNetwork(w_dim, self.superresolution.input_resolution, 32, **bcg_kwargs)
                              if rk.get("use_background", False) else None)
        self.t_mapping = MappingNetwork(z_dim, c_dim, 3, num_ws=1, last_activation="linear", lr_multiplier=1.0,
                                        **mapping_kwargs)
        self.register_buffer("dataset_label_std", torch.ones(c_dim))   # written by the training loop, never read
        self.neural_rendering_resolution = 64
        self.rendering_kwargs = rk

    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    def _camera_label(self, c: Tensor) -> Tensor:
        if c.ndim != 2 or c.shape[1] != self.c_dim:
            raise ValueError(f"camera labels must be [N, {self.c_dim}] (4x4 cam2world row-major + 3x3 normalized "
                             f"intrinsics), got {tuple(c.shape)}")
        if self.rendering_kwargs.get("c_gen_conditioning_zero", False):
            c = torch.zeros_like(c)
        return c * self.rendering_kwargs.get("c_scale", 0)

    def mapping(self, z: Tensor, c: Tensor, truncation_psi: float = 1, truncation_cutoff: int | None = None,
                trace: dict | None = None) -> Tensor:
        """z [N, z_dim], conditioning camera c [N, 25] -> ws [N, num_ws, w_dim] (truncated toward
        w_avg with ``truncation_psi`` on rows below ``truncation_cutoff``, all rows if None)."""
        return self.backbone.mapping(z, self._camera_label(c), truncation_psi, truncation_cutoff, trace=trace)

    def apply_delta_c(self, z: Tensor, c: Tensor, truncation_psi: float = 1,
                      truncation_cutoff: int | None = None) -> tuple[Tensor, Tensor]:
        """The learned camera shift: (c with t_mapping(z, c) added to the cam2world translation
        c[:, 3], c[:, 7], c[:, 11]; the shift [N, 3])."""
        if self.rendering_kwargs.get("c_gen_conditioning_zero", False):
            c = torch.zeros_like(c)
        label = self._camera_label(c)
        delta = self.t_mapping(z, label, truncation_psi, truncation_cutoff).squeeze(1)
        shift = torch.zeros_like(c)
        shift[:, 3], shift[:, 7], shift[:, 11] = delta[:, 0], delta[:, 1], delta[:, 2]
        return c + shift, delta

    def planes(self, ws: Tensor, noise_mode: str = "random", draws=None) -> Tensor:
        """The tri-grid [N, 96 * triplane_depth, T, T] of ws [N, num_ws, w_dim]."""
        return self.backbone.synthesis(ws, noise_mode=noise_mode, draws=as_draws(draws))

    def synthesis(self, ws: Tensor, c: Tensor, neural_rendering_resolution: int | None = None,
                  noise_mode: str = "random", draws=None, ws_bcg: Tensor | None = None,
                  trace: dict | None = None) -> dict[str, Tensor]:
        """Render ws [N, num_ws, w_dim] from cameras c [N, 25] (see the module docstring).

        ``neural_rendering_resolution`` R (sticky: stored on the module, as PanoHead does);
        ``noise_mode`` for the backbone and background networks; ``trace``: a dict that receives
        the intermediate tensors (rays, sample depths, planes, background, SR inputs)."""
        draws = as_draws(draws)
        c = c.to(ws.device, torch.float32) if c.dtype != torch.float32 else c
        if c.ndim != 2 or c.shape[1] != 25:
            raise ValueError(f"cameras must be [N, 25], got {tuple(c.shape)}")
        if neural_rendering_resolution is None:
            neural_rendering_resolution = self.neural_rendering_resolution
        else:
            self.neural_rendering_resolution = int(neural_rendering_resolution)
        r = int(neural_rendering_resolution)
        origins, dirs = ray_bundle(c[:, :16].reshape(-1, 4, 4), c[:, 16:25].reshape(-1, 3, 3), r)
        n = origins.shape[0]
        planes = self.backbone.synthesis(ws, noise_mode=noise_mode, draws=draws)
        if trace is not None:
            trace.update(ray_origins=origins, ray_directions=dirs, planes=planes)
        rk = self.rendering_kwargs
        planes = planes.reshape(len(planes), 3, 32 * rk["triplane_depth"], planes.shape[-2], planes.shape[-1])
        feats, depth, wsum = render_trigrid(planes, self.decoder, origins, dirs, rk, draws, trace)
        feature = feats.permute(0, 2, 1).reshape(n, feats.shape[-1], r, r).contiguous()
        depth_image = depth.permute(0, 2, 1).reshape(n, 1, r, r)
        wsum = wsum.permute(0, 2, 1).reshape(n, 1, r, r)
        if self.decoder.activation == "sigmoid":
            feature = feature * 2 - 1
        if trace is not None:
            trace.update(feature_raw=feature, weights_sum=wsum)
        if self.bcg_synthesis is not None:
            k = self.bcg_synthesis.num_ws
            wb = (ws if ws_bcg is None else ws_bcg)[:, :k]
            if wb.shape[1] < k:
                wb = torch.cat([wb, wb[:, -1:].repeat(1, k - wb.shape[1], 1)], 1)
            bcg = self.bcg_synthesis(wb, noise_mode=noise_mode, draws=draws)
            small = F.interpolate(bcg, size=feature.shape[2:], mode="bilinear", align_corners=False,
                                  antialias=rk["sr_antialias"])
            if trace is not None:
                trace.update(bcg=bcg, bcg_small=small)
            feature = feature + (1 - wsum) * small
        if trace is not None:
            trace["feature_image"] = feature
        if self.torgb is not None:
            rgb = self.torgb(feature, ws[:, -1], fused_modconv=False).to(torch.float32)
        else:
            rgb = feature[:, :3]
        image = self.superresolution(rgb, feature, ws, noise_mode=rk.get("superresolution_noise_mode", "none"),
                                     draws=draws, trace=trace)
        mask = wsum * (1 + 2 * 0.001) - 0.001
        return {"image": image, "image_raw": rgb, "image_depth": depth_image, "image_mask": mask}

    def forward(self, z: Tensor, c: Tensor, truncation_psi: float = 1, truncation_cutoff: int | None = None,
                neural_rendering_resolution: int | None = None, noise_mode: str = "random", draws=None,
                trace: dict | None = None) -> dict[str, Tensor]:
        """Generate from z [N, z_dim] at cameras c [N, 25]: ws = mapping(z, c), the camera shifted
        by ``apply_delta_c``, then :meth:`synthesis`. ``trace`` also receives ``ws``,
        ``t_mapping_out`` [N, 1, 3] and ``c_used``."""
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff)
        c_new, delta = self.apply_delta_c(z, c, truncation_psi, truncation_cutoff)
        if trace is not None:
            trace.update(ws=ws, t_mapping_out=delta.unsqueeze(1), c_used=c_new)
        return self.synthesis(ws, c_new, neural_rendering_resolution, noise_mode=noise_mode, draws=draws, trace=trace)
