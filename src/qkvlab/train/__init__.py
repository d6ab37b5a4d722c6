"""Training from scratch: the loop, checkpoints, sweeps."""

from qkvlab.train.trainer import TrainResult, train

__all__ = ["TrainResult", "train"]
