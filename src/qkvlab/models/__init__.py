"""qkvlab's own models (registered in the architecture table as the ``qkvlab`` family), one module per kind,
found through one registry.

A model kind is a :class:`ModelKind`: its name (``model.kind=``), the data kind it trains on (``lm``,
``image``, ``icl``: what ``qkvlab.data`` gives), its ``nn.Module`` class (built from one
:class:`ModelConfig`), how it fills the config's data-derived fields from the dataset's ``info``, and
whether its evaluation reports a perplexity. Adding one is one module here that calls :func:`register`
(built on :mod:`qkvlab.models.transformer`), plus its path in :data:`_BUILTIN`. Importing this package
loads no torch; :func:`kinds` imports the kinds' modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qkvlab._lazy import lazy_exports
from qkvlab.args import Key
from qkvlab.errors import UserError
from qkvlab.models.config import KEYS, ModelConfig

__all__ = ["ModelConfig", "ModelKind", "build_model", "get", "keys", "kinds", "register", "validate"]


@dataclass(frozen=True)
class ModelKind:
    """One ``model.kind`` of ``qkvlab train``: see the module docstring."""

    name: str
    #: a few words for ``--help-keys``
    help: str
    #: the data kind it trains on (``Dataset.kind``)
    data: str
    #: the ``nn.Module`` class, called with the :class:`ModelConfig`
    module: Callable[[ModelConfig], Any]
    #: ``fit(model_config, info)``: set the data-derived fields (a UserError if the data cannot fit)
    fit: Callable[[ModelConfig, dict[str, Any]], None]
    #: evaluation reports exp(loss)
    perplexity: bool = False
    #: the ``model.attention`` values it accepts
    attention: tuple[str, ...] = ("softmax",)


_REGISTRY: dict[str, ModelKind] = {}

# Modules that register the built-in kinds when imported.
_BUILTIN = ("qkvlab.models.gpt", "qkvlab.models.vit", "qkvlab.models.icl")


def register(kind: ModelKind) -> ModelKind:
    _REGISTRY[kind.name] = kind
    return kind


def kinds() -> dict[str, ModelKind]:
    """Every registered model kind, by name (importing the built-in ones, and torch, first)."""
    for module in _BUILTIN:
        importlib.import_module(module)
    return dict(_REGISTRY)


def get(name: str) -> ModelKind:
    known = kinds()
    if name not in known:
        raise ValueError(f"unknown model kind {name!r}; accepted: {', '.join(known)}")
    return known[name]


def keys() -> dict[str, Key]:
    """The model section of a run's config: ``model.kind`` (one of :func:`kinds`) and the sizes."""
    known = kinds()
    return {
        "model.kind": (
            " | ".join(f"{name} ({kind.help})" for name, kind in known.items()),
            (lambda v: v in kinds(), ", ".join(known)),
        ),
        **KEYS,
    }


def validate(cfg: ModelConfig) -> None:
    """What no single model key can say alone: the attention the kind accepts, an n_head dividing d_model."""
    if cfg.attention not in get(cfg.kind).attention:
        accepting = [name for name, kind in kinds().items() if cfg.attention in kind.attention]
        raise UserError(f"model.attention={cfg.attention} is only for model.kind={' or '.join(accepting)}")
    if not cfg.d_head and cfg.d_model % cfg.n_head:
        # d_model // n_head would floor silently (128 / 3 → 42) and change the model's width
        raise UserError(
            f"model.n_head={cfg.n_head} does not divide model.d_model={cfg.d_model}; accepted: "
            f"a divisor of {cfg.d_model}, or a model.d_head of its own (then n_head · d_head need not be d_model)"
        )


def build_model(cfg: ModelConfig) -> Any:
    """The model ``cfg.kind`` names, with its data-dependent fields already set."""
    return get(cfg.kind).module(cfg)


# GPT, ViT, ICLTransformer: the classes, loaded (with torch) on first use
__getattr__, _ = lazy_exports(
    __name__, {"GPT": "qkvlab.models.gpt", "ViT": "qkvlab.models.vit", "ICLTransformer": "qkvlab.models.icl"}
)
