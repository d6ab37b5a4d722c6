"""The optimiser vocabulary without torch: roles, per-role overrides, and the named presets.

``qkvlab.optim`` turns these into parameter groups of a real model; this module only checks and
merges settings, so configs and the command line's help can use it without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qkvlab.errors import UserError

__all__ = [
    "ATTENTION_ROLES",
    "KEYS",
    "PRESETS",
    "ROLES",
    "Preset",
    "optimizer_settings",
    "parse_preset",
    "preset_settings",
]

ROLES = ("q", "k", "v", "o", "qkv", "mlp", "embed", "norm", "head", "other")

#: The per-matrix section of a run's config (``qkvlab.config``; checked as a whole by ``optimizer_settings``).
KEYS: dict[str, tuple[str, None]] = {
    "preset": (
        "a named per-matrix preset: decoupled-attn | qv-ratio | loraplus, with args (qv-ratio:ratio=4)",
        None,
    ),
    "overrides": ("per role {lr_scale, weight_decay}, in a config file: overrides: {v: {lr_scale: 4}}", None),
    "train_roles": ("roles that train (e.g. [q, v, head]); None = all", None),
}
ATTENTION_ROLES = ("q", "k", "v", "o", "qkv")
_OVERRIDE_KEYS = ("lr_scale", "weight_decay")


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


def _train_set(train: Iterable[str] | str | None) -> tuple[set[str] | None, bool]:
    """Parse ``train``: roles to keep trainable; "-head" freezes the head explicitly."""
    if train is None:
        return None, True
    listed = train.split(",") if isinstance(train, str) else list(train)
    if any(not isinstance(t, str) for t in listed):
        raise UserError(
            f"train {train!r}; accepted: role names, comma-separated or a list ({', '.join(ROLES)})"
        )
    items = {t.strip() for t in listed if t.strip()}
    keep_head = "-head" not in items
    items.discard("-head")
    _check_roles(items, "train")
    if keep_head:
        items.add("head")
    return items, keep_head


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
