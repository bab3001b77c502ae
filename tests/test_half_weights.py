"""Half-precision weights: ``Pipeline(dtype=float16|bfloat16)`` stores the convolution and linear
weights in that dtype and runs under autocast, on CPU as on CUDA. Autocast casts exactly those
weights at every call, so the numbers equal autocast over float32 weights bit for bit, at half the
weight memory; ``from_checkpoints`` builds on 'meta' and casts as it loads.

(bf16 convolutions are slow on CPUs without native bf16, so these tests run single denoiser and
VAE calls, not whole generations; ``benchmarks/bench_memory.py`` runs whole ones.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import SET_A, rel_err
from dp360rt import Pipeline
from dp360rt.model import LOW_PRECISION_MODULES, autocast, build_model, store_half_weights
from dp360rt.checkpoint import load_checkpoint
from test_fast_engine import _random_call


def weight_dtypes(model: nn.Module) -> tuple[set, set]:
    """(dtypes of conv/linear parameters, dtypes of every other parameter)."""
    low, rest = set(), set()
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                (low if isinstance(mod, LOW_PRECISION_MODULES) else rest).add(p.dtype)
    return low, rest


def nbytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_equal_autocast_over_fp32(models, recipe, dtype):
    """A model built on 'meta', given half weights and loaded from the float32 checkpoint, run under
    ``model.autocast``: one denoiser call and one VAE decode equal the float32 model under
    autocast bit for bit; their error against plain float32 is printed."""
    m32 = models["backview"]
    half = build_model("backview", SET_A, device="meta")
    store_half_weights(half, dtype)
    load_checkpoint(half, recipe["backview"])
    assert weight_dtypes(half) == ({dtype}, {torch.float32})
    assert not any(t.is_meta for t in list(half.parameters()) + list(half.buffers()))
    assert nbytes(half) < 0.6 * nbytes(m32)
    x, t, ctx, hint, refs = _random_call(m32, (8, 8), seed=4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eps32 = m32.apply_model(x, t, ctx, hint, refs[0], [], uc=False).eps
        img32 = m32.decode_latent(z)
        with torch.autocast("cpu", dtype=dtype):
            want = m32.apply_model(x, t, ctx, hint, refs[0], [], uc=False).eps, m32.decode_latent(z)
        with autocast(torch.device("cpu"), dtype):
            got = half.apply_model(x, t, ctx, hint, refs[0], [], uc=False).eps, half.decode_latent(z)
    assert got[0].dtype == dtype
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    e_eps, e_img = rel_err(got[0].float(), eps32), rel_err(got[1].float(), img32)
    print(f"{dtype} weights + autocast vs float32: denoiser {e_eps:.3e}, VAE decode {e_img:.3e}")
    assert 0 < e_eps < 0.1 and 0 < e_img < 0.1


def test_pipeline_stores_half_weights(recipe):
    cfg = SET_A / "config.json"
    fp32 = Pipeline.from_checkpoints(recipe["nvs"], recipe["backview"], config=cfg)
    half = Pipeline.from_checkpoints(recipe["nvs"], recipe["backview"], config=cfg, dtype=torch.bfloat16)
    for m in (half.nvs, half.backview):
        assert weight_dtypes(m) == ({torch.bfloat16}, {torch.float32})
    ratio = nbytes(half.nvs) / nbytes(fp32.nvs)
    print(f"360° model weights (setA config): fp32 {nbytes(fp32.nvs)} B, bf16 {nbytes(half.nvs)} B ({ratio:.3f}x)")
    assert 0.5 <= ratio < 0.6                # norms and embeddings keep float32
    w = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(half.nvs.get_parameter(w), fp32.nvs.get_parameter(w).to(torch.bfloat16))
    # Pipeline(...) on built float32 models casts them the same way; ort/trt keep theirs untouched
    direct = Pipeline(fp32.nvs, fp32.backview, dtype=torch.float16)
    assert weight_dtypes(direct.nvs) == ({torch.float16}, {torch.float32})
    for p in (fp32, half, direct):
        p.close()


def test_store_half_weights_refuses_other_dtypes():
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        store_half_weights(nn.Linear(2, 2), torch.float64)
    with pytest.raises(ValueError, match="dtype=torch.float64 is not supported"):
        Pipeline.random("tiny", dtype=torch.float64)


@pytest.mark.parametrize("native", [False, True])
def test_half_precision_on_a_cpu_without_native_support_warns(monkeypatch, native):
    """On CPUs without native bfloat16 (AVX2 only) torch's bfloat16 convolution is a reference loop,
    hundreds of times slower than float32: the pipeline says so, with the fix, before any weights load."""
    import warnings
    import dp360rt.engine.pipeline as pl
    monkeypatch.setattr(pl, "cpu_half_is_native", lambda dtype: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.check_options("cpu", "torch", None, torch.bfloat16)
        pl.check_options("cpu", "torch", None, torch.float32)
        pl.check_options("cpu", "torch", None, torch.bfloat16, torch.float32)     # the fix: no warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == (0 if native else 1), msgs
    assert native or ("no native torch.bfloat16 arithmetic" in msgs[0] and "Fix: compute_dtype=torch.float32" in msgs[0])


def test_half_weights_with_float32_arithmetic(recipe):
    """``dtype=bfloat16, compute_dtype=float32``: bfloat16 weights (half the memory), float32
    arithmetic (no autocast). A whole generation equals the float32 pipeline whose convolution and
    linear weights were rounded to bfloat16; its error against plain float32 is printed. The memory
    plan counts 2-byte weights and 4-byte activations."""
    from dp360rt.engine.pipeline import memory_plan
    cfg = SET_A / "config.json"
    mixed = Pipeline.from_checkpoints(recipe["nvs"], recipe["backview"], config=cfg, dtype=torch.bfloat16,
                                      compute_dtype=torch.float32)
    fp32 = Pipeline.from_checkpoints(recipe["nvs"], recipe["backview"], config=cfg)
    rounded = Pipeline.from_checkpoints(recipe["nvs"], recipe["backview"], config=cfg)
    for m in (rounded.nvs, rounded.backview):
        for mod in m.modules():
            if isinstance(mod, LOW_PRECISION_MODULES):
                for p in mod._parameters.values():
                    if p is not None:
                        p.data = p.data.to(torch.bfloat16).float()
    for m in (mixed.nvs, mixed.backview):
        assert weight_dtypes(m) == ({torch.bfloat16}, {torch.float32})
    s = mixed.image_size
    portrait = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(1)) * 2 - 1
    conditions = torch.rand(24, 3, s, s, generator=torch.Generator().manual_seed(2)) * 2 - 1
    got, want, full = (p(portrait, conditions, steps=2, seed=3) for p in (mixed, rounded, fp32))
    assert got.latents.dtype == torch.float32
    err = rel_err(got.latents, want.latents)
    print(f"bf16 weights + fp32 arithmetic vs fp32 on bf16-rounded weights: {err:.2e}; "
          f"vs plain fp32: {rel_err(got.latents, full.latents):.2e}")
    assert err <= 1e-6 and torch.equal(got.back_view, want.back_view)
    assert not torch.equal(got.latents, full.latents)        # the rounding shows: the weights really are bf16
    half = memory_plan(mixed.nvs, mixed.backview, mixed.device, torch.bfloat16, None)
    assert mixed.plan.weights_bytes == half.weights_bytes
    assert mixed.plan.estimated_bytes - mixed.plan.weights_bytes == 2 * (half.estimated_bytes - half.weights_bytes)
    for p in (mixed, fp32, rounded):
        p.close()


def test_compute_dtype_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="compute_dtype=torch.float16 with dtype=torch.bfloat16"):
        Pipeline.random("tiny", dtype=torch.bfloat16, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="backend='ort' runs exported networks"):
        Pipeline.random("tiny", dtype=torch.bfloat16, compute_dtype=torch.float32, backend="ort")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_model_holds_no_page_of_the_checkpoint_file(tmp_path, recipe, dtype):
    """Checkpoint files are read memory-mapped. The model must not keep the mapping: a bfloat16 load
    reads every page of the float32 file, and one float32 norm taken from it as it is would keep all
    those pages in the process's RSS (10 GB for the official 360° file)."""
    import gc
    paths = {}
    for kind in ("nvs", "backview"):
        paths[kind] = tmp_path / f"{kind}.th"
        torch.save(recipe[kind], paths[kind])
    pipe = Pipeline.from_checkpoints(paths["nvs"], paths["backview"], config=SET_A / "config.json", dtype=dtype,
                                     compute_dtype=torch.float32)
    gc.collect()
    maps = open("/proc/self/maps").read()
    assert not any(str(p) in maps for p in paths.values()), "a checkpoint file is still mapped"
    pipe.close()
