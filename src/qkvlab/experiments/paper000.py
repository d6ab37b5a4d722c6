"""Paper 000 on real training: ``qkvlab repro wd-rank`` and ``qkvlab repro decouple``.

Settings, decided before any run was looked at (issue 10), and kept in code so the commands
reproduce them:

GPT on ``shakespeare`` (char level: the corpus is 1.1 M characters, so a 65-symbol vocabulary gives
every token thousands of examples, where BPE at this size would spend the model on rare tokens;
it is also nanoGPT's reference setting). 4 layers, 4 heads, d_model 128, d_head 32, MLP 512, no
biases (nothing sits between the factors), no dropout, tied embeddings; context 128, batch 32,
AdamW β = (0.9, 0.95), lr 1e-3 with 100 warm-up steps and a cosine to 1e-4, gradient clipping 1,
2,000 steps (8.2 M tokens, about 8 passes over the training text). Σₜηₜ = 1.0955 over the schedule.

Weight decay is set per role, as the paper's Fig. 3 and Table 1 do:

- ``attn``: q, k, v and o (the factors of W_KᵀW_Q and P·W_V);
- ``rest``: the MLP matrices;
- embeddings and the (tied) LM head: 0.1 in every cell; norm gains: 0 (HF Trainer convention).

``wd-rank`` varies λ_attn ∈ {0, 0.03, 0.1, 0.3, 1, 3} at λ_rest = 0.1 (Σηλ_attn from 0 to 3.3);
``decouple`` is λ_attn ∈ {0, 0.1, 1, 3} × λ_rest ∈ {0.1, 1}. Both live in one results folder, so the
cells they share are trained once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qkvlab.experiments.grid import Run
from qkvlab.experiments.training import train_worker

__all__ = ["GPT_BASE", "gpt_runs", "schedule_sum"]

# One shared run configuration (qkvlab train keys); the grid point adds the weight decays and seed.
GPT_BASE: dict[str, Any] = {
    "data": "shakespeare",
    "tokenizer": "char",
    "seq_len": 128,
    "model.kind": "gpt",
    "model.n_layer": 4,
    "model.n_head": 4,
    "model.d_model": 128,
    "model.d_head": 32,
    "model.d_mlp": 512,
    "model.bias": False,
    "model.dropout": 0.0,
    "model.tie_embeddings": True,
    "optimizer": "adamw",
    "beta1": 0.9,
    "beta2": 0.95,
    "lr": 1e-3,
    "schedule": "cosine",
    "warmup_steps": 100,
    "min_lr_ratio": 0.1,
    "grad_clip": 1.0,
    "batch_size": 32,
    "max_steps": 2000,
    "eval_every": 200,
    "eval_batches": 0,
    "spectra_every": 100,
    "checkpoint_every": 250,
    "keep_checkpoints": 1,
    "tensorboard": False,
}
EMBED_WEIGHT_DECAY = 0.1
WD_RANK_ATTN = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)
WD_RANK_REST = 0.1
DECOUPLE_ATTN = (0.0, 0.1, 1.0, 3.0)
DECOUPLE_REST = (0.1, 1.0)
ATTENTION = ("q", "k", "v", "o")


def schedule_sum(config: dict[str, Any]) -> float:
    """Σₜ ηₜ over the run's schedule (the time weight decay acts for), from qkv train's own lr rule."""
    from qkvlab.config import load_config
    from qkvlab.train.trainer import _lr_lambda

    resolved = load_config(None, config)
    factor = _lr_lambda(resolved)
    return math.fsum(resolved.lr * factor(step) for step in range(resolved.max_steps))


def gpt_point(attn: float, rest: float) -> dict[str, float]:
    return {"attn_weight_decay": float(attn), "rest_weight_decay": float(rest)}


def gpt_overrides(point: dict[str, Any]) -> dict[str, Any]:
    """The config keys of a (λ_attn, λ_rest) cell: λ_rest as the base decay, attention and embeddings overridden."""
    attn = point["attn_weight_decay"]
    overrides = {role: {"weight_decay": attn} for role in ATTENTION}
    overrides["embed"] = {"weight_decay": EMBED_WEIGHT_DECAY}
    return {"weight_decay": point["rest_weight_decay"], "overrides": overrides}


def gpt_runs(cells: list[tuple[float, float]], seeds: list[int]) -> list[Run]:
    """Seed by seed, so an interrupted grid holds whole seeds first."""
    return [Run(f"attn={a:g},rest={r:g},seed={s}", gpt_point(a, r), s) for s in seeds for a, r in cells]


def gpt_worker(run_dir: Path, point: dict[str, Any], seed: int, settings: dict[str, Any]) -> None:
    train_worker(run_dir, gpt_overrides(point), seed, settings)


def gpt_settings(max_steps: int | None = None, device: str | None = None) -> dict[str, Any]:
    """The guarded settings of the GPT folder: the base config and the fixed embedding decay."""
    base = dict(GPT_BASE)
    if max_steps is not None:
        base["max_steps"] = max_steps
        base["checkpoint_every"] = min(base["checkpoint_every"], max_steps)
        base["warmup_steps"] = min(base["warmup_steps"], max_steps // 10)
    if device is not None:
        base["device"] = device
    return {"overrides": base, "embed_weight_decay": EMBED_WEIGHT_DECAY}


def run_gpt_grid(
    out: Path,
    cells: list[tuple[float, float]],
    seeds: list[int],
    *,
    jobs: int = 1,
    echo: Any = print,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Train every (λ_attn, λ_rest) cell × seed into ``out`` (resumable; see the experiment layer)."""
    from qkvlab.experiments.grid import run_grid
    from qkvlab.experiments.training import train_status

    settings = gpt_settings(**kw)
    return run_grid(
        out,
        gpt_runs(cells, seeds),
        gpt_worker,
        settings=settings,
        status=train_status,
        jobs=jobs,
        log="train.log",
        echo=echo,
        label="paper 000, GPT",
        session={"seeds": seeds, "cells": cells},
    )
