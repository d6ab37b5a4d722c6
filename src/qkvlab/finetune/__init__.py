"""Fine-tuning chosen attention matrices of pretrained models (paper 001's strategy and its controls)."""

from qkvlab.finetune.data import FINETUNE_DATA, LabelledData, load_labelled
from qkvlab.finetune.run import FinetuneConfig, finetune

__all__ = ["FINETUNE_DATA", "FinetuneConfig", "LabelledData", "finetune", "load_labelled"]
