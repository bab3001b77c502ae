"""Built-in PanoHead generator specs: ``full`` (the released configuration, FACTS §1) and ``tiny``
(random-weight tests and demos: every code path, small widths).

A spec is what :func:`dp360rt.panohead.weights.build_generator` takes (see
:mod:`dp360rt.panohead.weights`). ``full``'s neural rendering resolution is 64 (a first-stage
snapshot; the release's value is stored in its pickle and wins when it is loaded).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

RENDERING = {
    "image_resolution": 512, "disparity_space_sampling": False, "clamp_mode": "softplus",
    "superresolution_module": "training.superresolution.SuperresolutionHybrid8XDC", "c_gen_conditioning_zero": False,
    "gpc_reg_prob": 0.8, "c_scale": 1.0, "superresolution_noise_mode": "none", "density_reg": 0.0,
    "density_reg_p_dist": 0.004, "reg_type": "l1", "decoder_lr_mul": 1.0, "decoder_activation": "none",
    "use_torgb_raw": True, "triplane_size": 256, "triplane_depth": 3, "trans_reg": 10.0, "use_background": True,
    "sr_antialias": True, "depth_resolution": 48, "depth_resolution_importance": 48, "ray_start": 2.25,
    "ray_end": 3.3, "box_warp": 1, "avg_camera_radius": 2.7, "avg_camera_pivot": [0, 0, 0.2],
}


def _spec(channel_base: int, channel_max: int, rendering: dict, resolution: int, sr_kwargs: dict) -> dict:
    return {"class_name": "training.triplane.TriPlaneGenerator",
            "init_kwargs": {"z_dim": 512, "w_dim": 512, "mapping_kwargs": {"num_layers": 2}, "architecture": "skip",
                            "channel_base": channel_base, "channel_max": channel_max,
                            "fused_modconv_default": "inference_only", "rendering_kwargs": rendering,
                            "num_fp16_res": 0, "sr_num_fp16_res": 4, "sr_kwargs": sr_kwargs, "conv_clamp": None,
                            "c_dim": 25, "img_resolution": 512, "img_channels": 3},
            "neural_rendering_resolution": resolution, "rendering_kwargs": dict(rendering, density_noise=0)}


FULL = _spec(32768, 512, RENDERING, 64, {"channel_base": 32768, "channel_max": 512,
                                          "fused_modconv_default": "inference_only"})
TINY = _spec(256, 16, dict(RENDERING, triplane_size=32, depth_resolution=8, depth_resolution_importance=8), 16,
             {"channel_base": 256, "channel_max": 16, "fused_modconv_default": "inference_only", "sr_widths": [16, 8]})
SPECS = {"full": FULL, "tiny": TINY}


def load_spec(name_or_path: str) -> dict:
    """A built-in spec (``full``, ``tiny``) or a JSON file holding one (``G_ema_init_kwargs.json``)."""
    if name_or_path in SPECS:
        return copy.deepcopy(SPECS[name_or_path])
    p = Path(name_or_path)
    if not p.is_file():
        raise ValueError(f"unknown PanoHead config {name_or_path!r}. Fix: use 'full', 'tiny' or a JSON spec file "
                         "(G_ema_init_kwargs.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not JSON ({e}). Fix: pass a G_ema_init_kwargs.json-style spec") from e
