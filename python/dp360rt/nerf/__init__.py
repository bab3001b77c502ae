"""Instant NeRF: fit the generated views (also while they arrive), render any viewpoint.

* :mod:`.cameras`: the 25-number PanoHead/EG3D camera convention (OpenCV axes, normalized
  intrinsics, world +y up), rays, the sphere32 orbit, ``cameras.json`` views folders.
* :mod:`.field`: :class:`GridField` (sparse voxel grid, the CPU default) and :class:`HashField`
  (instant-ngp's multiresolution hash grid + MLPs, the CUDA default; tiny-cuda-nn / Triton /
  PyTorch encodings).
* :mod:`.model`: :class:`Nerf` (fit, render, save/load) and :class:`NerfConfig`.
* :mod:`.fit`: :class:`Fitter` (incremental ``add_view`` while training).
* :mod:`.render`: volume rendering with occupancy skipping and early termination.
* :mod:`.video`: orbit videos (MP4 / GIF / PNG frames).
* :mod:`.mesh`: marching-cubes meshes (PLY / OBJ).
* :mod:`.cli`: ``dp360rt nerf fit|render|video|mesh|scene``.
"""
from .cameras import (CameraError, camera_rays, load_views, look_at, orbit_cameras, project_points,
                      read_cameras_json, sphere32_cameras, write_cameras_json, write_views)
from .fit import Fitter
from .model import Nerf, NerfConfig, psnr

__all__ = ["CameraError", "Fitter", "Nerf", "NerfConfig", "camera_rays", "load_views", "look_at", "orbit_cameras",
           "project_points", "psnr", "read_cameras_json", "sphere32_cameras", "write_cameras_json", "write_views"]
