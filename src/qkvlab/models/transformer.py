"""The transformer every qkvlab model kind is built from: one attention block with separate q/k/v/o
projections named ``blocks.{i}.attn.{q,k,v,o}_proj`` (the "qkvlab" family of the architecture table, so
``inspect``, ``roles`` and the presets work on every kind unchanged, and ``d_head`` is independent of
``d_model / n_head``), the MLP, the pre-LN block and GPT-2's initialisation. The kinds themselves (a GPT,
a small ViT, an in-context regression model) are one module each beside this one, found through
:func:`qkvlab.models.kinds`. Small modules that read top to bottom (nanoGPT style).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qkvlab.models.config import ModelConfig

__all__ = ["MLP", "Attention", "Block", "ModelConfig", "init_weights", "observe_logits"]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections.

    softmax: softmax(q kᵀ/√d_head [+ causal mask]) v. linear: (q kᵀ / n_tokens) v, no softmax.
    """

    def __init__(self, cfg: ModelConfig, causal: bool) -> None:
        super().__init__()
        inner = cfg.n_head * cfg.head_dim
        self.n_head, self.d_head, self.causal, self.kind = cfg.n_head, cfg.head_dim, causal, cfg.attention
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.probe = None  # a qkvlab.logits.LayerLogits while logits are measured (observe_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.n_head, self.d_head).transpose(1, 2)  # (b, h, t, d_head)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        if self.kind == "linear":
            scores = q @ k.transpose(-1, -2) / t
            if self.causal:
                scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), 0.0)
            out = scores @ v
        else:
            if self.probe is not None:  # the scores beside the fused kernel, which still computes the output
                observe_logits(q, k, self.causal, self.probe)
            drop = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=drop)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_head * self.d_head))


#: the most score elements formed at once while measuring the logits (64 Mi floats, 256 MiB)
SCORE_CHUNK = 1 << 26


@torch.no_grad()
def observe_logits(q: torch.Tensor, k: torch.Tensor, causal: bool, probe: Any) -> None:
    """Show ``probe`` (a qkvlab.logits.LayerLogits) each head's largest score S = q kᵀ/√d_head before the
    mask and, unless it measures the max only, the summed entropy of the softmax after the mask: what
    ``F.scaled_dot_product_attention`` computes, formed in float32 whatever the autocast (a bf16 score near
    τ = 52 would be off by up to 0.25), outside autograd (the step's numbers do not change), and a block
    of queries × heads × batch at a time, at most SCORE_CHUNK scores (one query row of one head when a
    row alone is longer)."""
    b, h, t, d = q.shape
    s = k.shape[-2]
    queries = max(1, min(t, SCORE_CHUNK // max(1, s)))
    heads = max(1, min(h, SCORE_CHUNK // max(1, queries * s)))
    batch = max(1, SCORE_CHUNK // max(1, heads * queries * s))
    scale = 1.0 / math.sqrt(d)
    top = torch.full((h,), -math.inf, dtype=torch.float32, device=q.device)
    entropy = None if probe.max_only else torch.zeros(h, dtype=torch.float32, device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        for i in range(0, t, queries):
            rows = min(queries, t - i)
            # the causal mask of query rows i … i+rows−1 (top-left aligned, as is_causal=True is)
            future = torch.ones(rows, s, dtype=torch.bool, device=q.device).triu(i + 1) if causal else None
            for j in range(0, h, heads):
                for n in range(0, b, batch):
                    scores = q[n : n + batch, j : j + heads, i : i + rows].float()
                    scores = (scores @ k[n : n + batch, j : j + heads].float().transpose(-1, -2)) * scale
                    top[j : j + heads] = torch.maximum(top[j : j + heads], scores.amax(dim=(0, 2, 3)))
                    if entropy is None:
                        continue
                    if future is not None:
                        scores = scores.masked_fill(future, float("-inf"))
                    p = torch.softmax(scores, dim=-1)
                    entropy[j : j + heads] -= torch.special.xlogy(p, p).sum(-1).sum(dim=(0, 2))
    probe.add(top, entropy, b * t)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN: x + attn(ln(x)), then x + mlp(ln(x)) (the MLP is skipped when d_mlp = 0)."""

    def __init__(self, cfg: ModelConfig, causal: bool, norm: bool = True) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, bias=cfg.bias) if norm else nn.Identity()
        self.attn = Attention(cfg, causal)
        self.has_mlp = cfg.mlp_dim > 0
        if self.has_mlp:
            self.ln_mlp = nn.LayerNorm(cfg.d_model, bias=cfg.bias) if norm else nn.Identity()
            self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_attn(x)))
        if self.has_mlp:
            x = x + self.mlp(self.ln_mlp(x))
        return x


def init_weights(module: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 init: N(0, std²) with std = 0.02 by default, residual output projections scaled by 1/√(2·n_layer)."""
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            residual = name.endswith(("o_proj.weight", "mlp.proj.weight"))
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layer) if residual else std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
