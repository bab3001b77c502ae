"""dp360rt: a fast, exact inference runtime for DiffPortrait360.

Public API: :func:`build_model`, :func:`load_checkpoint`, :class:`Pipeline`, :func:`verify`, and
:mod:`dp360rt.nerf` (the instant NeRF).
Importing never needs a GPU, the compiled extension, ONNX or TensorRT.
"""
from .checkpoint import CheckpointError, convert, load_checkpoint, read_state_dict
from .config import ConfigError, load_config
from .io.images import ImageError
from .model import DiffPortrait360, build_model
from .engine.generation import GenerationResult
from .engine.pipeline import Pipeline
from .capabilities import capabilities
from .verify import verify
from .version import __version__
from . import nerf

__all__ = ["capabilities", "build_model", "load_checkpoint", "read_state_dict", "convert", "load_config", "Pipeline",
           "GenerationResult", "DiffPortrait360", "verify", "nerf", "CheckpointError", "ConfigError", "ImageError"]

