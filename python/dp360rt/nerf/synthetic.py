"""Analytic test scenes inside ``[-0.5, 0.5]^3`` with exact (or finely integrated) renders, white
background; for tests and benchmarks.

* ``blobs``: coloured Gaussian density blobs, volume-rendered by midpoint quadrature with 256
  steps through the box (about ten steps per blob width).
* ``blobs_wide``: larger blobs spread over the whole box (filling the 18.8 deg field of view).
* ``sphere``: an opaque sphere with a smooth longitude/latitude colour texture and Lambertian
  shading from a fixed light (view independent), ray-traced exactly.
* ``head``: a head-like group of opaque ellipsoids with a band-limited random texture.
* ``checker``: fine texture: an opaque box with a checkerboard of 0.06-unit cells (about 6 pixels at
  64x64 from radius 2.7) and a sphere with stripes of period 0.04, ray-traced exactly.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .cameras import camera_rays, sphere32_cameras, write_views

SCENES = ("blobs", "blobs_wide", "sphere", "checker", "head")


def _hit_box(o: Tensor, d: Tensor, lo: float, hi: float):
    dd = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t0, t1 = (lo - o) / dd, (hi - o) / dd
    tn = torch.minimum(t0, t1).amax(-1)
    tf = torch.maximum(t0, t1).amin(-1)
    return tn, tf


def _hit_sphere(o: Tensor, d: Tensor, c: Tensor, r: float) -> Tensor:
    oc = o - c
    b = (oc * d).sum(-1)
    q = (oc * oc).sum(-1) - r * r
    disc = b * b - q
    t = -b - torch.sqrt(disc.clamp_min(0))
    return torch.where((disc > 0) & (t > 0), t, torch.full_like(t, math.inf))


class Scene:
    name = "scene"

    def render_rays(self, o: Tensor, d: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def render(self, camera: Tensor, width: int, height: int) -> Tensor:
        o, d = camera_rays(camera, width, height, dtype=torch.float64)
        return self.render_rays(o.reshape(-1, 3), d.reshape(-1, 3)).reshape(height, width, 3).float()


class Blobs(Scene):
    name = "blobs"

    def __init__(self, seed: int = 0, n: int = 10, spread: float = 0.36, size: float = 0.05):
        g = torch.Generator().manual_seed(seed)
        self.mu = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * spread
        self.s = size * (0.8 + 1.0 * torch.rand(n, generator=g, dtype=torch.float64))
        self.a = 30.0 + 60.0 * torch.rand(n, generator=g, dtype=torch.float64)
        self.c = torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.9 + 0.05

    def field(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, s, a, c = (v.to(x.dtype) for v in (self.mu, self.s, self.a, self.c))
        d2 = torch.cdist(x, mu) ** 2                                              # [N, n]
        g = a * torch.exp(-(d2 / (2 * s ** 2)).clamp_max(60.0))   # no denormals (slow on CPU)
        sigma = g.sum(-1)
        rgb = (g @ c) / sigma.clamp_min(1e-12)[:, None]
        return sigma, rgb

    def render_rays(self, o: Tensor, d: Tensor, steps: int = 256) -> Tensor:
        out = torch.ones(o.shape[0], 3, dtype=torch.float64)
        tn, tf = _hit_box(o, d, -0.5, 0.5)
        tn = tn.clamp_min(0)
        for s in range(0, o.shape[0], 1024):
            on, dn, a, b = o[s:s + 1024].float(), d[s:s + 1024].float(), tn[s:s + 1024].float(), tf[s:s + 1024].float()
            hit = b > a
            if not hit.any():
                continue
            dt = ((b - a).clamp_min(0) / steps)[:, None]
            t = a[:, None] + (torch.arange(steps, dtype=torch.float32) + 0.5)[None] * dt
            x = on[:, None] + dn[:, None] * t[..., None]
            sig, rgb = self.field(x.reshape(-1, 3))
            tau = sig.view(-1, steps) * dt
            trans = torch.exp(-(torch.cumsum(tau, 1) - tau).clamp_max(60.0))
            w = trans * (1 - torch.exp(-tau))
            col = (w[..., None] * rgb.view(-1, steps, 3)).sum(1)
            out[s:s + 1024] = (col + (1 - w.sum(1))[:, None]).double()
        return out


def _shade(n: Tensor, albedo: Tensor) -> Tensor:
    light = torch.tensor([0.4, 0.7, 0.6], dtype=torch.float64)
    light = light / light.norm()
    lam = (n * light).sum(-1).clamp_min(0)
    return albedo * (0.35 + 0.65 * lam)[:, None]


class TexturedSphere(Scene):
    name = "sphere"

    def __init__(self, radius: float = 0.25):
        self.r = radius

    def render_rays(self, o: Tensor, d: Tensor) -> Tensor:
        c = torch.zeros(3, dtype=torch.float64)
        t = _hit_sphere(o, d, c, self.r)
        hit = torch.isfinite(t)
        out = torch.ones(o.shape[0], 3, dtype=torch.float64)
        if hit.any():
            p = o[hit] + d[hit] * t[hit, None]
            n = p / self.r
            lon = torch.atan2(n[:, 0], n[:, 2])
            lat = torch.asin(n[:, 1].clamp(-1, 1))
            albedo = torch.stack([0.5 + 0.4 * torch.sin(3 * lon), 0.5 + 0.4 * torch.cos(4 * lat + lon),
                                  0.5 + 0.4 * torch.sin(2 * lon - 3 * lat)], -1)
            out[hit] = _shade(n, albedo)
        return out


class Checker(Scene):
    name = "checker"
    lo = (-0.22, -0.2, -0.12)
    hi = (0.02, 0.05, 0.12)
    centre = (0.12, 0.08, 0.05)
    radius = 0.13
    cell = 0.06
    period = 0.04

    def render_rays(self, o: Tensor, d: Tensor) -> Tensor:
        out = torch.ones(o.shape[0], 3, dtype=torch.float64)
        lo = torch.tensor(self.lo, dtype=torch.float64)
        hi = torch.tensor(self.hi, dtype=torch.float64)
        dd = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        t0, t1 = (lo - o) / dd, (hi - o) / dd
        tmin = torch.minimum(t0, t1)
        tn, face = tmin.max(-1)
        tf = torch.maximum(t0, t1).amin(-1)
        tb = torch.where((tf > tn) & (tn > 0), tn, torch.full_like(tn, math.inf))
        cs = torch.tensor(self.centre, dtype=torch.float64)
        ts = _hit_sphere(o, d, cs, self.radius)
        hb = torch.isfinite(tb) & (tb <= ts)
        if hb.any():
            p = o[hb] + d[hb] * tb[hb, None]
            f = face[hb]
            n = torch.zeros_like(p)
            n[torch.arange(p.shape[0]), f] = -torch.sign(d[hb].gather(1, f[:, None])[:, 0])
            cellk = torch.floor(p / self.cell).long()
            cellk[torch.arange(p.shape[0]), f] = 0                 # checker in the face's own two axes
            k = cellk.sum(-1) % 2
            albedo = torch.where(k[:, None] == 0, torch.tensor([0.9, 0.2, 0.15], dtype=torch.float64),
                                 torch.tensor([0.15, 0.25, 0.8], dtype=torch.float64))
            out[hb] = _shade(n, albedo)
        hs = torch.isfinite(ts) & (ts < tb)
        if hs.any():
            p = o[hs] + d[hs] * ts[hs, None]
            n = (p - cs) / self.radius
            stripe = 0.5 + 0.5 * torch.sin(2 * math.pi * (p[:, 1] + 0.5 * p[:, 0]) / self.period)
            albedo = torch.stack([0.2 + 0.7 * stripe, 0.8 - 0.5 * stripe, 0.3 + 0.2 * stripe], -1)
            out[hs] = _shade(n, albedo)
        return out


def _hit_ellipsoid(o: Tensor, d: Tensor, c: Tensor, radii: Tensor) -> Tensor:
    s = 1.0 / radii
    oo, dd = (o - c) * s, d * s
    a = (dd * dd).sum(-1)
    b = (oo * dd).sum(-1)
    q = (oo * oo).sum(-1) - 1.0
    disc = b * b - a * q
    t = (-b - torch.sqrt(disc.clamp_min(0))) / a
    return torch.where((disc > 0) & (t > 0), t, torch.full_like(t, math.inf))


class Head(Scene):
    """A head-like arrangement of opaque ellipsoids (head, nose, ears) with a band-limited random
    texture (periods of 5 to 10 pixels at 64x64) and Lambertian shading."""
    name = "head"

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.parts = [((0.0, 0.02, 0.0), (0.2, 0.26, 0.22)), ((0.0, -0.02, 0.22), (0.05, 0.06, 0.06)),
                      ((0.2, 0.0, 0.0), (0.04, 0.07, 0.05)), ((-0.2, 0.0, 0.0), (0.04, 0.07, 0.05))]
        k = 12
        dirs = torch.randn(k, 3, generator=g, dtype=torch.float64)
        self.freq = dirs / dirs.norm(dim=1, keepdim=True) * (2 * math.pi / (0.05 + 0.05 * torch.rand(k, 1, generator=g,
                                                                                                      dtype=torch.float64)))
        self.phase = torch.rand(k, generator=g, dtype=torch.float64) * 2 * math.pi
        self.amp = torch.rand(k, 3, generator=g, dtype=torch.float64) * 0.12

    def render_rays(self, o: Tensor, d: Tensor) -> Tensor:
        best = torch.full((o.shape[0],), math.inf, dtype=torch.float64)
        idx = torch.full((o.shape[0],), -1, dtype=torch.long)
        for i, (c, r) in enumerate(self.parts):
            t = _hit_ellipsoid(o, d, torch.tensor(c, dtype=torch.float64), torch.tensor(r, dtype=torch.float64))
            closer = t < best
            best = torch.where(closer, t, best)
            idx = torch.where(closer, torch.full_like(idx, i), idx)
        out = torch.ones(o.shape[0], 3, dtype=torch.float64)
        hit = torch.isfinite(best)
        if hit.any():
            p = o[hit] + d[hit] * best[hit, None]
            part = idx[hit]
            cs = torch.tensor([c for c, _ in self.parts], dtype=torch.float64)[part]
            rs = torch.tensor([r for _, r in self.parts], dtype=torch.float64)[part]
            n = (p - cs) / rs ** 2
            n = n / n.norm(dim=1, keepdim=True)
            skin = torch.tensor([0.85, 0.62, 0.5], dtype=torch.float64)
            hair = torch.tensor([0.3, 0.18, 0.1], dtype=torch.float64)
            is_hair = ((p[:, 1] > 0.1 - 0.08 * p[:, 2].clamp_min(0) / 0.22) & (part == 0)).to(torch.float64)[:, None]
            base = skin * (1 - is_hair) + hair * is_hair
            tex = (torch.sin(p @ self.freq.t() + self.phase)[:, :, None] * self.amp[None]).sum(1)
            out[hit] = _shade(n, (base + tex).clamp(0.02, 0.98))
        return out


def make_scene(name: str, seed: int = 0) -> Scene:
    if name == "blobs":
        return Blobs(seed)
    if name == "blobs_wide":
        return Blobs(seed, n=12, spread=0.5, size=0.08)
    if name == "sphere":
        return TexturedSphere()
    if name == "head":
        return Head(seed)
    if name == "checker":
        return Checker()
    raise ValueError(f"unknown synthetic scene {name!r}; choose one of {SCENES}")


def render_views(scene: Scene | str, cameras: Tensor | None = None, size: int = 64) -> tuple[list[Tensor], Tensor]:
    """Ground-truth views of a scene (default: the sphere32 orbit) -> (images [H, W, 3], cameras)."""
    sc = make_scene(scene) if isinstance(scene, str) else scene
    cams = sphere32_cameras() if cameras is None else cameras
    return [sc.render(c, size, size) for c in cams], cams


def write_scene(folder: str | Path, scene: Scene | str, cameras: Tensor | None = None, size: int = 64,
                indices: Sequence[int] | None = None) -> Path:
    """Render a scene and write it as a views folder (optionally only ``indices`` of the cameras)."""
    imgs, cams = render_views(scene, cameras, size)
    idx = list(range(len(imgs))) if indices is None else list(indices)
    return write_views(folder, [imgs[i] for i in idx], cams[idx], [f"{i:03d}.png" for i in idx])
