"""The architecture table: one entry per family, no if/else chains elsewhere.

Each family lists one or more *layouts*, i.e. naming schemes of its attention weights
(HF renamed ViT's in transformers 5, and checkpoints on disk keep the old names). A
layout is found by its ``anchor``: a regex on parameter names whose group ``block`` is
the attention block's prefix. The other matrices are templates relative to ``block``.
Any outer prefix (``bert.``, ``model.``, ``transformer.``…) is absorbed by ``block``.

Storage conventions:
- nn.Linear stores (out, in). Projections with ``transposed=True`` are HF ``Conv1D``
  (GPT-2), which stores (in, out); we transpose on read.
- A fused ``qkv`` weight (``qkv_order="blocks"``) stacks q, k, v along the output dimension
  (q first), and within each the heads in order: rows [q_h0 … q_h(H−1), k_g0 … k_g(G−1), v_g0 …],
  H·d_head + 2·G·d_head rows with G key/value heads. That is the layout of GPT-2 ``c_attn`` (after
  transposing), timm ``attn.qkv``, torch ``nn.MultiheadAttention.in_proj_weight`` (G = H) and
  Phi-3 ``qkv_proj`` (grouped-query attention, G ≤ H).
- GPT-NeoX / Pythia (``qkv_order="per-head"``) interleave per head instead: rows
  [q_h0, k_h0, v_h0, q_h1, k_h1, v_h1, …], each d_head rows, as its forward reads them with
  ``view(..., H, 3·d_head)`` then ``chunk(3)``.
- Heads occupy contiguous blocks of d_head output rows of W_Q, W_K, W_V and the same
  input columns of W_O.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

__all__ = [
    "CONFIG_KEYS",
    "FAMILIES",
    "ROTARY_KEYS",
    "Family",
    "Layout",
    "family_by_model_type",
    "supported_families_text",
]


@dataclass(frozen=True)
class Layout:
    """One naming scheme of an attention block's projection weights."""

    anchor: str
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    transposed: bool = False
    #: How a fused ``qkv`` weight orders its rows: "blocks" ([q; k; v]) or "per-head" (GPT-NeoX).
    qkv_order: str = "blocks"
    #: Which attention this is, for models with several kinds (T5): "self", "decoder_self", "cross".
    attention: str = "self"
    #: Bias (or other) templates that do not follow "<matrix>.weight" → "<matrix>.bias", as (role, template).
    extra: tuple[tuple[str, str], ...] = ()
    #: Parameters under ``block`` that are not inside the attention (GGUF's ``blk.N.attn_norm``, the
    #: pre-attention norm, shares the ``attn_`` prefix): left out of the notes on what the products omit.
    outside: tuple[str, ...] = ()

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.anchor)

    @property
    def fused(self) -> bool:
        return self.qkv is not None

    def role_templates(self) -> list[tuple[str, str]]:
        """(role, template) for every attention parameter of a block: weights, their biases, extras."""
        pairs = [
            (role, t)
            for role, t in (("q", self.q), ("k", self.k), ("v", self.v), ("qkv", self.qkv), ("o", self.o))
            if t
        ]
        biases = [(role, t[: -len("weight")] + "bias") for role, t in pairs if t.endswith(".weight")]
        return pairs + biases + list(self.extra)


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    model_types: tuple[str, ...]
    layouts: tuple[Layout, ...]
    #: Where the true bilinear form differs from W_KᵀW_Q (documented, reported in JSON).
    caveat: str = ""
    #: Every matching layout is one kind of attention of the model (T5: encoder self-attention,
    #: decoder self-attention, cross-attention), instead of alternative namings of one kind.
    several_kinds: bool = False
    #: Rotary embeddings' plane layout within a head, as the weights are read: "half" (rotate-half: dims
    #: i and i + rot/2 form plane i; LLaMA, Qwen, Gemma, GPT-NeoX), "interleaved" (dims 2i, 2i + 1;
    #: GPT-J), or "" (no rotary embeddings). The rotary share of each head comes from the config
    #: (``ROTARY_KEYS``); all of it when the config says nothing.
    rope: str = ""
    #: Why no logit ceiling (qkvlab.logits.LogitCeiling) is computed for this family, where its scores are
    #: not q·k/√d_head of the projections; "" where they are.
    no_ceiling: str = ""


def _with_split(fused: Layout) -> tuple[Layout, Layout]:
    """A fused layout, and the names of the same block after ``qkvlab.split_fused_qkv``: the fused
    module ``X`` holds children ``X.q``, ``X.k``, ``X.v`` (same storage convention), so the split
    weights are ``X.q.weight`` and so on, in a plain [q, k, v] layout."""
    assert fused.qkv is not None and fused.qkv.endswith(".weight") and fused.anchor.endswith(r"\.weight$")
    module = fused.qkv[: -len(".weight")]
    return fused, Layout(
        anchor=fused.anchor[: -len(r"\.weight$")] + r"\.q\.weight$",
        q=f"{module}.q.weight",
        k=f"{module}.k.weight",
        v=f"{module}.v.weight",
        o=fused.o,
        transposed=fused.transposed,
        attention=fused.attention,
    )


_PREFIX = r"(?:.*\.)?"  # any outer prefix, e.g. "bert." or "base_model.model.model."

_BERT = Layout(
    anchor=rf"^(?P<block>{_PREFIX}encoder\.layer\.\d+\.attention\.)self\.query\.weight$",
    q="{block}self.query.weight",
    k="{block}self.key.weight",
    v="{block}self.value.weight",
    o="{block}output.dense.weight",
)

_GPT2 = Layout(
    anchor=rf"^(?P<block>{_PREFIX}h\.\d+\.attn\.)c_attn\.weight$",
    qkv="{block}c_attn.weight",
    o="{block}c_proj.weight",
    transposed=True,
)

_LLAMA = Layout(
    anchor=rf"^(?P<block>{_PREFIX}layers\.\d+\.self_attn\.)q_proj\.weight$",
    q="{block}q_proj.weight",
    k="{block}k_proj.weight",
    v="{block}v_proj.weight",
    o="{block}o_proj.weight",
)

# llama.cpp's GGUF names (``qkvlab.attention.gguf`` reads the file and gives its metadata as a HF config):
# blk.N.attn_q / attn_k / attn_v / attn_output, nn.Linear's (out, in) once read, biases as attn_q.bias.
_GGUF = Layout(
    anchor=r"^(?P<block>blk\.\d+\.attn_)q\.weight$",
    q="{block}q.weight",
    k="{block}k.weight",
    v="{block}v.weight",
    o="{block}output.weight",
    outside=("{block}norm.weight",),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        description="HF BERT / RoBERTa / XLM-R / ELECTRA encoders (incl. MiniLM)",
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        layouts=(_BERT,),
    ),
    Family(
        name="gpt2",
        description="HF GPT-2 (fused, transposed Conv1D c_attn)",
        model_types=("gpt2",),
        layouts=_with_split(_GPT2),  # split: c_attn holds three Conv1D children
    ),
    Family(
        name="nanogpt",
        description="nanoGPT (c_attn and c_proj as nn.Linear under GPT-2's names; told from GPT-2 by shape)",
        model_types=(),
        layouts=_with_split(dataclasses.replace(_GPT2, transposed=False)),
    ),
    Family(
        name="llama",
        description="HF LLaMA / Mistral / Mixtral / Qwen2 / Qwen3 (grouped-query attention)",
        model_types=("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"),
        layouts=(_LLAMA, _GGUF),
        caveat=(
            "rotary position embeddings: the score bilinear form is W_Qᵀ R(Δ) W_K, so W_KᵀW_Q is "
            "the relative-offset-0 form; Qwen3's q/k RMSNorm also sits between the factors"
        ),
        rope="half",
    ),
    Family(
        name="gemma3",
        description="HF Gemma 2 / Gemma 3 (grouped-query attention, head_dim ≠ d_model / n_heads, q/k RMSNorm)",
        model_types=("gemma", "gemma2", "gemma3", "gemma3_text"),
        layouts=(_LLAMA, _GGUF),
        caveat=(
            "rotary position embeddings: the score bilinear form is W_Qᵀ R(Δ) W_K, so W_KᵀW_Q is the "
            "relative-offset-0 form; Gemma 3's q/k RMSNorm sits between the factors and rescales q and k per "
            "token, so W_Q's and W_K's own scale is free and weight decay's balance does not constrain the QK "
            "factors (OV is unaffected); scores are scaled by query_pre_attn_scalar, not 1/√d_head"
        ),
        rope="half",
        no_ceiling="Gemma 3's q/k RMSNorm between the factors bounds each logit by d_head·max|γ_q|·max|γ_k| "
        "(Gemma's gain γ = 1 + w) times the score scale, whatever W_Q and W_K; Gemma 2 scales scores by "
        "query_pre_attn_scalar^(-1/2), not 1/√d_head, and soft-caps them; Gemma 1 would admit the ceiling but "
        "shares this family's entry",
    ),
    Family(
        name="vit",
        description="HF ViT (transformers 5 names and the older checkpoint names)",
        model_types=("vit",),
        layouts=(
            Layout(
                anchor=rf"^(?P<block>{_PREFIX}layers\.\d+\.attention\.)q_proj\.weight$",
                q="{block}q_proj.weight",
                k="{block}k_proj.weight",
                v="{block}v_proj.weight",
                o="{block}o_proj.weight",
            ),
            Layout(
                anchor=rf"^(?P<block>{_PREFIX}encoder\.layer\.\d+\.attention\.)attention\.query\.weight$",
                q="{block}attention.query.weight",
                k="{block}attention.key.weight",
                v="{block}attention.value.weight",
                o="{block}output.dense.weight",
            ),
        ),
    ),
    Family(
        name="gpt-neox",
        description="HF GPT-NeoX / Pythia (fused query_key_value, interleaved per head)",
        model_types=("gpt_neox",),
        layouts=_with_split(
            Layout(
                anchor=rf"^(?P<block>{_PREFIX}layers\.\d+\.attention\.)query_key_value\.weight$",
                qkv="{block}query_key_value.weight",
                o="{block}dense.weight",
                qkv_order="per-head",
            )
        ),
        caveat=(
            "rotary position embeddings on the first rotary_pct of each head's dimensions (Pythia: 25 %): "
            "W_KᵀW_Q is the relative-offset-0 form of those dimensions and exact for the rest"
        ),
        rope="half",
    ),
    Family(
        name="opt",
        description="HF OPT (separate q/k/v_proj and out_proj, with biases)",
        model_types=("opt",),
        layouts=(
            Layout(
                anchor=rf"^(?P<block>{_PREFIX}layers\.\d+\.self_attn\.)q_proj\.weight$",
                q="{block}q_proj.weight",
                k="{block}k_proj.weight",
                v="{block}v_proj.weight",
                o="{block}out_proj.weight",
            ),
        ),
    ),
    Family(
        name="phi3",
        description="HF Phi-3 (fused qkv_proj as [q; k; v] blocks, grouped-query attention)",
        model_types=("phi3",),
        layouts=_with_split(
            Layout(
                anchor=rf"^(?P<block>{_PREFIX}layers\.\d+\.self_attn\.)qkv_proj\.weight$",
                qkv="{block}qkv_proj.weight",
                o="{block}o_proj.weight",
            )
        ),
        caveat="rotary position embeddings: W_KᵀW_Q is the relative-offset-0 form, as for LLaMA",
        rope="half",
    ),
    Family(
        name="distilbert",
        description="HF DistilBERT (q_lin, k_lin, v_lin, out_lin)",
        model_types=("distilbert",),
        layouts=(
            Layout(
                anchor=rf"^(?P<block>{_PREFIX}layer\.\d+\.attention\.)q_lin\.weight$",
                q="{block}q_lin.weight",
                k="{block}k_lin.weight",
                v="{block}v_lin.weight",
                o="{block}out_lin.weight",
            ),
        ),
    ),
    Family(
        name="mpnet",
        description="HF MPNet (attention.attn.{q,k,v,o}; incl. all-mpnet-base-v2)",
        model_types=("mpnet",),
        layouts=(
            Layout(
                anchor=rf"^(?P<block>{_PREFIX}layer\.\d+\.attention\.attn\.)q\.weight$",
                q="{block}q.weight",
                k="{block}k.weight",
                v="{block}v.weight",
                o="{block}o.weight",
            ),
        ),
        caveat="a learned relative-position bias is added to the scores; it does not enter W_KᵀW_Q",
        no_ceiling="a learned relative-position bias is added to the scores",
    ),
    Family(
        name="t5",
        description="HF T5 / mT5 / Flan-T5 (encoder self-, decoder self- and cross-attention)",
        model_types=("t5", "mt5", "umt5"),
        layouts=tuple(
            Layout(
                anchor=rf"^(?P<block>{_PREFIX}{where}\.block\.\d+\.layer\.{index}\.{module}\.)q\.weight$",
                q="{block}q.weight",
                k="{block}k.weight",
                v="{block}v.weight",
                o="{block}o.weight",
                attention=attention,
            )
            for where, index, module, attention in (
                ("encoder", 0, "SelfAttention", "self"),
                ("decoder", 0, "SelfAttention", "decoder_self"),
                ("decoder", 1, "EncDecAttention", "cross"),
            )
        ),
        caveat=(
            "T5 does not scale scores by 1/√d_kv (the scale is folded into its initialisation) and adds "
            "learned relative position biases to them; W_KᵀW_Q is the form without the bias"
        ),
        several_kinds=True,
        no_ceiling="scores are not scaled by 1/√d_kv and add learned relative position biases",
    ),
    Family(
        name="qkvlab",
        description="qkvlab's own GPT, ViT and in-context regression transformers",
        model_types=("qkvlab-gpt", "qkvlab-vit", "qkvlab-icl"),
        layouts=(
            Layout(
                anchor=rf"^(?P<block>{_PREFIX}blocks\.\d+\.attn\.)q_proj\.weight$",
                q="{block}q_proj.weight",
                k="{block}k_proj.weight",
                v="{block}v_proj.weight",
                o="{block}o_proj.weight",
            ),
        ),
    ),
    Family(
        name="timm-vit",
        description="timm VisionTransformer (fused attn.qkv)",
        model_types=(),
        layouts=_with_split(
            Layout(
                anchor=rf"^(?P<block>{_PREFIX}blocks\.\d+\.attn\.)qkv\.weight$",
                qkv="{block}qkv.weight",
                o="{block}proj.weight",
            )
        ),
    ),
    Family(
        name="torch-mha",
        description="torch nn.MultiheadAttention (fused in_proj_weight, or q/k/v_proj_weight when kdim/vdim differ)",
        model_types=(),
        layouts=(
            Layout(
                anchor=rf"^(?P<block>{_PREFIX})in_proj_weight$",
                qkv="{block}in_proj_weight",
                o="{block}out_proj.weight",
                extra=(("qkv", "{block}in_proj_bias"), ("k", "{block}bias_k"), ("v", "{block}bias_v")),
            ),
            Layout(  # kdim/vdim ≠ embed_dim, or after qkvlab.split_fused_qkv (q_bias/k_bias/v_bias)
                anchor=rf"^(?P<block>{_PREFIX})q_proj_weight$",
                q="{block}q_proj_weight",
                k="{block}k_proj_weight",
                v="{block}v_proj_weight",
                o="{block}out_proj.weight",
                extra=(
                    ("qkv", "{block}in_proj_bias"),
                    ("q", "{block}q_bias"),
                    ("k", "{block}k_bias"),
                    ("v", "{block}v_bias"),
                ),
            ),
        ),
    ),
)

#: The share of each head's dimensions that rotary embeddings rotate (config keys, in order; 1 if none).
ROTARY_KEYS = ("partial_rotary_factor", "rotary_pct")

#: HF config synonyms, read in order. n_kv_heads defaults to n_heads, d_head to d_model / n_heads.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "n_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads"),
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "d_head": ("head_dim", "d_head", "d_kv"),
}


def family_by_model_type(model_type: str) -> Family | None:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def family_by_name(name: str) -> Family | None:
    return next((f for f in FAMILIES if f.name == name), None)


def supported_families_text() -> str:
    return "; ".join(f"{f.name} ({f.description})" for f in FAMILIES)
