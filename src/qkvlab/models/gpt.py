"""``model.kind=gpt``: a decoder-only language model on ``lm`` data (text, tokenised)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qkvlab.models import ModelConfig, ModelKind, register
from qkvlab.models.transformer import Block, init_weights

__all__ = ["GPT"]


class GPT(nn.Module):
    """Decoder-only language model: token + learned position embeddings, causal blocks, LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=True) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layer, cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        t = input_ids.shape[1]
        x = self.drop(self.tok_embed(input_ids) + self.pos_embed(torch.arange(t, device=input_ids.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return out


def _fit(cfg: ModelConfig, info: dict[str, Any]) -> None:
    cfg.vocab_size, cfg.seq_len = info["vocab_size"], info["seq_len"]


KIND = register(ModelKind("gpt", "language", "lm", GPT, _fit, perplexity=True))
