"""Orbit videos of a fitted field: :func:`orbit_video` renders an orbit (by default the training
cameras' mean radius, elevation and focal length, 120 frames) and writes ``.mp4`` through
``imageio`` + ``imageio-ffmpeg`` (optional; a clear error names them when missing), ``.gif``
through Pillow, or one PNG per frame into a directory (any other path).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .cameras import orbit_cameras, save_image

if TYPE_CHECKING:  # pragma: no cover
    from .model import Nerf


MAX_FRAMES = 100_000                # an hour at 30 fps


def orbit_frames(nerf: "Nerf", frames: int = 120, width: int | None = None, height: int | None = None,
                 radius: float | None = None, elevation_deg: float | None = None) -> list[torch.Tensor]:
    """Render ``frames`` cameras evenly spaced in azimuth over 360 deg (radius, elevation and
    focal length default to the training cameras' means) -> frames [H, W, 3] in [0, 1] on the CPU."""
    from ..io.checks import positive_int
    frames = positive_int(frames, "frames", MAX_FRAMES)
    info = nerf.camera_info or {}
    cams = orbit_cameras(frames, radius if radius is not None else info.get("radius", 2.7),
                         elevation_deg if elevation_deg is not None else info.get("elevation_deg", 0.0),
                         info.get("lookat", (0.0, 0.0, 0.0)), info.get("fx", 4.2647))
    return [nerf.render(c, width, height)["rgb"] for c in cams]


def write_video(frames: list[torch.Tensor], path: str | Path, fps: int = 30) -> Path:
    """``.mp4`` (imageio-ffmpeg), ``.gif`` (Pillow) or a directory of PNG frames."""
    p = Path(path)
    arrs = [(f.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8) for f in frames]
    suffix = p.suffix.lower()
    try:
        if suffix in (".mp4", ".mov", ".mkv", ".avi"):
            try:
                import imageio.v2 as imageio
                import imageio_ffmpeg  # noqa: F401
            except ImportError:
                raise ImportError(f"writing {p.name} needs imageio and imageio-ffmpeg. Fix: pip install imageio "
                                   "imageio-ffmpeg, or write a .gif or a folder of PNG frames instead") from None
            p.parent.mkdir(parents=True, exist_ok=True)
            # libx264 wants even sizes: pad by one pixel where needed
            h, w = arrs[0].shape[:2]
            ph, pw = h % 2, w % 2
            if ph or pw:
                arrs = [np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="edge") for a in arrs]
            with imageio.get_writer(str(p), fps=fps, codec="libx264", quality=8, macro_block_size=1) as wr:
                for a in arrs:
                    wr.append_data(a)
        elif suffix == ".gif":
            from PIL import Image
            p.parent.mkdir(parents=True, exist_ok=True)
            ims = [Image.fromarray(a) for a in arrs]
            ims[0].save(p, save_all=True, append_images=ims[1:], duration=max(1, round(1000 / fps)), loop=0)
        else:
            p.mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(frames):
                save_image(f, p / f"{i:04d}.png")
    except OSError as e:
        raise OSError(f"cannot write {p}: {e.strerror or e}. Fix: choose a writable output path") from e
    return p


def orbit_video(nerf: "Nerf", path: str | Path, frames: int = 120, fps: int = 30, width: int | None = None,
                height: int | None = None, radius: float | None = None, elevation_deg: float | None = None) -> Path:
    """Render an orbit (see :func:`orbit_frames`) and write it to ``path`` (see :func:`write_video`).
    A missing video writer is reported before any frame is rendered."""
    from ..io.checks import positive_int
    frames = positive_int(frames, "frames", MAX_FRAMES)       # before rendering any
    fps = positive_int(fps, "fps", 1000)
    suffix = Path(path).suffix.lower()
    if suffix in (".mp4", ".mov", ".mkv", ".avi"):
        try:                                            # fail before rendering, not after
            import imageio  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ImportError(f"writing {Path(path).name} needs imageio and imageio-ffmpeg. Fix: pip install imageio "
                               "imageio-ffmpeg, or write a .gif or a folder of PNG frames instead") from None
    return write_video(orbit_frames(nerf, frames, width, height, radius, elevation_deg), path, fps)
