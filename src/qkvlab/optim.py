"""Roles, parameter groups, L2 penalty and presets: per-matrix optimiser control.

Everything returns plain data that any ``torch.optim`` optimiser accepts (timm's
``param_groups_weight_decay`` style), so it drops into any training loop.

Roles. Every parameter gets exactly one role:

    q, k, v, o   attention query/key/value/output projections (weights and their biases)
    qkv          a fused q/k/v projection (GPT-2 c_attn, timm qkv, MHA in_proj); see split_fused_qkv
    mlp          other parameters inside a transformer block (feed-forward, MoE)
    embed        token/position/patch embeddings, cls tokens
    norm         LayerNorm/RMSNorm/… gains and biases
    head         task head: classifier, LM head when untied, score, qa_outputs
    other        anything else (e.g. BERT's pooler)

Regularisation conventions (both are "weight decay λ", they differ under Adam):

- decoupled: ``torch.optim.AdamW(groups)`` does p ← p(1 − η·λ_g) apart from the
  adaptive step. This is the (λ/2)‖p‖² gradient step, so λ on both factors of W_KᵀW_Q
  corresponds to λ‖W_KᵀW_Q‖_* (see docs/spectra.md).
- coupled: L2 in the loss. Build the groups with ``regularization="l2"``: the optimiser
  then sees weight_decay = 0 and ``l2_penalty(groups)`` = Σ_g (λ_g/2)‖θ_g‖² is added to
  the loss. With SGD this equals SGD(weight_decay=λ); with Adam the penalty's gradient
  is rescaled by the adaptive denominator, as in the theory of paper 000.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from qkvlab.attention.families import FAMILIES
from qkvlab.errors import UserError
from qkvlab.presets import (
    ATTENTION_ROLES,
    PRESETS,
    ROLES,
    Preset,
    _normalise_overrides,
    _train_set,
    optimizer_settings,
    parse_preset,
    preset_settings,
)

__all__ = [
    "ATTENTION_ROLES",
    "PRESETS",
    "ROLES",
    "Preset",
    "l2_penalty",
    "optimizer_settings",
    "param_groups",
    "parse_preset",
    "preset_settings",
    "roles",
]


# Module names (any path component) that hold a task head.
_HEAD_NAMES = frozenset(
    {
        "classifier",
        "pre_classifier",
        "classification_head",
        "lm_head",
        "score",
        "qa_outputs",
        "head",
        "cls",
        "heads",
    }
)
# Parameter names of embeddings stored as bare parameters (ViT, timm).
_EMBED_PARAMS = frozenset(
    {"cls_token", "dist_token", "reg_token", "mask_token", "pos_embed", "position_embeddings"}
)
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.\d+(?:\.|$)")
# PEFT wrappers: frozen originals, and the adapter parameters of a wrapped module.
_FROZEN_BASE = re.compile(r"\.(?:base_layer|original_module)(?=\.)")
_LORA = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.[^.]+(?:\.(weight|bias))?$"
)
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")


def _canonical(name: str) -> str:
    """The parameter's name in the un-wrapped model: PEFT segments removed, LoRA → its base weight."""
    name = _SAVED_COPY.sub("", _FROZEN_BASE.sub("", name))
    return _LORA.sub(lambda m: ".bias" if m.group(2) == "bias" else ".weight", name)


def role_set(roles: Iterable[str] | str) -> set[str]:
    """Roles given as ``"q,k,v,o"`` or as an iterable of names, as a set (blanks dropped)."""
    return {r.strip() for r in (roles.split(",") if isinstance(roles, str) else roles)} - {""}


def lora_part(name: str) -> str | None:
    match = _LORA.search(name)
    if not match:
        return None
    return {"lora_A": "A", "lora_embedding_A": "A", "lora_B": "B", "lora_embedding_B": "B"}.get(
        match.group(1)
    )


def _is_frozen_base(name: str) -> bool:
    return bool(_FROZEN_BASE.search(name))


def _attention_roles(canonical_names: Iterable[str]) -> dict[str, str]:
    names = list(canonical_names)
    found: dict[str, str] = {}
    for family in FAMILIES:
        for layout in family.layouts:
            blocks = {m["block"] for n in names if (m := layout.pattern.match(n))}
            for block in blocks:
                for role, template in layout.role_templates():
                    found.setdefault(template.format(block=block), role)
    return found


def _is_norm(module: nn.Module) -> bool:
    base = getattr(module, "base_layer", module)
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)
    return isinstance(base, norm_types) or type(base).__name__.lower().endswith("norm")


def roles(model: nn.Module) -> dict[str, str]:
    """Map every parameter name of ``model`` (as ``named_parameters`` gives it) to one role.

    A bias takes the role of its matrix. In PEFT-wrapped models, ``lora_A``/``lora_B`` take
    the role of the module they adapt, and the frozen ``base_layer`` weight keeps it too.
    Tied parameters appear once, under the name ``named_parameters`` reports.
    """
    params = list(model.named_parameters())
    canonical = {name: _canonical(name) for name, _ in params}
    attention = _attention_roles(canonical.values())
    modules = dict(model.named_modules())
    result: dict[str, str] = {}
    for name, _ in params:
        canon = canonical[name]
        if canon in attention:
            result[name] = attention[canon]
            continue
        module_path, _, leaf = name.rpartition(".")
        module = modules.get(module_path, model)
        canon_path = canon.rpartition(".")[0]
        parts = canon_path.split(".") if canon_path else []
        if _is_norm(module) or re.search(r"(?:^|\.)(?:ln_\w+|\w*norm\w*)$", canon_path, re.IGNORECASE):
            result[name] = "norm"
        elif (
            isinstance(getattr(module, "base_layer", module), nn.Embedding)
            or leaf in _EMBED_PARAMS
            or any("embed" in p.lower() for p in parts)
            or canon.split(".")[-1] in _EMBED_PARAMS
        ):
            result[name] = "embed"
        elif any(p in _HEAD_NAMES for p in parts):
            result[name] = "head"
        elif _BLOCK.search(canon_path):
            result[name] = "mlp"
        else:
            result[name] = "other"
    return result


# -- parameter groups ----------------------------------------------------------------------


def _resolve_fused(
    present: set[str], overrides: dict[str, dict[str, float]], train: set[str] | None, fused_names: list[str]
) -> None:
    """Settings asked for q, k or v apply to a fused qkv tensor only if they agree."""
    if "qkv" not in present:
        return
    parts = ("q", "k", "v")
    where = f"{fused_names[0]}{' and others' if len(fused_names) > 1 else ''}"
    hint = "call qkvlab.split_fused_qkv(model) first"
    asked = {r: overrides.get(r) for r in parts if r in overrides}
    if asked:
        settings = [overrides.get(r, {}) for r in parts]
        if any(s != settings[0] for s in settings):
            raise UserError(
                f"different settings asked for q/k/v, which share the fused tensor {where}; {hint}"
            )
        overrides.setdefault("qkv", dict(settings[0]))
    if train is not None:
        chosen = [r in train for r in parts]
        if any(chosen) and not all(chosen):
            raise UserError(
                f"train={sorted(train)} splits q/k/v, which share the fused tensor {where}; {hint}"
            )
        if all(chosen):
            train.add("qkv")


def _decays(name: str, param: torch.Tensor, role: str) -> bool:
    """HF Trainer's convention (no decay for biases and norms), plus timm's for any 1-D tensor."""
    leaf = _canonical(name).rsplit(".", 1)[-1]
    return (
        role != "norm" and not leaf.endswith("bias") and leaf not in ("bias_k", "bias_v") and param.ndim >= 2
    )


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    train: Iterable[str] | str | None = None,
    lora_ratio: float | None = None,
    regularization: str = "decoupled",
    per_layer: Iterable[str] | str = (),
) -> list[dict[str, Any]]:
    """Parameter groups with a learning rate and weight decay per role.

    Args:
        lr: base learning rate; a role's rate is ``lr × overrides[role]["lr_scale"]``.
        weight_decay: base decay λ for matrices and embeddings. Biases, norms and any 1-D
            tensor get 0 (HF Trainer + timm convention). Embeddings are decayed, as the
            HF Trainer and nanoGPT do; override ``"embed"`` to change that.
        overrides: ``{role: {"lr_scale": float, "weight_decay": float}}``.
        train: roles that stay trainable (a set or "q,v"). Every other parameter gets
            ``requires_grad=False`` and is left out. The task head stays trainable unless
            ``"-head"`` is listed. ``None`` keeps the model's own ``requires_grad`` flags.
            PEFT's frozen base weights are never made trainable.
        lora_ratio: LoRA+ — ``lora_B`` gets its role's rate × ratio. Only ``lora_B``;
            1-D parameters keep their role's rate (unlike PEFT's helper).
        regularization: ``"decoupled"`` (groups carry ``weight_decay``, use AdamW) or
            ``"l2"`` (groups carry ``weight_decay=0`` and ``l2=λ_g``; add ``l2_penalty(groups)``
            to the loss).
        per_layer: roles (e.g. ``"q,k,v,o"``) whose groups are split by layer, each with a
            ``layer`` key: the layer is the first integer in the parameter's dotted name
            (``blocks.3.attn.q_proj.weight``, ``model.layers.3.self_attn.q_proj.weight``). The
            rank guard (:mod:`qkvlab.guard`) sets each layer's weight decay apart.

    Returns:
        One dict per (role, decay, LoRA part, layer) with ``params``, ``param_names``, ``role``,
        ``lr``, ``weight_decay`` (and ``l2`` for coupled L2, ``layer`` for ``per_layer`` roles).
    """
    if not lr > 0:  # `not >` also rejects NaN
        raise UserError(f"lr must be > 0, got {lr}")
    if not weight_decay >= 0:
        raise UserError(f"weight_decay must be ≥ 0, got {weight_decay}")
    if lora_ratio is not None and not lora_ratio > 0:
        raise UserError(f"lora_ratio must be > 0, got {lora_ratio}")
    if regularization not in ("decoupled", "l2"):
        raise UserError(f"regularization must be 'decoupled' or 'l2', got {regularization!r}")
    settings = _normalise_overrides(overrides)
    train_roles, _ = _train_set(train)
    split = role_set(per_layer)
    if split - {"q", "k", "v", "o"}:
        raise UserError(f"per_layer {sorted(split)}; accepted: a subset of q, k, v, o")
    role_of = roles(model)
    fused_names = [n for n, r in role_of.items() if r == "qkv"]
    _resolve_fused(set(role_of.values()), settings, train_roles, fused_names)

    peft_model = any(lora_part(n) or _is_frozen_base(n) or ".modules_to_save." in n for n in role_of)
    present = set(role_of.values())
    asked = set(settings) | (set(train_roles) - {"head"} if train_roles is not None else set())
    missing = sorted(
        r for r in asked & {"q", "k", "v", "o"} if r not in present and not (r != "o" and "qkv" in present)
    )
    if missing:
        raise UserError(
            f"this model has no parameter with role {', '.join(missing)} (roles found: {', '.join(sorted(present))}); "
            "is its attention layout in the architecture table? see qkvlab.attention.families"
        )
    groups: dict[tuple[str, bool, bool, int], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        role = role_of[name]
        if _is_frozen_base(name):
            param.requires_grad_(False)
            continue
        if train_roles is not None:
            if role not in train_roles:
                param.requires_grad_(False)
            elif not peft_model:
                param.requires_grad_(True)
            # in a PEFT model `train` only freezes: what PEFT froze (e.g. an LM head, an un-adapted
            # projection) stays frozen, and adapters / modules_to_save copies keep their flags
        if not param.requires_grad:
            continue
        decay = _decays(name, param, role)
        is_b = lora_part(name) == "B" and lora_ratio is not None
        layer = layer_of(name) if role in split else None
        if role in split and layer is None:
            raise UserError(f"per_layer: {name} has no layer number in its name")
        key = (role, decay, is_b, -1 if layer is None else layer)
        if key not in groups:
            role_settings = settings.get(role, {})
            rate = lr * role_settings.get("lr_scale", 1.0) * (lora_ratio if is_b else 1.0)
            lam = role_settings.get("weight_decay", weight_decay) if decay else 0.0
            group = {"params": [], "param_names": [], "role": role, "lr": rate, "weight_decay": lam}
            if is_b:
                group["lora"] = "B"
            if layer is not None:
                group["layer"] = layer
            if regularization == "l2":
                group["l2"], group["weight_decay"] = lam, 0.0
            groups[key] = group
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    if not groups:
        asked = (
            f"train={sorted(train_roles)}" if train_roles is not None else "the model's requires_grad flags"
        )
        present = sorted(set(role_of.values()))
        raise UserError(f"{asked} leaves nothing trainable; roles in this model: {', '.join(present)}")
    order = {r: i for i, r in enumerate(ROLES)}
    return [groups[k] for k in sorted(groups, key=lambda k: (order[k[0]], k[3], not k[1], k[2]))]


def layer_of(name: str) -> int | None:
    """The layer of a parameter: the first integer in its dotted name (None if it has none)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def l2_penalty(groups: Iterable[Mapping[str, Any]]) -> torch.Tensor:
    """Σ_g (λ_g/2)‖θ_g‖², λ_g = the group's ``l2`` (or its ``weight_decay`` if it has none).

    For coupled L2 training: build the groups with ``regularization="l2"`` so the
    optimiser's own weight_decay is 0, and add this to the loss.

    A parameter sharded by FSDP2 counts with this rank's shard only: its gradient λθ_local then lands on
    that shard outside FSDP's averaging, so the ranks together apply λθ, as one process does.
    """
    from qkvlab.dtensors import local

    total: torch.Tensor | None = None
    for group in groups:
        lam = group.get("l2", group.get("weight_decay", 0.0))
        if not lam:
            continue
        term = 0.5 * lam * sum(local(p).square().sum() for p in group["params"])
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())
