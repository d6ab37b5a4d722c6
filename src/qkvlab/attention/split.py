"""Split fused q/k/v projections into separate parameters, and back.

A per-matrix learning rate or weight decay needs q, k and v to be separate tensors.
``split_fused_qkv(model)`` rewrites, in place and with identical forward outputs:

- HF GPT-2 ``c_attn`` (a transposed ``Conv1D``, weight (d, 3d)) → ``SplitQKV`` holding
  three ``Conv1D`` children ``c_attn.q``, ``c_attn.k``, ``c_attn.v`` (weights (d, d), still (in, out));
- timm-style ``attn.qkv`` (``nn.Linear``, weight (3d, d)) → ``SplitQKV`` with ``nn.Linear``
  children ``qkv.q``, ``qkv.k``, ``qkv.v``;
- Phi-3 ``qkv_proj`` ([q; k; v] blocks of H·d_head, G·d_head, G·d_head rows: grouped-query
  attention) → ``SplitQKV`` with children of those sizes;
- GPT-NeoX / Pythia ``query_key_value`` (rows interleaved per head: [q_h, k_h, v_h] for each head h)
  → ``SplitQKV(heads=H)``, whose forward interleaves the children's outputs back per head;
- ``nn.MultiheadAttention`` with a fused ``in_proj_weight`` → the same module with
  ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` (torch's own separate-projection
  path) and ``q_bias``/``k_bias``/``v_bias``.

``fuse_split_qkv(model)`` is the inverse. A ``SplitQKV`` keeps the fused layer's names and layout
in state dicts (hooks on ``state_dict`` and ``load_state_dict``), so ``save_pretrained`` of a split
GPT-2 writes an ordinary GPT-2 checkpoint and a split model loads one; parameters (what optimisers
and per-role groups see) are the split ones. ``split_state_dict`` / ``fuse_state_dict`` convert
checkpoints between the two naming schemes without a model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from qkvlab.attention.extract import natural_key

__all__ = [
    "SplitMultiheadAttention",
    "SplitQKV",
    "fuse_split_qkv",
    "fuse_state_dict",
    "split_fused_qkv",
    "split_state_dict",
]


class SplitQKV(nn.Module):
    """Drop-in for a fused projection: its output from separate q, k, v modules.

    ``heads=None``: the fused layer stacked [q; k; v] (any sizes), so the output is
    cat([q(x), k(x), v(x)], -1). ``heads=H``: it interleaved them per head (GPT-NeoX), so the
    output is [q_h, k_h, v_h] for h = 0 … H−1, each of d_head features.
    """

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, heads: int | None = None) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v
        self.heads = heads
        # State dicts keep the fused layer's names and layout, so ``save_pretrained``, ``torch.save`` or
        # a Trainer checkpoint of a split model is an ordinary checkpoint of the original architecture
        # (it reloads with ``from_pretrained``), and loading such a checkpoint splits it again.
        self.register_state_dict_post_hook(_fuse_own_state)
        self.register_load_state_dict_pre_hook(_split_own_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (self.q(x), self.k(x), self.v(x))
        if self.heads is None:
            return torch.cat(parts, dim=-1)
        return torch.stack([p.unflatten(-1, (self.heads, -1)) for p in parts], dim=-2).flatten(-3)

    def stack_dim(self, name: str) -> int:
        """The dim along which q|k|v sit in the fused tensor ``name`` ("weight" or "bias")."""
        conv1d = _conv1d_cls()
        return 1 if name == "weight" and conv1d is not None and isinstance(self.q, conv1d) else 0

    def fuse(self, parts: list[torch.Tensor], name: str) -> torch.Tensor:
        """The fused layer's tensor ``name`` from the q, k, v ones."""
        dim = self.stack_dim(name)
        if self.heads is None:
            return torch.cat(parts, dim=dim)
        return torch.stack([p.unflatten(dim, (self.heads, -1)) for p in parts], dim=dim + 1).flatten(
            dim, dim + 2
        )

    def split(self, fused: torch.Tensor, name: str) -> list[torch.Tensor]:
        """Inverse of ``fuse``: the q, k, v tensors ``name`` (sizes from this module's children)."""
        dim = self.stack_dim(name)
        if self.heads is not None:
            return [
                t.flatten(dim, dim + 1) for t in fused.unflatten(dim, (self.heads, 3, -1)).unbind(dim + 1)
            ]
        sizes = [getattr(c, name).shape[dim] for c in (self.q, self.k, self.v)]
        return list(fused.split(sizes, dim=dim))


def _fuse_own_state(module: SplitQKV, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name in ("weight", "bias"):
        parts = [f"{prefix}{c}.{name}" for c in "qkv"]
        if all(p in state_dict for p in parts):
            state_dict[prefix + name] = module.fuse([state_dict.pop(p) for p in parts], name)


def _split_own_state(module: SplitQKV, state_dict: dict, prefix: str, *args: object) -> None:
    for name in ("weight", "bias"):
        if prefix + name in state_dict:
            for c, chunk in zip("qkv", module.split(state_dict.pop(prefix + name), name), strict=True):
                state_dict[f"{prefix}{c}.{name}"] = chunk


class SplitMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention on torch's separate-projection path, with separate q/k/v biases.

    ``in_proj_bias`` is a differentiable view (``cat`` of the three biases) that torch's
    forward reads; only ``q_bias``/``k_bias``/``v_bias`` are parameters.
    """

    @property
    def in_proj_bias(self) -> torch.Tensor | None:  # type: ignore[override]
        if getattr(self, "q_bias", None) is None:
            return None
        return torch.cat([self.q_bias, self.k_bias, self.v_bias])


@dataclass(frozen=True)
class _FusedLinear:
    """A fused module kind: which class, and along which weight dim q|k|v are stacked."""

    name_pattern: str
    cls_name: str
    dim: int


def _conv1d_cls() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _split_module(module: nn.Module, sizes: list[int] | None = None, heads: int | None = None) -> SplitQKV:
    """``sizes``: the q, k, v output sizes of a [q; k; v] layer (default: thirds); ``heads``: GPT-NeoX's
    per-head interleave with that many heads."""
    conv1d = _conv1d_cls()
    is_conv = conv1d is not None and isinstance(module, conv1d)
    out_dim = 1 if is_conv else 0
    total = module.weight.shape[out_dim]
    template = SplitQKV(nn.Identity(), nn.Identity(), nn.Identity(), heads=heads)
    if heads is None:
        sizes = sizes or [total // 3] * 3
        weights = list(module.weight.detach().split(sizes, dim=out_dim))
        biases = list(module.bias.detach().split(sizes)) if module.bias is not None else [None] * 3
    else:
        if is_conv:
            raise ValueError("a per-head interleaved projection stored as Conv1D is not supported")
        weights = [w.contiguous() for w in template.split(module.weight.detach(), "weight")]
        biases = (
            [b.contiguous() for b in template.split(module.bias.detach(), "bias")]
            if module.bias is not None
            else [None] * 3
        )
    children = []
    for w, b in zip(weights, biases, strict=True):
        if is_conv:  # weight (in, out)
            child = conv1d(w.shape[1], w.shape[0]).to(device=w.device, dtype=w.dtype)
        else:  # nn.Linear, weight (out, in)
            child = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        child.weight = nn.Parameter(w.clone(), requires_grad=module.weight.requires_grad)
        if b is not None:
            child.bias = nn.Parameter(b.clone(), requires_grad=module.bias.requires_grad)
        children.append(child)
    return SplitQKV(*children, heads=heads)


def _fuse_module(split: SplitQKV) -> nn.Module:
    conv1d = _conv1d_cls()
    q, k, v = split.q, split.k, split.v
    weight = split.fuse([q.weight, k.weight, v.weight], "weight").detach()
    if conv1d is not None and isinstance(q, conv1d):
        fused = conv1d(weight.shape[1], weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    else:
        fused = nn.Linear(
            weight.shape[1],
            weight.shape[0],
            bias=q.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
    fused.weight = nn.Parameter(weight.clone(), requires_grad=q.weight.requires_grad)
    if q.bias is not None:
        fused.bias = nn.Parameter(
            split.fuse([q.bias, k.bias, v.bias], "bias").detach().clone(), requires_grad=q.bias.requires_grad
        )
    return fused


def _split_mha(mha: nn.MultiheadAttention) -> None:
    weight = mha.in_proj_weight
    bias = mha.in_proj_bias
    grad = weight.requires_grad
    del mha._parameters["in_proj_weight"]
    mha.register_parameter("in_proj_weight", None)
    for name, w in zip(
        ("q_proj_weight", "k_proj_weight", "v_proj_weight"), weight.detach().chunk(3), strict=True
    ):
        mha.register_parameter(name, nn.Parameter(w.clone(), requires_grad=grad))
    del mha._parameters["in_proj_bias"]
    biases = bias.detach().chunk(3) if bias is not None else (None,) * 3
    for name, b in zip(("q_bias", "k_bias", "v_bias"), biases, strict=True):
        mha.register_parameter(
            name, None if b is None else nn.Parameter(b.clone(), requires_grad=bias.requires_grad)
        )
    mha._qkv_same_embed_dim = False
    mha.__class__ = SplitMultiheadAttention


def _split_mha_bias(mha: nn.MultiheadAttention) -> None:
    """kdim/vdim ≠ embed_dim: torch already keeps separate q/k/v weights; split the shared in_proj_bias too."""
    bias = mha.in_proj_bias
    del mha._parameters["in_proj_bias"]
    biases = bias.detach().chunk(3) if bias is not None else (None,) * 3
    for name, b in zip(("q_bias", "k_bias", "v_bias"), biases, strict=True):
        mha.register_parameter(
            name, None if b is None else nn.Parameter(b.clone(), requires_grad=bias.requires_grad)
        )
    mha.__class__ = SplitMultiheadAttention


def _fuse_mha(mha: SplitMultiheadAttention) -> None:
    if not (mha.kdim == mha.embed_dim and mha.vdim == mha.embed_dim):  # separate weights stay separate
        bias = (
            None if mha.q_bias is None else torch.cat([mha.q_bias, mha.k_bias, mha.v_bias]).detach().clone()
        )
        grad = mha.q_bias.requires_grad if mha.q_bias is not None else False
        for name in ("q_bias", "k_bias", "v_bias"):
            del mha._parameters[name]
        mha.__class__ = nn.MultiheadAttention
        mha.register_parameter(
            "in_proj_bias", None if bias is None else nn.Parameter(bias, requires_grad=grad)
        )
        return
    weight = torch.cat([mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]).detach().clone()
    bias = None if mha.q_bias is None else torch.cat([mha.q_bias, mha.k_bias, mha.v_bias]).detach().clone()
    grad = mha.q_proj_weight.requires_grad
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "q_bias", "k_bias", "v_bias"):
        del mha._parameters[name]
    mha.__class__ = nn.MultiheadAttention
    mha.register_parameter("q_proj_weight", None)
    mha.register_parameter("k_proj_weight", None)
    mha.register_parameter("v_proj_weight", None)
    mha.register_parameter("in_proj_weight", nn.Parameter(weight, requires_grad=grad))
    mha.register_parameter("in_proj_bias", None if bias is None else nn.Parameter(bias, requires_grad=grad))
    mha._qkv_same_embed_dim = True


@functools.cache
def _fused_modules() -> dict[str, str]:
    """The leaf name of every fused q/k/v module in the architecture table → how it orders its rows
    ("blocks" or "per-head"): c_attn, qkv, query_key_value, qkv_proj."""
    from qkvlab.attention.families import FAMILIES

    return {
        layout.qkv.removeprefix("{block}").removesuffix(".weight"): layout.qkv_order
        for family in FAMILIES
        for layout in family.layouts
        if layout.qkv and layout.qkv.endswith(".weight")
    }


def _fused_layout(name: str, module: nn.Module, parent: nn.Module) -> dict | None:
    """How to split the module ``name`` (keyword arguments of ``_split_module``), or None if it is
    not a fused q/k/v projection of the architecture table. Head counts come from the attention
    module that holds it (its HF config and head_dim); without them, [q; k; v] thirds."""
    order = _fused_modules().get(name.rsplit(".", 1)[-1])
    conv1d = _conv1d_cls()
    if order is None:
        return None
    if conv1d is not None and isinstance(module, conv1d):  # GPT-2: [q; k; v] thirds, stored (in, out)
        return {} if order == "blocks" else None
    if not isinstance(module, nn.Linear):
        return None
    config = getattr(parent, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if order == "per-head":  # GPT-NeoX / Pythia
        return {"heads": heads} if isinstance(heads, int) else None
    if isinstance(heads, int):  # [q; k; v] blocks sized by the head counts (Phi-3: grouped-query)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        d_head = getattr(parent, "head_dim", None) or module.out_features // (heads + 2 * kv_heads)
        sizes = [heads * d_head, kv_heads * d_head, kv_heads * d_head]
        return {"sizes": sizes} if sum(sizes) == module.out_features else None
    return {} if module.out_features % 3 == 0 else None  # timm: no config, q, k and v of one size


def split_fused_qkv(model: nn.Module) -> list[str]:
    """Replace every fused q/k/v projection by separate parameters, in place.

    Returns the names of the modules it rewrote. Forward outputs are unchanged (up to
    float rounding of the split matmuls). Optimiser state built before the split refers
    to the old tensors: split first, then build the optimiser.
    """
    rewritten = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and not isinstance(module, SplitMultiheadAttention):
            if module._qkv_same_embed_dim:
                _split_mha(module)
                rewritten.append(name)
            elif module.in_proj_bias is not None:
                _split_mha_bias(module)
                rewritten.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layout = _fused_layout(name, module, parent) if name else None
        if layout is not None:
            setattr(parent, child, _split_module(module, **layout))
            rewritten.append(name)
    return rewritten


def fuse_split_qkv(model: nn.Module) -> list[str]:
    """Inverse of ``split_fused_qkv``: restore fused projections, in place."""
    rewritten = []
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitMultiheadAttention):
            _fuse_mha(module)
            rewritten.append(name)
        elif isinstance(module, SplitQKV):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _fuse_module(module))
            rewritten.append(name)
    return rewritten


# -- state dicts -------------------------------------------------------------------------
# (fused key suffix, the three split suffixes, dim along which q|k|v are stacked)
_STATE_DICT_RULES: tuple[tuple[str, tuple[str, str, str], int | None], ...] = (
    ("c_attn.weight", ("c_attn.q.weight", "c_attn.k.weight", "c_attn.v.weight"), 1),  # Conv1D (in, 3·out)
    ("c_attn.bias", ("c_attn.q.bias", "c_attn.k.bias", "c_attn.v.bias"), 0),
    ("qkv.weight", ("qkv.q.weight", "qkv.k.weight", "qkv.v.weight"), 0),
    ("qkv.bias", ("qkv.q.bias", "qkv.k.bias", "qkv.v.bias"), 0),
    ("in_proj_weight", ("q_proj_weight", "k_proj_weight", "v_proj_weight"), 0),
    ("in_proj_bias", ("q_bias", "k_bias", "v_bias"), 0),
)


def _rule_prefix(key: str, suffix: str) -> str | None:
    if key == suffix:
        return ""
    if key.endswith("." + suffix):
        return key[: -len(suffix)]
    return None


def split_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused-projection checkpoint → the names and shapes of a ``split_fused_qkv`` model."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for fused, parts, dim in _STATE_DICT_RULES:
            prefix = _rule_prefix(key, fused)
            if prefix is not None and not _is_gpt2_conflict(fused, tensor):
                if fused == "c_attn.weight":  # GPT-2's Conv1D (in, 3d) or nanoGPT's nn.Linear (3d, in)
                    dim = 1 if tensor.shape[1] == 3 * tensor.shape[0] else 0
                for part, chunk in zip(parts, tensor.chunk(3, dim=dim), strict=True):
                    out[prefix + part] = chunk.clone()
                break
        else:
            out[key] = tensor
    return out


def fuse_state_dict(state_dict: dict[str, torch.Tensor], *, conv1d: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of ``split_state_dict``. ``conv1d``: whether ``c_attn`` is GPT-2's Conv1D, stored (in, out)
    (the default), or nanoGPT's nn.Linear (``conv1d=False``); its split parts are square either way, so
    they cannot say."""
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for key in state_dict:
        for fused, parts, dim in _STATE_DICT_RULES:
            prefix = _rule_prefix(key, parts[0])
            if fused == "c_attn.weight" and not conv1d:
                dim = 0
            if prefix is not None and all(prefix + p in state_dict for p in parts):
                out[prefix + fused] = torch.cat([state_dict[prefix + p] for p in parts], dim=dim)
                consumed.update(prefix + p for p in parts)
                break
    for key, tensor in state_dict.items():
        if key not in consumed:
            out[key] = tensor
    return {k: out[k] for k in sorted(out, key=natural_key)}


def _is_gpt2_conflict(fused: str, tensor: torch.Tensor) -> bool:
    """A ``c_attn.weight`` that is neither GPT-2's (in, 3·in) nor nanoGPT's (3·in, in): not ours to split."""
    if fused != "c_attn.weight":
        return False
    return tensor.ndim != 2 or not (
        tensor.shape[1] == 3 * tensor.shape[0] or tensor.shape[0] == 3 * tensor.shape[1]
    )
