"""``optimizer=sgd``: torch's SGD (heavy ball with ``momentum``; no dampening, no Nesterov); its
``weight_decay`` adds λθ to the gradient, so L2 is coupled."""

from __future__ import annotations

from typing import Any

from qkvlab.optimizers import OptimizerSpec, register


def build(config: Any, model: Any, groups: list[dict]) -> Any:
    import torch

    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


SPEC = register(
    OptimizerSpec(
        "sgd",
        "SGD, L2 in the gradient",
        "gradient",
        build,
        keys={"momentum": ("sgd: heavy-ball momentum β", (lambda v: 0 <= v < 1, "in [0, 1)"))},
    )
)
