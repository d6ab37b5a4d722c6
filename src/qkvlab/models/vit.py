"""``model.kind=vit``: a vision transformer for small images, on ``image`` data."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qkvlab.errors import UserError
from qkvlab.models import ModelConfig, ModelKind, register
from qkvlab.models.transformer import Block, init_weights

__all__ = ["ViT"]


class ViT(nn.Module):
    """Vision transformer for small images: patch embedding, cls token, bidirectional blocks."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.d_model, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        init_weights(self, cfg.n_layer, cfg.init_std)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (b, patches, d)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x[:, 0]))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


def _fit(cfg: ModelConfig, info: dict[str, Any]) -> None:
    cfg.image_size, cfg.channels, cfg.n_classes = info["image_size"], info["channels"], info["n_classes"]
    if cfg.image_size % cfg.patch_size:
        raise UserError(
            f"model.patch_size={cfg.patch_size} does not divide the image size {cfg.image_size}; "
            f"accepted: a divisor of {cfg.image_size}"
        )


KIND = register(ModelKind("vit", "images", "image", ViT, _fit))
