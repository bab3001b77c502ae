"""The perceptual network of the projector: VGG16 features with LPIPS weights (our own module).

The authors' projector loads NVIDIA's StyleGAN2-ADA metrics network ``vgg16.pt`` (a TorchScript
archive) and calls it as ``vgg16(images, resize_images=False, return_lpips=True)``: images
[N, 3, H, W] with values in [0, 255] -> a feature vector [N, F] whose squared distance between
two images is their LPIPS (v0.1, VGG) distance. This module computes the same thing from the
same weights (read as data by :mod:`dp360rt.invert.vgg_file`): LPIPS' input scaling, the 13
VGG16 convolutions with ReLU and 2x2 max pooling, and at the five LPIPS taps (relu1_2 ... relu5_3)
unit-normalized channels weighted by sqrt(w_c / (H W)), flattened and concatenated.

Parameter names follow the NVIDIA file: ``layers.conv1.weight`` ... ``layers.conv13.bias`` and
``lpips0`` ... ``lpips4`` (one non-negative weight per channel of each tap).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONVS_PER_STAGE = (2, 2, 3, 3, 3)
FULL_WIDTHS = (64, 128, 256, 512, 512)
TINY_WIDTHS = (4, 8, 8, 16, 16)
# LPIPS v0.1's input scaling for images in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class VGG16LPIPS(nn.Module):
    """VGG16 conv stages of ``widths`` (default the real network's 64 ... 512) with LPIPS tap weights.

    ``forward(images)``: [N, 3, H, W] in [0, 255] (no resizing: the projector area-resizes to 256²
    first, as the authors do) -> [N, F] with F = sum over taps of width * h * w; the LPIPS distance
    of two images is ``(f0 - f1).square().sum(1)``."""

    def __init__(self, widths: tuple[int, ...] = FULL_WIDTHS):
        super().__init__()
        if len(widths) != len(CONVS_PER_STAGE):
            raise ValueError(f"VGG16 has {len(CONVS_PER_STAGE)} stages, got widths {widths}")
        self.widths = tuple(int(w) for w in widths)
        self.layers = nn.Module()
        k, cin = 1, 3
        for width, n in zip(self.widths, CONVS_PER_STAGE):
            for _ in range(n):
                setattr(self.layers, f"conv{k}", nn.Conv2d(cin, width, 3, padding=1))
                cin, k = width, k + 1
        for i, width in enumerate(self.widths):
            self.register_buffer(f"lpips{i}", torch.ones(width))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = (images / 127.5 - 1 - self.shift) / self.scale
        feats, k = [], 1
        for stage, n in enumerate(CONVS_PER_STAGE):
            if stage:
                x = F.max_pool2d(x, 2)
            for _ in range(n):
                x = F.relu(getattr(self.layers, f"conv{k}")(x))
                k += 1
            # vector_norm's gradient is 0 where all channels are 0 (sqrt(sum) would give NaN there)
            unit = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10)
            w = (getattr(self, f"lpips{stage}") / (x.shape[2] * x.shape[3])).sqrt()
            feats.append((unit * w.view(1, -1, 1, 1)).flatten(1))
        return torch.cat(feats, 1)


def random_vgg(widths: tuple[int, ...] = TINY_WIDTHS, seed: int = 0) -> VGG16LPIPS:
    """A VGG16LPIPS with seeded random weights (He-scaled convolutions, positive tap weights), for
    tests and ``--random`` runs."""
    g = torch.Generator().manual_seed(seed)
    net = VGG16LPIPS(widths)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith(".weight"):
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith(".bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.01)
            else:
                t.copy_(torch.rand(t.shape, generator=g) * 0.2)
    return net.eval().requires_grad_(False)


class ZeroPerceptual(nn.Module):
    """A perceptual network that returns zeros [N, 1]: the fixture's projector case replaces the
    VGG16 with it (the loss is then 0.1 MSE + the w regulariser)."""

    def forward(self, images: Tensor) -> Tensor:
        return images.new_zeros(images.shape[0], 1)
