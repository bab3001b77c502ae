"""One test per row of docs/bad-input.md's table that is not covered in test_checkpoint.py:
every bad input gets a named error with its fix, never a deep traceback or a silent result."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from dp360rt import Pipeline
from dp360rt.cli.main import main
from dp360rt.config import get_model_config
from dp360rt.io.images import synthetic_conditions, synthetic_portrait
from dp360rt.io.images import ImageError, load_conditions, load_portrait, save_png, to_unit
from dp360rt.engine.runtime import RequestCancelled
from dp360rt.sampler.plan import MemoryBudgetError, plan_batches
from dp360rt.noise_schedule import schedule_buffers
from dp360rt.sampler.ddim import ddim_tables


@pytest.fixture(scope="module")
def pipe():
    p = Pipeline.random("tiny", seed=0)
    yield p
    p.close()


def test_not_an_image(tmp_path):
    p = tmp_path / "portrait.png"
    p.write_text("this is text")
    with pytest.raises(ImageError, match="not an image Pillow can read"):
        load_portrait(p)


def test_empty_image_file(tmp_path):
    p = tmp_path / "portrait.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_portrait(p)


def test_truncated_png(tmp_path):
    p = tmp_path / "portrait.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|could not be decoded|not an image"):
        load_portrait(p)


def test_huge_image(tmp_path):
    p = tmp_path / "huge.png"
    Image.new("1", (15000, 15000)).save(p)      # 225 MP, a few KB on disk
    with pytest.raises(ImageError, match="too large"):
        load_portrait(p)


def test_grayscale_image_is_converted(tmp_path):
    p = tmp_path / "gray.png"
    Image.new("L", (100, 80), 128).save(p)
    t = load_portrait(p, 64)
    assert t.shape == (1, 3, 64, 64) and torch.allclose(t[0, 0], t[0, 1])


def test_rgba_image_composited_on_white(tmp_path):
    p = tmp_path / "rgba.png"
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(p)
    assert torch.allclose(load_portrait(p, 64), torch.ones(1, 3, 64, 64))


def test_portrait_tensor_wrong_shape():
    with pytest.raises(ImageError, match="portrait tensor must be"):
        load_portrait(torch.zeros(2, 3, 64, 64), 64)


def test_portrait_tensor_nan():
    x = torch.zeros(1, 3, 64, 64)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ImageError, match="NaN"):
        load_portrait(x, 64)


def test_condition_folder_missing_files(tmp_path):
    for i in range(30):
        save_png(torch.zeros(3, 8, 8), tmp_path / f"{i:07d}.png")
    with pytest.raises(ImageError, match="must hold 32 files.*missing 2"):
        load_conditions(tmp_path, 64)


def test_condition_folder_not_found(tmp_path):
    with pytest.raises(ImageError, match="condition folder not found"):
        load_conditions(tmp_path / "sphere32", 64)


def test_condition_images_differ_in_size(tmp_path):
    for i in range(32):
        save_png(torch.zeros(3, 8 if i else 16, 8 if i else 16), tmp_path / f"{i:07d}.png")
    with pytest.raises(ImageError, match="differ in size"):
        load_conditions(tmp_path, 64)


def test_conditions_wrong_count(pipe):
    with pytest.raises(ImageError, match="cannot be split|at least"):
        pipe(synthetic_portrait(64), synthetic_conditions(12, 64), steps=2)


def test_conditions_nan(pipe):
    c = synthetic_conditions(32, 64)
    c[3, 0, 0, 0] = float("nan")
    with pytest.raises(ImageError, match="NaN"):
        pipe(synthetic_portrait(64), c, steps=2)


def test_conditions_wrong_size(pipe):
    with pytest.raises(ImageError, match=r"conditions must be \[N, 3, 64, 64\]"):
        pipe(synthetic_portrait(64), synthetic_conditions(32, 32), steps=2)


def test_generation_cameras_wrong_shape(pipe):
    from dp360rt.nerf import sphere32_cameras
    with pytest.raises(ImageError, match="expected 32 cameras of 25 numbers.*Fix"):
        pipe(synthetic_portrait(64), synthetic_conditions(32, 64), cameras=sphere32_cameras()[:8], steps=2)
    with pytest.raises(ImageError, match="expected 32 cameras of 25 numbers"):
        pipe.submit(synthetic_portrait(64), synthetic_conditions(32, 64), cameras=sphere32_cameras()[:, :16], steps=2)


def test_generation_cameras_nan_or_absent(pipe, tmp_path):
    from dp360rt.nerf import sphere32_cameras
    cams = sphere32_cameras()
    cams[4, 3] = float("nan")
    with pytest.raises(ImageError, match="NaN or Inf"):
        pipe(synthetic_portrait(64), synthetic_conditions(32, 64), cameras=cams, steps=2)
    (tmp_path / "cameras.json").write_text('{"views": [{"file": "000.png"}]}')
    with pytest.raises(ImageError, match="lists no cameras.*Fix"):
        pipe(synthetic_portrait(64), synthetic_conditions(32, 64), cameras=tmp_path / "cameras.json", steps=2)


def test_unsupported_step_count():
    with pytest.raises(ValueError, match="use a step count dividing 1000"):
        ddim_tables(schedule_buffers()["alphas_cumprod"], 3, 0.5)


def test_memory_budget_too_small():
    with pytest.raises(MemoryBudgetError, match="too small.*raise max_memory"):
        plan_batches(get_model_config("nvs", "full"), 4, 8, 64, 64, 2, 2**30)


def test_cancelled_stream(pipe):
    h = pipe.submit(synthetic_portrait(64), synthetic_conditions(32, 64), steps=4, seed=0)
    h.cancel()
    with pytest.raises(RequestCancelled, match="cancelled"):
        h.result(timeout=60)
    assert h.status == "cancelled"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; the read-only file case below still runs")
def test_unwritable_output_dir_permissions(tmp_path, pipe):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    res = pipe(synthetic_portrait(64), synthetic_conditions(32, 64), steps=2)
    with pytest.raises(OSError, match="writable"):
        res.save(d / "out")


def test_output_path_is_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    assert main(["demo", "--out", str(f / "sub"), "--steps", "2"]) == 2
    assert "writable" in capsys.readouterr().err


def test_generate_without_checkpoints(capsys):
    for verb in ("generate", "stream"):
        assert main([verb, "p.png", "--out", "x"]) == 2
        assert "--nvs and --backview" in capsys.readouterr().err
    assert main(["generate", "p.png", "--nvs", "a.th", "--backview", "b.th", "--out", "x"]) == 2
    assert "--conditions DIR" in capsys.readouterr().err


def test_backend_without_export_dir(capsys):
    assert main(["stream", "p.png", "--random", "tiny", "--backend", "ort", "--out", "x"]) == 2
    assert "--export-dir" in capsys.readouterr().err


BAD_SAMPLER_PARAMS = [
    ({"eta": float("nan")}, "eta=nan is not finite"),
    ({"eta": -5.0}, "eta=-5.0 is negative"),
    ({"cfg_scale": float("inf")}, "cfg_scale=inf is not finite"),
    ({"cfg_scale": "3"}, "cfg_scale must be a real number"),
    ({"steps": 2.0}, "steps must be an int, got 2.0"),
    ({"steps": "2"}, "steps must be an int, got '2'"),
    ({"steps": True}, "steps must be an int, got True"),
    ({"steps": 0}, "steps=0 must be >= 1"),
    ({"seed": 10 ** 23}, r"seed=100000000000000000000000 is outside \[0, 2\*\*64\)"),
    ({"seed": "0"}, "seed must be an int, a torch.Generator"),
    ({"seed": 1.5}, "seed must be an int, a torch.Generator"),
]


@pytest.mark.parametrize("kw,message", BAD_SAMPLER_PARAMS)
def test_sampler_params_refused(pipe, kw, message):
    """Refused at the API before any model runs (the portrait argument is never even read)."""
    from dp360rt.sampler.params import SamplerParamError
    with pytest.raises(SamplerParamError, match=message + ".*Fix: "):
        pipe("never-read.png", synthetic_conditions(32, 64), **kw)
    stream_kw = {k: v for k, v in kw.items() if k in ("steps", "seed")}
    if stream_kw:
        with pytest.raises(SamplerParamError, match=message):
            pipe.submit("never-read.png", synthetic_conditions(32, 64), **stream_kw)
        with pytest.raises(SamplerParamError, match=message):
            next(iter(pipe.stream("never-read.png", synthetic_conditions(32, 64), **stream_kw)))
    else:
        from dp360rt.engine.runtime import Runtime
        with pytest.raises(SamplerParamError, match=message):
            Runtime(pipe, **kw)


def test_integer_conditions_tensor_refused(pipe):
    from dp360rt.sampler.params import SamplerParamError
    cond = (synthetic_conditions(32, 64) * 127.5 + 127.5).round().to(torch.int64)
    for call in (pipe, pipe.submit):
        with pytest.raises(SamplerParamError, match=r"dtype torch.int64.*Fix: convert it"):
            call(synthetic_portrait(64), cond, steps=1)


@pytest.mark.parametrize("kind,stage", [("backview", "the back view"), ("nvs", r"window 0 \(views 0-7\)")])
def test_nan_latents_name_their_stage(kind, stage):
    """NaN latents (here from a NaN weight) are refused before decoding, naming the stage, on the
    direct path and on the streaming runtime; no view is produced."""
    from dp360rt.sampler.params import NonFiniteLatentsError
    p = Pipeline.random("tiny", seed=0)
    with torch.no_grad():
        getattr(p, kind).model.diffusion_model.out[-1].bias.fill_(float("nan"))
    por, cond = synthetic_portrait(64), synthetic_conditions(32, 64)
    with pytest.raises(NonFiniteLatentsError, match=stage + " produced .* NaN/Inf latent values.*Fix: "):
        p(por, cond, steps=1)
    try:
        with pytest.raises(NonFiniteLatentsError, match=stage):
            views = list(p.stream(por, cond, steps=1))
            assert views == []
    finally:
        p.close()
