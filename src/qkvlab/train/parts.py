"""What a run is built from, read off its config: the dataset, the model config its kind fills in, the
per-role groups and the registry's optimiser over them, and a rank-guard firing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qkvlab import models, optimizers
from qkvlab.config import TrainConfig
from qkvlab.errors import UserError
from qkvlab.guard import mark_corrected
from qkvlab.optim import optimizer_settings, param_groups

if TYPE_CHECKING:
    from qkvlab.data import Dataset

__all__ = ["build_optimizer", "guard_step", "load_run_dataset", "model_config"]


def load_run_dataset(config: TrainConfig, world_size: int = 1) -> Dataset:
    """The dataset a run of ``config`` trains on.

    With ``online=true`` it is refused (UserError) before any training if ``max_steps`` goes past
    one pass over the data.
    """
    from qkvlab.data import load_dataset

    data = config.section("data")  # every key of the data section is a load_dataset keyword
    dataset = load_dataset(data.pop("data"), seed=config.seed, **data)
    if config.online:  # refuse before training, not at the first step past the data
        steps = dataset.max_online_steps(config.batch_size // world_size, world_size)
        if steps is not None and config.max_steps > steps:
            raise UserError(
                f"online=true sees every sample once, but data={config.data} has enough for {steps} steps "
                f"at batch_size={config.batch_size}, and max_steps={config.max_steps}; accepted: "
                f"max_steps <= {steps}, a smaller batch, or online=false"
            )
    return dataset


def model_config(config: TrainConfig, info: dict[str, Any]):
    """The model config with its data-derived fields set by its kind (``qkvlab.models``)."""
    model = config.model
    kind = models.get(model.kind)
    if info["kind"] != kind.data:
        raise UserError(
            f"model.kind={kind.name} needs {kind.data} data, but data={config.data} gives {info['kind']} data"
        )
    kind.fit(model, info)
    return model


def build_optimizer(config: TrainConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, list[dict]]:
    """The per-role groups and the registry's optimiser over them (``qkvlab.optimizers``)."""
    spec = optimizers.get(config.optimizer)
    settings = optimizer_settings(config.preset, overrides=config.overrides, train=config.train_roles)
    guard = config.rank_guard()
    groups = param_groups(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        regularization="l2" if spec.decay == "loss" else "decoupled",
        per_layer="q,k,v,o" if guard is not None else (),
        **settings,
    )
    mark_corrected(groups, config.corrected_weight_decay)  # the decay each step is base · η_t / η_max
    if guard is not None:
        guard.start(groups)  # the configured attention decay, clipped into [λ_min, λ_max]
    return spec.build(config, model, groups), groups


def guard_step(
    guard: Any,
    record: dict[str, Any] | None,
    optimizer: torch.optim.Optimizer,
) -> dict[str, float]:
    """One rank-guard firing: rank 0 (which holds the monitor's record) updates every guarded group's λ;
    under DDP the others receive the same values, so every rank decays alike."""
    from qkvlab.guard import broadcast_decay

    logged = guard.update(record, optimizer.param_groups) if record is not None else {}
    broadcast_decay(guard, optimizer.param_groups)  # a no-op in one process
    return logged
