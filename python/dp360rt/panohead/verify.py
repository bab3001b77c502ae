"""Recompute a PanoHead fixture set's golden cases and compare (``dp360rt panohead verify DIR``).

A fixture set (``fixtures/panohead/README.md``) holds the weights in one or more forms — the
seeded recipe (``init.json`` + ``buffers.pt``), the network pickle (``network-snapshot.pkl``, or
its zeroed ``.template.pkl.xz`` + ``.fill.json``) and ``G_ema.safetensors`` — and ``cases.pt``.
Every form present is loaded and must give bit-identical G_ema weights (one ``weights:FORM`` row
each); the cases run on the first. Each stored output is compared by
``max|got - ref| / max|ref|`` against its tolerance in ``cases.pt["_meta"]["tolerance"]``.
The ``projector`` case (PanoHead inversion, :mod:`dp360rt.invert.projector`) runs the W
projection with the recorded draws and a perceptual network that returns zeros, as the case was made.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import math
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..case_table import CaseResult, CaseTable
from .cameras import diffportrait_orbit
from .draws import Draws
from .generator import TriPlaneGenerator
from .pickle_reader import PanoHeadCheckpointError
from .weights import fixture_spec, generator_from_state, read_safetensors, recipe_state_dicts

DEFAULT_TOL = 3e-5

# `dp360rt panohead verify`'s table.
TABLE = CaseTable(24, (("rel err", "rel", 10, ".3e"), ("tol", "tol", 8, ".0e")))


def materialize_pickle(fixture_dir: str | Path, arrays: dict[str, dict[str, Tensor]] | None = None) -> bytes:
    """The set's network pickle, byte-exact: the zeroed template with each recipe tensor's
    float32 bytes written back at its recorded offset; the SHA-256 is checked."""
    d = Path(fixture_dir)
    fill = json.loads((d / "network-snapshot.fill.json").read_text())
    buf = bytearray(lzma.decompress((d / "network-snapshot.template.pkl.xz").read_bytes()))
    if len(buf) != fill["size"]:
        raise PanoHeadCheckpointError(f"{d}: pickle template is {len(buf)} bytes, fill.json says {fill['size']}")
    arrays = arrays or recipe_state_dicts(d, models=sorted({e["model"] for e in fill["fill"]}))
    for e in fill["fill"]:
        data = arrays[e["model"]][e["key"]].numpy().astype("<f4").tobytes()
        if len(data) != e["nbytes"]:
            raise PanoHeadCheckpointError(f"{d}: {e['model']}/{e['key']} has {len(data)} bytes, the template {e['nbytes']}")
        buf[e["offset"]:e["offset"] + e["nbytes"]] = data
    if hashlib.sha256(buf).hexdigest() != fill["sha256"]:
        raise PanoHeadCheckpointError(f"{d}: the rebuilt pickle does not match the recorded SHA-256")
    return bytes(buf)


def _weight_forms(d: Path) -> list[tuple[str, Callable[[], tuple[dict, dict]]]]:
    """(name, loader -> (state dict, spec)) for every weight form the set holds, fastest first."""
    forms = []
    if (d / "G_ema.safetensors").is_file():
        forms.append(("safetensors", lambda: read_safetensors(d / "G_ema.safetensors")))

    def from_pickle(path: Path):
        from .pickle_reader import read_network_pickle
        snap = read_network_pickle(path)
        return snap.state_dict("G_ema"), snap.spec("G_ema")

    if (d / "network-snapshot.pkl").is_file():
        forms.append(("pkl", lambda: from_pickle(d / "network-snapshot.pkl")))
    elif (d / "network-snapshot.template.pkl.xz").is_file() and (d / "init.json").is_file():
        def from_template():
            with tempfile.TemporaryDirectory() as t:
                p = Path(t) / "network-snapshot.pkl"
                p.write_bytes(materialize_pickle(d))
                return from_pickle(p)
        forms.append(("pkl(template)", from_template))
    if (d / "init.json").is_file():
        forms.append(("recipe", lambda: (recipe_state_dicts(d)["G_ema"], fixture_spec(d))))
    return forms


def load_fixture_generator(fixture_dir: str | Path, on_row: Callable[[CaseResult], None] | None = None
                           ) -> tuple[TriPlaneGenerator | None, list[CaseResult]]:
    """G_ema of a fixture set from its first weight form, and one row per form (all must agree)."""
    d = Path(fixture_dir)
    rows: list[CaseResult] = []
    first = None
    g = None
    forms = _weight_forms(d)
    if not forms:
        rows.append(CaseResult("weights", False, message="no weights: need G_ema.safetensors, network-snapshot.pkl "
                                                         "or init.json + buffers.pt"))
    for name, load in forms:
        try:
            sd, spec = load()
            if first is None:
                g = generator_from_state(spec, sd, f"{d} ({name})")
                first = (name, sd)
                row = CaseResult(f"weights:{name}", True, rel=0.0, tol=0.0,
                                 worst=f"{len(sd)} tensors (cases run on these)")
            else:
                diff = sorted(k for k in set(sd) | set(first[1])
                              if k not in sd or k not in first[1] or not torch.equal(sd[k], first[1][k]))
                row = CaseResult(f"weights:{name}", not diff, rel=0.0, tol=0.0,
                                 worst=f"{len(sd)} tensors, equal to {first[0]}",
                                 message=f"{len(diff)} tensors differ from {first[0]} (e.g. {', '.join(diff[:3])})" if diff else "")
        except (ValueError, OSError, KeyError) as e:
            row = CaseResult(f"weights:{name}", False, message=f"{type(e).__name__}: {e}")
        rows.append(row)
        if on_row:
            on_row(row)
    return g, rows


def _pool(t: Tensor, k: int) -> Tensor:
    return F.avg_pool2d(t, k)


def _crop(t: Tensor, yx) -> Tensor:
    y0, y1, x0, x1 = (int(v) for v in yx)
    return t[..., y0:y1, x0:x1]


def _synth(g: TriPlaneGenerator, ws: Tensor, c: Tensor, r: int, draws: list, crop_yx, forward_z=None,
           psi=None, cutoff=None) -> dict[str, Tensor]:
    trace: dict[str, Tensor] = {}
    d = Draws(recorded=draws)
    if forward_z is not None:
        out = g(forward_z, c, psi, cutoff, neural_rendering_resolution=r, noise_mode="const", draws=d, trace=trace)
    else:
        out = g.synthesis(ws, c, r, noise_mode="const", draws=d, trace=trace)
    if d.remaining:
        raise ValueError(f"{d.remaining} recorded draws were not used")
    got = dict(trace)
    got.update(out)
    if "bcg" in trace:
        got["bcg_pool8"] = _pool(trace["bcg"], 8)
    got["sr_rgb128_pool4"] = _pool(trace["sr_rgb128"], 4)
    got["sr_x128_pool8"] = _pool(trace["sr_x128"], 8)
    got["sr_block0_img_pool8"] = _pool(trace["sr_block0_img"], 8)
    got["image_pool8"] = _pool(out["image"], 8)
    got["image_crop"] = _crop(out["image"], crop_yx)
    if forward_z is not None:
        got["cam2world_used"] = trace["c_used"][:, :16].reshape(-1, 4, 4)
    return got


def compute_case(g: TriPlaneGenerator, name: str, case: dict, meta: dict) -> dict[str, Tensor]:
    """Recompute the outputs of one case (see the fixture README for each case's definition)."""
    i = case["inputs"]
    crop_yx = meta.get("crop_yx", (192, 256, 320, 384))
    if name == "projector":         # an optimisation: needs gradients
        return _projector(g, case)
    with torch.no_grad():
        if name == "mapping":
            z, c = i["z"], i["c"]
            psi, cut = float(i["truncation_psi"]), int(i["truncation_cutoff"])
            ppsi, pcut = float(i["partial_psi"]), int(i["partial_cutoff"])
            trace: dict = {}
            got = {"ws_psi1": g.mapping(z, c, 1, None, trace=trace), "c_embed": trace["c_embed"],
                   "ws_trunc": g.mapping(z, c, psi, cut), "ws_partial": g.mapping(z, c, ppsi, pcut)}
            got["c_new_psi1"], got["delta_c_psi1"] = g.apply_delta_c(z, i["c_target"])
            got["c_new_trunc"], got["delta_c_trunc"] = g.apply_delta_c(z, i["c_target"], psi, cut)
            return got
        if name == "planes":
            p = g.planes(i["ws"], noise_mode="const")
            out = case["outputs"]
            got = {"planes": p, "planes_pool16": _pool(p, 16)}
            if "planes_crop_origin" in out:
                y, x = (int(v) for v in out["planes_crop_origin"])
                h, w = out["planes_crop"].shape[-2:]
                got["planes_crop"] = p[..., y:y + h, x:x + w]
                got["planes_crop_origin"] = out["planes_crop_origin"]
            return got
        if name == "orbit32_cameras":
            return {"c": diffportrait_orbit(i["frame"]).float()}
        if name.startswith("synth_"):
            saved = g.rendering_kwargs["ray_start"]
            g.rendering_kwargs["ray_start"] = float(i["ray_start"])
            try:
                return _synth(g, i["ws"], i["c"], int(i["neural_rendering_resolution"]), case["draws"], crop_yx)
            finally:
                g.rendering_kwargs["ray_start"] = saved
        if name == "forward":
            # the render size is not an input of G(z, c): take it from the stored raw image
            raw = case["outputs"].get("image_raw")
            r = int(raw.shape[-1]) if isinstance(raw, Tensor) else g.neural_rendering_resolution
            return _synth(g, None, i["c"], r, case["draws"], crop_yx, forward_z=i["z"],
                          psi=float(i["truncation_psi"]), cutoff=int(i["truncation_cutoff"]))
    raise KeyError(name)


def _projector(g: TriPlaneGenerator, case: dict) -> dict[str, Tensor]:
    """The fixture's ``project()`` run: num_steps steps, VGG16 replaced by zeros, recorded draws
    (the pose sampler's two zero-weighted normals first, then three per step)."""
    import numpy as np
    from ..invert.projector import ProjectionLog, project_w, w_statistics
    from ..invert.vgg import ZeroPerceptual
    i = case["inputs"]
    if "target_uint8" in i:
        target = i["target_uint8"]
    else:
        target = torch.from_numpy(np.random.RandomState(int(i["target_seed"])).randint(0, 256, size=(3, 512, 512))
                                  .astype(np.uint8))
        if "target_sha256" in i and hashlib.sha256(target.numpy().tobytes()).hexdigest() != i["target_sha256"]:
            raise ValueError("the rebuilt target image does not match target_sha256")
    draws = list(case["draws"])
    if len(draws) < 2 or any(tuple(d["value"].shape) != (1, 1) for d in draws[:2]):
        raise ValueError("the projector case must start with the pose sampler's two randn (1, 1) draws")
    d = Draws(recorded=draws[2:])
    log = ProjectionLog()
    stats = w_statistics(g)
    w, c = project_w(g, target, i["c"], ZeroPerceptual(), steps=int(i["num_steps"]), draws=d,
                     ray_start=float(i["ray_start"]), log=log)
    if d.remaining:
        raise ValueError(f"{d.remaining} recorded draws were not used")
    return {"w_avg": stats.w_avg, "w_std": torch.tensor(stats.w_std, dtype=torch.float64), "c_after_delta": c,
            "lr": torch.tensor(log.lr, dtype=torch.float64), "loss": torch.tensor(log.loss),
            "w_grad": torch.stack(log.w_grad), "w_after_step": torch.stack(log.w_after_step),
            "w_out": torch.cat(log.w_after_step), "synth_image_pool8": torch.stack(log.images_pool8)}


def compare(name: str, got: dict[str, Tensor], ref: dict, tol: dict) -> CaseResult:
    """Worst scale-relative error over the stored outputs of a case."""
    worst_rel, worst_key, worst_tol, bad = -1.0, "", DEFAULT_TOL, []
    for key, r in ref.items():
        if not isinstance(r, Tensor):
            continue
        if key not in got:
            bad.append(f"{key} not computed")
            continue
        o = got[key].detach().cpu()
        if tuple(o.shape) != tuple(r.shape):
            bad.append(f"{key} shape {tuple(o.shape)} vs {tuple(r.shape)}")
            continue
        t = float(tol.get(key, DEFAULT_TOL))
        if not r.is_floating_point():
            rel = 0.0 if torch.equal(o.to(r.dtype), r) else math.inf
        else:
            scale = float(r.double().abs().max())
            err = float((o.double() - r.double()).abs().max())
            rel = err / scale if scale > 0 else err
            if not math.isfinite(rel):
                rel = math.inf
        if rel > t:
            bad.append(f"{key} {rel:.2e} > {t:.0e}")
        if rel / t > worst_rel / worst_tol or worst_rel < 0:
            worst_rel, worst_key, worst_tol = rel, key, t
    if bad:
        return CaseResult(name, False, rel=max(worst_rel, 0.0), tol=worst_tol, message="; ".join(bad[:4]))
    return CaseResult(name, True, rel=worst_rel, tol=worst_tol, worst=worst_key)


def verify(fixture_dir: str | Path, skip: tuple[str, ...] = (), on_row: Callable[[CaseResult], None] | None = None
           ) -> list[CaseResult]:
    """Verify a PanoHead fixture set; one :class:`CaseResult` per weight form and per case (in file order)."""
    d = Path(fixture_dir)
    g, rows = load_fixture_generator(d, on_row)

    def emit(r: CaseResult) -> None:
        rows.append(r)
        if on_row:
            on_row(r)

    try:
        cases = torch.load(d / "cases.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        emit(CaseResult("cases.pt", False, message=f"{d / 'cases.pt'} not found"))
        return rows
    except Exception as e:  # a corrupt file: report, never crash
        emit(CaseResult("cases.pt", False, message=f"unreadable ({type(e).__name__}: {e})"))
        return rows
    meta = cases.get("_meta", {}) if isinstance(cases, dict) else {}
    tols = meta.get("tolerance", {})
    for name, case in (cases.items() if isinstance(cases, dict) else []):
        if name == "_meta" or name in skip:
            continue
        if g is None:
            emit(CaseResult(name, False, message="no usable weights"))
            continue
        try:
            got = compute_case(g, name, case, meta)
            emit(compare(name, got, case["outputs"], tols.get(name, {})))
        except KeyError as e:
            emit(CaseResult(name, False, message=f"unknown case or missing input {e}"))
        except (ValueError, RuntimeError, TypeError) as e:
            emit(CaseResult(name, False, message=f"{type(e).__name__}: {e}"))
    return rows
