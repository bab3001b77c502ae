"""Which TensorRT build flags the trt backend uses per TensorRT version, against a fake ``tensorrt``
module (no GPU, no TensorRT needed): strongly typed networks from 10.12 on, precision flags before."""
from __future__ import annotations

import enum
import types

import pytest

from dp360rt.backends import trt_backend


def fake_trt(version: str):
    """A ``tensorrt`` stand-in that records the network flags and builder flags of a build."""
    rec = {"network_flags": None, "set": [], "clear": []}
    BuilderFlag = enum.Enum("BuilderFlag", "FP16 BF16 INT8 FP8 TF32")
    NetFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})

    class Network:
        num_layers = 0

    class Config:
        def set_flag(self, f):
            rec["set"].append(f.name)

        def clear_flag(self, f):
            rec["clear"].append(f.name)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            return b"engine"

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    trt = types.SimpleNamespace(__version__=version, BuilderFlag=BuilderFlag, NetworkDefinitionCreationFlag=NetFlag,
                                Builder=Builder, OnnxParser=Parser, Logger=lambda level: object(),
                                LayerType=types.SimpleNamespace(QUANTIZE=1, DEQUANTIZE=2))
    trt.Logger.WARNING = 0
    return trt, rec


@pytest.fixture
def build(monkeypatch, tmp_path):
    def run(version: str, precision: str):
        trt, rec = fake_trt(version)
        monkeypatch.setattr(trt_backend, "import_trt", lambda: trt)
        monkeypatch.setattr(trt_backend, "_LOGGER", None)
        assert trt_backend.build_engine(tmp_path / "x.onnx", precision) == b"engine"
        return rec
    return run


@pytest.mark.parametrize("version", ["10.12.0.36", "10.13.2", "11.0.0"])
def test_strongly_typed_from_10_12(build, version):
    rec = build(version, "fp16")
    assert rec["network_flags"] == 1 << 1 and rec["set"] == [] and rec["clear"] == []


@pytest.mark.parametrize("version", ["10.0.1", "10.11.0.33"])
def test_precision_flags_before_10_12(build, version):
    rec = build(version, "fp16")
    assert rec["network_flags"] == 0 and rec["set"] == ["FP16"]
    assert build(version, "bf16")["set"] == ["BF16"]


@pytest.mark.parametrize("version", ["10.4.0", "10.12.0", "11.1.0"])
def test_fp32_turns_tf32_off_without_precision_flags(build, version):
    rec = build(version, "fp32")
    assert rec["network_flags"] == 0 and rec["set"] == [] and rec["clear"] == ["TF32"]


def test_bf16_refused_where_only_strong_typing_exists(build):
    with pytest.raises(ValueError, match="strongly typed.*Fix: build precision='fp16'"):
        build("10.12.0", "bf16")
