"""Edge mode (``max_memory`` below both models' weights): one diffusion model resident at a time,
the same numbers as the default mode, shared frozen tensors intact, the runtime's waves."""
from __future__ import annotations

import pytest
import torch

from dp360rt import Pipeline
from dp360rt.config import load_config
from dp360rt.io.images import synthetic_conditions, synthetic_portrait
from dp360rt.sampler.plan import activation_bytes, vae_decode_bytes, weight_bytes

COND, POR = synthetic_conditions(32, 64), synthetic_portrait(64)
CFG = load_config("tiny")


@pytest.fixture(scope="module")
def weights():
    """Random tiny state dicts whose back-view model carries the 360° model's VAE and text tower,
    as the official checkpoints do (so the pipeline shares them)."""
    p = Pipeline.random("tiny", seed=0)
    nvs, bv = p.nvs.state_dict(), p.backview.state_dict()
    for k in bv:
        if k.startswith(("first_stage_model.", "cond_stage_model.")):
            bv[k] = nvs[k].clone()
    return nvs, bv


@pytest.fixture(scope="module")
def default(weights):
    """The default mode's pipeline and its result for seed 5 (one DDIM step keeps these tests fast)."""
    pipe = Pipeline.from_checkpoints(*weights, config="tiny")
    yield pipe, pipe(POR, COND, steps=1, seed=5)
    pipe.close()


def edge_budget(decode_frames: int) -> int:
    """A float32 budget below both models' weights that still fits the default batch (one window,
    both guidance branches) and a VAE decode of ``decode_frames`` frames, but not of twice as many."""
    n, lat = CFG["nvs"], CFG["nvs"].latent_size
    step = activation_bytes(n, 2, lat, lat, 4) + activation_bytes(n, 16, lat, lat, 4)
    need = max(step, vae_decode_bytes(n, decode_frames, lat, lat, 4))
    assert need < vae_decode_bytes(n, 2 * decode_frames, lat, lat, 4) or decode_frames == 8
    return weight_bytes(n, 4) + need


def meta_params(model) -> int:
    return sum(p.is_meta for p in model.parameters())


def test_edge_mode_gives_the_default_modes_views(weights, default, tmp_path):
    nvs, bv = weights
    want = default[1]
    edge = Pipeline.from_checkpoints(nvs, bv, config="tiny", max_memory=edge_budget(8), offload_dir=tmp_path)
    assert edge.shared["tensors"] > 0                   # the VAE and the text tower are one copy
    plan = edge.plan
    assert plan.one_model_resident and (plan.windows_per_call, plan.batch_cfg) == (1, True)
    assert "one diffusion model resident" in plan.describe(4, 8)
    assert edge.swap.resident == "backview" and meta_params(edge.nvs) > 0 and meta_params(edge.backview) == 0
    for call in range(2):                               # the second call reloads the back-view model
        got = edge(POR, COND, steps=1, seed=5)
        assert torch.equal(got.views, want.views) and torch.equal(got.back_view, want.back_view)
        assert torch.equal(got.latents, want.latents)
        assert edge.swap.resident == "nvs" and edge.swap.reloads == 1 + 2 * call
    # The offloaded back-view model lost its own weights, not the shared ones the 360° model reads.
    assert meta_params(edge.backview) > 0
    assert not any(p.is_meta for p in edge.nvs.first_stage_model.parameters())
    assert (tmp_path / "backview.pt").is_file() and (tmp_path / "nvs.pt").is_file()
    edge.close()
    assert tmp_path.is_dir()                           # a folder the caller gave is left alone


@pytest.mark.parametrize("edge", [True, False])
def test_edge_mode_loads_one_model_at_a_time(weights, monkeypatch, tmp_path, edge):
    """from_checkpoints in edge mode offloads the 360° model before the back-view model's own weights
    load (the two are never resident together); without a budget both stay, as the spy shows."""
    import dp360rt.engine.pipeline as pl
    seen: dict = {}
    real_identical, real_load = pl.identical_tensors, pl.load_state

    def identical(keep, model, sd):
        out = real_identical(keep, model, sd)
        seen.update(nvs=keep, shared={id(t) for t in out.values()})
        return out

    def load(model, sd, **kw):
        if model.kind == "backview":
            own = [p for p in seen["nvs"].parameters() if id(p) not in seen["shared"]]
            seen["nvs_own_resident"] = sum(p.numel() for p in own if not p.is_meta)
        return real_load(model, sd, **kw)

    monkeypatch.setattr(pl, "identical_tensors", identical)
    monkeypatch.setattr(pl, "load_state", load)
    pipe = Pipeline.from_checkpoints(*weights, config="tiny", max_memory=edge_budget(8) if edge else None,
                                     offload_dir=tmp_path)
    assert seen["shared"] and (seen["nvs_own_resident"] == 0) == edge, seen["nvs_own_resident"]
    assert (pipe.swap is not None) == edge and pipe.shared["tensors"] == len(seen["shared"])
    assert meta_params(pipe.backview) == 0
    pipe.close()


def test_sliced_decode_matches_whole_window(weights, default):
    nvs, bv = weights
    edge = Pipeline.from_checkpoints(nvs, bv, config="tiny", max_memory=edge_budget(2))
    assert edge.plan.decode_frames == 2
    want, got = default[1], edge(POR, COND, steps=1, seed=5)
    assert torch.equal(got.latents, want.latents)
    # fewer frames per decode call may change float32 rounding only (0 here for 2 frames; 2.4e-6 seen for 1)
    err = (got.views - want.views).abs().max().item()
    print(f"sliced VAE decode vs whole window: max abs error {err:.2e}")
    assert err < 1e-5
    edge.close()
    assert not edge.swap.directory.exists()           # its own temporary folder is removed


def test_offload_folder_removed_without_close(weights):
    """A caller who never calls close() does not leave gigabytes in the temporary folder: it goes
    with the pipeline (and at the latest at interpreter exit); a folder the caller gave is kept."""
    import gc
    nvs, bv = weights
    edge = Pipeline.from_checkpoints(nvs, bv, config="tiny", max_memory=edge_budget(8))
    folder = edge.swap.directory
    assert (folder / "nvs.pt").is_file()
    del edge
    gc.collect()
    assert not folder.exists()


def test_edge_mode_refuses_exported_backends(weights, tmp_path):
    nvs, bv = weights
    with pytest.raises(ValueError, match="edge mode.*Fix: use backend='torch' or raise max_memory"):
        Pipeline.from_checkpoints(nvs, bv, config="tiny", max_memory=edge_budget(8), backend="ort",
                                  export_dir=tmp_path)


def test_runtime_in_edge_mode_serves_later_requests_in_a_new_wave(weights, default):
    """A request submitted while another runs waits, then reloads the back-view model; both give
    the default runtime's views; a waiting request can be cancelled."""
    nvs, bv = weights
    edge = Pipeline.from_checkpoints(nvs, bv, config="tiny", max_memory=edge_budget(8))
    want = [default[0].submit(POR, COND, steps=1, seed=s).result(timeout=600) for s in (1, 2)]
    first = edge.submit(POR, COND, steps=1, seed=1)
    second = edge.submit(POR, COND, steps=1, seed=2)
    third = edge.submit(POR, COND, steps=1, seed=3)
    assert second.status == third.status == "waiting"
    third.cancel()
    assert third.status == "cancelled"
    got = [h.result(timeout=600) for h in (first, second)]
    for g, w in zip(got, want):
        assert torch.equal(g.views, w.views) and torch.equal(g.latents, w.latents)
    # wave 1: the 360° model in (the back view started resident); wave 2: back view in, 360° in
    assert edge.swap.reloads == 3 and edge.swap.resident == "nvs"
    edge.close()
