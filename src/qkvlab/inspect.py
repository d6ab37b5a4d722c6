"""Per-head QK/OV spectra of a whole model: ``qkvlab.inspect(model_or_path)``.

The JSON written by ``InspectReport.to_json`` has a fixed shape that other tools and
reports read (``schema_version`` 1):

    {"schema_version": 1, "source": str,
     "architecture": {"family", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_head"},
     "rtol": float,
     "heads": [{"layer", "head", "product": "qk"|"ov", "singular_values": [...],
                "rank", "effective_rank", "stable_rank", "nuclear_norm",
                "l2_half", "gap", "imbalance"}, ...]}

Layers and heads count from 0. ``heads`` is ordered by layer, then product (qk, ov),
then head.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from qkvlab.attention import ArchitectureInfo, AttentionFactors, load_source
from qkvlab.errors import UserError
from qkvlab.spectra import DEFAULT_RTOL, ProductSpectrum

__all__ = ["METRICS", "PRODUCTS", "InspectReport", "inspect", "spectrum_records"]

SCHEMA_VERSION = 1
PRODUCTS = ("qk", "ov")
METRICS = ("rank", "effective_rank", "stable_rank", "nuclear_norm", "l2_half", "gap", "imbalance")


def spectrum_records(
    layer: int, product: str, spectrum: ProductSpectrum, rtol: float
) -> list[dict[str, Any]]:
    """One JSON-ready record per head of one product of one layer."""
    columns = {
        "rank": spectrum.rank(rtol).tolist(),
        "effective_rank": spectrum.effective_rank.tolist(),
        "stable_rank": spectrum.stable_rank.tolist(),
        "nuclear_norm": spectrum.nuclear_norm.tolist(),
        "l2_half": spectrum.l2_half.tolist(),
        "gap": spectrum.gap.tolist(),
        "imbalance": spectrum.imbalance.tolist(),
    }
    singular_values = spectrum.singular_values.tolist()
    return [
        {
            "layer": layer,
            "head": head,
            "product": product,
            "singular_values": singular_values[head],
            **{name: values[head] for name, values in columns.items()},
        }
        for head in range(len(singular_values))
    ]


@dataclass
class InspectReport:
    source: str
    architecture: ArchitectureInfo
    rtol: float
    heads: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "architecture": self.architecture.to_dict(),
            "rtol": self.rtol,
            "heads": self.heads,
        }

    def to_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InspectReport:
        return cls(data["source"], ArchitectureInfo(**data["architecture"]), data["rtol"], data["heads"])

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per (layer, head, product); singular values space-separated in the last column."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["layer", "head", "product", *METRICS, "singular_values"])
            for rec in self.heads:
                sv = " ".join(f"{s:.9g}" for s in rec["singular_values"])
                writer.writerow([rec["layer"], rec["head"], rec["product"], *(rec[m] for m in METRICS), sv])

    def select(self, product: str, layer: int | None = None) -> list[dict[str, Any]]:
        return [r for r in self.heads if r["product"] == product and (layer is None or r["layer"] == layer)]

    def layer_summary(self) -> list[dict[str, float | int]]:
        """Per layer and product: mean/min effective rank, mean rank, mean gap."""
        rows = []
        for layer in range(self.architecture.n_layers):
            row: dict[str, float | int] = {"layer": layer}
            for product in PRODUCTS:
                recs = self.select(product, layer)
                eranks = [r["effective_rank"] for r in recs]
                row[f"{product}_erank_mean"] = statistics.fmean(eranks)
                row[f"{product}_erank_min"] = min(eranks)
                row[f"{product}_rank_mean"] = statistics.fmean(r["rank"] for r in recs)
                row[f"{product}_gap_mean"] = statistics.fmean(r["gap"] for r in recs)
            rows.append(row)
        return rows


def inspect(
    source: nn.Module | str | os.PathLike[str],
    *,
    rtol: float = DEFAULT_RTOL,
    family: str | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
) -> InspectReport:
    """Exact per-head spectra of W_KᵀW_Q and P·W_V for every attention layer.

    Args:
        source: a ``torch.nn.Module``, a HF model folder, a ``.safetensors`` file, or a
            packaged name such as ``"minilm"``. Checkpoints are streamed layer by layer.
        rtol: threshold of ``rank`` (#σᵢ > rtol·σ₁).
        family, n_heads, n_kv_heads: overrides for detection (see ``AttentionFactors``).
        progress: optional wrapper ``(iterable, total) -> iterable`` such as a tqdm bar.
    """
    if not (0.0 <= rtol < 1.0):
        raise UserError(f"rtol must be in [0, 1), got {rtol}")
    tensors = load_source(source)
    factors = AttentionFactors(tensors, family=family, n_heads=n_heads, n_kv_heads=n_kv_heads)
    layers: Iterable[Any] = factors if progress is None else progress(factors, len(factors))
    records: list[dict[str, Any]] = []
    for layer in layers:
        records += spectrum_records(layer.layer, "qk", layer.qk.spectrum(), rtol)
        records += spectrum_records(layer.layer, "ov", layer.ov.spectrum(), rtol)
    return InspectReport(tensors.name, factors.info, rtol, records)
