"""The fast engine computes the reference's numbers with less work."""
from __future__ import annotations

import pytest
import torch

from conftest import SET_A, rel_err
from dp360rt import Pipeline
from dp360rt.config import get_model_config
from dp360rt.demo import synthetic_conditions, synthetic_portrait
from dp360rt.flops import UNET_EQUIVALENT, per_window, run_flops
from dp360rt.kernels.shared_kv_attention import (attention_lse_math, shared_kv_attention,
                                                  shared_kv_attention_reference)
from dp360rt.backends.torch_backend import TorchBackend
from dp360rt.sampler.fast import write_shared_bank
from dp360rt.sampler.plan import MemoryBudgetError, plan_batches
from dp360rt.unet.bank import BankReader, SharedBank


@pytest.mark.parametrize("b,n,m,d", [(8, 64, 128, 40), (3, 17, 34, 8), (1, 5, 3, 80)])
def test_shared_kv_attention_equals_concatenation(b, n, m, d):
    g = torch.Generator().manual_seed(b * n)
    q, k, v = (torch.randn(b, 4, n, d, generator=g) for _ in range(3))
    ks, vs = (torch.randn(1, 4, m, d, generator=g) for _ in range(2))
    ours = shared_kv_attention(q, k, v, ks, vs)
    ref = shared_kv_attention_reference(q, k, v, ks, vs)
    assert (ours - ref).abs().max().item() < 1e-5


def test_lse_math_path_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 33, 16, generator=g) for _ in range(3))
    out, lse = attention_lse_math(q, k, v, chunk=8)
    assert (out - torch.nn.functional.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5
    assert (lse - (q @ k.transpose(-1, -2) / 4).logsumexp(-1)).abs().max() < 1e-5


def test_whole_generation_fast_equals_reference():
    """4 windows x 8 frames with the back view first, same noises, both engines."""
    cond, por = synthetic_conditions(32, 64), synthetic_portrait(64)
    out, plans = {}, {}
    for engine in ("reference", "fast"):
        pipe = Pipeline.random("tiny", seed=1, engine=engine)
        out[engine] = pipe(por, cond, steps=4, seed=7)
        plans[engine] = pipe.plan
    ref, fast = out["reference"], out["fast"]
    # the back view is 8-bit quantized (as the authors save it): fp32 rounding may flip one level of a few pixels
    diff = (fast.back_view - ref.back_view).abs()
    assert diff.max() <= 1 / 255 + 1e-6 and (diff > 0).float().mean() < 1e-3
    assert rel_err(fast.latents, ref.latents) < 1e-4, rel_err(fast.latents, ref.latents)
    assert (fast.views - ref.views).abs().max() < 1e-4
    assert ref.unet_calls == 2 * 4 * (1 + 4)          # two calls per step, back view + 4 windows
    per_step = 4 // plans["fast"].windows_per_call * (1 if plans["fast"].batch_cfg else 2)
    assert fast.unet_calls == 4 * (1 + per_step)      # guidance branches batched, back view in one call


def test_windows_at_different_timesteps_share_a_call(models):
    """Per-sample timesteps: two groups with their own bank in one UNet call equal separate calls."""
    m = models["nvs"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, 8, 8, generator=g)
    hint = torch.rand(16, 3, 64, 64, generator=g) * 2 - 1
    refs = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(2)]
    ctx = torch.randn(1, 77, 32, generator=g)
    ts = [torch.tensor([981]), torch.tensor([501])]
    banks = [write_shared_bank(TorchBackend(m), refs, t, ctx) for t in ts]
    t_rows = torch.cat([t.expand(8) for t in ts])
    with torch.no_grad():
        pose = m.pose_control_model(x, hint, t_rows, ctx.expand(16, -1, -1))
        joint = m.unet(x, t_rows, ctx.expand(16, -1, -1),
                       bank=SharedBank([torch.cat(es) for es in zip(*banks)], [8, 8]), pose_residuals=pose)
        for i in range(2):
            sl = slice(8 * i, 8 * i + 8)
            ref = m.unet(x[sl], t_rows[sl], ctx.expand(8, -1, -1),
                         bank=BankReader([e.expand(8, -1, -1) for e in banks[i]]), pose_residuals=[p[sl] for p in pose])
            assert rel_err(joint[sl], ref) < 1e-5


def test_flop_targets_full_size():
    """Counted on meta tensors at full size: the brief's per-step and per-run figures."""
    ref, fast = run_flops("full", "reference"), run_flops("full", "fast")
    ref_w, fast_w = per_window(ref["nvs_step"], 4), per_window(fast["nvs_step"], 4)
    assert ref_w["total"] == pytest.approx(39.4e12, rel=0.01)
    assert fast_w["total"] <= 24.4e12
    assert fast["run"]["total"] / ref["run"]["total"] <= 0.63
    # the waste the fast engine removes: appearance net x8 copies, the discarded pose pass
    assert fast_w["appearance net"] < ref_w["appearance net"] / 20
    assert fast_w["pose net"] == pytest.approx(ref_w["pose net"] / 2, rel=1e-6)
    assert ref_w["total"] / UNET_EQUIVALENT == pytest.approx(49, abs=0.5)


def test_planner_respects_budget():
    cfg = get_model_config("nvs", "full")
    free = plan_batches(cfg, 4, 8, 64, 64, 2, None)
    assert free.windows_per_call == 4 and free.batch_cfg
    tight = plan_batches(cfg, 4, 8, 64, 64, 2, free.estimated_bytes - 1)
    assert tight.estimated_bytes <= free.estimated_bytes - 1
    assert (tight.windows_per_call, tight.batch_cfg) != (4, True)
    with pytest.raises(MemoryBudgetError, match="too small"):
        plan_batches(cfg, 4, 8, 64, 64, 2, 2 ** 30)


def test_pipeline_uses_plan_within_budget():
    cfg_small = plan_batches(get_model_config("nvs", "tiny"), 4, 8, 8, 8, 4, None)
    budget = cfg_small.estimated_bytes - 1
    pipe = Pipeline.random("tiny", seed=0, engine="fast", max_memory=budget)
    assert pipe.plan.estimated_bytes <= budget
    res = pipe(synthetic_portrait(64), synthetic_conditions(32, 64), steps=2, seed=0)
    assert res.unet_calls > 2 * 2
