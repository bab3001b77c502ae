"""fp16 export: half-precision weights and matmuls/convolutions, float32 everywhere else.

The reference runs its networks under CUDA fp16 autocast: convolutions, linear layers and matmuls
in fp16, normalizations, softmax, exponentials and reductions in fp32. This pass gives an fp32
ONNX graph the same split: every ``Conv``/``ConvTranspose``/``MatMul``/``Gemm`` gets fp16 weights
(the initializers are stored in fp16, halving the file) and fp16 activations (a ``Cast`` before,
one after back to fp32); everything else stays fp32, and the graph's inputs and outputs keep
their fp32 types. ONNX Runtime drops the Cast pairs between adjacent fp16 nodes; TensorRT (FP16
flag) fuses them into its kernels' precision choices.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP16_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_F16_MAX = float(np.finfo(np.float16).max)


def _to_fp16(init: TensorProto, name: str) -> TensorProto:
    a = numpy_helper.to_array(init)
    a = np.clip(a, -_F16_MAX, _F16_MAX).astype(np.float16)
    return numpy_helper.from_array(a, name)


def convert_mixed_fp16(model: onnx.ModelProto, ops: frozenset[str] = FP16_OPS) -> dict[str, int]:
    """Rewrite ``model`` in place (see module doc). Returns counts for the log."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    float_inits = {n for n, i in inits.items() if i.data_type == TensorProto.FLOAT}
    # Which float initializers feed only fp16 nodes (converted in place) or also others (get a copy).
    users: dict[str, set[bool]] = {}
    for node in g.node:
        half = node.op_type in ops
        for name in node.input:
            if name in float_inits:
                users.setdefault(name, set()).add(half)
    in_place = {n for n, u in users.items() if u == {True}}
    copies: dict[str, str] = {}
    new_inits: list[TensorProto] = []
    for i, init in enumerate(g.initializer):
        if init.name in in_place:
            g.initializer[i].CopyFrom(_to_fp16(init, init.name))
    for n, u in users.items():
        if u == {True, False}:
            copies[n] = n + "__fp16"
            new_inits.append(_to_fp16(inits[n], copies[n]))
    g.initializer.extend(new_inits)

    casts: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    stats = {"fp16_nodes": 0, "fp16_weights": len(in_place) + len(copies), "casts": 0}
    for node in g.node:
        if node.op_type not in ops:
            nodes.append(node)
            continue
        stats["fp16_nodes"] += 1
        for k, name in enumerate(node.input):
            if not name:
                continue
            if name in in_place:
                continue
            if name in copies:
                node.input[k] = copies[name]
                continue
            if name not in casts:                      # activation: one Cast per tensor, before its first use
                casts[name] = f"{name}__to_fp16"
                nodes.append(helper.make_node("Cast", [name], [casts[name]], to=TensorProto.FLOAT16,
                                              name=f"{name}__cast_fp16"))
                stats["casts"] += 1
            node.input[k] = casts[name]
        outs = list(node.output)
        for k, name in enumerate(outs):
            node.output[k] = f"{name}__fp16"
        nodes.append(node)
        for name in outs:
            nodes.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT,
                                          name=f"{name}__cast_fp32"))
            stats["casts"] += 1
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]      # stale types of renamed tensors; inference recomputes what is needed
    return stats
