"""Both Triton kernels compile for an H100/H200 (CUDA sm_90) without a GPU: ``triton.compile`` to a
cubin for ``GPUTarget("cuda", 90, 32)`` at the full model's first-level head dim (40) in fp16 (ptxas ships with
Triton). Compiling proves nothing about speed or numbers on the GPU; the first-use self-check and
the GPU suite cover those."""
from __future__ import annotations

import pytest

from dp360rt.kernels.triton_env import interpreting

triton = pytest.importorskip("triton")
if interpreting():
    pytest.skip("under TRITON_INTERPRET=1 the kernels are interpreted, not compiled", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def _compile(fn, signature: dict[str, str], constexprs: dict[str, object]):
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    return triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=SM90)


def test_shared_kv_kernel_compiles_for_sm90():
    from dp360rt.kernels import shared_kv_attention_triton as skv
    fn = skv._shared_kv_fwd
    consts = {"HAS_SHARED": True, "IEEE": False, "UPCAST": False, "BLOCK_M": 64, "BLOCK_N": 64,
              "BLOCK_D": skv.head_block(40)}                        # head dim 40: the first UNet level
    sig = {a: "i32" for a in fn.arg_names if a not in consts}      # strides and sizes
    sig.update({n: "*fp16" for n in ("Q", "K", "V", "KS", "VS", "O")}, qk_scale="fp32")
    c = _compile(fn, sig, consts)
    assert len(c.asm["cubin"]) > 1000 and ".target sm_90" in c.asm["ptx"]


def test_temporal_kernel_compiles_for_sm90():
    from dp360rt.kernels import temporal_attention_triton as tmp
    fn = tmp._temporal_fwd
    consts = {"F_PAD": 8, "BLOCK_S": 32, "BLOCK_D": 64}              # 8 frames, head dim 40
    sig = {a: "i32" for a in fn.arg_names if a not in consts}
    sig.update({n: "*fp16" for n in ("Q", "K", "V", "O")}, qk_scale="fp32")
    c = _compile(fn, sig, consts)
    assert len(c.asm["cubin"]) > 1000 and ".target sm_90" in c.asm["ptx"]
