"""Training from scratch: the loop, checkpoints, sweeps."""

from qkvlab._lazy import lazy_exports

_WHERE = {"TrainResult": "qkvlab.train.trainer", "train": "qkvlab.train.trainer"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
