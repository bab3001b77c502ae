"""Triton kernels against their PyTorch twins, the backend switch, and one setA case end to end.

Without a GPU the kernels run in the Triton interpreter. ``TRITON_INTERPRET=1`` must be set before
anything imports triton (``tl.sum``/``tl.max`` are themselves jit functions, decorated at import),
and it must not leak into the rest of a pytest session (later GPU tests would inherit an
interpreter-mode triton). So:

* run with ``TRITON_INTERPRET=1`` already in the environment: the checks run in this process on
  CPU tensors;
* otherwise this module re-runs itself in a subprocess with ``TRITON_INTERPRET=1``
  (:func:`test_kernels_under_interpreter_subprocess`), and, when CUDA is available, also runs
  the kernel checks here on the GPU (compiled kernels).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import SET_A, rel_err
from dp360rt.checkpoint import load_checkpoint, materialize_recipe
from dp360rt.kernels import dispatch, triton_env
from dp360rt.kernels.shared_kv_attention import shared_kv_attention, shared_kv_attention_reference
from dp360rt.kernels.temporal_attention import temporal_attention_reference
from dp360rt.model import build_model
from dp360rt.unet.attention import Attention, merge_heads, split_heads
from dp360rt.unet.bank import SharedBank
from dp360rt.unet.motion import TemporalAttention

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

INTERP = triton_env.interpreting() and triton_env.interpreter_consistent()
CUDA = torch.cuda.is_available() and not triton_env.interpreting()
DEVICE = "cpu" if INTERP else ("cuda" if CUDA else None)
kernels = pytest.mark.skipif(DEVICE is None, reason="no CUDA and not under TRITON_INTERPRET=1: "
                                                    "covered by test_kernels_under_interpreter_subprocess")
interpreter_only = pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1 from the start "
                                                         "(covered by the subprocess test)")

# |ours - ref| <= atol + rtol * |ref|, ref computed in fp32 from the same (rounded) inputs
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert ours.shape == ref.shape and ours.dtype == dtype
    err = (ours.float() - ref.float()).abs()
    bound = atol + rtol * ref.float().abs()
    assert bool((err <= bound).all()), f"{dtype}: max err {err.max().item():.3e}, worst excess " \
                                       f"{(err - bound).max().item():.3e}"


def _heads(b: int, n: int, h: int, d: int, g: torch.Generator, dtype, device) -> torch.Tensor:
    """[B, H, N, D] as ``split_heads`` makes it: a strided view of a [B, N, H*D] projection."""
    return split_heads(torch.randn(b, n, h * d, generator=g).to(device=device, dtype=dtype), h)


# -- shared-KV attention --------------------------------------------------------------------------------
SKV_SHAPES = [  # b, h, n, m, d, blocks (None: the kernel's default tiles)
    (1, 1, 17, 34, 40, (16, 16)),
    (3, 4, 17, 34, 8, (16, 16)),
    (3, 4, 17, 34, 40, None),
    (1, 4, 5, 3, 80, None),
    (3, 1, 33, 70, 160, (16, 32)),
]


@kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("b,h,n,m,d,blocks", SKV_SHAPES)
def test_shared_kv_kernel_matches_reference(b, h, n, m, d, blocks, dtype):
    from dp360rt.kernels.shared_kv_attention_triton import shared_kv_attention_triton
    g = torch.Generator().manual_seed(b * 1000 + n * 10 + d)
    q, k, v = (_heads(b, n, h, d, g, dtype, DEVICE) for _ in range(3))
    # shared keys: row 1 of a 2-group bank, as SharedBank slices it (non-contiguous, offset)
    ks, vs = (_heads(2, m, h, d, g, dtype, DEVICE)[1:2] for _ in range(2))
    assert h == 1 or not (q.is_contiguous() or ks.is_contiguous())   # H=1: the transpose is a no-op
    bm, bn = blocks or (None, None)
    ours = shared_kv_attention_triton(q, k, v, ks, vs, block_m=bm, block_n=bn)
    ref = shared_kv_attention_reference(*(x.float() for x in (q, k, v, ks, vs)))
    _close(ours, ref, dtype)


@kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("b,h,n,d", [(3, 4, 17, 40), (1, 1, 34, 8)])
def test_plain_attention_kernel_matches_sdpa(b, h, n, d, dtype):
    from dp360rt.kernels.shared_kv_attention_triton import shared_kv_attention_triton
    g = torch.Generator().manual_seed(7 * n + d)
    q, k, v = (_heads(b, n, h, d, g, dtype, DEVICE) for _ in range(3))
    ours = shared_kv_attention_triton(q, k, v, None, None, block_m=16, block_n=16)
    _close(ours, F.scaled_dot_product_attention(q.float(), k.float(), v.float()), dtype)


# -- temporal attention ---------------------------------------------------------------------------------
def _frames_layout(bf: int, s: int, c: int, g: torch.Generator, dtype, device) -> torch.Tensor:
    """[B*F, S, C] as a strided (transposed) view, to check the kernel honours strides."""
    return torch.randn(bf, c, s, generator=g).to(device=device, dtype=dtype).transpose(1, 2)


@kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("b,f,s,h,d,block_s", [
    (1, 8, 17, 4, 8, 4), (2, 8, 9, 1, 40, None), (1, 5, 9, 2, 24, 2), (2, 8, 17, 4, 40, 8), (1, 8, 3, 1, 160, None)])
def test_temporal_kernel_matches_reference(b, f, s, h, d, block_s, dtype):
    from dp360rt.kernels.temporal_attention_triton import temporal_attention_triton
    g = torch.Generator().manual_seed(b * 100 + s + d)
    q, k, v = (_frames_layout(b * f, s, h * d, g, dtype, DEVICE) for _ in range(3))
    ours = temporal_attention_triton(q, k, v, f, h, block_s=block_s)
    ref = temporal_attention_reference(q.float(), k.float(), v.float(), f, h)
    _close(ours, ref, dtype)


def test_temporal_reference_is_the_motion_module_math():
    """The reference equals TemporalAttention's permute + SDPA (runs anywhere, no triton)."""
    g = torch.Generator().manual_seed(0)
    b, f, s, h, d = 2, 8, 5, 4, 8
    q, k, v = (torch.randn(b * f, s, h * d, generator=g) for _ in range(3))

    def seq(x):
        return split_heads(x.view(b, f, s, h * d).transpose(1, 2).reshape(b * s, f, h * d), h)
    out = merge_heads(F.scaled_dot_product_attention(seq(q), seq(k), seq(v)))
    out = out.view(b, s, f, h * d).transpose(1, 2).reshape(b * f, s, h * d)
    assert (temporal_attention_reference(q, k, v, f, h) - out).abs().max() < 1e-6


# -- wiring: UNet modules, triton backend vs torch backend --------------------------------------------
@kernels
def test_motion_module_triton_path_equals_torch_path(monkeypatch):
    torch.manual_seed(0)
    attn = TemporalAttention(32, 4, 24).to(DEVICE)
    x = torch.randn(16, 9, 32, device=DEVICE)
    with torch.no_grad():
        monkeypatch.setenv(dispatch.ENV, "torch")
        ref = attn(x, 8)
        monkeypatch.setenv(dispatch.ENV, "triton")
        ours = attn(x, 8)
    assert (ours - ref).abs().max() < 1e-5


@kernels
def test_shared_bank_triton_path_equals_torch_path(monkeypatch):
    """Two groups with their own bank row plus unconditional rows, as SharedBank reads them."""
    torch.manual_seed(1)
    attn = Attention(32, 4, 8).to(DEVICE)
    x = torch.randn(7, 17, 32, device=DEVICE)
    entries = [torch.randn(2, 34, 32, device=DEVICE)]
    out = {}
    with torch.no_grad():
        for mode in ("torch", "triton"):
            monkeypatch.setenv(dispatch.ENV, mode)
            out[mode] = SharedBank(entries, [3, 2]).self_attention(attn, x)
    assert (out["triton"] - out["torch"]).abs().max() < 1e-5


# -- dispatch -------------------------------------------------------------------------------------------
def test_dispatch_env_override(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.kernel_backend("cpu") == "torch"
    assert dispatch.kernel_backend(torch.empty(1)) == "torch"
    assert dispatch.kernel_backend("cuda") == ("triton" if triton_env.import_error() is None else "torch")
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert dispatch.kernel_backend("cuda") == "torch"
    monkeypatch.setenv(dispatch.ENV, "triton")
    assert dispatch.kernel_backend("meta") == "torch"            # FLOP counting on meta tensors
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.kernel_backend("cpu") == "triton"
    monkeypatch.setenv(dispatch.ENV, "cuda-please")
    with pytest.raises(ValueError, match="DP360RT_KERNELS"):
        dispatch.kernel_backend("cpu")


def test_dispatch_forced_triton_without_gpu_or_interpreter_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="not CUDA.*TRITON_INTERPRET=1"):
        dispatch.kernel_backend("cpu")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=g)
    with pytest.raises(RuntimeError, match="DP360RT_KERNELS=triton"):
        dispatch.shared_kv_attention(q, q, q, q, q)
    monkeypatch.setattr(triton_env, "import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        dispatch.kernel_backend("cuda")


@pytest.mark.skipif(INTERP or triton_env.import_error() is not None,
                    reason="needs triton imported with the interpreter off")
def test_kernels_refuse_what_they_cannot_run(monkeypatch):
    """Called directly, the kernels name the fix: CPU tensors without the interpreter, or
    TRITON_INTERPRET=1 set after triton was imported (its own jit helpers are compiled ones)."""
    from dp360rt.kernels.shared_kv_attention_triton import shared_kv_attention_triton
    from dp360rt.kernels.temporal_attention_triton import temporal_attention_triton
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 3, 8)
    x = torch.randn(8, 3, 8)
    with pytest.raises(RuntimeError, match="not CUDA.*Fix: .*TRITON_INTERPRET=1"):
        shared_kv_attention_triton(q, q, q, q, q)
    with pytest.raises(RuntimeError, match="not CUDA.*Fix: .*TRITON_INTERPRET=1"):
        temporal_attention_triton(x, x, x, 8, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_env.interpreter_consistent()
    with pytest.raises(RuntimeError, match="set after triton was imported.*Fix: set TRITON_INTERPRET=1 before"):
        shared_kv_attention_triton(q, q, q, q, q)


def test_dispatch_torch_path_is_the_reference(monkeypatch):
    """DP360RT_KERNELS=torch gives the PyTorch twins bit for bit (CPU numbers unchanged)."""
    monkeypatch.setenv(dispatch.ENV, "torch")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 4, 17, 8, generator=g) for _ in range(3))
    ks, vs = (torch.randn(1, 4, 34, 8, generator=g) for _ in range(2))
    assert torch.equal(dispatch.shared_kv_attention(q, k, v, ks, vs), shared_kv_attention(q, k, v, ks, vs))
    assert torch.equal(dispatch.shared_kv_attention(q, k, v, None, None), F.scaled_dot_product_attention(q, k, v))
    x = [torch.randn(16, 5, 32, generator=g) for _ in range(3)]
    assert torch.equal(dispatch.temporal_attention(*x, 8, 4), temporal_attention_reference(*x, 8, 4))


# -- end to end -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nvs_model():
    """The setA nvs model, built as conftest's ``models`` does, without the back-view model this
    test does not need (saves ~15 s in the interpreter subprocess)."""
    m = build_model("nvs", SET_A)
    load_checkpoint(m, materialize_recipe(SET_A, "nvs"))
    return m


@interpreter_only
def test_fast_engine_with_triton_kernels_reproduces_setA(cases, nvs_model, monkeypatch):
    """nvs_apply_cond through the fast engine with every shared-KV and temporal attention on the
    Triton kernels (interpreter): eps within 1e-5 of the authors' numbers."""
    from dp360rt.sampler.fast import apply_fast
    import dp360rt.kernels.shared_kv_attention_triton as skv_t
    import dp360rt.kernels.temporal_attention_triton as tmp_t
    calls = {"skv": 0, "temporal": 0}

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(skv_t, "shared_kv_attention_triton", count("skv", skv_t.shared_kv_attention_triton))
    monkeypatch.setattr(tmp_t, "temporal_attention_triton", count("temporal", tmp_t.temporal_attention_triton))
    monkeypatch.setenv(dispatch.ENV, "triton")
    c = cases["nvs_apply_cond"]
    i, o = c["inputs"], c["outputs"]
    with torch.no_grad():
        out = apply_fast(nvs_model, i["x_noisy"], i["t"], i["context"], i["hint"], i["ref_front"],
                         [i["ref_back"]])
    assert calls["skv"] > 0 and calls["temporal"] > 0, calls
    err = rel_err(out.eps, o["eps"])
    assert err <= 1e-5, f"eps relative error {err:.3e}"


# -- the interpreter run, when this process cannot host it ----------------------------------------------
# tests that run a Triton kernel (the child must pass some, or it checked nothing)
KERNEL_TESTS = ("test_shared_kv_kernel_matches_reference", "test_plain_attention_kernel_matches_sdpa",
                "test_temporal_kernel_matches_reference", "test_motion_module_triton_path_equals_torch_path",
                "test_shared_bank_triton_path_equals_torch_path", "test_fast_engine_with_triton_kernels_reproduces_setA")
CHILD_ENV = "DP360RT_TRITON_INTERPRETER_CHILD"     # set in the child: it must never spawn another


def test_kernels_under_interpreter_subprocess():
    if INTERP:
        pytest.skip("already running under the interpreter")
    if os.environ.get(CHILD_ENV):
        pytest.fail("this is the interpreter child, yet triton was not imported in interpreter mode; "
                    "refusing to spawn another child")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: no interpreter to run the kernels in")
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_ENV: "1"})
    env.pop(dispatch.ENV, None)
    here = Path(__file__).resolve()
    r = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-x", str(here)],
                       cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=900)
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    passed = re.findall(r"::(test_\w+)(?:\[[^\]]*\])? PASSED", r.stdout)
    kernel_tests = [n for n in passed if n in KERNEL_TESTS]
    assert "test_fast_engine_with_triton_kernels_reproduces_setA" in kernel_tests and len(kernel_tests) >= 2, (
        f"the interpreter child ran {len(kernel_tests)} kernel test(s): {kernel_tests}\n{tail}")
