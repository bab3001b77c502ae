"""Instant NeRF (dp360rt.nerf): camera convention, fitting quality on a synthetic scene, save/load,
incremental views, CLI, bad input, exports. CPU only."""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# submodule imports: an editable install made before nerf/ existed sees dp360rt.nerf as a namespace
from dp360rt.nerf.cameras import (CameraError, camera_rays, intrinsics, load_views, look_at, make_camera,
                                  orbit_cameras, project_points, sphere32_cameras)
from dp360rt.nerf.model import Nerf
from dp360rt.nerf.cli import add_parser, holdout_indices, main as nerf_main
from dp360rt.nerf.synthetic import SCENES, render_views, write_scene

HOLD = [3, 11, 19, 27]
TRAIN = [i for i in range(32) if i not in HOLD]


# ---------------------------------------------------------------------------------------------
# cameras
# ---------------------------------------------------------------------------------------------

def test_projection_of_known_points():
    cam = make_camera(look_at((0.0, 0.0, 2.7)), intrinsics(4.2647))
    c2w = cam[:16].reshape(4, 4)
    # OpenCV axes: x right, y down, z forward (towards the origin); world +y is up
    assert torch.allclose(c2w[:3, 2], torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64))
    assert torch.allclose(c2w[:3, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(c2w[:3, 1], torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64))
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0]], dtype=torch.float64)
    px, depth = project_points(cam, pts, 64, 64)
    # the look-at point lands on the image centre, between pixels 31 and 32
    assert px[0].tolist() == pytest.approx([31.5, 31.5])
    assert float(depth[0]) == pytest.approx(2.7)
    # u = fx * x / z + cx = 4.2647 * 0.1 / 2.7 + 0.5 -> column u * 64 - 0.5 = 41.609...
    assert float(px[1, 1]) == pytest.approx((4.2647 * 0.1 / 2.7 + 0.5) * 64 - 0.5)
    assert float(px[1, 0]) == pytest.approx(31.5)
    # a point above the centre appears higher in the image: smaller row index
    assert float(px[2, 0]) == pytest.approx((0.5 - 4.2647 * 0.1 / 2.7) * 64 - 0.5)
    assert float(px[2, 0]) < 31.5


def test_ray_through_pixel_hits_projected_point():
    cam = sphere32_cameras()[5]
    o, d = camera_rays(cam, 48, 40, dtype=torch.float64)
    i, j = 7, 30
    x = o[i, j] + 1.9 * d[i, j]
    px, _ = project_points(cam, x[None], 48, 40)
    assert px[0].tolist() == pytest.approx([i, j], abs=1e-9)


def test_sphere32_orbit():
    cams = sphere32_cameras()
    assert cams.shape == (32, 25)
    c2w = cams[:, :16].reshape(32, 4, 4)
    eye = c2w[:, :3, 3]
    assert torch.allclose(eye.norm(dim=1), torch.full((32,), 2.7, dtype=torch.float64))
    assert torch.allclose(eye[0], torch.tensor([0.0, 0.0, 2.7], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(eye[8], torch.tensor([2.7, 0.0, 0.0], dtype=torch.float64), atol=1e-12)
    rot = c2w[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(32, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(32, dtype=torch.float64))
    for cam in cams:                                  # every camera sees the look-at point in its centre
        px, _ = project_points(cam, torch.zeros(1, 3, dtype=torch.float64), 64, 64)
        assert px[0].tolist() == pytest.approx([31.5, 31.5])
    up = orbit_cameras(4, elevation_deg=30.0)
    assert float(up[0, 7]) == pytest.approx(2.7 * math.sin(math.radians(30)))
    assert cams[0, 16:].tolist() == [4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1]


# ---------------------------------------------------------------------------------------------
# fitting a synthetic scene
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scene():
    imgs, cams = render_views("sphere", size=64)
    return imgs, cams


@pytest.fixture(scope="module")
def fitted(scene):
    imgs, cams = scene
    nerf = Nerf(device="cpu")
    stats = nerf.fit([imgs[i] for i in TRAIN], cams[TRAIN], steps=300, progress=False,
                     holdout=([imgs[i] for i in HOLD], cams[HOLD]))
    return nerf, stats


def test_fit_reaches_25db_on_held_out_views(fitted):
    nerf, stats = fitted
    assert stats["steps"] == 300
    assert stats["views"] == 28
    assert stats["background_mode"] == "fixed" and stats["background"] == [1.0, 1.0, 1.0]
    assert stats["holdout_psnr_mean"] >= 25.0, stats


def test_depth_and_opacity(fitted):
    nerf, _ = fitted
    cam = sphere32_cameras()[3]
    out = nerf.render(cam, 32, 32)
    assert out["rgb"].shape == (32, 32, 3) and out["depth"].shape == (32, 32)
    # the ray through the centre hits the sphere (radius 0.25) at distance 2.7 - 0.25
    centre = out["depth"][15:17, 15:17].mean()
    assert float(centre) == pytest.approx(2.45, abs=0.04)
    assert float(out["opacity"][15:17, 15:17].min()) > 0.99
    assert float(out["opacity"][0, 0]) < 0.01                  # background corner


def test_save_load_renders_identically(fitted, tmp_path):
    nerf, _ = fitted
    nerf.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format"] == "dp360rt-nerf" and cfg["encoding"] == "grid"
    back = Nerf.load(tmp_path / "m")
    assert back.image_size == (64, 64)
    for cam in sphere32_cameras()[[0, 11]]:
        a, b = nerf.render(cam), back.render(cam)
        assert torch.equal(a["rgb"], b["rgb"])
        assert torch.equal(a["depth"], b["depth"])


def test_views_join_while_training(scene):
    imgs, cams = scene
    nerf = Nerf(device="cpu", grid_res=64)
    f = nerf.fitter(steps=60, progress=False)
    for i in range(0, 32, 4):
        f.add_view(imgs[i], cams[i])
    f.train(steps=15)
    assert f.step == 15 and f.num_views == 8
    n_rays = f._ray_pool()[0].shape[0]
    # the rest arrive from another thread while training runs
    t = threading.Thread(target=lambda: [f.add_view(imgs[i], cams[i]) for i in range(32) if i % 4])
    t.start()
    f.train(steps=15)
    t.join()
    stats = f.train()
    assert f.num_views == 32 and f._ray_pool()[0].shape[0] == 32 * 64 * 64 > n_rays
    assert stats["steps"] == 60 and stats["train_psnr"] > 15


def test_train_while_views_stream_in(scene):
    imgs, cams = scene

    def stream():
        for i in range(0, 32, 4):
            time.sleep(0.05)
            yield imgs[i], cams[i]

    nerf = Nerf(device="cpu", grid_res=48)
    stats = nerf.fitter(steps=40, progress=False).train_while(stream())
    assert stats["views"] == 8 and stats["steps"] == 40

    def broken():
        yield imgs[0], cams[0]
        raise ValueError("stream broke")

    with pytest.raises(ValueError, match="stream broke"):
        Nerf(device="cpu", grid_res=32).fitter(steps=10_000, progress=False).train_while(broken())


# ---------------------------------------------------------------------------------------------
# views folders, CLI, bad input
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def views_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    write_scene(d, "sphere", sphere32_cameras()[::2], size=32)      # 16 views at 32x32
    return d


def test_views_folder_roundtrip(views_dir):
    imgs, cams, files = load_views(views_dir)
    assert len(imgs) == 16 and cams.shape == (16, 25) and files[0] == "000.png"
    assert imgs[0].shape == (32, 32, 3) and imgs[0].dtype == torch.float32
    assert torch.allclose(cams, sphere32_cameras()[::2])


def test_cli_fit_and_render(views_dir, tmp_path, capsys):
    model = tmp_path / "model"
    assert nerf_main(["fit", str(views_dir), "--out", str(model), "--steps", "40", "--holdout", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "held-out PSNR" in out and (model / "model.safetensors").is_file()
    cams = {"views": [{"camera": [float(x) for x in c]} for c in sphere32_cameras()[[1, 5, 9]]]}
    (tmp_path / "cams.json").write_text(json.dumps(cams))
    rend = tmp_path / "rend"
    assert nerf_main(["render", str(model), "--cameras", str(tmp_path / "cams.json"), "--out", str(rend)]) == 0
    pngs = sorted(p.name for p in rend.glob("*.png"))
    assert pngs == ["000.png", "001.png", "002.png"]
    from PIL import Image
    assert Image.open(rend / "000.png").size == (32, 32)
    assert json.loads((rend / "cameras.json").read_text())["views"][2]["file"] == "002.png"
    assert nerf_main(["render", str(model), "--cameras", str(tmp_path / "cams.json"), "--out", str(tmp_path / "r2"),
                      "--width", "20", "--height", "16"]) == 0
    assert Image.open(tmp_path / "r2" / "001.png").size == (20, 16)
    # the same verbs through add_parser on another CLI
    import argparse
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["nerf", "render", str(model), "--cameras", str(views_dir / "cameras.json"), "--out",
                      str(tmp_path / "r3")])
    assert a.fn(a) == 0
    assert len(list((tmp_path / "r3").glob("*.png"))) == 16          # named like the listed files
    assert (tmp_path / "r3" / "015.png").is_file()


def test_cli_scene_writes_the_views_folder_fit_takes(tmp_path, capsys):
    """`nerf scene DIR` is write_scene(DIR, scene): the exact renders, as the views folder of the
    acceptance recipe (then `nerf fit DIR`)."""
    d = tmp_path / "scene"
    assert nerf_main(["scene", str(d), "--scene", "checker", "--size", "16"]) == 0
    assert f"dp360rt nerf fit {d}" in capsys.readouterr().out
    imgs, cams, files = load_views(d)
    assert files == [f"{i:03d}.png" for i in range(32)] and torch.equal(cams, sphere32_cameras())
    ref, _ = render_views("checker", size=16)
    assert max(float((a - b).abs().max()) for a, b in zip(imgs, ref)) <= 0.5 / 255 + 1e-6     # 8-bit PNG rounding
    assert nerf_main(["fit", str(d), "--out", str(tmp_path / "m"), "--steps", "2", "--holdout", "4", "--quiet"]) == 0
    some = write_scene(tmp_path / "some", "checker", size=16, indices=[4, 12])
    assert sorted(p.name for p in some.glob("*.png")) == ["004.png", "012.png"]
    import dp360rt.nerf.cli as cli
    assert cli.SCENES == SCENES                          # the CLI's copy (its --help imports no torch)
    with pytest.raises(SystemExit):
        nerf_main(["scene", str(tmp_path / "x"), "--scene", "cube"])


def _copy_views(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_bad_input_errors(views_dir, tmp_path):
    # missing cameras.json
    d = _copy_views(views_dir, tmp_path / "a")
    (d / "cameras.json").unlink()
    with pytest.raises(ValueError, match="cameras.json not found.*Fix"):
        load_views(d)
    # a camera with the wrong count of numbers
    d = _copy_views(views_dir, tmp_path / "b")
    data = json.loads((d / "cameras.json").read_text())
    data["views"][3]["camera"] = data["views"][3]["camera"][:16]
    (d / "cameras.json").write_text(json.dumps(data))
    with pytest.raises(CameraError, match="view 3.*16 numbers, expected 25"):
        load_views(d)
    # image / camera count mismatch
    d = _copy_views(views_dir, tmp_path / "c")
    (d / "004.png").unlink()
    with pytest.raises(CameraError, match="16 views but 1 of their images are missing"):
        load_views(d)
    with pytest.raises(CameraError, match="3 images but 2 cameras"):
        Nerf().fit([torch.zeros(8, 8, 3)] * 3, sphere32_cameras()[:2], steps=1, progress=False)
    # unreadable PNG
    d = _copy_views(views_dir, tmp_path / "d")
    (d / "002.png").write_bytes(b"not a png")
    with pytest.raises(CameraError, match="cannot read image .*002.png.*Fix"):
        load_views(d)
    # unwritable output directory (a path below a regular file)
    (tmp_path / "file").write_text("x")
    import argparse

    from dp360rt.nerf.cli import cmd_fit
    with pytest.raises(OSError, match="cannot write to the output directory.*Fix"):
        cmd_fit(argparse.Namespace(views=str(views_dir), out=str(tmp_path / "file" / "model"), seconds=None, steps=1,
                                   holdout=0, encoding=None, device=None, seed=None, grid_res=None, background=None,
                                   bound=None, json=None, quiet=True))
    # the standalone CLI reports instead of raising
    assert nerf_main(["fit", str(tmp_path / "a"), "--out", str(tmp_path / "m"), "--steps", "1", "--quiet"]) == 2
    with pytest.raises(ValueError, match="not a fitted NeRF"):
        Nerf.load(tmp_path)


def test_holdout_indices():
    assert holdout_indices(32, 4) == [4, 12, 20, 28]
    assert holdout_indices(10, 0) == []
    with pytest.raises(ValueError):
        holdout_indices(4, 4)


# ---------------------------------------------------------------------------------------------
# exports
# ---------------------------------------------------------------------------------------------

def test_mesh_export(fitted, tmp_path):
    from dp360rt.nerf.mesh import extract_mesh, write_mesh
    nerf, _ = fitted
    mesh = extract_mesh(nerf, resolution=64, method="tetra")
    v, f = mesh["vertices"], mesh["faces"]
    assert len(v) > 500 and len(f) > 500 and f.max() < len(v)
    r = np.linalg.norm(v, axis=1)
    assert abs(float(np.median(r)) - 0.25) < 0.03                 # the sphere of radius 0.25
    # outward winding: face normals point away from the centre
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    assert float(((fn * v[f].mean(1)).sum(1) > 0).mean()) > 0.95
    ply = write_mesh(mesh, tmp_path / "m.ply")
    head = ply.read_bytes()[:400].split(b"end_header")[0].decode()
    assert f"element vertex {len(v)}" in head and f"element face {len(f)}" in head
    obj = write_mesh(mesh, tmp_path / "m.obj").read_text().splitlines()
    assert sum(line.startswith("v ") for line in obj) == len(v)
    with pytest.raises(ValueError, match="Fix"):
        write_mesh(mesh, tmp_path / "m.stl")


def test_marching_tetrahedra_sphere():
    from dp360rt.nerf.mesh import marching_tetrahedra
    n = 33
    c = torch.linspace(-1, 1, n)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = (0.6 - torch.sqrt(x * x + y * y + z * z)).numpy()
    v, f = marching_tetrahedra(vol, 0.0)
    r = np.linalg.norm(v / (n - 1) * 2 - 1, axis=1)
    assert np.abs(r - 0.6).max() < 0.02
    # closed surface: every edge shared by exactly two triangles
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    assert (counts == 2).all()


def test_orbit_video(fitted, tmp_path):
    from dp360rt.nerf.video import orbit_video
    nerf, _ = fitted
    gif = orbit_video(nerf, tmp_path / "o.gif", frames=4, width=24, height=24)
    from PIL import Image
    im = Image.open(gif)
    assert im.n_frames == 4 and im.size == (24, 24)
    frames = orbit_video(nerf, tmp_path / "frames", frames=3, width=16, height=16)
    assert len(list(frames.glob("*.png"))) == 3
    mp4 = orbit_video(nerf, tmp_path / "o.mp4", frames=4, width=24, height=24)      # imageio-ffmpeg is a dependency
    import imageio.v2 as imageio
    assert len(imageio.mimread(mp4)) == 4


# ---------------------------------------------------------------------------------------------
# hash-grid field (the CUDA default) on the PyTorch path
# ---------------------------------------------------------------------------------------------

def test_hash_field_learns_on_cpu(scene):
    imgs, cams = scene
    nerf = Nerf(device="cpu", encoding="hash", hash_log2_table=14, batch_samples=4096)
    f = nerf.fitter(steps=25, progress=False)
    for i in range(0, 32, 2):
        f.add_view(imgs[i], cams[i])
    first = f.train(steps=4)["train_psnr"]
    stats = f.train()
    assert nerf.field.encoding.spec.max_res == 64                # grows to the image resolution
    assert stats["train_psnr"] > first + 2.0
