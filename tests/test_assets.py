"""Portable assets (dp360rt.nerf.assets / glb / splat / splat_render): the GLB validates and keeps
its budgets, the splat .ply has the standard layout, the rasterizer matches its brute-force
twin, refinement helps, and bad input fails with named errors before any work."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dp360rt.nerf.assets import NoNerfError, export_glb, export_splat, find_nerf
from dp360rt.nerf.glb import read_glb
from dp360rt.nerf.mesh_render import render_textured_mesh
from dp360rt.nerf.model import Nerf, psnr
from dp360rt.nerf.splat import PLY_PROPERTIES, EmptyFieldError, init_splat, read_splat_ply
from dp360rt.nerf.splat_refine import refine_splat
from dp360rt.nerf.splat_render import render_splat, render_splat_reference
from dp360rt.nerf.synthetic import render_views
from dp360rt.io.results import OutputError

ROOT = Path(__file__).resolve().parents[1]
TRAIN = list(range(0, 32, 2))
HOLD = [5, 13, 21, 29]
STEPS_32 = 150          # refinement steps of the quality guard
MAX_GAP_32 = 3.5        # dB the guard allows below the NeRF (measured 2.9; voxel init + 100 steps: 6.4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder: 64^2 head views + cameras.json, and a short CPU fit in nerf/."""
    from dp360rt.nerf.cameras import write_views
    imgs, cams = render_views("head", size=64)
    d = tmp_path_factory.mktemp("run")
    write_views(d, [imgs[i] for i in TRAIN], cams[TRAIN])
    nerf = Nerf(device="cpu", grid_res=64)
    nerf.fit([imgs[i] for i in TRAIN], cams[TRAIN], steps=200, progress=False)
    nerf.save(d / "nerf")
    return d, nerf, imgs, cams


@pytest.fixture(scope="module")
def glb(run, tmp_path_factory):
    d, nerf, _, _ = run
    out = tmp_path_factory.mktemp("glb") / "head.glb"
    info = nerf.export_glb(out, triangles=3000, texture_size=128, resolution=64)
    return out, info


@pytest.fixture(scope="module")
def splat(run, tmp_path_factory):
    d, nerf, _, _ = run
    out = tmp_path_factory.mktemp("splat") / "head.ply"
    info = nerf.export_splat(out, views=d, steps=40, resolution=40)
    return out, info


def _node_validator():
    node = shutil.which("node")
    if node is None or not (ROOT / ".ci" / "node" / "node_modules" / "gltf-validator").is_dir():
        return None
    return node


def test_glb_validates_and_keeps_budgets(glb):
    path, info = glb
    assert info["triangles"] <= 3000 and path.stat().st_size == info["bytes"]
    m = read_glb(path)
    assert m["faces"].shape[0] <= 3000 and m["faces"].shape[0] > 100
    assert m["texture"].shape == (128, 128, 3)
    assert m["uv"].min() >= 0.0 and m["uv"].max() <= 1.0
    assert m["texture"].std() > 5             # a baked texture, not a flat fill
    node = _node_validator()
    if node is None:
        pytest.skip("node or .ci/node/node_modules/gltf-validator missing (bash .ci/run installs it): "
                    "the structural checks above ran, the Khronos validator did not")
    out = subprocess.run([node, str(ROOT / ".ci" / "validate_gltf.mjs"), str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["numErrors"] == 0, report["messages"]


def test_glb_renders_close_to_the_nerf(run, glb):
    """The bake and the surface level, measured on the held-out views: the GLB scores within 2.5 dB
    of the NeRF (the old bake, the field's raw colour on the density-10 surface, was 4.5 dB under
    it here and 11 dB under at the benchmark's settings) and its silhouette is the render's
    (opacity >= 0.5): at most 1% of the render's pixels extra or missing on average (the old
    surface had 25 extra per view, 1.5%, all round the outline)."""
    _, nerf, imgs, cams = run
    m = read_glb(glb[0])
    bg = nerf.background.tolist()
    p_glb, p_nerf, extra, missing, area = [], [], [], [], []
    for i in HOLD:
        g = render_textured_mesh(m, cams[i], 64, 64, bg)
        r = nerf.render(cams[i], 64, 64)
        p_glb.append(psnr(g, imgs[i]))
        p_nerf.append(psnr(r["rgb"], imgs[i]))
        covered = (render_textured_mesh(m, cams[i], 64, 64, [1.0, 0.0, 1.0]) - torch.tensor([1.0, 0.0, 1.0])).abs().sum(-1) > 0
        shown = r["opacity"] >= 0.5
        extra.append(int((covered & ~shown).sum()))
        missing.append(int((shown & ~covered).sum()))
        area.append(int(shown.sum()))
        assert p_glb[-1] > psnr(torch.tensor(bg).expand(64, 64, 3), imgs[i]) + 3.0     # the head is there
    assert np.mean(p_glb) > np.mean(p_nerf) - 2.5, (p_glb, p_nerf)
    assert np.mean(extra) < 0.01 * np.mean(area) and np.mean(missing) < 0.01 * np.mean(area), (extra, missing, area)
    assert glb[1]["level"] > 0


def test_splat_ply_layout_and_round_trip(splat):
    path, info = splat
    head = path.read_bytes()[:4000].split(b"end_header\n")[0].decode().splitlines()
    assert head[:2] == ["ply", "format binary_little_endian 1.0"]
    assert [ln.split()[2] for ln in head if ln.startswith("property")] == PLY_PROPERTIES
    assert PLY_PROPERTIES[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert PLY_PROPERTIES[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    s = read_splat_ply(path)
    assert s["count"] == info["splats"] > 0 and s["data"].shape == (info["splats"], 62)
    p = info["params"]
    for k in ("means", "f_dc", "logit_opacity", "log_scales"):
        assert torch.allclose(s[k], p[k].float(), atol=1e-6), k
    assert torch.allclose(s["quats"].norm(dim=-1), torch.ones(s["count"]), atol=1e-5)
    assert np.all(s["data"][:, 9:54] == 0)


def test_refined_splat_beats_its_init_and_loss_falls(run, splat):
    _, nerf, imgs, cams = run
    path, info = splat
    losses = info["losses"]
    assert np.mean(losses[-10:]) < np.mean(losses[:5])
    init = init_splat(nerf, 40)
    s = read_splat_ply(path)
    i = TRAIN[3]
    bg = nerf.background
    with torch.no_grad():
        p_init = psnr(render_splat(init, cams[i], 64, 64, bg), imgs[i])
        p_ref = psnr(render_splat(s, cams[i], 64, 64, bg), imgs[i])
    assert p_ref > p_init + 1.0


@pytest.mark.parametrize("n,width,height,opacity_shift", [(12, 20, 18, 0.0), (40, 23, 17, 4.0)])
def test_rasterizer_matches_brute_force_twin(n, width, height, opacity_shift):
    """Sizes that are not multiples of the tile, Gaussians half off the image, nearly opaque
    ones (whose alpha still passes ALPHA_MIN beyond 3 sigma): the vectorised rasterizer draws
    exactly what the per-pixel loop draws."""
    g = torch.Generator().manual_seed(n)
    params = {"means": (torch.rand(n, 3, generator=g) - 0.5) * 0.5,
              "log_scales": torch.log(0.02 + 0.06 * torch.rand(n, 3, generator=g)),
              "quats": torch.randn(n, 4, generator=g),
              "logit_opacity": torch.randn(n, generator=g) + opacity_shift,
              "f_dc": torch.randn(n, 3, generator=g)}
    params = {k: v.double() for k, v in params.items()}
    _, cams = render_views("sphere", size=8)
    cam = cams[3]
    bg = torch.tensor([0.2, 0.4, 0.9])
    fast = render_splat(params, cam, width, height, bg)
    ref = render_splat_reference(params, cam, width, height, bg)
    assert (fast - ref).abs().max() < 1e-9
    assert (ref - bg).abs().max() > 0.1     # something was drawn


def test_densify_clones_splits_prunes_within_budget():
    from dp360rt.nerf.splat_refine import GRAD_THRESHOLD, densify_and_prune
    n = 6
    params = {"means": torch.zeros(n, 3), "log_scales": torch.log(torch.tensor([[0.001] * 3] * 3 + [[0.5] * 3] * 3)),
              "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
              "logit_opacity": torch.tensor([0.0, 0.0, -9.0, 0.0, 0.0, 0.0]), "f_dc": torch.arange(n * 3.0).view(n, 3)}
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam([{"params": [params[k]], "lr": 0.1, "name": k} for k in params])
    sum(v.sum() for v in params.values()).backward()
    opt.step()
    grad = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.5]) * GRAD_THRESHOLD * 2
    large = float(params["log_scales"][3, 0].detach())
    densify_and_prune(params, opt, grad, extent=1.0, max_splats=100, gen=torch.Generator().manual_seed(0))
    # Gaussian 0 (small) cloned, 3 and 5 (large) split in two, 2 (transparent) pruned: 6 + 1 + 2 - 1
    assert params["means"].shape[0] == 8
    assert torch.isclose(params["log_scales"], torch.tensor(large - math.log(1.6))).all(-1).sum() == 4
    for group in opt.param_groups:
        p = group["params"][0]
        assert p is params[group["name"]] and p.requires_grad
        assert opt.state[p]["exp_avg"].shape == p.shape
    densify_and_prune(params, opt, torch.ones(8), extent=1.0, max_splats=9, gen=torch.Generator())
    assert params["means"].shape[0] == 9           # the budget leaves room for one more


def test_refined_splat_close_to_the_nerf_on_held_out_views(run, tmp_path):
    """The regression guard of the export's quality: a splat refined for a few seconds on 32^2
    versions of the training views scores, on held-out views, close to the NeRF it came from."""
    _, nerf, imgs, cams = run
    small = [torch.nn.functional.interpolate(i.permute(2, 0, 1)[None], size=(32, 32), mode="area")[0]
             .permute(1, 2, 0).contiguous() for i in imgs]
    info = nerf.export_splat(tmp_path / "s.ply", views=([small[i] for i in TRAIN], cams[TRAIN]), steps=STEPS_32)
    bg = nerf.background
    with torch.no_grad():
        p_splat = np.mean([psnr(render_splat(info["params"], cams[i], 32, 32, bg), small[i]) for i in HOLD])
        p_nerf = np.mean([psnr(nerf.render(cams[i], 32, 32)["rgb"], small[i]) for i in HOLD])
    print(f"held out at 32^2: NeRF {p_nerf:.2f} dB, splat {p_splat:.2f} dB ({info['splats']} Gaussians, "
          f"{info['seconds']:.1f} s)")
    assert p_splat > p_nerf - MAX_GAP_32


def test_refinement_gradients_reach_every_parameter():
    g = torch.Generator().manual_seed(1)
    n = 6
    params = {"means": (torch.rand(n, 3, generator=g) - 0.5) * 0.3, "log_scales": torch.full((n, 3), -3.0),
              "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1), "logit_opacity": torch.zeros(n),
              "f_dc": torch.zeros(n, 3)}
    imgs, cams = render_views("sphere", size=16)
    losses = refine_splat(params, [imgs[0]], cams[:1], steps=15, lr=0.02)
    assert losses[-1] < losses[0]


def test_bad_input_named_errors_before_work(run, tmp_path, monkeypatch):
    d, nerf, _, _ = run
    import dp360rt.nerf.glb as glbmod
    import dp360rt.nerf.splat as splatmod

    def boom(*a, **k):
        raise AssertionError("work started before the checks")
    monkeypatch.setattr(glbmod, "build_textured_mesh", boom)
    monkeypatch.setattr(splatmod, "init_splat", boom)
    with pytest.raises(NoNerfError, match="Fix"):
        find_nerf(tmp_path)
    assert find_nerf(d) == d / "nerf" and find_nerf(d / "nerf") == d / "nerf"
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="triangle budget"):
            export_glb(nerf, tmp_path / "a.glb", triangles=bad)
    for bad in (1000, 16384, 0, 3):
        with pytest.raises(ValueError, match="power of two"):
            export_glb(nerf, tmp_path / "a.glb", texture_size=bad)
    (tmp_path / "x.glb").write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists"):
        export_glb(nerf, tmp_path / "x.glb")
    with pytest.raises(OutputError, match="already exists"):
        (tmp_path / "x.ply").write_bytes(b"old")
        export_splat(nerf, tmp_path / "x.ply")
    with pytest.raises(OutputError, match="does not exist"):
        export_splat(nerf, tmp_path / "nope" / "x.ply")
    with pytest.raises(ValueError, match=r"\.glb"):
        export_glb(nerf, tmp_path / "a.obj")
    assert (tmp_path / "x.glb").read_bytes() == b"old"


def test_empty_field_is_named(run, tmp_path):
    _, nerf, _, _ = run
    empty = nerf.snapshot()
    empty.occ.set_mask(torch.zeros_like(empty.occ.mask))
    with pytest.raises(EmptyFieldError, match="no surface"):
        empty.export_splat(tmp_path / "e.ply", steps=0)
    run_dir = run[0]
    with pytest.raises(EmptyFieldError, match="no training ray reaches"):     # seeded from views: was a torch.cat error
        empty.export_splat(tmp_path / "e.ply", views=run_dir, steps=0)
    with pytest.raises(EmptyFieldError, match="no surface"):
        empty.export_glb(tmp_path / "e.glb", triangles=100, texture_size=64, resolution=32)
    assert not list(tmp_path.iterdir())                  # nothing half-written


def test_cli_export(run, tmp_path, capsys):
    from dp360rt.nerf.cli import main
    d, _, _, _ = run
    rc = main(["export", str(d), "--glb", str(tmp_path / "h.glb"), "--triangles", "800", "--texture-size", "64",
               "--resolution", "48", "--splat", str(tmp_path / "h.ply"), "--splat-steps", "3",
               "--splat-resolution", "24"])
    assert rc == 0 and (tmp_path / "h.glb").is_file() and read_splat_ply(tmp_path / "h.ply")["count"] > 0
    assert main(["export", str(tmp_path), "--glb", str(tmp_path / "z.glb")]) == 2
    assert "no fitted NeRF" in capsys.readouterr().err
    assert main(["export", str(d), "--glb", str(tmp_path / "h.glb")]) == 2          # exists, no --overwrite
    assert main(["export", str(d), "--glb", str(tmp_path / "q.glb"), "--texture-size", "1000"]) == 2
    assert not (tmp_path / "q.glb").exists()
