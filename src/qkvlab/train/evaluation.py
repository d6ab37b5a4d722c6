"""A validation pass: loss, perplexity where the model kind reports one, accuracy, and for in-context
regression the distance to one step of gradient descent."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import nn

from qkvlab import models
from qkvlab.config import TrainConfig

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Any, config: TrainConfig, device: torch.device, autocast
) -> dict[str, float]:
    model.eval()
    losses, correct, count = [], 0, 0
    answer_only = bool(getattr(dataset, "info", {}).get("answer_only"))
    gd_step = getattr(dataset, "gd_step", None)  # icl-regression: compare with one step of GD
    gd_errors, gd_distances = [], []
    if gd_step is not None:
        from qkvlab.data.icl import gd_prediction
    for i, batch in enumerate(dataset.eval_batches(max(1, config.batch_size))):
        if config.eval_batches and i >= config.eval_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            out = model(**batch)
        losses.append(out["loss"].float().item())
        if gd_step is not None:
            reference = gd_prediction(batch["inputs"].double(), gd_step)
            gd_errors.append((reference - batch["targets"].double()).square().mean().item())
            gd_distances.append((out["prediction"].double() - reference).square().mean().item())
        if "labels" in batch and batch["labels"].ndim == 1:
            correct += (out["logits"].argmax(-1) == batch["labels"]).sum().item()
            count += batch["labels"].numel()
        elif answer_only:  # accuracy on the answer tokens only (the rest are −100)
            mask = batch["labels"] != -100
            correct += (out["logits"].argmax(-1)[mask] == batch["labels"][mask]).sum().item()
            count += mask.sum().item()
    model.train()
    metrics = {"loss": statistics.fmean(losses)} if losses else {}
    if losses and models.get(config.model.kind).perplexity:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    if count:
        metrics["accuracy"] = correct / count
    if gd_errors:  # one GD step with the expected-error-optimal step (data.icl.gd_step_size), same sequences
        metrics["gd_mse"] = statistics.fmean(gd_errors)
        metrics["gd_distance"] = statistics.fmean(gd_distances)  # mean (model − GD prediction)²
    return metrics
