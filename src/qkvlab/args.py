"""Command-line argument types and checks shared by every subcommand (no torch import here)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from qkvlab.errors import UserError

# The command line this process was started with when it came through `qkvlab` (set by cli.main);
# output files record it so a report can show the exact command behind each result.
INVOCATION: str | None = None

__all__ = ["INVOCATION", "check_outputs", "number_list", "positive_int", "seeds"]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    if not values or min(values) < 0:
        raise UserError(f"--seeds {text!r}; accepted: comma-separated integers ≥ 0, e.g. 0,1,2")
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


def check_outputs(files: list[str | None], folders: list[str | None]) -> None:
    """Refuse unusable output paths before any work is done."""
    for name in filter(None, files):
        path = Path(name)
        if path.is_dir():
            raise UserError(f"{name} is a folder; accepted: a file path to write")
        parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
        if not parent.is_dir():
            raise UserError(f"cannot write {name}: {parent} is not a folder")
    for name in filter(None, folders):
        path = Path(name)
        blocker = next((p for p in [path, *path.parents] if p.exists()), Path("."))
        if not blocker.is_dir():
            raise UserError(f"cannot write into {name}: {blocker} is a file; accepted: a folder path")
