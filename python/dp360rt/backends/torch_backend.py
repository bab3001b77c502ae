"""The PyTorch backend: calls the model's modules directly (any device, autocast outside)."""
from __future__ import annotations

from torch import Tensor

from ..unet.bank import BankWriter, SharedBank


class TorchBackend:
    name = "torch"

    def __init__(self, model):
        self.model = model

    def appearance(self, refs: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        writer = BankWriter()
        self.model.control_model(refs, t, context, writer, stop_early=True)
        return writer.entries

    def bank(self, entries: list[Tensor]) -> SharedBank:
        # Keys/values of the bank are projected once per step and reused by every call of the step.
        return SharedBank(entries, [0] * entries[0].shape[0])

    def pose(self, x: Tensor, hint: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        return self.model.pose_control_model(x, hint, t, context)

    def unet(self, x: Tensor, t: Tensor, context: Tensor, bank: SharedBank | None,
             residuals: list[Tensor] | None, cond_rows: int | list[int]) -> Tensor:
        rows = [cond_rows] if isinstance(cond_rows, int) else list(cond_rows)
        reader = bank.for_call(rows) if bank is not None and sum(rows) else None
        return self.model.unet(x, t, context, bank=reader, pose_residuals=residuals if sum(rows) else None)

    def encode_text(self, token_ids: Tensor) -> Tensor:
        return self.model.encode_text(token_ids)

    def encode_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode_image(image)

    def decode_latent(self, latent: Tensor) -> Tensor:
        return self.model.decode_latent(latent)
