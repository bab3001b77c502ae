"""Execution backends behind one interface (:class:`~dp360rt.backends.base.Backend`).

``torch`` (default, any device), ``ort`` (ONNX Runtime, CPU/CUDA) and ``trt`` (TensorRT) run
the same fast sampler; optional backends import their libraries only when used.
"""
from .base import Backend, get_backend

__all__ = ["Backend", "get_backend"]
