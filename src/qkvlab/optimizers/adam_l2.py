"""``optimizer=adam-l2``: torch's Adam with coupled L2: the groups carry ``weight_decay`` 0 for torch and
the trainer adds Σ λ/2‖θ‖² to the loss (:func:`qkvlab.optim.l2_penalty`), so the penalty's gradient λθ
goes through Adam's normalisation. ``adam`` is its earlier spelling (run folders written with it load)."""

from __future__ import annotations

from typing import Any

from qkvlab.optimizers import OptimizerSpec, register


def build(config: Any, model: Any, groups: list[dict]) -> Any:
    import torch

    return torch.optim.Adam(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8)


SPEC = register(
    OptimizerSpec("adam-l2", "Adam with coupled L2 in the loss", "loss", build, aliases=("adam",))
)
