"""The architecture of every qkvlab model, one dataclass (importable without torch: the run config and
the command line's help read it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qkvlab.args import NONNEGATIVE, POSITIVE, UNIT, Key

__all__ = ["KEYS", "ModelConfig"]


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


#: The model section of a run's config (``model.kind`` is the registry's: ``qkvlab.models.keys``).
KEYS: dict[str, Key] = {
    "model.n_layer": ("transformer blocks", POSITIVE),
    "model.n_head": ("attention heads per block", POSITIVE),
    "model.d_model": ("residual width", POSITIVE),
    "model.d_head": ("per-head width (None: d_model / n_head)", POSITIVE),
    "model.d_mlp": ("MLP width (None: 4·d_model; 0: attention-only blocks)", NONNEGATIVE),
    "model.dropout": ("dropout probability", UNIT),
    "model.bias": ("biases in linear layers", None),
    "model.tie_embeddings": ("gpt: the LM head shares the token embedding", None),
    "model.attention": (
        "softmax | linear (icl only; von Oswald et al. 2023)",
        (lambda v: v in ("softmax", "linear"), "softmax or linear"),
    ),
    "model.norm": ("icl: LayerNorm before each sublayer (False: a pure residual attention stack)", None),
    "model.patch_size": ("vit: patch side in pixels", POSITIVE),
    "model.init_std": (
        "std of every weight matrix at init (residual output projections: std/√(2·n_layer))",
        POSITIVE,
    ),
}
