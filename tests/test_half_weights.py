"""Half-precision weights: ``Pipeline(dtype=float16|bfloat16)`` stores the convolution and linear
weights in that dtype and runs under autocast, on CPU as on CUDA. Autocast would cast exactly
those weights at every call, so the numbers equal autocast over float32 weights bit for bit, at
half the weight memory; ``from_checkpoints`` builds on 'meta' and casts as it loads."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dp360rt import Pipeline
from dp360rt.demo import synthetic_conditions, synthetic_portrait
from dp360rt.model import LOW_PRECISION_MODULES, store_half_weights

COND, POR = synthetic_conditions(24, 64), synthetic_portrait(64)


def weight_dtypes(model: nn.Module) -> tuple[set, set]:
    """(dtypes of conv/linear parameters, dtypes of every other parameter)."""
    low, rest = set(), set()
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                (low if isinstance(mod, LOW_PRECISION_MODULES) else rest).add(p.dtype)
    return low, rest


@pytest.fixture(scope="module")
def weights():
    p = Pipeline.random("tiny", seed=0)
    return p.nvs.state_dict(), p.backview.state_dict()


def test_half_weights_equal_autocast_over_fp32(weights):
    fp32 = Pipeline.from_checkpoints(*weights, config="tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = fp32(POR, COND, steps=1, seed=1)
    half = Pipeline.from_checkpoints(*weights, config="tiny", dtype=torch.bfloat16)
    got = half(POR, COND, steps=1, seed=1)              # the pipeline's own autocast
    for m in (half.nvs, half.backview):
        assert weight_dtypes(m) == ({torch.bfloat16}, {torch.float32})
        assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    assert torch.equal(got.back_view, want.back_view) and torch.equal(got.views, want.views)
    # float32 on CPU stays float32 (no autocast): a different result from the bf16 run
    plain = fp32(POR, COND, steps=1, seed=1)
    err = (plain.views - got.views).abs().max().item()
    print(f"bf16 weights + autocast vs fp32: max abs error of the views {err:.3e}")
    assert 0 < err < 0.5
    fp32.close(), half.close()


def test_half_weights_halve_the_weight_bytes(weights):
    fp32 = Pipeline.from_checkpoints(*weights, config="tiny")
    half = Pipeline.from_checkpoints(*weights, config="tiny", dtype=torch.float16)
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())   # noqa: E731
    ratio = nbytes(half.nvs) / nbytes(fp32.nvs)
    print(f"tiny 360° model weights: fp32 {nbytes(fp32.nvs)} B, fp16 {nbytes(half.nvs)} B ({ratio:.3f}x)")
    assert 0.5 <= ratio < 0.6        # norms and embeddings keep float32
    # Pipeline(...) on already-built float32 models casts them the same way
    direct = Pipeline(Pipeline.from_checkpoints(*weights, config="tiny").nvs,
                      Pipeline.from_checkpoints(*weights, config="tiny").backview, dtype=torch.float16)
    assert weight_dtypes(direct.nvs) == ({torch.float16}, {torch.float32})
    for p in (fp32, half, direct):
        p.close()


def test_store_half_weights_refuses_other_dtypes():
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        store_half_weights(nn.Linear(2, 2), torch.float64)
    with pytest.raises(ValueError, match="dtype=torch.float64 is not supported"):
        Pipeline.random("tiny", dtype=torch.float64)
