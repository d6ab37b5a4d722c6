"""qkvlab's own transformers: a decoder-only GPT, a small ViT, and an in-context regression model.

One config dataclass, then small modules that read top to bottom (nanoGPT style). All three
share one attention block with separate q/k/v/o projections named ``blocks.{i}.attn.{q,k,v,o}_proj``
— the "qkvlab" family of the architecture table — so ``inspect``, ``roles`` and the presets
work on them unchanged, and ``d_head`` is independent of ``d_model / n_head``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GPT", "ICLTransformer", "ModelConfig", "ViT", "build_model"]


@dataclass
class ModelConfig:
    """Architecture of every qkvlab model. Fields a model does not use are ignored by it."""

    kind: str = "gpt"  # gpt | vit | icl
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_head: int | None = None  # default d_model // n_head
    d_mlp: int | None = None  # default 4 · d_model; 0 = attention-only blocks
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True  # gpt: LM head shares the token embedding
    attention: str = "softmax"  # softmax | linear (linear: von Oswald et al. 2023, icl only)
    norm: bool = True  # icl: LayerNorm before each sublayer (False = pure residual attention stack)
    patch_size: int = 4  # vit
    # std of every weight matrix at init: GPT-2's 0.02; residual output projections get std / √(2·n_layer)
    init_std: float = 0.02
    # Filled from the data by build_model:
    vocab_size: int = 0
    seq_len: int = 0
    image_size: int = 0
    channels: int = 1
    n_classes: int = 0
    input_dim: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def mlp_dim(self) -> int:
        return 4 * self.d_model if self.d_mlp is None else self.d_mlp

    def hf_config(self) -> dict:
        """config.json for checkpoints: what ``qkvlab inspect`` reads from disk."""
        return {
            "model_type": f"qkvlab-{self.kind}",
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "hidden_size": self.d_model,
            "head_dim": self.head_dim,
            "qkvlab": asdict(self),
        }


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
            drop = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=drop)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_head * self.d_head))


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


def _init_weights(module: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 init: N(0, std²) with std = 0.02 by default, residual output projections scaled by 1/√(2·n_layer)."""
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            residual = name.endswith(("o_proj.weight", "mlp.proj.weight"))
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layer) if residual else std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


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
        _init_weights(self, cfg.n_layer, cfg.init_std)
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
        _init_weights(self, cfg.n_layer, cfg.init_std)

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
        _init_weights(self, cfg.n_layer, cfg.init_std)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.embed(inputs)
        for block in self.blocks:
            x = block(x)
        prediction = self.head(self.ln_f(x[:, -1])).squeeze(-1)
        out = {"prediction": prediction}
        if targets is not None:
            out["loss"] = F.mse_loss(prediction.float(), targets)
        return out


_MODELS = {"gpt": GPT, "vit": ViT, "icl": ICLTransformer}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg.kind`` names, with its data-dependent fields already set."""
    if cfg.kind not in _MODELS:
        raise ValueError(f"unknown model kind {cfg.kind!r}; accepted: {', '.join(_MODELS)}")
    return _MODELS[cfg.kind](cfg)
