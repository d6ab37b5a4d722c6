"""A run's metrics: ``metrics.jsonl`` and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from qkvlab.files import open_append

__all__ = ["RunLogger"]


class RunLogger:
    """metrics.jsonl + TensorBoard on rank 0; no-op elsewhere."""

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool, resumed_at: int | None = None
    ) -> None:
        self.enabled = enabled
        self.file = open_append(run_dir / "metrics.jsonl") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, TensorBoard drops what was logged after the checkpoint (it is logged again)
            purge = resumed_at + 1 if resumed_at is not None else None
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)

    def log(self, step: int, split: str, metrics: dict[str, float], note: str | None = None) -> None:
        if not self.enabled:
            return
        extra = {"note": note} if note else {}
        self.file.write(json.dumps({"step": step, "split": split, **metrics, **extra}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"{split}/{key}", value, step)

    def tags(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars whose names are already TensorBoard tags (``spectra/L0/qk_erank_mean``); the
        metrics file gets them as one ``{"step", "split": "spectra", "L0/qk_erank_mean": …}`` line."""
        if not self.enabled:
            return
        split = {key.partition("/")[2]: value for key, value in metrics.items()}
        self.file.write(json.dumps({"step": step, "split": "spectra", **split}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
