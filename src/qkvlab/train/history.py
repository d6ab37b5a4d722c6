"""Run-folder upkeep on resume: what a crash leaves behind, and the log lines after the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from qkvlab.errors import UserError
from qkvlab.files import write_atomic

__all__ = ["clean_debris", "truncate_history"]


def clean_debris(run_dir: Path) -> None:
    """What a crash can leave: half-written checkpoint folders and atomic-write temp files."""
    import shutil

    for path in run_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in run_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def truncate_history(run_dir: Path, step: int) -> None:
    """Drop metric and spectra lines logged after ``step`` (the checkpoint resumed from): the run
    logs those steps again, so each step appears once."""
    for name in ("metrics.jsonl", "spectra.jsonl"):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
        except UnicodeDecodeError:
            raise UserError(
                f"cannot resume {run_dir}: {path} is damaged (not UTF-8 text); move it aside to resume "
                "without the history logged so far"
            ) from None
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] > step:
                    continue
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
            keep.append(line)
        if len(keep) != len(lines):
            write_atomic(path, "".join(keep))
