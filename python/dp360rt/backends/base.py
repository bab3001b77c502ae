"""The narrow interface the fast sampler and the pipeline drive: one method per network call."""
from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class Backend(Protocol):
    """What the fast engine and the pipeline's other stages need from an execution backend (all
    tensors on the backend's device).

    Shapes: refs [R, 4, h, w]; x [B, 4, h, w]; t [B] int64; context [B, 77, C]; hint [B, 3, 8h, 8w];
    token_ids [B, 77] int64; image [B, 3, 8h, 8w] in [-1, 1].
    """

    name: str

    def appearance(self, refs: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        """Bank entries of the appearance net, stopped after its last write: each [R, HW, C]."""

    def bank(self, entries: list[Tensor]) -> Any:
        """Wrap one step's bank (entries [G, M, C]) for :meth:`unet`; may cache projections."""

    def pose(self, x: Tensor, hint: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        """The pose ControlNet's residuals (input blocks, then middle block)."""

    def unet(self, x: Tensor, t: Tensor, context: Tensor, bank: Any | None, residuals: list[Tensor] | None,
             cond_rows: int | list[int]) -> Tensor:
        """eps [B, 4, h, w]; the first ``sum(cond_rows)`` rows read ``bank`` and take ``residuals``, the
        rest are the unconditional branch (no bank, no residuals). A list gives the rows reading each
        bank group in turn (requests or timesteps sharing the call)."""

    def encode_text(self, token_ids: Tensor) -> Tensor:
        """The text tower: context [B, 77, C]."""

    def encode_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE encoder's posterior: (mean, clamped logvar), each [B, 4, h, w]."""

    def decode_latent(self, latent: Tensor) -> Tensor:
        """The VAE decoder on scaled latents [B, 4, h, w]: images [B, 3, 8h, 8w] (about [-1, 1])."""


def get_backend(name: str, model: Any, **options: Any) -> Backend:
    """Backend ``name`` (``torch``, ``ort``, ``trt``) for a :class:`~dp360rt.model.DiffPortrait360`."""
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(model)
    if name == "ort":
        from .ort_backend import OrtBackend  # noqa: F401  (optional dependency)
        return OrtBackend.from_model(model, **options)
    if name == "trt":
        from .trt_backend import TrtBackend  # noqa: F401  (optional dependency)
        return TrtBackend.from_model(model, **options)
    raise ValueError(f"unknown backend {name!r}; choose torch, ort or trt")
