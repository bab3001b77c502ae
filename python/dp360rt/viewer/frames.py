"""Frame requests of the viewer's WebSocket and the encoding of rendered frames.

A request is one JSON object, either an orbit camera around the fitted head::

    {"id": 7, "azimuth": 30.0, "elevation": 10.0, "radius": 2.7, "width": 256, "height": 256,
     "format": "jpeg", "quality": 85}

(degrees; azimuth 0 looks at the front, +90 from +x; ``radius`` defaults to the training cameras'
mean distance) or a full camera: ``{"id": 7, "camera": [25 numbers], "width": ..., "height": ...}``.
``format`` is ``jpeg`` (default) or ``png``.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..nerf.cameras import DEFAULT_FOCAL, DEFAULT_RADIUS, orbit_cameras

MAX_SIDE = 1024
MIN_SIDE = 16
MAX_MESSAGE = 64 * 1024        # bytes of one request: a camera is a few hundred


class FrameRequestError(ValueError):
    """A WebSocket frame request the viewer cannot serve; the message names the fix."""


@dataclass
class FrameRequest:
    id: Any
    width: int
    height: int
    fmt: str = "jpeg"
    quality: int = 85
    azimuth: float = 0.0
    elevation: float = 0.0
    radius: float | None = None
    camera: torch.Tensor | None = None          # [25] float64 when given as a full camera

    def orbit_camera(self, camera_info: dict[str, Any]) -> torch.Tensor:
        """The 25-number camera of this orbit request around the training cameras' look-at point."""
        radius = self.radius if self.radius is not None else float(camera_info.get("radius", DEFAULT_RADIUS))
        return orbit_cameras(1, radius, self.elevation, camera_info.get("lookat", (0.0, 0.0, 0.0)),
                             float(camera_info.get("fx", DEFAULT_FOCAL)), start_azimuth_deg=self.azimuth)[0]


def _number(msg: dict[str, Any], key: str, default: float | None, lo: float, hi: float) -> float | None:
    v = msg.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FrameRequestError(f"frame request field {key!r} must be a finite number, got {v!r}. "
                                f"Fix: send a number between {lo:g} and {hi:g}")
    if not lo <= v <= hi:
        raise FrameRequestError(f"frame request field {key!r} = {v:g} is out of range. Fix: send a number between "
                                f"{lo:g} and {hi:g}")
    return float(v)


def parse_frame_request(text: str) -> FrameRequest:
    """Parse and check one WebSocket message (see the module doc) -> :class:`FrameRequest`.
    Raises :class:`FrameRequestError` naming the bad field and the fix."""
    if len(text) > MAX_MESSAGE:
        raise FrameRequestError(f"a frame request of {len(text)} characters is too long (at most {MAX_MESSAGE}). "
                                'Fix: send one small JSON object, e.g. {"azimuth": 30, "width": 256}')
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise FrameRequestError("a frame request must be a JSON object. Fix: send e.g. "
                                '{"azimuth": 30, "elevation": 0, "width": 256, "height": 256}') from None
    if not isinstance(msg, dict):
        raise FrameRequestError("a frame request must be a JSON object. Fix: send e.g. "
                                '{"azimuth": 30, "elevation": 0, "width": 256, "height": 256}')
    w = int(_number(msg, "width", 256, MIN_SIDE, MAX_SIDE))        # type: ignore[arg-type]
    h = int(_number(msg, "height", w, MIN_SIDE, MAX_SIDE))         # type: ignore[arg-type]
    fmt = str(msg.get("format", "jpeg")).lower()
    if fmt not in ("jpeg", "png"):
        raise FrameRequestError(f"unknown frame format {fmt!r}. Fix: use \"jpeg\" or \"png\"")
    req = FrameRequest(id=msg.get("id"), width=w, height=h, fmt=fmt,
                       quality=int(_number(msg, "quality", 85, 1, 95)))  # type: ignore[arg-type]
    if "camera" in msg:
        cam = msg["camera"]
        ok = isinstance(cam, list) and len(cam) == 25 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in cam)
        if not ok:
            raise FrameRequestError("frame request field 'camera' must be 25 finite numbers (4x4 cam2world row-major, "
                                    "then 3x3 normalized intrinsics). Fix: send all 25 numbers or azimuth/elevation")
        req.camera = torch.tensor(cam, dtype=torch.float64)
    else:
        req.azimuth = float(_number(msg, "azimuth", 0.0, -1e6, 1e6)) % 360.0       # type: ignore[arg-type]
        req.elevation = float(_number(msg, "elevation", 0.0, -89.0, 89.0))          # type: ignore[arg-type]
        req.radius = _number(msg, "radius", None, 0.1, 100.0)
    return req


def encode_frame(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 85) -> bytes:
    """uint8 [H, W, 3] -> JPEG or PNG bytes."""
    from PIL import Image
    buf = io.BytesIO()
    img = Image.fromarray(rgb)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def read_png(path: str | Path) -> np.ndarray:
    """A stored view's PNG -> uint8 [H, W, 3]."""
    from PIL import Image
    with Image.open(path) as img:
        return np.ascontiguousarray(np.asarray(img.convert("RGB")))
