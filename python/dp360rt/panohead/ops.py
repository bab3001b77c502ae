"""StyleGAN2's custom ops in plain PyTorch, written from their definitions.

* :func:`bias_act` — add a per-channel bias, apply an activation, scale by a gain, clamp.
* :func:`upfirdn2d` — zero-insertion up-sampling, padding, 2-D FIR filtering, down-sampling.
* :func:`conv2d_resample` — a convolution fused with 2x FIR up-sampling (the cases StyleGAN2's
  synthesis network uses: stride 1, or up-sampling by a transposed convolution followed by the
  low-pass filter).
* :func:`modulated_conv2d` — style modulation, optional demodulation and noise, fused (one grouped
  convolution over the batch) or unfused (scale activations before and after the convolution).

The operations follow the order of arithmetic of NVlabs' reference kernels so float32 results
agree to rounding. All tensors are NCHW.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LRELU_GAIN = math.sqrt(2)
ACT_GAIN = {"linear": 1.0, "lrelu": LRELU_GAIN}


def fir_filter(taps=(1, 3, 3, 1)) -> Tensor:
    """The separable low-pass filter as a normalized 2-D kernel: outer(taps, taps) / sum, float32 [k, k]."""
    t = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(t, t)
    return f / f.sum()


def bias_act(x: Tensor, b: Tensor | None = None, act: str = "linear", gain: float | None = None,
             clamp: float | None = None) -> Tensor:
    """``clamp(act(x + b) * gain, -clamp, clamp)`` with the bias broadcast over dim 1.

    ``act`` is ``linear`` or ``lrelu`` (slope 0.2); ``gain`` defaults to the activation's own
    (1 or sqrt 2). Any shape [N, C, ...]."""
    if act not in ACT_GAIN:
        raise ValueError(f"activation {act!r} is not supported (linear, lrelu)")
    if b is not None:
        x = x + b.reshape([-1 if i == 1 else 1 for i in range(x.ndim)])
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
    gain = ACT_GAIN[act] if gain is None else float(gain)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def upfirdn2d(x: Tensor, f: Tensor, up: int = 1, down: int = 1, padding=(0, 0, 0, 0), gain: float = 1.0) -> Tensor:
    """Up-sample by inserting ``up - 1`` zeros after every pixel, pad (negative pads crop), convolve
    every channel with the 2-D filter ``f`` times ``gain``, keep every ``down``-th pixel.

    x: [N, C, H, W]; f: [kh, kw] float32; padding (x0, x1, y0, y1) in up-sampled pixels."""
    n, c, h, w = x.shape
    px0, px1, py0, py1 = padding
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    k = (f * (gain ** (f.ndim / 2))).to(x.dtype).flip([0, 1])        # convolution, not correlation
    x = F.conv2d(x, k[None, None].repeat(c, 1, 1, 1), groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: Tensor, f: Tensor, up: int = 2) -> Tensor:
    """FIR up-sampling by ``up`` keeping the signal's DC gain: [N, C, H, W] -> [N, C, up*H, up*W]."""
    kw = f.shape[-1]
    p = [(kw + up - 1) // 2, (kw - up) // 2]
    return upfirdn2d(x, f, up=up, padding=(p[0], p[1], p[0], p[1]), gain=up * up)


def conv2d_resample(x: Tensor, w: Tensor, f: Tensor | None = None, up: int = 1, padding: int = 0,
                    groups: int = 1) -> Tensor:
    """Correlation of x [N, I*groups, H, W] with w [O, I, k, k] (as ``F.conv2d``), optionally
    up-sampled by ``up`` with the FIR filter ``f`` in one step: a stride-``up`` transposed
    convolution, then the filter (gain ``up^2``). Output [N, O, H*up, W*up] ("same" padding)."""
    if up == 1:
        return F.conv2d(x, w, padding=padding, groups=groups)
    out_ch, in_per_group, kh, kw = w.shape
    fw = f.shape[-1]
    # padding of the filtered, up-sampled signal after the transposed convolution's own growth
    p0 = padding + (fw + up - 1) // 2 - (kw - 1)
    p1 = padding + (fw - up) // 2 - (kw - up)
    if groups == 1:
        wt = w.transpose(0, 1)
    else:
        wt = w.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
        wt = wt.reshape(groups * in_per_group, out_ch // groups, kh, kw)
    # the layer asks for a true convolution when up-sampling; the transpose of a correlation is one
    x = F.conv_transpose2d(x, wt, stride=up, groups=groups)
    return upfirdn2d(x, f, padding=(p0, p1, p0, p1), gain=up * up)


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, noise: Tensor | None = None, up: int = 1,
                     padding: int = 0, resample_filter: Tensor | None = None, demodulate: bool = True,
                     fused: bool = True) -> Tensor:
    """StyleGAN2's modulated convolution.

    x [N, I, H, W], weight [O, I, k, k], styles [N, I], noise broadcastable to [N, O, H', W'] (added
    after the convolution). ``demodulate`` normalizes each output channel's modulated weights
    (eps 1e-8). ``fused`` runs one grouped convolution with per-sample weights; otherwise the
    activations are scaled (same math, the form used when training). Returns [N, O, H*up, W*up]."""
    n = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    w = dcoefs = None
    if demodulate or fused:
        w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)             # [N, O, I, k, k]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()              # [N, O]
    if not fused:
        x = x * styles.to(x.dtype).reshape(n, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), resample_filter, up=up, padding=padding)
        if demodulate and noise is not None:
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(n, -1, 1, 1))
        if demodulate:
            return x * dcoefs.to(x.dtype).reshape(n, -1, 1, 1)
        if noise is not None:
            return x + noise.to(x.dtype)
        return x
    if demodulate:
        w = w * dcoefs.reshape(n, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    x = conv2d_resample(x, w.reshape(-1, in_ch, kh, kw).to(x.dtype), resample_filter, up=up, padding=padding, groups=n)
    x = x.reshape(n, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise
    return x
