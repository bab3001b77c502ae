"""Issue 16, items 5-8: portraits decoded by their real range and orientation, named errors (never a
traceback) for bad option values and places, wrong-dtype weights, cameras.json paths that leave
the views folder. Each test builds its inputs itself; CLI cases run through dp360rt.cli.main.main."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SET_A
from dp360rt import Pipeline
from dp360rt.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from dp360rt.io.checks import ArgumentError
from dp360rt.cli.main import main
from dp360rt.io.images import synthetic_conditions, synthetic_portrait
from dp360rt.io.images import ImageError, load_portrait
from dp360rt.model import build_model
from dp360rt.nerf import Nerf
from dp360rt.nerf.cameras import CameraError, load_views, orbit_cameras, write_views


@pytest.fixture(scope="module")
def pipe():
    p = Pipeline.random("tiny", seed=0)
    yield p
    p.close()


def _brightness(t: torch.Tensor) -> float:
    return float((t + 1).mean() / 2)


def _usage_error(argv: list[str], capsys) -> str:
    """Run the CLI on argv, expect argparse's usage error (exit 2); return stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# -- item 5: portraits ---------------------------------------------------------------------------

def test_16bit_gray_png_by_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 256)[None].repeat(256, 0).astype(np.uint16)     # left black -> right white
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    t = load_portrait(tmp_path / "g16.png", 64)
    assert abs(_brightness(t) - 0.5) < 0.01                   # was 0.996 (clipped as 8-bit)
    assert _brightness(t[..., :8]) < 0.1 and _brightness(t[..., -8:]) > 0.9


def test_float_tiff_by_its_range(tmp_path):
    ramp = np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(256, 0)
    Image.fromarray(ramp).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    t = load_portrait(tmp_path / "f.tif", 64)
    assert abs(_brightness(t) - 0.5) < 0.01
    nan = ramp.copy()
    nan[3, 3] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match="NaN or Inf pixels"):
        load_portrait(tmp_path / "nan.tif", 64)


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((64, 64, 3), np.uint8)
    a[:32, :, 0] = 255                        # stored: top half red, bottom half blue
    a[32:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6                          # Orientation 6: shown rotated 90° clockwise (stored top -> right)
    Image.fromarray(a).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    t = (load_portrait(tmp_path / "phone.jpg", 64)[0] + 1) / 2
    left, right = t[:, :, :24].mean((1, 2)), t[:, :, 40:].mean((1, 2))
    assert right[0] > 0.9 and right[2] < 0.1 and left[2] > 0.9 and left[0] < 0.1
    assert torch.allclose(load_portrait(Image.open(tmp_path / "phone.jpg"), 64), load_portrait(tmp_path / "phone.jpg", 64))


def test_image_over_100_megapixels_refused_from_header(tmp_path):
    p = tmp_path / "144mp.png"
    Image.new("1", (12000, 12000)).save(p)     # 144 MP (accepted before: Pillow only warns below 2x its limit)
    with pytest.raises(ImageError, match="too large: 12000x12000 = 144 MP.*Fix: downscale"):
        load_portrait(p)


def test_service_upload_over_100_megapixels_refused(tmp_path):
    from dp360rt.serve.backend import BadInput, decode_portrait
    Image.new("1", (12000, 12000)).save(tmp_path / "144mp.png")
    with pytest.raises(BadInput, match="12000x12000, more than 100 MP. Fix: downscale") as e:
        decode_portrait((tmp_path / "144mp.png").read_bytes())
    assert e.value.status == 413


def test_conditions_checked_before_any_model_runs(pipe):
    calls = []
    with pytest.raises(ImageError, match="31 condition images cannot be split into windows of 8 frames"):
        pipe(synthetic_portrait(64), synthetic_conditions(31, 64), steps=2, progress=lambda *a: calls.append(a))
    assert calls == []                         # refused before the back view, not after it
    with pytest.raises(ImageError, match="31 condition images cannot be split into windows of 8 frames"):
        pipe.submit(synthetic_portrait(64), synthetic_conditions(31, 64), steps=2)
    with pytest.raises(ImageError, match="feature frames"):
        pipe.submit(synthetic_portrait(64), synthetic_conditions(32, 64), features=torch.zeros(31, 3, 64, 64), steps=2)


# -- item 6: named errors --------------------------------------------------------------------------

def test_device_unknown_or_without_cuda(tmp_path, capsys):
    bad = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    err = _usage_error(["generate", "p.png", "--random", "tiny", "--device", bad, "--out", str(tmp_path)], capsys)
    assert "Fix: use --device cpu" in err or "Fix: use cuda:0" in err
    assert "unknown --device 'gpu0'. Fix" in _usage_error(
        ["generate", "p.png", "--random", "tiny", "--device", "gpu0", "--out", str(tmp_path)], capsys)
    with pytest.raises(ArgumentError, match="Fix"):
        Pipeline.random("tiny", device=bad)


def test_max_memory_inf_nan_and_zero(capsys):
    for v in ("inf", "nan", "-1"):
        err = _usage_error(["generate", "p.png", "--random", "tiny", "--max-memory", v, "--out", "x"], capsys)
        assert "is not a memory budget. Fix" in err and "Traceback" not in err
    with pytest.raises(ArgumentError, match="not a memory budget"):
        Pipeline.random("tiny", max_memory=float("inf"))
    p = Pipeline.random("tiny", max_memory=0)      # 0 means no limit, as on the command line
    assert p.max_memory is None and p.plan.budget_bytes is None


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="TensorRT is usable here: the case is a machine without it")
def test_backend_trt_without_tensorrt(tmp_path, capsys):
    rc = main(["generate", "p.png", "--random", "tiny", "--backend", "trt", "--export-dir", str(tmp_path),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "the trt backend needs" in err and "Fix:" in err and "--backend ort" in err


def test_nerf_fit_budget_and_box_checked(tmp_path, capsys):
    for opt, v in (("--seconds", "0"), ("--steps", "0"), ("--bound", "0"), ("--grid-res", "0"), ("--seconds", "nan")):
        err = _usage_error(["nerf", "fit", str(tmp_path), "--out", str(tmp_path / "m"), opt, v], capsys)
        assert f"argument {opt}: {opt} must be" in err and "Fix" in err
    with pytest.raises(ArgumentError, match="bound must be"):
        Nerf(bound=0)
    with pytest.raises(ArgumentError, match="grid_res must be between 8 and 1024"):
        Nerf(grid_res=0)
    with pytest.raises(ArgumentError, match="seconds must be"):
        Nerf(device="cpu").fitter(seconds=0)
    with pytest.raises(ArgumentError, match="steps must be"):
        Nerf(device="cpu").fitter(steps=0)


def test_nerf_render_video_mesh_sizes_checked(tmp_path, capsys):
    for w in ("-5", "100000", "0"):
        err = _usage_error(["nerf", "render", str(tmp_path), "--cameras", "c.json", "--out", "o", "--width", w], capsys)
        assert "--width must be between 1 and 8192" in err
    assert "--frames must be" in _usage_error(["nerf", "video", str(tmp_path), "--out", "o.gif", "--frames", "0"], capsys)
    assert "--resolution must be" in _usage_error(["nerf", "mesh", str(tmp_path), "--out", "m.ply", "--resolution", "0"],
                                                  capsys)
    from dp360rt.nerf.mesh import extract_mesh
    from dp360rt.nerf.video import orbit_video
    nerf = Nerf(device="cpu")
    with pytest.raises(ArgumentError, match="width must be between 1 and 8192, got 0"):
        nerf.render(orbit_cameras(1)[0], 0, 64)               # rendered 64x64 silently before
    with pytest.raises(ArgumentError, match="frames must be"):
        orbit_video(nerf, tmp_path / "o.gif", frames=0)
    with pytest.raises(ArgumentError, match="resolution must be"):
        extract_mesh(nerf, resolution=0)


def test_unwritable_convert_and_export(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")                     # a path under a regular file cannot be created, even by root
    assert main(["convert", str(SET_A / "buffers.pt"), str(blocker / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the output folder" in err and "Fix: choose a writable location" in err
    assert main(["export", "--random", "--config", "tiny", "--out", str(blocker / "onnx")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the export directory" in err and "Fix" in err and "loaded" not in capsys.readouterr().out


def test_bench_repeats_zero(pipe, tmp_path, capsys):
    assert "--repeats must be >= 1" in _usage_error(["bench", "--random", "tiny", "--repeats", "0"], capsys)
    from dp360rt.cli.bench import run_bench
    with pytest.raises(ArgumentError, match="repeats must be >= 1"):
        run_bench(pipe, tmp_path, steps=2, repeats=0)
    assert not any(tmp_path.iterdir())        # refused before any work or file


def test_directory_as_checkpoint_or_portrait(tmp_path, capsys):
    (tmp_path / "model_state-340000.th").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file.*model_state-340000.th.*Fix"):
        read_state_dict(tmp_path)
    assert main(["generate", str(tmp_path), "--random", "tiny", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is a directory, not an image file. Fix" in err


@pytest.mark.parametrize("data", [b"\x80\x02" + bytes(range(7, 250)), bytes(range(1, 200))])
def test_random_bytes_cases_pt(tmp_path, capsys, data):
    (tmp_path / "cases.pt").write_bytes(data)
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert "cases.pt" in text and "FAIL" in text and "Fix: restore cases.pt" in text
    assert "weights_only` set to `False" not in text and "weights_only=False" not in text
    assert "trusted source" not in text


# -- item 7: wrong-dtype weights -------------------------------------------------------------------

NAMES = ["control_model.time_embed.0.weight", "first_stage_model.decoder.conv_out.bias", "model.diffusion_model.out.2.weight"]


def test_non_float_weights_refused(recipe):
    sd = dict(recipe["backview"])
    for k, dtype in zip(NAMES, (torch.int8, torch.complex64, torch.bool)):
        sd[k] = sd[k].to(dtype)
    with pytest.raises(CheckpointError, match=f"3 tensor\\(s\\) are stored as integer, bool, complex .*"
                                              f"{NAMES[0]} \\(torch.int8\\).*{NAMES[1]} \\(torch.complex64\\).*Fix"):
        load_checkpoint(build_model("backview", SET_A), sd)


def test_other_float_precisions_cast_on_load(recipe):
    sd = dict(recipe["backview"])
    dtypes = (torch.float16, torch.bfloat16, torch.float64)
    for k, dtype in zip(NAMES, dtypes):
        sd[k] = sd[k].to(dtype)
    state = load_checkpoint(build_model("backview", SET_A), sd).state_dict()
    for k in NAMES:          # exact: the stored value, cast to the model's float32
        assert state[k].dtype == torch.float32 and torch.equal(state[k], sd[k].float())


# -- item 8: cameras.json paths --------------------------------------------------------------------

@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_views_file_outside_folder_refused(tmp_path, how):
    d = write_views(tmp_path / "views", [torch.full((8, 8, 3), 0.5)] * 2, orbit_cameras(2))
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    data = json.loads((d / "cameras.json").read_text())
    if how == "absolute":
        data["views"][1]["file"] = str(outside)
    elif how == "dotdot":
        data["views"][1]["file"] = "../secret.png"
    else:
        (d / "link.png").symlink_to(outside)
        data["views"][1]["file"] = "link.png"
    (d / "cameras.json").write_text(json.dumps(data))
    with pytest.raises(CameraError, match="view 1: \"file\" .* points outside the views folder.*Fix"):
        load_views(d)
