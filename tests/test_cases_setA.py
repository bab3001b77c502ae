"""One test per golden case of setA: our modules and sampler against the authors' code."""
from __future__ import annotations

import pytest
import torch

from conftest import SET_A, rel_err
from dp360rt.sampler.noise import RecordedNoise
from dp360rt.sampler.reference import sample_reference
from dp360rt.text.clip import empty_prompt_ids
from dp360rt.verify import TOL_CALL, TOL_DDIM

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _check(pairs, tol):
    for name, ours, ref in pairs:
        err = rel_err(ours, ref)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def test_text_encode(cases, models):
    c = cases["text_encode"]
    assert torch.equal(c["inputs"]["token_ids"], empty_prompt_ids())
    _check([("context", models["nvs"].encode_text(c["inputs"]["token_ids"]), c["outputs"]["context"])], TOL_CALL)


def test_backview_text_context(cases, models):
    ref = cases["_meta"]["backview_text_context"]
    _check([("context", models["backview"].encode_text(empty_prompt_ids()), ref)], TOL_CALL)


def test_vae_encode(cases, models):
    c, m = cases["vae_encode"], models["nvs"]
    mean, logvar = m.encode_image(c["inputs"]["image"])
    latent = m.sample_latent(mean, logvar, c["noise"][0])
    o = c["outputs"]
    _check([("mean", mean, o["mean"]), ("logvar", logvar, o["logvar"]), ("latent", latent, o["latent"])], TOL_CALL)


def test_vae_decode(cases, models):
    c = cases["vae_decode"]
    _check([("image", models["nvs"].decode_latent(c["inputs"]["latent"]), c["outputs"]["image"])], TOL_CALL)


@pytest.mark.parametrize("kind", ["nvs", "backview"])
@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_apply(cases, models, kind, branch):
    c = cases[f"{kind}_apply_{branch}"]
    i, o = c["inputs"], c["outputs"]
    uc = branch == "uncond"
    ref_back = [i["ref_back"]] if "ref_back" in i else []
    out = models[kind].apply_model(i["x_noisy"], i["t"], i["context"], i["hint"],
                                   None if uc else i["ref_front"], ref_back, uc=uc)
    pairs = [("eps", out.eps, o["eps"])]
    pairs += [(f"pose_residuals[{j}]", a, b) for j, (a, b) in enumerate(zip(out.pose_residuals, o["pose_residuals"], strict=True))]
    if not uc:
        pairs += [(f"bank[{j}]", a, b) for j, (a, b) in enumerate(zip(out.bank, o["bank"], strict=True))]
    else:
        assert out.bank is None
    _check(pairs, TOL_CALL)


@pytest.mark.parametrize("kind", ["nvs", "backview"])
def test_ddim(cases, models, kind):
    c = cases[f"{kind}_ddim"]
    i, o = c["inputs"], c["outputs"]
    noise = RecordedNoise(c["noise"])
    r = sample_reference(models[kind], context=i["context"], hint=i["hint"], ref_front=i["ref_front"],
                         ref_back=[i["ref_back"]] if "ref_back" in i else [], latent_hw=tuple(i["latent_hw"].tolist()),
                         steps=int(i["steps"]), eta=float(i["eta"]), cfg_scale=float(i["cfg_scale"]),
                         feature_latent=i.get("feature_latent"), noise=noise, record=True)
    assert noise.remaining == 0, "the sampler must consume exactly the reference's draws"
    assert r.unet_calls == 2 * int(i["steps"])
    assert torch.equal(r.tables.timesteps, o["ddim_timesteps"])
    assert torch.equal(r.tables.alphas, o["ddim_alphas"])
    assert torch.equal(r.tables.alphas_prev, o["ddim_alphas_prev"])
    assert torch.equal(r.tables.sigmas, o["ddim_sigmas"])
    assert torch.equal(r.tables.sqrt_one_minus_alphas, o["ddim_sqrt_one_minus_alphas"])
    pairs = [("x_T", r.x_T, o["x_T"]), ("final_latent", r.latent, o["final_latent"])]
    pairs += [(f"x_steps[{k}]", a, b) for k, (a, b) in enumerate(zip(r.x_steps, o["x_steps"], strict=True))]
    pairs += [(f"pred_x0_steps[{k}]", a, b) for k, (a, b) in enumerate(zip(r.pred_x0_steps, o["pred_x0_steps"], strict=True))]
    _check(pairs, TOL_DDIM)


def test_every_case_is_tested(cases):
    """A new case in the fixture set must get a test here (and a branch in dp360rt.verify)."""
    known = {"text_encode", "vae_encode", "vae_decode", "nvs_apply_cond", "nvs_apply_uncond", "nvs_ddim",
             "backview_apply_cond", "backview_apply_uncond", "backview_ddim", "_meta"}
    assert set(cases) == known
