"""Architecture adapters: per-head attention factors from real models and checkpoints.

Loaded on first use (PEP 562): ``qkvlab.attention.families`` is the architecture table and
imports no torch, so the command line can describe the families without importing it."""

from __future__ import annotations

from qkvlab._lazy import lazy_exports

_WHERE = {
    "ArchitectureInfo": "qkvlab.attention.extract",
    "AttentionFactors": "qkvlab.attention.extract",
    "LayerFactors": "qkvlab.attention.extract",
    "PACKAGED_MODELS": "qkvlab.attention.sources",
    "DiskSource": "qkvlab.attention.sources",
    "LiveSource": "qkvlab.attention.sources",
    "TensorSource": "qkvlab.attention.sources",
    "load_source": "qkvlab.attention.sources",
}

__all__ = sorted([*_WHERE, "families"])


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
