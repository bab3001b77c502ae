"""A small z-buffer triangle rasterizer with UV texture lookup (numpy), to render an exported GLB
from the training/held-out cameras and score it (tests, ``benchmarks/bench_assets.py``). Not
fast: a Python loop over triangles, each filling its pixel box vectorised."""
from __future__ import annotations

import numpy as np
import torch

from .cameras import project_points


def render_textured_mesh(mesh: dict[str, np.ndarray], camera, width: int, height: int,
                         background=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Render {"vertices" [V, 3], "faces" [T, 3], "uv" [V, 2], "texture" uint8 [S, S, 3]} from
    a 25-number camera -> rgb [H, W, 3] float32 in [0, 1]. Nearest texel lookup, perspective
    correct UVs, no lighting (the texture holds the field's radiance)."""
    v = np.asarray(mesh["vertices"], np.float64)
    f = np.asarray(mesh["faces"], np.int64)
    uv = np.asarray(mesh["uv"], np.float64)
    tex = np.asarray(mesh["texture"], np.float32) / 255.0
    S = tex.shape[0]
    px, z = project_points(torch.as_tensor(camera, dtype=torch.float64), torch.from_numpy(v), width, height)
    px, z = px.numpy(), z.numpy()
    xy = px[:, ::-1]                                   # (column, row)
    zbuf = np.full((height, width), np.inf)
    out = np.empty((height, width, 3), np.float32)
    out[:] = np.asarray(background, np.float32)
    for a, b, c in f:
        if min(z[a], z[b], z[c]) <= 1e-3:
            continue
        pa, pb, pc = xy[a], xy[b], xy[c]
        x0 = max(int(np.ceil(min(pa[0], pb[0], pc[0]))), 0)
        x1 = min(int(np.floor(max(pa[0], pb[0], pc[0]))), width - 1)
        y0 = max(int(np.ceil(min(pa[1], pb[1], pc[1]))), 0)
        y1 = min(int(np.floor(max(pa[1], pb[1], pc[1]))), height - 1)
        if x1 < x0 or y1 < y0:
            continue
        d = (pb[1] - pc[1]) * (pa[0] - pc[0]) + (pc[0] - pb[0]) * (pa[1] - pc[1])
        if abs(d) < 1e-12:
            continue
        gy, gx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
        w0 = ((pb[1] - pc[1]) * (gx - pc[0]) + (pc[0] - pb[0]) * (gy - pc[1])) / d
        w1 = ((pc[1] - pa[1]) * (gx - pc[0]) + (pa[0] - pc[0]) * (gy - pc[1])) / d
        w2 = 1 - w0 - w1
        ins = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        if not ins.any():
            continue
        w0, w1, w2, gy, gx = w0[ins], w1[ins], w2[ins], gy[ins], gx[ins]
        # perspective-correct: interpolate 1/z-weighted attributes
        iz = w0 / z[a] + w1 / z[b] + w2 / z[c]
        depth = 1.0 / iz
        near = depth < zbuf[gy, gx]
        if not near.any():
            continue
        gy, gx, depth = gy[near], gx[near], depth[near]
        q0, q1, q2 = (w0[near] / z[a]) * depth, (w1[near] / z[b]) * depth, (w2[near] / z[c]) * depth
        t = q0[:, None] * uv[a] + q1[:, None] * uv[b] + q2[:, None] * uv[c]
        col = np.clip((t[:, 0] * S).astype(np.int64), 0, S - 1)
        row = np.clip(((1.0 - t[:, 1]) * S).astype(np.int64), 0, S - 1)
        zbuf[gy, gx] = depth
        out[gy, gx] = tex[row, col]
    return torch.from_numpy(out)
