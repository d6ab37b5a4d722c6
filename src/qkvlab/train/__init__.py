"""Training from scratch (sweeps of it: qkvlab.grid.sweep), in parts: ``loop`` (the run, start to end),
``parts`` (dataset, model config, optimiser, read off the config), ``schedule``, ``evaluation``,
``logger`` (metrics.jsonl and TensorBoard), ``signals``, ``health`` (non-finite steps), ``history`` (log
upkeep on resume), ``lock``, ``distributed`` and ``checkpoint``."""

from qkvlab._lazy import lazy_exports

_WHERE = {"TrainResult": "qkvlab.train.loop", "train": "qkvlab.train.loop"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
