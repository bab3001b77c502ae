"""PanoHead camera labels: the look-at pose sampler and the DiffPortrait360 condition orbit.

PanoHead's ``LookAtPoseSampler.sample(h, v, lookat, radius)`` places the camera on the sphere of
``radius`` around the world origin at ``theta = h`` and polar angle ``phi = arccos(1 - 2 v / pi)``
(``v`` clamped to [1e-5, pi - 1e-5]): origin = r (sin phi cos(pi - theta), cos phi,
sin phi sin(pi - theta)), looking at ``lookat`` with world +y up (OpenCV axes). ``h = v = pi/2``
is the frontal camera on +z; larger ``h`` moves toward +x; ``v < pi/2`` is above.
DiffPortrait360's 32 condition frames use ``h = 3.14/2 + 2*3.14*i/32``, ``v = 3.14/2`` (literal
3.14), look-at (0, 0, 0), radius 2.7, focal 4.2647.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

AUTHORS_PI = 3.14            # DiffPortrait360's orbit script writes 3.14, not pi
FOCAL = 4.2647
RADIUS = 2.7


def lookat_label(h: float | Tensor, v: float | Tensor, lookat: Sequence[float] = (0.0, 0.0, 0.0),
                 radius: float = RADIUS, focal: float = FOCAL) -> Tensor:
    """Camera labels [N, 25] (float64) of ``LookAtPoseSampler.sample(h, v, lookat, radius)`` with
    intrinsics (focal, focal, 0.5, 0.5); ``h``, ``v`` scalars or [N] tensors (radians)."""
    h = torch.as_tensor(h, dtype=torch.float64).reshape(-1)
    v = torch.as_tensor(v, dtype=torch.float64).reshape(-1).expand_as(h)
    v = v.clamp(1e-5, math.pi - 1e-5)
    phi = torch.arccos(1 - 2 * (v / math.pi))
    origin = torch.stack([radius * torch.sin(phi) * torch.cos(math.pi - h), radius * torch.cos(phi),
                          radius * torch.sin(phi) * torch.sin(math.pi - h)], -1)
    target = torch.as_tensor(lookat, dtype=torch.float64).reshape(1, 3)
    forward = target - origin
    forward = forward / forward.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(forward)
    right = -torch.linalg.cross(up, forward, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right, dim=-1)
    down = down / down.norm(dim=-1, keepdim=True)
    c2w = torch.eye(4, dtype=torch.float64).repeat(len(h), 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, down, forward, origin
    k = torch.tensor([focal, 0.0, 0.5, 0.0, focal, 0.5, 0.0, 0.0, 1.0], dtype=torch.float64)
    return torch.cat([c2w.reshape(-1, 16), k.expand(len(h), 9)], 1)


def diffportrait_orbit(frames: Sequence[int] | Tensor = range(32), count: int = 32) -> Tensor:
    """DiffPortrait360's condition cameras (the sphere32 orbit) for the given frame indices -> [N, 25] float64."""
    i = torch.as_tensor(list(frames) if not isinstance(frames, Tensor) else frames, dtype=torch.float64)
    return lookat_label(AUTHORS_PI / 2 + 2 * AUTHORS_PI * i / count, AUTHORS_PI / 2)


def orbit(count: int = 32, yaw_start_deg: float | None = None, yaw_end_deg: float | None = None,
          elevation_deg: float = 0.0, radius: float = RADIUS, lookat: Sequence[float] = (0.0, 0.0, 0.0),
          focal: float = FOCAL) -> Tensor:
    """``count`` cameras on an orbit -> [count, 25] float64.

    With every argument at its default this is exactly :func:`diffportrait_orbit` (the authors'
    literal-3.14 formula). Otherwise camera k sits at yaw ``start + k (end - start) / count``
    degrees (0 = in front on +z, 90 = on +x; the end is excluded, so 0..360 closes the loop) and at
    geometric ``elevation_deg`` above the horizon, on the sphere of ``radius`` around the world origin,
    looking at ``lookat``."""
    if count < 1:
        raise ValueError(f"orbit count {count} must be at least 1. Fix: e.g. --count 32")
    if radius <= 0:
        raise ValueError(f"orbit radius {radius} must be positive. Fix: e.g. --radius 2.7")
    if not -89.0 <= elevation_deg <= 89.0:
        raise ValueError(f"elevation {elevation_deg} deg is outside [-89, 89]. Fix: pass an angle above (+) or "
                         "below (-) the horizon")
    default = (yaw_start_deg is None and yaw_end_deg is None and elevation_deg == 0 and radius == RADIUS
               and tuple(lookat) == (0.0, 0.0, 0.0) and focal == FOCAL)
    if default:
        return diffportrait_orbit(range(count), count)
    start = 0.0 if yaw_start_deg is None else yaw_start_deg
    end = 360.0 if yaw_end_deg is None else yaw_end_deg
    yaw = torch.tensor([math.radians(start + k * (end - start) / count) for k in range(count)], dtype=torch.float64)
    phi = math.pi / 2 - math.radians(elevation_deg)            # geometric polar angle
    v = math.pi * (1 - math.cos(phi)) / 2                      # PanoHead's v for that angle
    return lookat_label(math.pi / 2 + yaw, v, lookat, radius, focal)
