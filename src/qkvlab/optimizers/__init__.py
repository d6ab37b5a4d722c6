"""The optimisers ``qkvlab train`` knows, one module each, found through one registry.

An optimiser is an :class:`OptimizerSpec`: its name (one name everywhere: the trainer, the theory toy's
labels, the claims' tables), where it applies weight decay λ, a ``build`` that turns qkvlab's per-role
parameter groups into a torch optimiser, and the config keys only it reads, with their help and checks.
Adding one is one module here that calls :func:`register`, plus its name in :data:`_BUILTIN`; nothing
in the trainer or the config changes. Importable without torch (``--help-keys`` reads the registry);
``build`` imports what it needs.

Where λ acts (``decay``):

- ``decoupled``: p ← p(1 − η_t·λ) apart from the gradient step (torch's AdamW; Muon's groups);
- ``loss``: Σ λ/2‖θ‖² is added to the loss (:func:`qkvlab.optim.l2_penalty`), so its gradient λθ goes
  through the optimiser's normalisation (Adam + L2);
- ``gradient``: λθ is added to the gradient by the optimiser itself (torch SGD's ``weight_decay``).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qkvlab.args import NONNEGATIVE, POSITIVE, UNIT, Key
from qkvlab.errors import UserError

__all__ = ["OptimizerSpec", "get", "keys", "names", "normalise", "register", "registry"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimiser of ``qkvlab train``: see the module docstring."""

    name: str
    #: one line for ``qkvlab train --help-keys``
    help: str
    #: where weight decay acts: ``decoupled``, ``loss`` or ``gradient``
    decay: str
    #: ``build(config, model, groups)`` → the torch optimiser over qkvlab's per-role ``groups`` (the very
    #: dicts the monitor and the guard hold: a build may tag them in place, never copy them)
    build: Callable[[Any, Any, list[dict]], Any]
    #: config keys only this optimiser reads: key → (help line, check or None)
    keys: Mapping[str, Key] = field(default_factory=dict)
    #: earlier spellings that still load (config files and run folders written before the name settled)
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.decay not in ("decoupled", "loss", "gradient"):
            raise ValueError(f"{self.name}: decay must be decoupled, loss or gradient, not {self.decay!r}")

    @property
    def decoupled(self) -> bool:
        return self.decay == "decoupled"


_REGISTRY: dict[str, OptimizerSpec] = {}
_ALIASES: dict[str, str] = {}

# Modules that register the built-in optimisers when imported.
_BUILTIN = (
    "qkvlab.optimizers.adamw",
    "qkvlab.optimizers.adam_l2",
    "qkvlab.optimizers.sgd",
    "qkvlab.optimizers.muon",
)


def register(spec: OptimizerSpec) -> OptimizerSpec:
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    _REGISTRY[spec.name] = spec
    return spec


def registry() -> dict[str, OptimizerSpec]:
    """Every registered optimiser, by name (importing the built-in ones first)."""
    for module in _BUILTIN:
        importlib.import_module(module)
    return dict(_REGISTRY)


def names() -> list[str]:
    return list(registry())


def normalise(name: str) -> str:
    """The registry's name for ``name`` (an alias maps to its optimiser); unknown names pass through."""
    registry()
    return _ALIASES.get(name, name)


def get(name: str) -> OptimizerSpec:
    """The optimiser called ``name`` (or one of its aliases); a UserError with a did-you-mean if none is."""
    known = registry()
    name = normalise(name)
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, [*known, *_ALIASES], n=2, cutoff=0.5)
    close = list(dict.fromkeys(_ALIASES.get(c, c) for c in close))  # an alias suggests today's name
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"unknown optimizer {name!r}{hint} accepted: {', '.join(known)}")


def keys() -> dict[str, Key]:
    """The optimiser section of a run's config: the name, the keys every optimiser reads, and each
    optimiser's own keys (from its module)."""
    known = registry()
    return {
        "optimizer": (
            " | ".join(f"{name} ({spec.help})" for name, spec in known.items()),
            (lambda v: v in registry(), ", ".join(known)),
        ),
        "lr": ("peak learning rate η", POSITIVE),
        "weight_decay": (
            "λ for weight matrices and embeddings (biases, norms and other 1-D tensors get 0 unless a preset says otherwise)",
            NONNEGATIVE,
        ),
        "beta1": ("Adam/AdamW β₁", UNIT),
        "beta2": ("Adam/AdamW β₂", UNIT),
        **{key: entry for spec in known.values() for key, entry in spec.keys.items()},
    }
