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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qkvlab.attention.families import FAMILIES
from qkvlab.errors import UserError

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

ROLES = ("q", "k", "v", "o", "qkv", "mlp", "embed", "norm", "head", "other")
ATTENTION_ROLES = ("q", "k", "v", "o", "qkv")
_OVERRIDE_KEYS = ("lr_scale", "weight_decay")

# Module names (any path component) that hold a task head.
_HEAD_NAMES = frozenset({"classifier", "lm_head", "score", "qa_outputs", "head", "cls", "heads"})
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


def _lora_part(name: str) -> str | None:
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


def _check_roles(names: Iterable[str], what: str) -> None:
    bad = sorted(set(names) - set(ROLES))
    if bad:
        raise UserError(
            f"unknown role{'s' if len(bad) > 1 else ''} {', '.join(bad)} in {what}; accepted: {', '.join(ROLES)}"
        )


def _normalise_overrides(overrides: Mapping[str, Mapping[str, float]] | None) -> dict[str, dict[str, float]]:
    overrides = dict(overrides or {})
    _check_roles(overrides, "overrides")
    out = {}
    for role, settings in overrides.items():
        if not isinstance(settings, Mapping):
            raise UserError(f"overrides[{role!r}] must be a dict with keys {', '.join(_OVERRIDE_KEYS)}")
        bad = sorted(set(settings) - set(_OVERRIDE_KEYS))
        if bad:
            raise UserError(
                f"unknown setting {', '.join(bad)} for role {role}; accepted: {', '.join(_OVERRIDE_KEYS)}"
            )
        for key, value in settings.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not value >= 0
                or (key == "lr_scale" and value == 0)
            ):
                accepted = "> 0" if key == "lr_scale" else "≥ 0"
                raise UserError(f"overrides[{role!r}][{key!r}] = {value!r}; accepted: a number {accepted}")
        out[role] = {k: float(v) for k, v in settings.items()}
    return out


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


def _train_set(train: Iterable[str] | str | None) -> tuple[set[str] | None, bool]:
    """Parse ``train``: roles to keep trainable; "-head" freezes the head explicitly."""
    if train is None:
        return None, True
    items = {t.strip() for t in (train.split(",") if isinstance(train, str) else train) if t.strip()}
    keep_head = "-head" not in items
    items.discard("-head")
    _check_roles(items, "train")
    if keep_head:
        items.add("head")
    return items, keep_head


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

    Returns:
        One dict per (role, decay, LoRA part) with ``params``, ``param_names``, ``role``,
        ``lr``, ``weight_decay`` (and ``l2`` for coupled L2).
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
    role_of = roles(model)
    fused_names = [n for n, r in role_of.items() if r == "qkv"]
    _resolve_fused(set(role_of.values()), settings, train_roles, fused_names)

    peft_model = any(_lora_part(n) or _is_frozen_base(n) or ".modules_to_save." in n for n in role_of)
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
    groups: dict[tuple[str, bool, bool], dict[str, Any]] = {}
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
        is_b = _lora_part(name) == "B" and lora_ratio is not None
        key = (role, decay, is_b)
        if key not in groups:
            role_settings = settings.get(role, {})
            rate = lr * role_settings.get("lr_scale", 1.0) * (lora_ratio if is_b else 1.0)
            lam = role_settings.get("weight_decay", weight_decay) if decay else 0.0
            group = {"params": [], "param_names": [], "role": role, "lr": rate, "weight_decay": lam}
            if is_b:
                group["lora"] = "B"
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
    return [groups[k] for k in sorted(groups, key=lambda k: (order[k[0]], not k[1], k[2]))]


def l2_penalty(groups: Iterable[Mapping[str, Any]]) -> torch.Tensor:
    """Σ_g (λ_g/2)‖θ_g‖², λ_g = the group's ``l2`` (or its ``weight_decay`` if it has none).

    For coupled L2 training: build the groups with ``regularization="l2"`` so the
    optimiser's own weight_decay is 0, and add this to the loss.
    """
    total: torch.Tensor | None = None
    for group in groups:
        lam = group.get("l2", group.get("weight_decay", 0.0))
        if not lam:
            continue
        term = 0.5 * lam * sum(p.square().sum() for p in group["params"])
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


# -- presets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named recipe: a function of its keyword arguments returning param_groups settings."""

    name: str
    description: str
    defaults: dict[str, float] = field(default_factory=dict)

    def settings(self, **kwargs: float) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(self.defaults))
        if unknown:
            accepted = ", ".join(self.defaults) or "none"
            raise UserError(f"preset {self.name} has no argument {', '.join(unknown)}; accepted: {accepted}")
        values = {**self.defaults, **kwargs}
        for key, value in values.items():
            if not isinstance(value, int | float) or value < 0:
                raise UserError(f"preset {self.name}: {key}={value!r}; accepted: a number ≥ 0")
        return _PRESET_BUILDERS[self.name](**values)


def _decoupled_attn(attn_weight_decay: float, attn_lr_scale: float) -> dict[str, Any]:
    if attn_lr_scale <= 0:
        raise UserError(f"preset decoupled-attn: attn_lr_scale must be > 0, got {attn_lr_scale}")
    setting = {"weight_decay": attn_weight_decay, "lr_scale": attn_lr_scale}
    return {"overrides": {role: dict(setting) for role in ATTENTION_ROLES}}


def _qv_ratio(ratio: float) -> dict[str, Any]:
    if ratio <= 0:
        raise UserError(f"preset qv-ratio: ratio (λ = η_V / η_QK) must be > 0, got {ratio}")
    return {"train": {"q", "v", "head"}, "overrides": {"v": {"lr_scale": ratio}}}


def _loraplus(ratio: float) -> dict[str, Any]:
    if ratio <= 0:
        raise UserError(f"preset loraplus: ratio must be > 0, got {ratio}")
    return {"lora_ratio": ratio}


PRESETS: dict[str, Preset] = {
    "decoupled-attn": Preset(
        "decoupled-attn",
        "attention q/k/v/o (and fused qkv) get their own weight decay and lr scale, apart from the rest "
        "(paper 000: lower or no attention weight decay)",
        {"attn_weight_decay": 0.0, "attn_lr_scale": 1.0},
    ),
    "qv-ratio": Preset(
        "qv-ratio",
        "paper 001: train only W_q, W_v (and the head), with η_V = ratio · η_QK; k and o frozen",
        {"ratio": 4.0},
    ),
    "loraplus": Preset(
        "loraplus", "LoRA+: lora_B learns ratio× faster than lora_A (only lora_B)", {"ratio": 16.0}
    ),
}
_PRESET_BUILDERS = {"decoupled-attn": _decoupled_attn, "qv-ratio": _qv_ratio, "loraplus": _loraplus}


def preset_settings(name: str, **kwargs: float) -> dict[str, Any]:
    """``param_groups`` keyword arguments of a named preset, e.g. ``preset_settings("qv-ratio", ratio=8)``."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name].settings(**kwargs)


def optimizer_settings(
    preset: str | None = None,
    *,
    preset_args: Mapping[str, float] | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    train: Iterable[str] | str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """``param_groups`` keyword arguments from a preset and the user's own settings: the one merge.

    ``preset`` is ``NAME`` (with ``preset_args``) or the CLI form ``NAME[:key=value,...]``. The user's
    ``overrides`` update the preset's per role *and per key*, so ``decoupled-attn:attn_weight_decay=0``
    plus ``{"v": {"lr_scale": 4}}`` gives W_V a 4× rate *and* zero decay. ``train`` and ``extra``
    (``lora_ratio``, ``regularization``) replace the preset's when given. The trainer, the HF
    Trainer path and fine-tuning all resolve their settings here.
    """
    settings: dict[str, Any] = {}
    if preset is None:
        if preset_args:
            raise UserError(f"preset arguments {dict(preset_args)} given without a preset")
    else:
        name, kwargs = _preset_arguments(preset)
        settings = preset_settings(name, **{**kwargs, **dict(preset_args or {})})
    merged = {role: dict(values) for role, values in settings.get("overrides", {}).items()}
    for role, values in _normalise_overrides(overrides).items():
        merged.setdefault(role, {}).update(values)
    if merged:
        settings["overrides"] = merged
    if train is not None:
        _train_set(train)  # unknown roles fail here
        settings["train"] = {t.strip() for t in (train.split(",") if isinstance(train, str) else train)}
    settings.update({k: v for k, v in extra.items() if v is not None})
    return settings


def _preset_arguments(text: str) -> tuple[str, dict[str, float]]:
    name, _, args = text.partition(":")
    kwargs: dict[str, float] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"preset argument {item!r} must look like key=value (in {text!r})")
        try:
            kwargs[key.strip()] = float(value)
        except ValueError:
            raise UserError(f"preset argument {key}={value!r} is not a number (in {text!r})") from None
    return name.strip(), kwargs


def parse_preset(text: str) -> dict[str, Any]:
    """CLI form ``NAME[:key=value,...]``, e.g. ``qv-ratio:ratio=8`` → ``param_groups`` settings."""
    name, kwargs = _preset_arguments(text)
    return preset_settings(name, **kwargs)
