"""A fixture set with non-square latents, made by the reference engine from setA's weights.

setA's golden cases are 8x8 latents; hidden fixture sets have other shapes (e.g. 16x24 latents,
128x192 images). This builds such a set: setA's config and weight recipe, and every standard case
recomputed by the reference engine (already held to the authors' code by the setA cases) on
non-square inputs, with the random draws recorded as the authors' fixtures do.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dp360rt.sampler.noise import RecordedNoise
from dp360rt.verify import CaseRunner


def make_nonsquare_set(src: Path, dst: Path, latent_hw: tuple[int, int] = (16, 24), steps: int = 2,
                       seed: int = 5) -> Path:
    """Copy ``src``'s config and weights to ``dst`` and write ``cases.pt`` at ``latent_hw`` (H, W),
    DDIM cases of ``steps`` steps."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "init.json", "buffers.pt"):
        shutil.copy(src / name, dst / name)
    h, w = latent_hw
    src_cases = torch.load(src / "cases.pt", weights_only=True)
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    unif = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    runner = CaseRunner(dst, "reference")
    nvs = runner.model("nvs")
    cases: dict = {"text_encode": src_cases["text_encode"], "_meta": src_cases["_meta"]}
    with torch.no_grad():
        image, draw = unif(2, 3, 8 * h, 8 * w), [randn(2, 4, h, w)]
        mean, logvar = nvs.encode_image(image)
        cases["vae_encode"] = {"inputs": {"image": image}, "noise": draw, "outputs": {
            "mean": mean, "logvar": logvar, "latent": nvs.sample_latent(mean, logvar, draw[0])}}
        latent = randn(1, 4, h, w)
        cases["vae_decode"] = {"inputs": {"latent": latent}, "noise": [],
                               "outputs": {"image": nvs.decode_latent(latent)}}
        for kind, rows in (("nvs", 8), ("backview", 1)):
            m = runner.model(kind)
            ctx = src_cases[f"{kind}_apply_cond"]["inputs"]["context"][:1].expand(rows, -1, -1).contiguous()
            refs = {"ref_front": randn(1, 4, h, w).expand(rows, -1, -1, -1).contiguous()}
            if kind == "nvs":
                refs["ref_back"] = randn(1, 4, h, w).expand(rows, -1, -1, -1).contiguous()
            hint = unif(rows, 3, 8 * h, 8 * w)
            t = torch.full((rows,), 700, dtype=torch.long)
            x = randn(rows, 4, h, w)
            ref_back = [refs["ref_back"]] if "ref_back" in refs else []
            for branch in ("cond", "uncond"):
                uc = branch == "uncond"
                out = m.apply_model(x, t, ctx, hint, None if uc else refs["ref_front"], ref_back, uc=uc)
                inputs = {"x_noisy": x, "t": t, "context": ctx, "hint": hint, **({} if uc else refs)}
                outputs = {"eps": out.eps, "pose_residuals": out.pose_residuals}
                if not uc:
                    outputs["bank"] = out.bank
                cases[f"{kind}_apply_{branch}"] = {"inputs": inputs, "noise": [], "outputs": outputs}
            inputs = {"hint": hint, "context": ctx, "uncond_context": ctx, **refs,
                      "latent_hw": torch.tensor([h, w]), "steps": steps, "eta": 0.5, "cfg_scale": 3.0}
            if kind == "nvs":
                inputs["feature_latent"] = randn(rows, 4, h, w)
            # x_T, the feature latent's q_sample (360° model only), one per step
            draws = [randn(rows, 4, h, w) for _ in range(steps + (2 if kind == "nvs" else 1))]
            noise = RecordedNoise(list(draws))
            r = runner.sample(m, inputs, ref_back, noise)
            assert noise.remaining == 0, "the reference must consume every recorded draw"
            tb = r.tables
            cases[f"{kind}_ddim"] = {"inputs": inputs, "noise": draws, "outputs": {
                "x_T": r.x_T, "x_steps": r.x_steps, "pred_x0_steps": r.pred_x0_steps, "final_latent": r.latent,
                "ddim_timesteps": tb.timesteps, "ddim_alphas": tb.alphas, "ddim_alphas_prev": tb.alphas_prev,
                "ddim_sigmas": tb.sigmas, "ddim_sqrt_one_minus_alphas": tb.sqrt_one_minus_alphas}}
    torch.save(cases, dst / "cases.pt")
    return dst
