"""What this machine offers dp360rt, probed lazily (nothing here is needed to import dp360rt)."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
        return f"broken ({type(e).__name__}: {e})"


def native_scheduler_status() -> str:
    """Whether the compiled extension loads (it is optional for the Python paths)."""
    try:
        from . import _C
        return f"loaded (version {_C.version()})"
    except ImportError as e:
        return f"not available ({e})"


def capabilities() -> dict[str, Any]:
    """Devices and optional backends: CUDA, Triton, ONNX Runtime providers, TensorRT, tiny-cuda-nn,
    the native scheduler. Values are versions/names, or None when absent."""
    caps: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "native_scheduler": native_scheduler_status(),
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "tensorrt": _version("tensorrt"),
        "tinycudann": _version("tinycudann"),
        "imageio_ffmpeg": _version("imageio_ffmpeg"),
    }
    if caps["onnxruntime"] and not caps["onnxruntime"].startswith("broken"):
        import onnxruntime
        caps["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if torch.cuda.is_available():
        caps["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    from .kernels import dispatch
    if torch.cuda.is_available() and caps["triton"] and not caps["triton"].startswith("broken"):
        try:
            dispatch.probe("cuda")
        except RuntimeError as e:        # DP360RT_KERNELS=triton and a kernel failed: report it here
            caps["triton_kernel_error"] = str(e)
    caps["triton_kernel_checks"] = dispatch.kernel_status() or None
    return caps
