"""Export-friendly views of the model's networks: every input and output an explicit tensor.

Each wrapper calls the runtime's own modules (no second implementation), except where a runtime
helper does something an exporter cannot see through; that is said at the place.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from dp360rt.model import DiffPortrait360
from dp360rt.unet.bank import BankWriter, SharedBank

ATTENTION_MODES = ("lse", "concat")
QUERY_CHUNK = 1024


def query_chunk(q: Tensor) -> int:
    """Queries per frame in one chunk: :data:`QUERY_CHUNK` over the batch the graph is traced at,
    so a chunk's score tensor stays that size however many rows the file is later pinned to
    (ONNX Runtime on CPU keeps several chunks' scores alive at once)."""
    return max(1, QUERY_CHUNK // int(q.shape[0]))


def chunked_sdpa(sdpa):
    """``scaled_dot_product_attention`` over query chunks (:func:`query_chunk`) when both the
    queries and the keys are long (the UNet's top-level self-attention: 4096 tokens at full size),
    so an unfused runtime (ONNX Runtime CPU) never holds a whole [B, H, N, M] score tensor; other
    calls (masks, causal, short sequences) go through unchanged."""
    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        n = q.shape[-2]
        if attn_mask is not None or is_causal or dropout_p or kw or n <= QUERY_CHUNK or k.shape[-2] <= QUERY_CHUNK:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        c = query_chunk(q)
        return torch.cat([sdpa(q[..., s:s + c, :], k, v, scale=scale) for s in range(0, n, c)], dim=-2)
    return attention


def attention_lse_export(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`~dp360rt.kernels.shared_kv_attention.attention_lse_math` written for runtimes: one
    exponential per score (max-shifted), row sums instead of ``logsumexp`` (ONNX Runtime's CPU
    ``ReduceLogSumExp`` was a third of the bank UNet's time), chunked over each frame's queries
    (:func:`query_chunk`). q: [B, H, N, D], k/v: [B or 1, H, M, D] (1: shared by the B frames,
    broadcast) -> (out [B, H, N, D], lse [B, H, N] float32)."""
    scale = q.shape[-1] ** -0.5
    kt, vf = k.float().transpose(-1, -2), v.float()
    chunk = query_chunk(q)
    outs, lses = [], []
    for s in range(0, q.shape[2], chunk):
        sc = torch.matmul(q[:, :, s:s + chunk].float() * scale, kt)
        mx = sc.amax(dim=-1, keepdim=True)
        p = torch.exp(sc - mx)
        den = p.sum(dim=-1, keepdim=True)
        outs.append((torch.matmul(p, vf) / den).to(q.dtype))
        lses.append((mx + torch.log(den)).squeeze(-1))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def shared_kv_attention_export(q: Tensor, k: Tensor, v: Tensor, k_shared: Tensor, v_shared: Tensor) -> Tensor:
    """:func:`~dp360rt.kernels.shared_kv_attention.shared_kv_attention` with a graph valid at any
    batch: the runtime folds the frames into the query axis for the shared part, which would fix
    the query chunks to the traced batch; here the shared keys broadcast over the frames instead.
    q, k, v: [B, H, N, D]; k_shared, v_shared: [1, H, M, D] -> [B, H, N, D]."""
    from dp360rt.kernels.shared_kv_attention import merge_partials
    o_own, l_own = attention_lse_export(q, k, v)
    o_sh, l_sh = attention_lse_export(q, k_shared, v_shared)
    return merge_partials(o_own, l_own, o_sh, l_sh)


@contextlib.contextmanager
def export_attention(mode: str = "lse") -> Iterator[None]:
    """Route attention through exportable ops while exporting.

    ``lse``: the runtime's two-part shared-bank attention with log-sum-exp merge, in plain matmuls
    (:func:`attention_lse_export`, chunked over queries; the CPU path's private flash op has no
    ONNX form), and long plain self-attentions chunked over queries
    (:func:`chunked_sdpa`): bounded memory for unfused runtimes, the same numbers as the torch backend.
    ``concat``: shared-bank attention as softmax over ``[own keys ; shared keys expanded over the
    frames]`` and plain attention unchunked - the patterns TensorRT fuses into flash attention.

    Patches module globals for the duration (offline tool; not thread-safe).
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    import torch.nn.functional as F
    from dp360rt.kernels import shared_kv_attention as skv
    from dp360rt.unet import bank as bank_mod
    saved = skv.attention_lse, bank_mod.shared_kv_attention, F.scaled_dot_product_attention
    try:
        if mode == "lse":
            skv.attention_lse = attention_lse_export
            bank_mod.shared_kv_attention = shared_kv_attention_export
            F.scaled_dot_product_attention = chunked_sdpa(saved[2])
        else:
            bank_mod.shared_kv_attention = skv.shared_kv_attention_reference
        yield
    finally:
        skv.attention_lse, bank_mod.shared_kv_attention, F.scaled_dot_product_attention = saved


class TextExport(nn.Module):
    """token_ids [B, 77] int64 -> context [B, 77, C].

    The text tower's forward validates token ids with ``int(ids.min())`` (a data-dependent host
    read no exporter can trace), so this exports its unchecked ``hidden_states``."""

    def __init__(self, model: DiffPortrait360):
        super().__init__()
        self.tm = model.cond_stage_model.transformer.text_model

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.tm.hidden_states(token_ids)


class VAEEncoderExport(nn.Module):
    """image [B, 3, H, W] in [-1, 1] -> (mean, logvar) [B, 4, H/8, W/8] (``encode_image``)."""

    def __init__(self, model: DiffPortrait360):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.model.encode_image(image)
        return mean, logvar


class VAEDecoderExport(nn.Module):
    """Scaled latent [B, 4, h, w] -> image [B, 3, 8h, 8w] (``decode_latent``, scale factor included)."""

    def __init__(self, model: DiffPortrait360):
        super().__init__()
        self.model = model

    def forward(self, latent: Tensor) -> Tensor:
        return self.model.decode_latent(latent)


class AppearanceExport(nn.Module):
    """refs [R, 4, h, w], t [R], context [R, 77, C] -> the bank entries, each [R, HW, C]
    (appearance net stopped after its last write, as the fast engine runs it)."""

    def __init__(self, model: DiffPortrait360):
        super().__init__()
        self.net = model.control_model

    def forward(self, refs: Tensor, t: Tensor, context: Tensor) -> tuple[Tensor, ...]:
        writer = BankWriter()
        self.net(refs, t, context, writer, stop_early=True)
        return tuple(writer.entries)


class PoseExport(nn.Module):
    """x [B, 4, h, w], hint [B, 3, 8h, 8w], t [B], context [B, 77, C] -> the 13 residuals."""

    def __init__(self, model: DiffPortrait360):
        super().__init__()
        self.net = model.pose_control_model

    def forward(self, x: Tensor, hint: Tensor, t: Tensor, context: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.net(x, hint, t, context))


class UNetExport(nn.Module):
    """x [B, 4, h, w], t [B], context [B, 77, C], bank entries ``n_bank`` x [1, M, C_i], pose
    residuals ``n_res`` x [cond_rows, ...] -> eps [B, 4, h, w].

    The first ``cond_rows`` rows read the bank (shared keys/values, one copy for all rows) and
    take the residuals; the rest are the unconditional branch - exactly
    :meth:`~dp360rt.backends.torch_backend.TorchBackend.unet`."""

    def __init__(self, model: DiffPortrait360, cond_rows: int, n_bank: int, n_res: int):
        super().__init__()
        self.unet = model.unet
        self.cond_rows, self.n_bank, self.n_res = cond_rows, n_bank, n_res

    def forward(self, x: Tensor, t: Tensor, context: Tensor, *bank_and_res: Tensor) -> Tensor:
        entries = list(bank_and_res[:self.n_bank])
        residuals = list(bank_and_res[self.n_bank:self.n_bank + self.n_res])
        reader = SharedBank(entries, [0]).for_call([self.cond_rows])
        return self.unet(x, t, context, bank=reader, pose_residuals=residuals)


class UNetNoBankExport(nn.Module):
    """The unconditional branch alone: x, t, context -> eps (plain self-attention, no residuals)."""

    def __init__(self, model: DiffPortrait360):
        super().__init__()
        self.unet = model.unet

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.unet(x, t, context)
