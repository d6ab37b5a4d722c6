"""``model.kind=icl``: in-context linear regression on ``icl`` data (von Oswald et al. 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qkvlab.models import ModelConfig, ModelKind, register
from qkvlab.models.transformer import Block, init_weights

__all__ = ["ICLTransformer"]


class ICLTransformer(nn.Module):
    """In-context linear regression (von Oswald et al. 2023): tokens [x_i, y_i], predict y of the last.

    ``attention="linear"`` with ``norm=False`` and ``d_mlp=0`` is the linear self-attention
    model of that paper; the defaults give a softmax transformer.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.input_dim, cfg.d_model, bias=cfg.bias)
        self.blocks = nn.ModuleList(Block(cfg, causal=False, norm=cfg.norm) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias) if cfg.norm else nn.Identity()
        self.head = nn.Linear(cfg.d_model, 1, bias=cfg.bias)
        init_weights(self, cfg.n_layer, cfg.init_std)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.embed(inputs)
        for block in self.blocks:
            x = block(x)
        prediction = self.head(self.ln_f(x[:, -1])).squeeze(-1)
        out = {"prediction": prediction}
        if targets is not None:
            out["loss"] = F.mse_loss(prediction.float(), targets)
        return out


def _fit(cfg: ModelConfig, info: dict[str, Any]) -> None:
    cfg.input_dim = info["dim"] + 1  # tokens [x_i, y_i]


KIND = register(
    ModelKind("icl", "in-context regression", "icl", ICLTransformer, _fit, attention=("softmax", "linear"))
)
