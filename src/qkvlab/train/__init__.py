"""Training from scratch: the loop and its checkpoints (sweeps of it: qkvlab.grid.sweep)."""

from qkvlab._lazy import lazy_exports

_WHERE = {"TrainResult": "qkvlab.train.trainer", "train": "qkvlab.train.trainer"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
