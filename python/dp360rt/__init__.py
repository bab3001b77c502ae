"""dp360rt: a fast, exact inference runtime for DiffPortrait360.

Public API: :func:`build_model`, :func:`load_checkpoint`, :class:`Pipeline`, :func:`verify`, and
:mod:`dp360rt.nerf` (the instant NeRF).
Importing never needs a GPU, the compiled extension, ONNX or TensorRT.
"""
from .checkpoint import CheckpointError, convert, load_checkpoint, read_state_dict
from .config import ConfigError, load_config
from .images import ImageError
from .model import DiffPortrait360, build_model
from .generation import GenerationResult
from .pipeline import Pipeline
from .capabilities import capabilities
from .verify import verify
from . import nerf

__version__ = "0.1.0"
__all__ = ["capabilities", "build_model", "load_checkpoint", "read_state_dict", "convert", "load_config", "Pipeline",
           "GenerationResult", "DiffPortrait360", "verify", "nerf", "CheckpointError", "ConfigError", "ImageError"]


def _C_status() -> str:
    """Whether the compiled extension loads (it is optional for the Python paths)."""
    try:
        from . import _C
        return f"loaded (version {_C.version()})"
    except ImportError as e:
        return f"not available ({e})"
