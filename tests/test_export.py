"""Export toolchain and exported backends (CPU): ONNX files of the setA tiny models run in ONNX
Runtime and give the torch backend's numbers; the engine cache never serves a stale engine; the
runtime imports without onnx / onnxruntime / tensorrt.

The two models are exported once per module, in parallel: the back-view model through the CLI in
a subprocess, the 360° model in-process.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SET_A, rel_err


onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dp360rt.backends.engine_cache import EngineCache, EngineKey, StaleEngineError  # noqa: E402
from dp360rt.backends.manifest import MODULE_PREFIX, ExportManifest, ExportMismatchError  # noqa: E402
from dp360rt.backends.ort_backend import OrtBackend  # noqa: E402
from dp360rt.backends.torch_backend import TorchBackend  # noqa: E402
from dp360rt.sampler.fast import sample_windows_fast, write_shared_bank  # noqa: E402
from dp360rt.sampler.plan import BatchPlan  # noqa: E402
from dp360rt.export.profiles import Profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]          # the repository: export/ holds the offline scripts
TOL = 1e-5
THREADS = 1   # tiny networks: one thread is fastest, and immune to a busy CPU stalling the OpenMP team
# The built-in 360° profiles with the VAE at batch 1 only (the 8-frame VAE files add time, not coverage).
NVS_PROFILES = [
    Profile("window8", "nvs", unet=((8, 8),), nobank=(8,), pose=(8,), refs=2),
    Profile("window8x2cfg", "nvs", unet=((16, 8),), nobank=(8,), pose=(8,), refs=2),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory, _one_thread):
    """{"nvs": dir, "backview": dir, "cli_output": str, "seconds": float}."""
    from dp360rt.export.onnx_export import export_models, format_summary
    base = tmp_path_factory.mktemp("onnx")
    bv_ckpt = base / "backview.pt"
    torch.save(models["backview"].state_dict(), bv_ckpt)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dp360rt.export", "--config", str(SET_A), "--backview", str(bv_ckpt),
                             "--profiles", "backview", "--out", str(base / "backview"), "--quiet",
                             "--threads", str(THREADS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, rows = export_models({"nvs": models["nvs"]}, base / "nvs", NVS_PROFILES, progress=False,
                                sources={"nvs": "setA recipe"})
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    print("\n" + format_summary(rows) + "\n" + out)
    return {"nvs": base / "nvs", "backview": base / "backview", "cli_output": out,
            "seconds": time.perf_counter() - t0}


@pytest.fixture(scope="module")
def backends(models, exported):
    return {k: OrtBackend.from_model(models[k], export_dir=exported[k], threads=THREADS) for k in ("nvs", "backview")}


def _inputs(m, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = m.cfg.latent_size
    x = torch.randn(rows, 4, h, h, generator=g)
    hint = torch.rand(rows, 3, 8 * h, 8 * h, generator=g) * 2 - 1
    refs = [torch.randn(1, 4, h, h, generator=g) for _ in range(2 if m.kind == "nvs" else 1)]
    from dp360rt.text.clip import empty_prompt_ids
    ctx = m.encode_text(empty_prompt_ids())
    return x, hint, refs, ctx


# -- the files -------------------------------------------------------------------------------------------
def test_manifest_describes_every_file(exported):
    from dp360rt.export.onnx_export import sha256_file
    for kind in ("nvs", "backview"):
        man = ExportManifest.load(exported[kind])
        assert set(man.models) == {kind}
        modules = {f.module for f in man.files}
        assert modules == {"text", "vae_encoder", "vae_decoder", "pose", "appearance", "unet", "unet_nobank"}
        for f in man.files:
            p = man.path(f)
            assert p.is_file() and sha256_file(p) == f.sha256
            assert f.opset >= 17 and f.precision == "fp32" and f.data_file == f"{kind}/weights.data"
            assert f.data_sha256 == sha256_file(man.dir / f.data_file)
            assert f.state_dict_sha256 == man.models[kind]["module_sha256"][MODULE_PREFIX[f.module]]
            proto = onnx.load(str(p), load_external_data=False)
            assert [i.name for i in proto.graph.input] == [s.name for s in f.inputs]
            assert [o.name for o in proto.graph.output] == [s.name for s in f.outputs]
            assert all(d > 0 for s in f.inputs + f.outputs for d in s.shape)
        onnx.checker.check_model(str(man.path(next(f for f in man.files if f.module == "unet"))), full_check=True)
    nvs = ExportManifest.load(exported["nvs"])
    unets = {(f.rows, f.cond_rows): f for f in nvs.files if f.module == "unet"}
    assert set(unets) == {(8, 8), (16, 8)}
    assert unets[16, 8].profiles == ("window8x2cfg",)
    assert len([s for s in unets[16, 8].inputs if s.name.startswith("bank_")]) == 16
    assert len([s for s in unets[16, 8].inputs if s.name.startswith("res_")]) == 13
    assert nvs.profiles["window8"]["files"] and "nvs/unet_nobank_b8.onnx" in nvs.profiles["window8x2cfg"]["files"]
    assert "backview/unet_b2_c1_r1.onnx" in exported["cli_output"]        # the CLI printed its summary table


@pytest.mark.parametrize("kind", ["nvs", "backview"])
def test_every_module_matches_torch(kind, models, backends):
    m, ob, tb = models[kind], backends[kind], TorchBackend(models[kind])
    rows = 8 if kind == "nvs" else 1
    x, hint, refs, ctx = _inputs(m, rows, seed=1)
    t = torch.full((rows,), 417)
    errs = {}
    with torch.no_grad():
        e_o = write_shared_bank(ob, refs, t[:1], ctx)
        e_t = write_shared_bank(tb, refs, t[:1], ctx)
        errs["appearance"] = max(rel_err(a, b) for a, b in zip(e_o, e_t))
        r2, t2 = torch.cat(refs + refs), torch.tensor([417] * len(refs) + [9] * len(refs))  # two bank groups
        errs["appearance (2 groups)"] = max(rel_err(a, b) for a, b in zip(
            ob.appearance(r2, t2, ctx.expand(len(t2), -1, -1)), tb.appearance(r2, t2, ctx.expand(len(t2), -1, -1))))
        c = ctx.expand(rows, -1, -1)
        p_o, p_t = ob.pose(x, hint, t, c), tb.pose(x, hint, t, c)
        errs["pose"] = max(rel_err(a, b) for a, b in zip(p_o, p_t))
        errs["unet (cond rows only)"] = rel_err(ob.unet(x, t, c, ob.bank(e_t), p_t, rows),
                                                tb.unet(x, t, c, tb.bank(e_t), p_t, rows))
        x2, t2, c2 = torch.cat([x, x + 0.5]), torch.cat([t, t]), ctx.expand(2 * rows, -1, -1)
        errs["unet (cond + uncond rows)"] = rel_err(ob.unet(x2, t2, c2, ob.bank(e_t), p_t, rows),
                                                    tb.unet(x2, t2, c2, tb.bank(e_t), p_t, rows))
        errs["unet_nobank"] = rel_err(ob.unet(x, t, c, None, None, 0), tb.unet(x, t, c, None, None, 0))
        from dp360rt.text.clip import empty_prompt_ids
        errs["text"] = rel_err(ob.encode_text(empty_prompt_ids()), tb.encode_text(empty_prompt_ids()))
        img = torch.rand(2, 3, 8 * m.cfg.latent_size, 8 * m.cfg.latent_size) * 2 - 1   # split over batch-1 files
        (mo, lo), (mt, lt) = ob.encode_image(img), tb.encode_image(img)
        errs["vae_encoder"] = max(rel_err(mo, mt), rel_err(lo, lt))
        errs["vae_decoder"] = rel_err(ob.decode_latent(x[:1]), tb.decode_latent(x[:1]))
    print(f"\n{kind} ORT CPU vs torch, max relative error per module:")
    for k, v in errs.items():
        print(f"  {k:<26} {v:.2e}")
    assert all(v < TOL for v in errs.values()), errs


def test_every_backend_implements_the_interface():
    """Callers (sampler, pipeline, verify) call every Backend method on any backend, never probe for one."""
    from dp360rt.backends.base import Backend
    from dp360rt.backends.trt_backend import TrtBackend
    wanted = {n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")}
    assert {"appearance", "bank", "pose", "unet", "encode_text", "encode_image", "decode_latent"} <= wanted
    for cls in (TorchBackend, OrtBackend, TrtBackend):
        assert not [n for n in wanted if not callable(getattr(cls, n, None))], cls


def test_whole_360_generation_ort_equals_torch(models, backends):
    """4 windows x 8 frames, same noises, fast sampler on the ort backend vs the torch backend,
    for both exported UNet shapes (batched and separate guidance branches)."""
    from dp360rt.sampler.windows import prepare_windows
    from dp360rt.sampler.noise import GeneratorNoise
    m = models["nvs"]
    _, _, refs, ctx = _inputs(m, 8, seed=2)
    cond = torch.rand(32, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    for plan in (BatchPlan(1, batch_cfg=True), BatchPlan(1, batch_cfg=False)):
        out = {}
        for name, be in (("torch", TorchBackend(m)), ("ort", backends["nvs"])):
            wins = prepare_windows(m, cond, None, 2, GeneratorNoise(11))
            zs, calls = sample_windows_fast(m, wins, context=ctx, ref_front=refs[0], ref_back=refs[1:], steps=2,
                                            eta=0.5, cfg_scale=3.0, plan=plan, backend=be)
            out[name] = (torch.cat(zs), calls)
        err = rel_err(out["ort"][0], out["torch"][0])
        print(f"\n360° generation, {plan.describe(4, 8)}: ort vs torch max rel err {err:.2e}")
        assert out["ort"][1] == out["torch"][1]
        assert err < 1e-4


def test_pipeline_on_ort_backend_equals_torch(models, exported):
    """The product path: `Pipeline(..., backend="ort", export_dir=...)` end to end (back view, 32 views,
    text tower and VAE from the export too), and the same request streamed through the C++ loop."""
    from dp360rt import Pipeline
    from dp360rt.io.images import synthetic_conditions, synthetic_portrait
    por, cond = synthetic_portrait(64), synthetic_conditions(32, 64)
    ref = Pipeline(models["nvs"], models["backview"])(por, cond, steps=2, seed=4)
    pipe = Pipeline(models["nvs"], models["backview"], backend="ort", threads=THREADS,
                    export_dir={"nvs": exported["nvs"], "backview": exported["backview"]})
    assert all(isinstance(pipe.net(m), OrtBackend) for m in (pipe.nvs, pipe.backview))
    got = pipe(por, cond, steps=2, seed=4)
    err = rel_err(got.latents, ref.latents)
    print(f"\npipeline ort vs torch: latents max rel err {err:.2e}, views max abs "
          f"{(got.views - ref.views).abs().max():.2e}")
    assert err < 1e-4 and (got.views - ref.views).abs().max() < 1e-3
    assert (got.back_view - ref.back_view).abs().max() <= 1 / 255 + 1e-6
    streamed = torch.stack([v.image for v in pipe.stream(por, cond, steps=2, seed=4)])
    pipe.close()
    assert (streamed - ref.views).abs().max() < 1e-3
    with pytest.raises(ValueError, match="engine='fast'"):
        Pipeline(models["nvs"], models["backview"], engine="reference", backend="ort", export_dir=exported["nvs"])


def test_batch_sizes_share_one_trace_and_weights(models, tmp_path):
    """The `batch32` files (4 windows per call) are the `window8` graphs pinned to 32 rows, traced
    once at one window; every weight tensor is stored once (the UNet with and without the bank
    share theirs); a whole 4-windows-per-call generation on the files equals torch."""
    from dp360rt.export import onnx_export as oe
    from dp360rt.export.profiles import parse_profiles
    from dp360rt.sampler.windows import prepare_windows
    from dp360rt.sampler.noise import GeneratorNoise
    m = models["nvs"]
    man, rows = oe.export_models({"nvs": m}, tmp_path, parse_profiles(["window8", "batch32"]), progress=False,
                                 options=oe.ExportOptions(modules=("pose", "appearance", "unet_nobank", "unet")))
    print("\n" + oe.format_summary(rows))
    files = {(f["module"], f["rows"]): f for f in man["files"]}
    for module in ("pose", "unet_nobank", "unet"):
        small, big = files[module, 8], files[module, 32]
        assert small["traced_rows"] == big["traced_rows"] == 8
        assert big["inputs"][0]["shape"][0] == 32 and big["outputs"][0]["shape"][0] == 32
    assert {f["data_file"] for f in man["files"]} == {"nvs/weights.data"}    # one weights file for all
    for r in rows:                        # only the first file of each trace adds weights; the UNet with
        graph = (tmp_path / r.file).stat().st_size          # the bank finds all of the no-bank UNet's
        assert (r.bytes > graph) == (r.file in ("nvs/pose_b8.onnx", "nvs/appearance_r2.onnx",
                                                "nvs/unet_nobank_b8.onnx")), r
    assert sum(r.bytes for r in rows) < 0.5 * sum(f["bytes"] for f in man["files"])
    ob = OrtBackend.from_model(m, export_dir=tmp_path, threads=THREADS)
    _, _, refs, ctx = _inputs(m, 8, seed=6)
    cond = torch.rand(32, 3, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    out = {}
    for name, be in (("torch", TorchBackend(m)), ("ort", ob)):
        wins = prepare_windows(m, cond, None, 2, GeneratorNoise(12))
        zs, _ = sample_windows_fast(m, wins, context=ctx, ref_front=refs[0], ref_back=refs[1:], steps=2, eta=0.5,
                                    cfg_scale=3.0, plan=BatchPlan(4, batch_cfg=False), backend=be)
        out[name] = torch.cat(zs)
    err = rel_err(out["ort"], out["torch"])
    print(f"360° generation on the batch32 files (traced at 8 rows): ort vs torch max rel err {err:.2e}")
    assert err < 1e-4


def test_backview_sampling_ort_equals_torch(models, backends):
    from dp360rt.sampler.windows import Window
    from dp360rt.sampler.noise import GeneratorNoise, RecordedNoise
    m = models["backview"]
    _, hint, refs, ctx = _inputs(m, 1, seed=3)
    noise = GeneratorNoise(4)
    draws = [noise((1, 4, 8, 8)) for _ in range(3)]
    out = {}
    for name, be in (("torch", TorchBackend(m)), ("ort", backends["backview"])):
        (z,), _ = sample_windows_fast(m, [Window(0, hint, None, RecordedNoise(draws))], context=ctx,
                                      ref_front=refs[0], ref_back=[], steps=2, eta=0.5, cfg_scale=3.0, backend=be)
        out[name] = z
    assert rel_err(out["ort"], out["torch"]) < 1e-4


# -- refusing what does not fit -------------------------------------------------------------------------
def test_unexported_shape_is_a_clear_error(models, backends):
    m, ob = models["nvs"], backends["nvs"]
    x, hint, refs, ctx = _inputs(m, 16)
    t = torch.full((16,), 10)
    with pytest.raises(ExportMismatchError, match=r"no exported 'pose' file.*x \[16, 4, 8, 8\].*pose_b8\.onnx"):
        ob.pose(x, hint, t, ctx.expand(16, -1, -1))
    entries = write_shared_bank(ob, refs, t[:1], ctx)
    res = ob.pose(x[:8], hint[:8], t[:8], ctx.expand(8, -1, -1))
    with pytest.raises(ExportMismatchError, match=r"cond_rows 8.*unet_b16_c8_r2\.onnx.*window8x2cfg.*Fix"):
        ob.unet(torch.cat([x, x]), torch.cat([t, t]), ctx.expand(32, -1, -1), ob.bank(entries), res, 8)
    with pytest.raises(ExportMismatchError, match="one bank group"):
        ob.bank([torch.cat([e, e]) for e in entries])
    with pytest.raises(ExportMismatchError, match="2 bank groups"):
        ob.unet(x, t, ctx.expand(16, -1, -1), ob.bank(entries), res, [8, 8])
    from dp360rt.sampler.windows import prepare_windows
    from dp360rt.sampler.noise import GeneratorNoise
    wins = prepare_windows(m, torch.rand(32, 3, 64, 64) * 2 - 1, None, 1, GeneratorNoise(0))
    with pytest.raises(ExportMismatchError, match="BatchPlan"):   # 4 windows per call: 32 rows, not exported
        sample_windows_fast(m, wins, context=ctx, ref_front=refs[0], ref_back=refs[1:], steps=1, eta=0.0,
                            cfg_scale=3.0, plan=BatchPlan(4, batch_cfg=True), backend=ob)


def test_export_of_other_weights_or_profiles_is_refused(models, exported):
    from dp360rt.model import build_model, init_random
    other = build_model("nvs", SET_A)
    with torch.no_grad():
        init_random(other)
    with pytest.raises(ExportMismatchError, match="other model.diffusion_model weights|other .* weights"):
        OrtBackend.from_model(other, export_dir=exported["nvs"])
    OrtBackend.from_model(other, export_dir=exported["nvs"], verify_weights=False)   # explicit opt-out works
    with pytest.raises(ExportMismatchError, match="batch32"):
        OrtBackend.from_model(models["nvs"], export_dir=exported["nvs"], profile="batch32")
    with pytest.raises(ExportMismatchError, match="no files for the backview model"):
        OrtBackend.from_model(models["backview"], export_dir=exported["nvs"])
    tiny_medium = build_model("nvs", "medium", device="meta")
    with pytest.raises(ExportMismatchError, match="another nvs config"):
        OrtBackend._check_model(ExportManifest.load(exported["nvs"]), tiny_medium, [], verify_weights=False)


def test_verify_with_ort_backend(models, exported):
    from dp360rt.verify import TABLE, verify
    results = verify(SET_A, backend="ort", export_dir={"nvs": exported["nvs"], "backview": exported["backview"]},
                     threads=THREADS)
    print("\n" + "\n".join(TABLE.row(r) for r in results))
    assert len(results) == 10 and all(r.ok for r in results), [r for r in results if not r.ok]


def test_export_attention_forms_equal_the_runtime():
    """The exportable attention forms (patched in while tracing) compute the runtime's numbers."""
    import torch.nn.functional as F
    from dp360rt.kernels.shared_kv_attention import attention_lse_math, shared_kv_attention
    from dp360rt.export.wrappers import QUERY_CHUNK, attention_lse_export, export_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, QUERY_CHUNK + 300, 16, generator=g) for _ in range(3))
    ks, vs = (torch.randn(1, 3, 200, 16, generator=g) for _ in range(2))
    out, lse = attention_lse_export(q, k, v)
    ref_out, ref_lse = attention_lse_math(q, k, v)
    assert (out - ref_out).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
    want = [F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True),
            shared_kv_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], ks, vs)]
    for mode in ("lse", "concat"):
        with export_attention(mode):
            got = [F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True)]
            from dp360rt.unet import bank as bank_mod
            got.append(bank_mod.shared_kv_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], ks, vs))
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(got, want)), mode
    assert F.scaled_dot_product_attention.__module__ != "dp360rt.export.wrappers"          # restored


# -- fp16 ---------------------------------------------------------------------------------------------------
def test_fp16_export_halves_weights_and_stays_close(models, tmp_path):
    from dp360rt.export.onnx_export import ExportOptions, export_models
    m = models["nvs"]
    p = [Profile("fp16", "nvs", unet=((8, 8),), nobank=(8,), pose=(8,), refs=2)]
    man, _ = export_models({"nvs": m}, tmp_path / "fp16", p,
                           ExportOptions(precision="fp16", modules=("text", "vae_decoder")), progress=False)
    proto = onnx.load(str(tmp_path / "fp16" / "nvs" / "text_b1.onnx"))
    inits = {i.name: i for i in proto.graph.initializer}
    gemm_w = [inits[n] for node in proto.graph.node if node.op_type in ("MatMul", "Gemm") for n in node.input
              if n in inits]
    assert gemm_w and all(i.data_type == onnx.TensorProto.FLOAT16 for i in gemm_w)
    ln = [inits[n] for node in proto.graph.node if node.op_type == "LayerNormalization"
          for n in node.input if n in inits]
    assert ln and all(i.data_type == onnx.TensorProto.FLOAT for i in ln)                   # norms stay fp32
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT     # fp32 I/O kept
    ob = OrtBackend.from_model(m, export_dir=tmp_path / "fp16", threads=THREADS)
    from dp360rt.text.clip import empty_prompt_ids
    ids = empty_prompt_ids()
    e_text = rel_err(ob.encode_text(ids), m.encode_text(ids))
    z = torch.randn(1, 4, 8, 8)
    e_vae = rel_err(ob.decode_latent(z), m.decode_latent(z))
    print(f"\nfp16 export vs torch fp32: text {e_text:.2e}, vae decoder {e_vae:.2e}")
    assert e_text < 1e-2 and e_vae < 1e-2
    assert all(f["precision"] == "fp16" for f in man["files"])


# -- the engine cache (CPU: fake environment fields) --------------------------------------------------------
def _key(**kw) -> EngineKey:
    base = dict(onnx_sha256="a" * 64, precision="fp16", profile="window8x2cfg|x=16x4x64x64:float32",
                trt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    base.update(kw)
    return EngineKey(**base)


def test_engine_cache_reuses_only_an_exact_key(tmp_path):
    cache = EngineCache(tmp_path)
    builds = []

    def build(tag: bytes):
        return lambda: builds.append(tag) or tag

    data, path, cached = cache.get("nvs__unet_b16_c8_r2", _key(), build(b"engine-1"))
    assert (data, cached) == (b"engine-1", False) and path.is_file()
    data, _, cached = cache.get("nvs__unet_b16_c8_r2", _key(), build(b"never"))
    assert (data, cached) == (b"engine-1", True) and builds == [b"engine-1"]
    for field, value in [("onnx_sha256", "b" * 64), ("precision", "fp32"), ("profile", "window8|x=8x4x64x64:float32"),
                         ("trt_version", "10.4.0"), ("gpu_name", "NVIDIA H200"), ("compute_capability", "8.9")]:
        with pytest.raises(StaleEngineError, match=field) as ei:
            cache.get("nvs__unet_b16_c8_r2", _key(**{field: value}), build(b"never"), rebuild=False)
        assert ei.value.mismatched == [field]
        assert "stale" in str(ei.value)
    assert builds == [b"engine-1"]
    # a mismatch with rebuilding allowed builds a fresh engine and drops the stale one
    data, new_path, cached = cache.get("nvs__unet_b16_c8_r2", _key(trt_version="10.4.0"), build(b"engine-2"))
    assert (data, cached) == (b"engine-2", False) and not path.exists()
    assert [k.trt_version for _, k in cache.entries("nvs__unet_b16_c8_r2")] == ["10.4.0"]
    # an engine altered after it was written is never loaded
    new_path.write_bytes(b"tampered")
    assert cache.lookup("nvs__unet_b16_c8_r2", _key(trt_version="10.4.0")) is None
    with pytest.raises(StaleEngineError, match="does not verify"):
        cache.get("nvs__unet_b16_c8_r2", _key(trt_version="10.4.0"), build(b"never"), rebuild=False)
    with pytest.raises(StaleEngineError, match="no cached engine"):
        cache.get("nvs__pose_b8", _key(), build(b"never"), rebuild=False)
    # other stems never count as candidates
    cache.get("nvs__unet_b16_c8_r2x", _key(), build(b"other"))
    assert len(cache.entries("nvs__unet_b16_c8_r2")) == 1


def test_engine_key_tracks_the_onnx_file(exported, tmp_path):
    from dp360rt.backends.trt_backend import engine_key
    man = ExportManifest.load(exported["backview"])
    entry = next(f for f in man.files if f.module == "text")
    env = {"trt_version": "10.3.0", "gpu_name": "fake", "compute_capability": "9.0"}
    memo = tmp_path / "hashes.json"
    k1 = engine_key(man, entry, "fp16", env, memo)
    assert k1 == engine_key(man, entry, "fp16", env, memo) and memo.is_file()
    assert "token_ids=1x77:int64" in k1.profile and k1.precision == "fp16"
    copy = tmp_path / "export"
    import shutil
    shutil.copytree(exported["backview"], copy)
    man2 = ExportManifest.load(copy)
    p = man2.path(entry)
    proto = onnx.load(str(p))
    proto.producer_version = "changed"
    onnx.save_model(proto, str(p))                 # replaced behind the manifest's back
    assert engine_key(man2, entry, "fp16", env, memo).onnx_sha256 != k1.onnx_sha256


# -- optional dependencies stay optional -----------------------------------------------------------------
def test_runtime_imports_without_onnx_or_tensorrt():
    code = ("import sys, dp360rt, dp360rt.cli.main, dp360rt.backends.manifest, dp360rt.backends.exported, "
            "dp360rt.backends.ort_backend, dp360rt.backends.trt_backend, dp360rt.backends.engine_cache; "
            "bad = [m for m in ('onnx', 'onnxruntime', 'tensorrt', 'dp360rt.export') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_offline_scripts_export_random_weights(tmp_path):
    """The repository's toolchain scripts as a user runs them: export/to_onnx.py writes a random
    model's files and a manifest naming those weights; export/trt_engines.py builds their engines,
    or says what is missing."""
    from dp360rt.backends.manifest import state_dict_hashes
    from dp360rt.export.onnx_export import sha256_file
    from dp360rt.model import build_model, init_random
    out = tmp_path / "onnx"
    r = subprocess.run([sys.executable, str(ROOT / "export" / "to_onnx.py"), "--random", "--seed", "3",
                        "--config", str(SET_A), "--profiles", "backview", "--modules", "text", "vae_decoder",
                        "--out", str(out), "--quiet", "--threads", str(THREADS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    man = ExportManifest.load(out)
    assert set(man.models) == {"backview"} and man.models["backview"]["source"] == "random seed 3"
    assert sorted(f.module for f in man.files) == ["text", "vae_decoder"]
    assert all(sha256_file(man.path(f)) == f.sha256 for f in man.files)
    m = build_model("backview", SET_A)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        init_random(m)
    assert man.models["backview"]["state_dict_sha256"] == state_dict_hashes(m.state_dict())[0]
    r = subprocess.run([sys.executable, str(ROOT / "export" / "trt_engines.py"), str(out), "--precision", "fp32"],
                       capture_output=True, text=True)
    if _trt_missing() is None:
        assert r.returncode == 0 and len(list((out / "engines").glob("*.engine"))) >= 2, r.stderr
    else:
        assert r.returncode == 2 and r.stderr.startswith("trt engines: ") and "Fix" in r.stderr, r.stderr


def test_cli_parser_and_argument_errors(capsys):
    import argparse
    from dp360rt.export.cli import add_parser
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    add_parser(sub)
    a = ap.parse_args(["export", "--out", "x", "--profiles", "window8", "w2x2=32:16", "--fp16"])
    assert a.fp16 and a.profiles == ["window8", "w2x2=32:16"]
    assert a.func(ap.parse_args(["export", "--out", "x"])) == 2
    assert "give the weights" in capsys.readouterr().err
    assert a.func(ap.parse_args(["export", "--out", "x", "--random", "--config", "tiny", "--profiles", "nope"])) == 2
    assert "unknown profile" in capsys.readouterr().err
    if _trt_missing() is not None:         # fails fast, before any export work
        assert a.func(ap.parse_args(["export", "--out", "x", "--random", "--to", "trt"])) == 2
        assert "TensorRT" in capsys.readouterr().err


# -- TensorRT (GPU machines with TensorRT only) ---------------------------------------------------------------
def _trt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@pytest.mark.skipif(_trt_missing() is not None, reason=f"TensorRT backend: {_trt_missing()}")
def test_trt_backend_matches_torch(models, exported, tmp_path, monkeypatch):
    from dp360rt.backends.trt_backend import TrtBackend
    monkeypatch.setenv("DP360RT_KERNELS", "torch")                  # plain fp32 reference: no Triton, no TF32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    m = models["backview"]
    x, hint, refs, ctx = (v.cuda() if isinstance(v, torch.Tensor) else [r.cuda() for r in v] for v in _inputs(m, 1))
    t = torch.full((1,), 300, device="cuda")
    m.cuda()
    try:
        for graphs in (False, True):
            tb = TrtBackend.from_model(m, export_dir=exported["backview"], precision="fp32", cuda_graphs=graphs,
                                       cache_dir=tmp_path / "engines")
            with torch.no_grad():
                e = write_shared_bank(tb, refs, t, ctx)
                e_t = write_shared_bank(TorchBackend(m), refs, t, ctx)
                assert max(rel_err(a.cpu(), b.cpu()) for a, b in zip(e, e_t)) < 1e-4
                p = tb.pose(x, hint, t, ctx)
                eps = tb.unet(x, t, ctx, tb.bank(e_t), p, 1)
                ref = TorchBackend(m).unet(x, t, ctx, TorchBackend(m).bank(e_t), p, 1)
                assert rel_err(eps.cpu(), ref.cpu()) < 1e-4
        rebuilt = TrtBackend.from_model(m, export_dir=exported["backview"], precision="fp32", rebuild=False,
                                        cache_dir=tmp_path / "engines")
        assert rebuilt.unet(x, t, ctx, None, None, 0).shape == x.shape                     # served from the cache
    finally:
        m.cpu()
