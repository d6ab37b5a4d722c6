"""The learning-rate schedule: linear warm-up, then cosine, linear or constant down to ``min_lr_ratio``."""

from __future__ import annotations

import math
from collections.abc import Callable

from qkvlab.config import TrainConfig

__all__ = ["lr_lambda"]


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """The factor on ``lr`` at each step, for ``torch.optim.lr_scheduler.LambdaLR``."""
    warmup, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if config.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return 1.0

    return factor
