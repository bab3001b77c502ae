"""What the runtime uses of the pipeline that owns it, and nothing more.

:class:`~dp360rt.engine.pipeline.Pipeline` is the one implementation; the runtime names this protocol
instead of importing it, because the pipeline is the layer above (it creates runtimes).
"""
from __future__ import annotations

from typing import Mapping, Protocol

import torch
from torch import Tensor

from ...backends.base import Backend
from ...model import DiffPortrait360
from ..offload import ModelSwap
from ...sampler.plan import BatchPlan


class RuntimeHost(Protocol):
    """The two diffusion models, where and how they run, and the model-level steps the runtime
    shares with the pipeline's own loop (so both give the same numbers)."""

    nvs: DiffPortrait360                # the 360° model (kind "nvs")
    backview: DiffPortrait360           # the back-view model (kind "backview")
    device: torch.device
    dtype: torch.dtype                  # the weights' dtype
    compute_dtype: torch.dtype          # float16/bfloat16: autocast (model.autocast); float32: none
    image_size: int                     # S: portraits and conditions are [*, 3, S, S]
    plan: BatchPlan | None              # the fast engine's memory plan (None: one window per call)
    swap: ModelSwap | None              # set in edge mode: one diffusion model resident at a time
    backends: Mapping[str, Backend]     # kind -> what runs that model's networks (TorchBackend by default)

    def use(self, model: DiffPortrait360) -> DiffPortrait360:
        """Make ``model`` resident (edge mode) and return it."""
        ...

    def net(self, model: DiffPortrait360) -> Backend:
        """The backend that runs ``model``'s networks, whichever kind was chosen."""
        ...

    def text_context(self, model: DiffPortrait360) -> Tensor:
        """The empty prompt's text context [1, 77, C]."""
        ...

    def decode(self, model: DiffPortrait360, latent: Tensor) -> Tensor:
        """Latents [B, 4, h, w] -> images [B, 3, 8h, 8w] (about [-1, 1])."""
        ...
