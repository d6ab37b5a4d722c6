"""Checkpoints that are safe to write, safe to read, and enough to resume bit-identically.

Layout of ``RUN/checkpoint-{step:08d}/``:

    model.safetensors       weights (shared/tied tensors handled by safetensors' save_model)
    optimizer.safetensors   every tensor of the optimiser state, keyed "{param_index}.{name}"
    state.json              step, optimiser param_groups (no tensors), scheduler state,
                            RNG states (torch CPU/CUDA, python, numpy) and the data position
    config.json             the model's HF-style config, so `qkvlab inspect RUN/checkpoint-…` works

Atomicity: everything is written into a temporary folder, each file fsync'ed, and the folder
is renamed into place; ``RUN/latest`` (a one-line pointer) is replaced the same way. A crash
leaves at worst a ``.tmp-*`` folder, never a checkpoint folder that looks complete.
Loading never unpickles: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from qkvlab.data.cache import atomic_write_bytes
from qkvlab.errors import UserError

__all__ = [
    "latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_atomic",
]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, rename), then fsync the folder."""
    atomic_write_bytes(path, text.encode("utf-8"))
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as JSON-serialisable data."""
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    random.setstate(_tuplify(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    return value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    model_config: dict[str, Any],
    keep: int = 2,
) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".tmp-checkpoint-{step:08d}-"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {
            "step": step,
            "optimizer": meta,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            **extra,
        }
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / "config.json").write_text(json.dumps(model_config, indent=1))
        for file in tmp.iterdir():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(run_dir / "latest", final.name + "\n")
    for old in sorted(run_dir.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "latest"
    if pointer.is_file():
        candidate = run_dir / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = [p for p in sorted(run_dir.glob("checkpoint-*")) if (p / "state.json").is_file()]
    return complete[-1] if complete else None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device
) -> dict[str, Any]:
    """Restore model, optimiser, scheduler and RNGs in place; returns the state dict (step, …)."""
    try:
        state = json.loads((path / "state.json").read_text())
        missing, unexpected = load_model(
            model, str(path / "model.safetensors"), strict=False, device=str(device)
        )
        tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot resume from {path}: {exc}") from None
    if missing or unexpected:
        raise UserError(
            f"cannot resume from {path}: the checkpoint does not match the model ({missing or unexpected})"
        )
    _restore_optimizer(optimizer, tensors, state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
