"""What ``qkvlab theory`` can be asked for, and its checks: importable without torch (the command line's
help shows these defaults)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qkvlab.conventions import TOY_UPDATE_RULES
from qkvlab.errors import UserError

__all__ = ["KIND", "OPTIMIZERS", "PARTS", "SCHEMA_VERSION", "TOY_TARGET", "TheorySettings"]

#: The optimisers of the toy, by name (``qkvlab.theory.train_factors`` runs them; the table lives in
#: ``qkvlab.conventions`` so the maths needs nothing from here).
OPTIMIZERS = TOY_UPDATE_RULES

SCHEMA_VERSION = 1
KIND = "theory"
PARTS = ("toy", "optimizers", "completion", "pretrained")
#: The paper's Fig. 1 target singular values.
TOY_TARGET = (0.2, 0.4, 0.6, 0.8, 1.0)
#: Where float64 rounding takes over, relative to ½(‖A‖² + ‖B‖²) at that time: the imbalance is a
#: difference of Gram matrices (~1e-16, with a 100× margin); ``factor_gap`` is a sum of squares whose
#: relative error is ~1e-16·√(l2_half/gap), 2e-3 at this floor.
IMBALANCE_FLOOR = 1e-13
GAP_FLOOR = 1e-26
#: Records kept per curve in the JSON (the fits use every record).
CURVE_POINTS = 200


#: The most steps a theory part takes: beyond it a run is hours per λ and seed, and its step records
#: would not fit in memory.
MAX_STEPS = 10_000_000


@dataclass(frozen=True)
class TheorySettings:
    """Every knob of ``qkvlab theory``; the defaults run in well under a minute on 2 CPU cores."""

    lambdas: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.2, 1.5)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 20_000
    lr: float = 0.01
    init_scale: tuple[float, float] = (0.3, 0.05)  # std of A's and B's entries: unbalanced on purpose
    record_every: int = 10
    optimizers: tuple[str, ...] = ("sgd-momentum", "adam-l2", "adamw")
    momentum: float = 0.9
    momentum_lr: float = 1e-3  # η/(1 − β) = 0.01, the gradient-descent step
    adam_lr: float = 0.01
    adam_steps: int = 10_000
    betas: tuple[float, float] = (0.9, 0.95)  # the paper's LM
    eps: float = 1e-8
    anneal_from: float = 0.7  # adaptive optimisers: cosine from here down to anneal_floor·lr
    anneal_floor: float = 0.01
    tail_fraction: float = 0.05  # adaptive optimisers: final values are the mean over this tail
    completion_lambdas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    completion_size: int = 100
    completion_rank: int = 5
    completion_width: int = 20
    completion_observed: float = 0.3
    completion_steps: int = 6_000
    completion_lr: float = 0.02
    completion_init: float = 0.1
    models: tuple[str, ...] = ("minilm",)
    parts: tuple[str, ...] = PARTS

    def __post_init__(self) -> None:
        for name in ("lambdas", "completion_lambdas"):
            values = getattr(self, name)
            if not values or any(not math.isfinite(v) or v < 0 for v in values):
                raise UserError(f"{name} {list(values)}; accepted: one or more numbers ≥ 0")
        if not self.seeds or any(not 0 <= s <= 2**31 - 1 for s in self.seeds):
            raise UserError(f"seeds {list(self.seeds)}; accepted: one or more integers in [0, 2147483647]")
        unknown = sorted(set(self.optimizers) - (set(OPTIMIZERS) - {"gd"}))
        if unknown:
            accepted = ", ".join(o for o in OPTIMIZERS if o != "gd")
            raise UserError(f"unknown optimizer {', '.join(unknown)}; accepted: {accepted} (gd always runs)")
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown or not self.parts:
            raise UserError(f"unknown part {', '.join(unknown) or '(none)'}; accepted: {', '.join(PARTS)}")
        for name in ("steps", "adam_steps", "completion_steps", "record_every"):
            if not 0 < getattr(self, name) <= MAX_STEPS:
                raise UserError(f"{name} {getattr(self, name)}; accepted: an integer in [1, {MAX_STEPS:,}]")
        for name in ("lr", "momentum_lr", "adam_lr", "completion_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise UserError(f"{name} must be a number > 0, got {value}")
        # Gradient descent on the toy contracts the thresholded directions by 1 − η(λ + dᵢ) per step:
        # beyond 1 it oscillates and the discrete rates are not defined. Refuse before running.
        worst = self.lr * (max(self.lambdas) + max(TOY_TARGET))
        if worst >= 1:
            limit = 1 / (max(self.lambdas) + max(TOY_TARGET))
            raise UserError(
                f"lr {self.lr:g} is too large for λ up to {max(self.lambdas):g}; accepted: lr < {limit:.3g}"
            )

    def command(self) -> str:
        """The ``qkvlab theory`` command line that reproduces these settings."""

        def joined(values: Sequence[Any]) -> str:
            return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

        parts = [
            "qkvlab theory",
            f"--lambdas {joined(self.lambdas)}",
            f"--steps {self.steps}",
            f"--lr {self.lr:g}",
            f"--seeds {joined(self.seeds)}",
            f"--optimizers {joined(self.optimizers) or 'none'}",
            f"--parts {joined(self.parts)}",
            f"--completion-lambdas {joined(self.completion_lambdas)}",
            *(f"--model {m}" for m in self.models),
        ]
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
