"""``optimizer=adamw``: torch's AdamW, decoupled decay p ← p(1 − η_t·λ) per role."""

from __future__ import annotations

from typing import Any

from qkvlab.optimizers import OptimizerSpec, register


def build(config: Any, model: Any, groups: list[dict]) -> Any:
    import torch

    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8)


SPEC = register(OptimizerSpec("adamw", "AdamW (decoupled decay)", "decoupled", build))
