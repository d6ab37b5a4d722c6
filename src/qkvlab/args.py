"""Command-line argument types and checks shared by every subcommand (no torch import here)."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qkvlab.errors import UserError

__all__ = [
    "NONNEGATIVE",
    "POSITIVE",
    "UNIT",
    "Check",
    "Key",
    "check_outputs",
    "number_list",
    "positive_int",
    "seeds",
]

#: A config key's accepted values: (predicate, what is accepted, in words).
Check = tuple[Callable[[Any], bool], str]
#: A config key as its owning component declares it: (one help line, its check or None).
Key = tuple[str, Check | None]
POSITIVE: Check = (lambda v: 0 < v < math.inf, "finite and > 0")
NONNEGATIVE: Check = (lambda v: 0 <= v < math.inf, "finite and ≥ 0")
UNIT: Check = (lambda v: 0 <= v < 1, "in [0, 1)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


MAX_SEED = 2**31 - 1
"""The largest seed qkvlab accepts: every generator it seeds (torch, numpy, Python, derived per-epoch
seeds) takes it without overflow, and it is the range most tools document."""


def seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` → [0, 1, 2] (repeats dropped); a UserError for anything else."""
    parts = text.split(",")
    if any(not s.strip() for s in parts):  # "0,,1": a typo, not two seeds
        raise UserError(
            f"--seeds {text!r} has an empty item; accepted: comma-separated integers ≥ 0, e.g. 0,1,2"
        )
    try:
        values = [int(s) for s in parts]
    except ValueError:
        raise UserError(f"--seeds {text!r} must be comma-separated integers") from None
    if not values or min(values) < 0 or max(values) > MAX_SEED:
        raise UserError(
            f"--seeds {text!r}; accepted: comma-separated integers in [0, {MAX_SEED}], e.g. 0,1,2"
        )
    return list(dict.fromkeys(values))


def number_list(text: str, what: str, kind: type = float) -> tuple:
    """``"0,0.1,1"`` → (0.0, 0.1, 1.0); a UserError naming ``what`` for anything else."""
    name = "integers" if kind is int else "finite numbers"
    parts = text.split(",")
    if not text.strip():
        raise UserError(f"{what} is empty; accepted: comma-separated {name}")
    if any(not v.strip() for v in parts):
        raise UserError(f"{what} {text!r} has an empty item; accepted: comma-separated {name}")
    try:
        values = tuple(kind(v) for v in parts)
    except ValueError:
        raise UserError(f"{what} {text!r}; accepted: comma-separated {name}") from None
    if kind is float and not all(math.isfinite(v) for v in values):
        raise UserError(f"{what} {text!r}; accepted: comma-separated {name}")
    return values


def _check_name(name: str) -> Path:
    if name != name.strip():
        raise UserError(
            f"output path {name!r} begins or ends with white space (a stray quote or space?); "
            "accepted: a path without leading or trailing spaces"
        )
    path = Path(name)
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise UserError(
                f"cannot write {name}: the name {part[:24]}… is {len(os.fsencode(part))} bytes; "
                "accepted: at most 255 bytes per file or folder name"
            )
    return path


def _check_creatable(name: str, folder: Path) -> None:
    """That ``folder`` exists or can be made, and that a file can be written in it (probed, then removed)."""
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"cannot write {name}: {existing} is a file, not a folder")
    try:
        if existing != folder:
            first_missing = next(p for p in [folder, *folder.parents] if p.parent == existing)
            os.mkdir(first_missing)
            os.rmdir(first_missing)
        else:
            fd, probe = tempfile.mkstemp(dir=existing, prefix=".qkvlab-probe-")
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write {name}: {exc.strerror} ({exc.filename or existing})") from None


def check_outputs(
    files: list[str | os.PathLike[str] | None], folders: list[str | os.PathLike[str] | None]
) -> None:
    """Refuse unusable output paths before any work is done: white space at either end (``out="DIR "``
    would otherwise write into ``DIR``), names over 255 bytes, a file where a folder must go, and a place
    where nothing can be created (``/proc/x``, a read-only or full file system)."""
    for name in map(str, filter(None, files)):
        path = _check_name(name)
        if path.is_dir():
            raise UserError(f"{name} is a folder; accepted: a file path to write")
        _check_creatable(name, path.parent)
    for name in map(str, filter(None, folders)):
        path = _check_name(name)
        blocker = next((p for p in [path, *path.parents] if p.exists()), Path("."))
        if not blocker.is_dir():
            raise UserError(f"cannot write into {name}: {blocker} is a file; accepted: a folder path")
        _check_creatable(name, path)
