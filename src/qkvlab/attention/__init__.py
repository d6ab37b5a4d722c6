"""Architecture adapters: per-head attention factors from real models and checkpoints."""

from qkvlab.attention import families
from qkvlab.attention.extract import ArchitectureInfo, AttentionFactors, LayerFactors
from qkvlab.attention.sources import PACKAGED_MODELS, DiskSource, LiveSource, TensorSource, load_source

__all__ = [
    "PACKAGED_MODELS",
    "ArchitectureInfo",
    "AttentionFactors",
    "DiskSource",
    "LayerFactors",
    "LiveSource",
    "TensorSource",
    "families",
    "load_source",
]
