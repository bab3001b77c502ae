"""The CLIP ViT-L/14 text tower (``cond_stage_model.transformer.text_model``), written without
``transformers``: token + position embeddings, pre-LN causal transformer, final LayerNorm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TextConfig

BOS, EOS = 49406, 49407


def empty_prompt_ids(length: int = 77) -> Tensor:
    """Token ids of the empty prompt, the only prompt DiffPortrait360 uses: [1, length] int64."""
    return torch.tensor([[BOS] + [EOS] * (length - 1)], dtype=torch.long)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.quick = cfg.hidden_act == "quick_gelu"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return self.fc2(h)


class _Layer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = _SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """``forward(token_ids) -> last_hidden_state``: [B, 77] int64 -> [B, 77, hidden]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, token_ids: Tensor) -> Tensor:
        if token_ids.dim() != 2 or token_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"token ids must be [B, <= {self.cfg.max_position_embeddings}], got {tuple(token_ids.shape)}")
        if token_ids.device.type != "meta" and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        return self.hidden_states(token_ids)

    def hidden_states(self, token_ids: Tensor) -> Tensor:
        """The computation of :meth:`forward` without its input checks (their data-dependent
        branches cannot be traced for ONNX export)."""
        pos = torch.arange(token_ids.shape[1], device=token_ids.device)
        x = self.embeddings.token_embedding(token_ids) + self.embeddings.position_embedding(pos)[None]
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class FrozenCLIPEmbedder(nn.Module):
    """``cond_stage_model``: holds ``transformer.text_model``; ``forward(ids)`` is its last hidden state."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.text_model = CLIPTextModel(cfg)

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.transformer.text_model(token_ids)
