"""Checkpoints that are safe to write, safe to read, and enough to resume bit-identically.

Layout of ``RUN/checkpoint-{step:08d}/``:

    model.safetensors       weights (shared/tied tensors handled by safetensors' save_model)
    optimizer.safetensors   every tensor of the optimiser state, keyed "{param_index}.{name}"
    state.json              step, optimiser param_groups (no tensors), scheduler state,
                            RNG states (torch CPU/CUDA, python, numpy) and the data position
    config.json             the model's HF-style config, so `qkvlab inspect RUN/checkpoint-…` works
    checksums.json          SHA-256 and size of each file above, written last

Damage: a resume verifies each candidate, newest first (:func:`resumable_checkpoint`): a missing
file, a size or checksum that differs from ``checksums.json``, JSON that does not parse, or
tensors whose names, shapes or dtypes differ from the model's are reported in one line naming the
file and the problem, and the next older checkpoint is tried. Rotation deletes old checkpoints
only after the new one has been read back and verified, so the last good one is never lost.
Checkpoints written before ``checksums.json`` existed are checked for structure only.

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

from qkvlab.attention.sources import SAFETENSORS_DTYPES as _DTYPES
from qkvlab.errors import UserError
from qkvlab.files import fsync_dir, latest_checkpoint, sha256_file, write_atomic

__all__ = [
    "checked_state",
    "checkpoint_problem",
    "latest_checkpoint",
    "load_checkpoint",
    "resumable_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_atomic",
]


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


def _io(save: Any, data: Any, path: Path) -> None:
    """``save(data, path)``, with safetensors' I/O failures (disk full, file-size limit, read-only)
    raised as the OSError they are, so callers can name them in one line."""
    import re

    try:
        save(data, str(path))
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if exc.__class__.__name__ != "SafetensorError" or found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


_FILES = ("model.safetensors", "optimizer.safetensors", "state.json", "config.json")
CHECKSUMS = "checksums.json"


def _write_checksums(folder: Path) -> None:
    files = {
        name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for name in _FILES
    }
    (folder / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def checkpoint_problem(path: Path, checksums_expected: bool = False) -> str | None:
    """What is wrong with the checkpoint folder ``path`` on disk, in a few words naming the file; None if
    its files are all there and match ``checksums.json`` (or, for an older checkpoint without one, if
    its JSON parses and its safetensors headers read). With ``checksums_expected`` (the run's other
    checkpoints have checksums), a missing ``checksums.json`` is damage."""
    if path.is_symlink() or not path.is_dir():
        return "it is not a folder (replaced by a file or a link)"
    for name in _FILES:
        if (path / name).is_symlink():
            return f"{name} is a symbolic link"
        if not (path / name).is_file():
            return f"{name} is missing"
    sums = path / CHECKSUMS
    if not sums.is_file() and checksums_expected:
        return f"{CHECKSUMS} is missing, though this run's checkpoints are written with one (damaged)"
    if sums.is_file():
        try:
            expected = json.loads(sums.read_bytes())["files"]
            if not isinstance(expected, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return f"{CHECKSUMS} is not valid JSON"
        for name in _FILES:
            want = expected.get(name)
            if not isinstance(want, dict) or not {"bytes", "sha256"} <= set(want):
                return f"{CHECKSUMS} has no entry for {name}"
            size = (path / name).stat().st_size
            if size != want["bytes"]:
                return f"{name} has {size} bytes, {want['bytes']} were written (truncated or replaced)"
            if sha256_file(path / name) != want["sha256"]:
                return f"{name} does not match its checksum (its bytes changed after it was written)"
        return None
    for name in ("state.json", "config.json"):  # a checkpoint from before checksums: structure only
        try:
            json.loads((path / name).read_bytes())
        except (ValueError, UnicodeDecodeError):
            return f"{name} is not valid JSON"
    from safetensors import safe_open

    for name in ("model.safetensors", "optimizer.safetensors"):
        try:
            with safe_open(str(path / name), framework="pt") as fh:
                list(fh.keys())
        except Exception as exc:  # safetensors raises its own error types for a bad header
            return f"{name} is not a readable safetensors file ({exc.__class__.__name__})"
    return None


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
        _io(save_model, model, tmp / "model.safetensors")
        tensors, meta = _optimizer_tensors(optimizer)
        _io(save_file, tensors, tmp / "optimizer.safetensors")
        state = {
            "step": step,
            "optimizer": meta,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            **extra,
        }
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / "config.json").write_text(json.dumps(model_config, indent=1))
        _write_checksums(tmp)
        for file in tmp.iterdir():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.is_dir() and not final.is_symlink():  # re-saving the same step (after a resume)
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():  # debris under its name: a file or a link
            final.unlink()
        os.replace(tmp, final)
        fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(run_dir / "latest", final.name + "\n")
    problem = checkpoint_problem(final)  # read back from disk before anything older is deleted
    if problem is not None:
        import warnings

        warnings.warn(
            f"{final} did not verify after writing ({problem}); older checkpoints are kept", stacklevel=2
        )
        return final
    for old in sorted(run_dir.glob("checkpoint-*"))[:-keep]:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:  # debris under a checkpoint's name (a file, a link): only the entry itself goes
            old.unlink(missing_ok=True)
    return final


def resumable_checkpoint(run_dir: Path, restore: Any, echo: Any = print) -> tuple[Path, Any]:
    """The newest checkpoint of ``run_dir`` that verifies and that ``restore(path)`` loads without a
    UserError, with ``restore``'s result. Every one skipped gets one line; if none works, a UserError
    lists them."""
    candidates = sorted(run_dir.glob("checkpoint-*"), reverse=True)
    if not candidates:
        raise UserError(f"nothing to resume in {run_dir}: no checkpoint-* folder")
    expected = _writes_checksums(run_dir, candidates)
    skipped = []
    for path in candidates:
        problem = checkpoint_problem(path, expected)
        if problem is None:
            try:
                restored = restore(path)
            except UserError as exc:
                problem = str(exc).removeprefix(f"cannot resume from {path}: ")
            else:
                for name, why in skipped:  # said only now: when none works, the one error names them all
                    echo(f"skipping {name}: {why}")
                return path, restored
        skipped.append((path.name, problem))
    named = "; ".join(f"{name} ({why})" for name, why in skipped)
    raise UserError(f"no checkpoint in {run_dir} can be resumed: {named}")


def _writes_checksums(run_dir: Path, candidates: list[Path]) -> bool:
    """Whether this run's checkpoints are written with checksums: then one without is damaged, not old.
    (A run with a single checkpoint that lost its checksums cannot be told from an old run; it gets the
    structural checks of one.)"""
    return any((p / CHECKSUMS).is_file() for p in candidates if p.is_dir() and not p.is_symlink())


def _model_mismatch(path: Path, model: nn.Module) -> str | None:
    """Tensor names, shapes or dtypes of ``model.safetensors`` that differ from ``model``'s (torch would
    cast a float16 re-save silently)."""
    from safetensors import safe_open

    expected = dict(model.state_dict())
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            tensor = fh.get_slice(name)
            want = expected.get(name)
            if want is None:
                continue  # a tied tensor saved under one of its names; load_model checks the set
            dtype = str(tensor.get_dtype())
            shape = tuple(tensor.get_shape())
            if tuple(want.shape) != shape:
                return f"model.safetensors: {name} has shape {shape}, the model {tuple(want.shape)}"
            if _DTYPES.get(dtype) is not want.dtype:
                return f"model.safetensors: {name} is {dtype}, the model {str(want.dtype).removeprefix('torch.')}"
    return None


def checked_state(path: Path, model: nn.Module) -> dict[str, Any]:
    """``state.json`` of the checkpoint ``path``, once it parses, has a step, and ``model.safetensors``'s
    tensor names, shapes and dtypes fit ``model`` (headers only); else a UserError naming the problem."""
    try:
        state = json.loads((path / "state.json").read_bytes())
        mismatch = _model_mismatch(path, model)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot resume from {path}: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise UserError(f"cannot resume from {path}: state.json has no step (damaged)")
    if mismatch is not None:
        raise UserError(f"cannot resume from {path}: {mismatch}")
    return state


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device
) -> dict[str, Any]:
    """Restore model, optimiser, scheduler and RNGs in place; returns the state dict (step, …).

    A checkpoint that cannot be restored raises a UserError naming the file and the problem."""
    state = checked_state(path, model)
    try:
        missing, unexpected = load_model(
            model, str(path / "model.safetensors"), strict=False, device=str(device)
        )
        tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"cannot resume from {path}: {exc.__class__.__name__}: {exc}") from None
    except Exception as exc:  # safetensors' own error types for a damaged header
        if exc.__class__.__module__.startswith("safetensors"):
            raise UserError(f"cannot resume from {path}: {exc}") from None
        raise
    if missing or unexpected:
        raise UserError(
            f"cannot resume from {path}: the checkpoint does not match the model ({missing or unexpected})"
        )
    # a checkpoint is never written with non-finite weights; one that has them is damaged, not "good"
    own = model.state_dict()
    for name, value in [*own.items(), *tensors.items()]:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            where = "model.safetensors" if name in own else "optimizer.safetensors"
            raise UserError(f"cannot resume from {path}: {where} holds non-finite values in {name}")
    return finish_restore(
        path, state, scheduler, lambda: _restore_optimizer(optimizer, tensors, state["optimizer"])
    )


def finish_restore(
    path: Path, state: dict[str, Any], scheduler: Any, restore_optimizer: Any
) -> dict[str, Any]:
    """The last steps every resume shares, once the weights are in: the optimiser's state
    (``restore_optimizer()``; a state that does not fit is a UserError), the scheduler and the RNGs."""
    try:
        restore_optimizer()
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot resume from {path}: optimizer state does not fit ({exc})") from None
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
