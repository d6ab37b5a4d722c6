"""Per-head QK/OV spectra of a whole model: ``qkvlab.inspect(model_or_path)``.

The JSON written by ``InspectReport.to_json`` has a fixed shape that other tools and
reports read (``schema_version`` 3; readers accept 2, and 1, whose records are all self-attention):

    {"schema_version": 3, "source": str,
     "architecture": {"family", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_head",
                      "attention_layers": {kind: layers}, only with several kinds (T5)},
     "rtol": float,
     "notes": [str, ...],  # what the products leave out, and whether rank at rtol is noise-limited
     "rank_noise_limited": bool,  # rtol < 10·eps of the weights' half-precision dtype, or quantised weights
     "weight_types": {tensor: type},  # only for quantised files (GGUF): each attention tensor's storage type
     "groups": [{"attention", "layer", "group", "product", …the head metrics…}, ...],  # grouped-query only
     "rope_planes": [{"attention", "layer", "group", "plane", "query", "key", "imbalance"}, ...],  # rotary only
     "precision": {"method": "qr"|"gram", "relative_error_bound": float},  # max over heads of bound/σ₁
     "heads": [{"attention": "self"|"decoder_self"|"cross", "layer" (counted within its kind),
                "head", "product": "qk"|"ov", "singular_values": [...],
                "rank", "effective_rank", "stable_rank", "nuclear_norm",
                "l2_half", "gap", "imbalance", "left_gram", "right_gram"}, ...]}

``groups`` (models with grouped-query attention): per KV group, the product weight decay bounds, the
group's heads side by side (QK: W_K^g against every W_Q^h of the group) or stacked (OV); see
``LayerFactors.groups``. ``left_gram``/``right_gram`` are ‖AᵀA‖_F and ‖BᵀB‖_F of the head's factors (A, B as in
docs/spectra.md: for OV, A = P^h and B = W_V^hᵀ); a compare report has none.

Layers and heads count from 0. ``heads`` is ordered by layer, then product (qk, ov),
then head.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import statistics
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkvlab.attention import ArchitectureInfo, AttentionFactors, load_source
from qkvlab.attention.extract import natural_key
from qkvlab.errors import UserError
from qkvlab.files import write_atomic
from qkvlab.spectra import DEFAULT_RTOL, SPECTRUM_METHODS, ProductSpectrum

__all__ = [
    "METRICS",
    "PRODUCTS",
    "InspectReport",
    "InspectSeries",
    "append_spectra_record",
    "checkpoint_step",
    "compare",
    "expand_sources",
    "inspect",
    "inspect_series",
    "record_spectra",
    "spectrum_records",
    "summary_metrics",
]

#: 3: grouped-query models add "groups"; 2: every head record has "attention"; readers accept 1 (all "self")
SCHEMA_VERSION = 3
PRODUCTS = ("qk", "ov")
METRICS = ("rank", "effective_rank", "stable_rank", "nuclear_norm", "l2_half", "gap", "imbalance")
SUMMARY_STATS = (
    "erank_mean",
    "erank_min",
    "rank_mean",
    "stable_rank_mean",
    "nuclear_norm_mean",
    "gap_mean",
    "imbalance_mean",
)


def spectrum_records(
    layer: int,
    product: str,
    spectrum: ProductSpectrum,
    rtol: float,
    attention: str = "self",
    unit: str = "head",
) -> list[dict[str, Any]]:
    """One JSON-ready record per head (``unit="group"``: per KV group) of one product of one layer (of
    one kind of attention)."""
    columns = {
        "rank": spectrum.rank(rtol).tolist(),
        "effective_rank": spectrum.effective_rank.tolist(),
        "stable_rank": spectrum.stable_rank.tolist(),
        "nuclear_norm": spectrum.nuclear_norm.tolist(),
        "l2_half": spectrum.l2_half.tolist(),
        "gap": spectrum.gap.tolist(),
        "imbalance": spectrum.imbalance.tolist(),
    }
    if spectrum.left_gram is not None and spectrum.right_gram is not None:
        columns["left_gram"] = spectrum.left_gram.tolist()
        columns["right_gram"] = spectrum.right_gram.tolist()
    singular_values = spectrum.singular_values.tolist()
    finite = torch.isfinite(spectrum.singular_values).all(-1).tolist()
    return [
        {
            "attention": attention,
            "layer": layer,
            unit: head,
            "product": product,
            # a head whose weights hold NaN/inf (a diverged run) gets nulls, not a crash or fake zeros
            "singular_values": singular_values[head] if finite[head] else None,
            **{name: values[head] if finite[head] else None for name, values in columns.items()},
        }
        for head in range(len(singular_values))
    ]


def head_stats(product: str, records: list[dict[str, Any]]) -> dict[str, float | int]:
    """Over ``records`` (heads of one product): ``{product}_{erank_mean|erank_min|rank_mean|
    stable_rank_mean|nuclear_norm_mean|gap_mean|imbalance_mean}``, and ``{product}_nonfinite_heads``.
    Heads with non-finite weights are counted there, never averaged in; if every head is, the
    statistics are NaN."""
    finite = [r for r in records if r["effective_rank"] is not None]
    stats: dict[str, float | int] = {f"{product}_nonfinite_heads": len(records) - len(finite)}
    if not finite:
        return {**stats, **{f"{product}_{k}": float("nan") for k in SUMMARY_STATS}}
    eranks = [r["effective_rank"] for r in finite]
    stats[f"{product}_erank_mean"] = statistics.fmean(eranks)
    stats[f"{product}_erank_min"] = min(eranks)
    stats[f"{product}_rank_mean"] = statistics.fmean(r["rank"] for r in finite)
    for name in ("stable_rank", "nuclear_norm", "gap", "imbalance"):
        stats[f"{product}_{name}_mean"] = statistics.fmean(r[name] for r in finite)
    return stats


@dataclass
class InspectReport:
    source: str
    architecture: ArchitectureInfo
    rtol: float
    heads: list[dict[str, Any]]
    #: What the products leave out (rotary, norms or gains inside the attention block) and precision
    #: limits, as lines the terminal prints under the table.
    notes: list[str] = field(default_factory=list)
    #: True when the weights are bf16/fp16 and rtol < 10·eps of that dtype, or quantised: rank at rtol
    #: then counts noise.
    rank_noise_limited: bool = False
    #: Each attention tensor's storage type where the file keeps quantised weights (GGUF: ``Q4_K`` …).
    weight_types: dict[str, str] = field(default_factory=dict)
    #: Grouped-query attention: one record per KV group, layer and product (see the module docstring).
    groups: list[dict[str, Any]] = field(default_factory=list)
    #: Rotary embeddings: per layer, KV group and rotary plane, the plane's squared norms in the group's
    #: query factors and its key factor, and their difference (``AttentionFactors.rotary_planes``).
    rope_planes: list[dict[str, Any]] = field(default_factory=list)
    #: How the spectra were computed: ``{"method": "qr" | "gram", "relative_error_bound": b}``, b the largest
    #: stated bound on |σᵢ − σᵢ(exact)|/σ₁ over every head and group (``ProductSpectrum.error_bound``).
    precision: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "inspect",
            "source": self.source,
            "architecture": self.architecture.to_dict(),
            "rtol": self.rtol,
            "notes": self.notes,
            "rank_noise_limited": self.rank_noise_limited,
            **({"weight_types": self.weight_types} if self.weight_types else {}),
            "heads": self.heads,
            **({"groups": self.groups} if self.groups else {}),
            **({"rope_planes": self.rope_planes} if self.rope_planes else {}),
            **({"precision": self.precision} if self.precision else {}),
        }

    def to_json(self, path: str | os.PathLike[str], *, step: int | None = None) -> None:
        """Write the report (atomically); ``step`` records the training step it was taken at, so
        ``qkvlab report`` draws several such files against the step."""
        write_atomic(path, json.dumps({**self.to_dict(), **({"step": step} if step is not None else {})}))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InspectReport:
        """From ``to_dict``'s output, schema_version 3, 2 or 1 (1: every record self-attention; before 3: no groups)."""
        return cls(
            data["source"],
            ArchitectureInfo(**data["architecture"]),
            data["rtol"],
            [r if "attention" in r else {"attention": "self", **r} for r in data["heads"]],
            list(data.get("notes", [])),
            bool(data.get("rank_noise_limited", False)),
            dict(data.get("weight_types", {})),
            list(data.get("groups", [])),
            list(data.get("rope_planes", [])),
            dict(data.get("precision", {})),
        )

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per (layer, head, product); singular values space-separated in the last column."""
        fh = io.StringIO(newline="")
        writer = csv.writer(fh)
        writer.writerow(["layer", "head", "product", *METRICS, "singular_values"])
        for rec in self.heads:
            sv = " ".join(f"{s:.9g}" for s in rec["singular_values"])
            writer.writerow([rec["layer"], rec["head"], rec["product"], *(rec[m] for m in METRICS), sv])
        write_atomic(path, fh.getvalue())

    def _records(
        self, product: str, layer: int | None = None, attention: str | None = None
    ) -> list[dict[str, Any]]:
        return [
            r
            for r in self.heads
            if r["product"] == product
            and (layer is None or r["layer"] == layer)
            and (attention is None or r.get("attention", "self") == attention)
        ]

    def group_summary(self) -> list[dict[str, Any]]:
        """Per layer, the KV groups' products and the rotary planes' balance (:func:`group_summary`)."""
        return group_summary(self)

    def attention_kinds(self) -> list[str]:
        """The kinds of attention this report holds, in model order: ["self"], or T5's
        ["self", "decoder_self", "cross"]."""
        return list(dict.fromkeys(r.get("attention", "self") for r in self.heads)) or ["self"]

    def for_attention(self, kind: str) -> InspectReport:
        """The report of one kind of attention alone (its layers counted from 0), as for a one-kind model."""
        if kind not in self.attention_kinds():
            raise ValueError(
                f"unknown attention {kind!r}; this report has: {', '.join(self.attention_kinds())}"
            )
        layers = (self.architecture.attention_layers or {}).get(kind, self.architecture.n_layers)
        arch = dataclasses.replace(self.architecture, n_layers=layers, attention_layers=None)
        heads = [r for r in self.heads if r.get("attention", "self") == kind]
        groups = [r for r in self.groups if r.get("attention", "self") == kind]
        return InspectReport(
            self.source,
            arch,
            self.rtol,
            heads,
            self.notes,
            self.rank_noise_limited,
            self.weight_types,
            groups,
        )

    def products(self) -> list[str]:
        """The products this report holds: ``qk`` and ``ov`` (a compare report: ``dqk``, ``dov``, …)."""
        return list(dict.fromkeys(r["product"] for r in self.heads))

    def select(
        self, product: str, layer: int | None = None, head: int | None = None, attention: str | None = None
    ) -> list[dict[str, Any]]:
        """The records of ``product``, optionally of one layer and/or head (ValueError for an unknown
        product, layer or head, rather than an empty list that looks like a real answer). With several
        kinds of attention (T5), a layer needs ``attention=`` ("self", "decoder_self" or "cross")."""
        if attention is not None or len(self.attention_kinds()) > 1:
            if attention is None and layer is not None:
                raise ValueError(
                    f"this model has several kinds of attention ({', '.join(self.attention_kinds())}); "
                    "give attention= with layer="
                )
            if attention is not None:
                return self.for_attention(attention).select(product, layer, head)
        if product not in self.products():
            raise ValueError(f"unknown product {product!r}; this report has: {', '.join(self.products())}")
        arch = self.architecture
        if layer is not None and not 0 <= layer < arch.n_layers:
            raise ValueError(f"layer {layer} out of range; this model has layers 0..{arch.n_layers - 1}")
        if head is not None and not 0 <= head < arch.n_heads:
            raise ValueError(f"head {head} out of range; this model has heads 0..{arch.n_heads - 1}")
        return [r for r in self._records(product, layer) if head is None or r["head"] == head]

    def _summary_line(self) -> str:
        arch = self.architecture
        parts = []
        for product in self.products():
            eranks = [r["effective_rank"] for r in self._records(product) if r["effective_rank"] is not None]
            if eranks:
                parts.append(f"{product} erank mean {statistics.fmean(eranks):.2f}, min {min(eranks):.2f}")
        return (
            f"{self.source}: {arch.family}, {arch.n_layers} layers × {arch.n_heads} heads "
            f"({arch.n_kv_heads} KV), d_head {arch.d_head}; " + "; ".join(parts) + f"; rtol {self.rtol:g}"
        )

    def __repr__(self) -> str:  # short: the singular values stay in .heads
        return f"<InspectReport {self._summary_line()}>"

    def _repr_html_(self) -> str:
        """Jupyter: the summary line and the per-layer table."""
        import html

        from qkvlab.render.page import Table, table_html
        from qkvlab.render.tables import INSPECT_LEGEND, inspect_rows

        table = table_html(Table(*inspect_rows(self), caption=INSPECT_LEGEND))
        return f"<p><b>InspectReport</b> {html.escape(self._summary_line())}</p>{table}"

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame``, one row per (layer, head, product): the metrics and the singular values
        (a list per row). pandas is not a qkvlab dependency of its own; install it to use this."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("InspectReport.to_pandas needs pandas: pip install pandas") from None
        columns = ["layer", "head", "product", *METRICS, "singular_values"]
        return pd.DataFrame([[r.get(c) for c in columns] for r in self.heads], columns=columns)

    def layer_summary(self) -> list[dict[str, float | int]]:
        """Per layer and product, over heads: mean/min effective rank, and the mean rank, stable rank,
        nuclear norm, gap and imbalance (``{product}_{erank_mean|erank_min|rank_mean|stable_rank_mean|
        nuclear_norm_mean|gap_mean|imbalance_mean|nonfinite_heads}``). Heads with non-finite weights are
        left out of the statistics and counted in ``{product}_nonfinite_heads``. With several kinds of
        attention (T5) the rows of each kind follow each other, each with its ``attention``."""
        kinds = self.attention_kinds()
        if len(kinds) > 1:
            return [{"attention": k, **row} for k in kinds for row in self.for_attention(k).layer_summary()]
        rows = []
        for layer in range(self.architecture.n_layers):
            row: dict[str, float | int] = {"layer": layer}
            for product in PRODUCTS:
                recs = self._records(product, layer)
                if recs:  # none: e.g. a compare report (dqk, dov, …)
                    row.update(head_stats(product, recs))
            rows.append(row)
        return rows


#: The version of the spectra series format (``spectra.jsonl``; see :mod:`qkvlab.monitor`).
SERIES_VERSION = 1


def read_series_line(line: str) -> dict[str, Any]:
    """One line of ``spectra.jsonl`` as a dict; a ``series_version`` newer than this qkvlab's is refused."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    version = record.get("series_version", 1)
    if not isinstance(version, int) or version > SERIES_VERSION:
        raise UserError(
            f"a spectra record has series_version {version!r}; this qkvlab reads up to {SERIES_VERSION}: upgrade qkvlab"
        )
    return record


def record_spectra(
    model: nn.Module,
    path: str | os.PathLike[str],
    step: int,
    *,
    epoch: float | None = None,
    rtol: float = DEFAULT_RTOL,
) -> InspectReport:
    """Measure ``model``'s attention spectra and append one record to the spectra log ``path``.

    For a plain PyTorch loop (or Lightning, Accelerate: call it from rank 0)::

        for step, batch in enumerate(loader, 1):
            ...
            if step % 100 == 0:
                qkvlab.record_spectra(model, "out/spectra.jsonl", step)

    Each line is ``{"step", "epoch", **inspect-record}``, the shape ``qkvlab.hf.SpectraCallback`` writes;
    ``qkvlab report out/spectra.jsonl`` draws every product's effective rank and gap against the step.
    The line is appended whole (never through a symbolic link); returns the report.
    """
    was_training = model.training
    report = inspect(model, rtol=rtol)
    model.train(was_training)
    append_spectra_record(path, report, step, epoch)
    return report


def append_spectra_record(
    path: str | os.PathLike[str], report: InspectReport, step: int, epoch: float | None = None
) -> None:
    """One line ``{"step", "epoch", **inspect-record}`` appended to a spectra log, never through a link."""
    from qkvlab.files import open_append

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_append(path) as fh:
        fh.write(
            json.dumps({"series_version": SERIES_VERSION, "step": step, "epoch": epoch, **report.to_dict()})
            + "\n"
        )


def inspect(
    source: nn.Module | str | os.PathLike[str],
    *,
    rtol: float = DEFAULT_RTOL,
    family: str | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
    method: str = "auto",
) -> InspectReport:
    """Exact per-head spectra of W_KᵀW_Q and P·W_V for every attention layer.

    Args:
        source: a ``torch.nn.Module``, a HF model folder, a ``.safetensors`` file, or a
            packaged name such as ``"minilm"``. Checkpoints are streamed layer by layer.
        rtol: threshold of ``rank`` (#σᵢ > rtol·σ₁).
        family, n_heads, n_kv_heads: overrides for detection (see ``AttentionFactors``).
        progress: optional wrapper ``(iterable, total) -> iterable`` such as a tqdm bar.
        method: how each factor's R is computed, always in float64: ``auto`` (default) takes the Gram route
            where the weights are stored in bf16, fp16 or a quantised format and Householder QR otherwise;
            ``gram`` or ``qr`` forces one (``qkvlab.spectra.spectrum_method``). The report states the
            resulting bound on every σᵢ (``InspectReport.precision``).
    """
    if not (0.0 <= rtol < 1.0):
        raise UserError(f"rtol must be in [0, 1), got {rtol}")
    if method not in SPECTRUM_METHODS:
        raise UserError(f"method must be one of {', '.join(SPECTRUM_METHODS)}; got {method!r}")
    tensors = load_source(source)
    factors = AttentionFactors(tensors, family=family, n_heads=n_heads, n_kv_heads=n_kv_heads)
    weight_types = _quantised_types(tensors, factors)
    if method == "auto" and weight_types:
        from qkvlab.attention.gguf import FLOAT_TYPES

        if any(kind not in FLOAT_TYPES for kind in weight_types.values()):
            method = "gram"  # dequantised to float32, but a 4–8-bit grid: coarser than bf16
    # Only the methods used and the worst relative bound are kept: holding every layer's small result tensors
    # would keep the allocator from returning the freed per-layer buffers between them (RSS grew ~50 MB
    # per layer at the 7B shape).
    computed: dict[str, Any] = {}

    def measured(spectrum: ProductSpectrum) -> ProductSpectrum:
        _precision(spectrum, computed)
        return spectrum

    layers: Iterable[Any] = factors if progress is None else progress(factors, len(factors))
    records: list[dict[str, Any]] = []
    group_records: list[dict[str, Any]] = []
    plane_records: list[dict[str, Any]] = []
    dtypes: set[torch.dtype] = set()
    for layer in layers:
        dtypes.update((layer.qk.left.dtype, layer.qk.right.dtype, layer.ov.left.dtype, layer.ov.right.dtype))
        qk, ov = measured(layer.qk.spectrum(method)), measured(layer.ov.spectrum(method))
        records += spectrum_records(layer.layer, "qk", qk, rtol, layer.attention)
        records += spectrum_records(layer.layer, "ov", ov, rtol, layer.attention)
        rotary = factors.rotary_planes(layer, qk)
        if rotary is not None:
            query, key = (x.tolist() for x in rotary)
            plane_records += [
                {
                    "attention": layer.attention,
                    "layer": layer.layer,
                    "group": g,
                    "plane": p,
                    "query": query[g][p],
                    "key": key[g][p],
                    "imbalance": query[g][p] - key[g][p],
                }
                for g in range(len(query))
                for p in range(len(query[g]))
            ]
        grouped = layer.groups()
        if grouped is not None:
            for product, factors_g in zip(("qk", "ov"), grouped, strict=True):
                group_records += spectrum_records(
                    layer.layer,
                    product,
                    measured(factors_g.spectrum(method)),
                    rtol,
                    layer.attention,
                    unit="group",
                )
    notes = factors.left_out()
    if "gram" in computed.get("method", ""):
        notes.append(
            "spectra from float64 Gram matrices, as the weights are stored in low precision: every σᵢ is within "
            f"{computed['relative_error_bound']:.1g}·σ₁ of the exact value (a worst-case bound, docs/spectra.md; "
            "measured errors are far smaller); --spectrum-method qr uses Householder QR"
        )
    half = sorted((d for d in dtypes if d in (torch.bfloat16, torch.float16)), key=str)
    noisy = bool(half) and rtol < 10 * max(torch.finfo(d).eps for d in half)
    if noisy:
        eps = max(torch.finfo(d).eps for d in half)
        message = (
            f"the weights are {', '.join(str(d).removeprefix('torch.') for d in half)} (machine epsilon "
            f"{eps:.2g}): rank at rtol {rtol:g} < 10·eps counts rounding noise; use --rtol {10 * eps:.2g} or "
            "more, or read effective_rank and stable_rank, which need no threshold"
        )
        warnings.warn(message, stacklevel=2)
        notes.append(message)
    if weight_types:
        from qkvlab.attention.gguf import FLOAT_TYPES, noise_floor

        counts = Counter(weight_types.values())
        quantised = ", ".join(
            f"{n} × {kind}" for kind, n in sorted(counts.items()) if kind not in FLOAT_TYPES
        )
        floats = sum(n for kind, n in counts.items() if kind in FLOAT_TYPES)
        floor = max(noise_floor(kind) for kind in counts)
        stored = (
            f"the attention weights are quantised ({quantised}"
            + (f"; {floats} more in float, biases and norms among them" if floats else "")
            + f"), dequantised to float32; quantisation moves each σᵢ/σ₁ by up to {floor:.2g} "
            "(BENCHMARKS.md §8)"
        )
        if rtol < floor:
            noisy = True
            stored += (
                f", so rank at rtol {rtol:g} counts quantisation noise: use --rtol {floor:.2g} or more, or read "
                "effective_rank and stable_rank"
            )
        notes.append(stored)
    if group_records:
        notes.append(
            "grouped-query attention: the products weight decay bounds are per KV group (its heads' products "
            'side by side for QK, stacked for OV); --json holds them under "groups" (docs/spectra.md)'
        )
    return InspectReport(
        tensors.name,
        factors.info,
        rtol,
        records,
        notes,
        noisy,
        weight_types,
        group_records,
        plane_records,
        computed,
    )


def _precision(spectrum: ProductSpectrum, into: dict[str, Any]) -> None:
    """Fold one spectrum into ``InspectReport.precision``: the method(s), and the largest error bound
    relative to σ₁ (heads whose product is zero or not finite have none)."""
    methods = set(into.get("method", "").split("+")) - {""} | {spectrum.method}
    into["method"] = "+".join(sorted(methods))
    worst = into.get("relative_error_bound", 0.0)
    if spectrum.error_bound is not None:
        top = spectrum.singular_values[:, 0]
        ratio = spectrum.error_bound / top.clamp_min(torch.finfo(top.dtype).tiny)
        ratio = ratio[torch.isfinite(ratio) & (top > 0)]
        if ratio.numel():
            worst = max(worst, float(ratio.max()))
    into["relative_error_bound"] = worst


def _quantised_types(tensors: Any, factors: AttentionFactors) -> dict[str, str]:
    """Each attention tensor's storage type, when the source keeps some of them quantised; else {}."""
    types = getattr(tensors, "storage_types", None)
    if types is None:
        return {}
    from qkvlab.attention.gguf import FLOAT_TYPES

    stored = types()
    read = {
        template.format(block=block)
        for layout, block, _ in factors.units
        for _, template in layout.role_templates()
    }
    attention = {name: stored[name] for name in sorted(read) if name in stored}
    return attention if any(kind not in FLOAT_TYPES for kind in attention.values()) else {}


# -- many checkpoints in one call -------------------------------------------------------------------

#: A checkpoint folder's step, from its name: checkpoint-00000400 (qkvlab, HF Trainer), step143000
#: (Pythia's revisions), global_step1000 (DeepSpeed), iter_0001000 (Megatron).
_STEP = re.compile(r"(?:checkpoint|global_step|step|iter)[-_]?(\d+)$")


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The training step a checkpoint's folder name says, or None."""
    match = _STEP.search(Path(path).name)
    return int(match.group(1)) if match else None


def _is_model(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()


def expand_sources(sources: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Each source as given, except a folder of several checkpoints (the HF Trainer's output folder,
    a set of Pythia steps), which becomes its checkpoints in step order. A ``qkvlab train`` run folder
    stays one source, its latest checkpoint (its spectral monitor already records every step; give
    ``RUN/checkpoint-*`` to inspect each kept checkpoint)."""
    out: list[str] = []
    for source in sources:
        path = Path(source).expanduser()
        inner = (
            sorted(
                (p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_model(p)),
                key=lambda p: natural_key(p.name),
            )
            if path.is_dir() and not _is_model(path)
            else []
        )
        qkvlab_run = (path / "metrics.jsonl").is_file() or (path / "latest").is_file()
        if len(inner) > 1 and not qkvlab_run:
            stepped = [p for p in inner if checkpoint_step(p) is not None]
            chosen = sorted(stepped, key=lambda p: checkpoint_step(p)) if stepped else inner
            out += [str(p) for p in chosen]
        else:
            out.append(str(source))
    return out


@dataclass
class InspectSeries:
    """One ``InspectReport`` per checkpoint, in order, with the step each one is at (None: unknown).

    JSON (``kind`` "inspect-series", ``schema_version`` 1): ``{"schema_version", "kind", "steps",
    "reports": [an inspect JSON each]}``.
    """

    reports: list[InspectReport]
    steps: list[int | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "kind": "inspect-series",
            "steps": self.steps,
            "reports": [r.to_dict() for r in self.reports],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InspectSeries:
        return cls([InspectReport.from_dict(r) for r in data["reports"]], list(data["steps"]))

    def to_json(self, path: str | os.PathLike[str]) -> None:
        write_atomic(path, json.dumps(self.to_dict()))

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str]) -> InspectSeries:
        """The records of a spectra log (:class:`qkvlab.Monitor` and every callback built on it,
        :func:`record_spectra`): one inspect record with its ``step`` per line, the series format of
        :mod:`qkvlab.monitor`. A last line without its newline (a write cut short) is skipped."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is damaged (not UTF-8 text)") from None
        lines = text.split("\n")[: -1 if not text.endswith("\n") else None]
        reports, steps = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = read_series_line(line)
                reports.append(InspectReport.from_dict(record))
            except UserError:
                raise
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"{path} is damaged (line {number} is not an inspect record)") from None
            steps.append(record.get("step"))
        if not reports:
            raise UserError(f"{path} holds no spectra record yet")
        return cls(reports, steps)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per (checkpoint, layer, head, product)."""
        fh = io.StringIO(newline="")
        writer = csv.writer(fh)
        writer.writerow(["source", "step", "layer", "head", "product", *METRICS, "singular_values"])
        for report, step in zip(self.reports, self.steps, strict=True):
            for rec in report.heads:
                sv = " ".join(f"{s:.9g}" for s in rec["singular_values"] or [])
                row = [rec["layer"], rec["head"], rec["product"], *(rec[m] for m in METRICS), sv]
                writer.writerow([report.source, "" if step is None else step, *row])
        write_atomic(path, fh.getvalue())

    def x(self) -> tuple[list[float], str]:
        """The x axis: the steps when every checkpoint has one, else the checkpoint's position."""
        if all(s is not None for s in self.steps):
            return [float(s) for s in self.steps], "training step"  # type: ignore[arg-type]
        return [float(i) for i in range(len(self.reports))], "checkpoint (in the order given)"

    def rows(self) -> list[dict[str, Any]]:
        """Per checkpoint, over every head of every layer: the statistics of :func:`head_stats`."""
        rows = []
        for report, step in zip(self.reports, self.steps, strict=True):
            row: dict[str, Any] = {"source": report.source, "step": step}
            for product in PRODUCTS:
                row.update(head_stats(product, report._records(product)))
            rows.append(row)
        return rows


def inspect_series(
    sources: Sequence[nn.Module | str | os.PathLike[str]],
    *,
    rtol: float = DEFAULT_RTOL,
    family: str | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
    method: str = "auto",
) -> InspectSeries:
    """``inspect`` of each source in order (a folder of checkpoints counts as its checkpoints, in step
    order): how attention changes over training. Every source must have the same architecture."""
    paths: list[Any] = []
    for source in sources:
        paths += [source] if isinstance(source, nn.Module) else expand_sources([source])
    reports, steps = [], []
    items: Iterable[Any] = paths if progress is None else progress(paths, len(paths))
    for source in items:
        report = inspect(
            source, rtol=rtol, family=family, n_heads=n_heads, n_kv_heads=n_kv_heads, method=method
        )
        if reports and report.architecture != reports[0].architecture:
            raise UserError(
                f"{report.source} is a {report.architecture.family} of {report.architecture.n_layers} layers × "
                f"{report.architecture.n_heads} heads, unlike {reports[0].source}; a series compares checkpoints "
                "of one model"
            )
        reports.append(report)
        steps.append(None if isinstance(source, nn.Module) else checkpoint_step(source))
    return InspectSeries(reports, steps)


COMPARE_PRODUCTS = ("dqk", "dov", "dq", "dk", "dv", "do")


def compare(
    base: nn.Module | str | os.PathLike[str],
    tuned: nn.Module | str | os.PathLike[str],
    *,
    rtol: float = DEFAULT_RTOL,
) -> InspectReport:
    """Per-head spectra of what fine-tuning changed, from the factors of both models.

    Products (``product`` field): ``dqk`` = W_K'ᵀW_Q' − W_KᵀW_Q, ``dov`` = P'W_V' − PW_V (each the
    product of concatenated factors [A' | −A][B' | B]ᵀ, rank ≤ 2·d_head, never formed), and the
    per-head weight changes ``dq``, ``dk``, ``dv`` (ΔW^h, d_head × d_model) and ``do`` (ΔP^h).
    ``l2_half``/``gap``/``imbalance`` describe the concatenated factors and have no
    weight-decay meaning here; they are reported as null.
    """
    import torch

    from qkvlab.spectra import FactoredProduct

    if not (0.0 <= rtol < 1.0):
        raise UserError(f"rtol must be in [0, 1), got {rtol}")
    a_src, b_src = load_source(base), load_source(tuned)
    a, b = AttentionFactors(a_src), AttentionFactors(b_src)
    if a.info != b.info:
        raise UserError(f"the two models differ in architecture: {a.info} vs {b.info}")
    records: list[dict[str, Any]] = []
    for index in range(len(a)):
        la, lb = a.layer(index), b.layer(index)
        for name, (fa, fb) in (("dqk", (la.qk, lb.qk)), ("dov", (la.ov, lb.ov))):
            left = torch.cat([fb.left.double(), -fa.left.double()], dim=-1)
            right = torch.cat([fb.right.double(), fa.right.double()], dim=-1)
            product = FactoredProduct(left, right, fa.left_index, fa.right_index)
            scale = _scale(fa) + _scale(fb)
            records += _null_factor_fields(
                spectrum_records(la.layer, name, _clean(product.spectrum(), scale), rtol, la.attention)
            )
        # single weights: ΔW^h as the product ΔW^hᵀ · I (d_head columns): σ(ΔW^h) directly
        deltas = {
            "dq": (lb.qk.right - la.qk.right, None),
            "dk": (lb.qk.left - la.qk.left, la.qk.left_index),
            "dv": (lb.ov.right - la.ov.right, la.ov.right_index),
            "do": (lb.ov.left - la.ov.left, None),
        }
        for name, (delta, head_index) in deltas.items():
            d_head = delta.shape[-1]
            eye = torch.eye(d_head, dtype=torch.float64).expand(delta.shape[0], d_head, d_head)
            product = FactoredProduct(delta.double(), eye, head_index, head_index)
            scale = torch.linalg.matrix_norm(delta.double())
            scale = (scale if head_index is None else scale[head_index]) + 1e-300
            records += _null_factor_fields(
                spectrum_records(la.layer, name, _clean(product.spectrum(), scale), rtol, la.attention)
            )
    source = f"{a_src.name} -> {b_src.name}"
    order = {p: i for i, p in enumerate(COMPARE_PRODUCTS)}
    kinds = {k: i for i, k in enumerate(dict.fromkeys(r["attention"] for r in records))}
    records.sort(key=lambda r: (kinds[r["attention"]], r["layer"], order[r["product"]], r["head"]))
    return InspectReport(source, a.info, rtol, records)


def _scale(product: Any) -> Any:
    """‖A‖_F‖B‖_F per head: an upper bound on σ₁ of the product, the scale of its rounding noise."""
    import torch

    a = torch.linalg.matrix_norm(product.left.double())
    b = torch.linalg.matrix_norm(product.right.double())
    a = a if product.left_index is None else a[product.left_index]
    b = b if product.right_index is None else b[product.right_index]
    return a * b


def _clean(spectrum: ProductSpectrum, scale: Any) -> ProductSpectrum:
    """A difference of equal products is 0 up to float64 rounding: zero σ below 1e-12 × its scale."""
    sv = spectrum.singular_values.clone()
    sv[sv < 1e-12 * scale[:, None]] = 0.0
    return ProductSpectrum(sv, spectrum.l2_half, spectrum.imbalance)


def _null_factor_fields(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for rec in records:
        rec["l2_half"] = rec["gap"] = rec["imbalance"] = None
    return records


def group_summary(report: InspectReport) -> list[dict[str, Any]]:
    """Per layer (and kind of attention), what weight decay bounds under grouped-query attention and rotary
    embeddings: ``{qk|ov}_group_erank_mean``, ``{qk|ov}_group_gap_rel`` (Σ gap / Σ ‖·‖_* over the KV
    groups' products) and ``qk_plane_imbalance`` (the mean over planes and groups of
    |Σ_h‖Q^(p)‖² − ‖K^(p)‖²| / (Σ_h‖Q^(p)‖² + ‖K^(p)‖²)). Empty when the report holds neither."""
    kinds = report.attention_kinds()  # model order; every group and plane record's kind is among them
    keys = sorted(
        {(r.get("attention", "self"), r["layer"]) for r in [*report.groups, *report.rope_planes]},
        key=lambda k: (kinds.index(k[0]), k[1]),
    )
    rows = []
    for kind, layer in keys:
        row: dict[str, Any] = {"attention": kind, "layer": layer}
        for product in PRODUCTS:
            group = [
                r
                for r in report.groups
                if r.get("attention", "self") == kind and r["layer"] == layer and r["product"] == product
            ]
            finite = [r for r in group if r["effective_rank"] is not None]
            if finite:
                row[f"{product}_group_erank_mean"] = statistics.fmean(r["effective_rank"] for r in finite)
                row[f"{product}_group_gap_rel"] = sum(r["gap"] for r in finite) / sum(
                    r["nuclear_norm"] for r in finite
                )
        planes = [r for r in report.rope_planes if r.get("attention", "self") == kind and r["layer"] == layer]
        if planes:
            row["qk_plane_imbalance"] = statistics.fmean(
                abs(r["imbalance"]) / (r["query"] + r["key"]) for r in planes
            )
        rows.append(row)
    return rows


def summary_metrics(report: InspectReport) -> dict[str, float]:
    """Flat per-layer summaries named as TensorBoard tags (the HF callback and ``qkvlab train`` use these).

    ``spectra/L{layer}/{qk|ov}_{stat}`` for every stat of :data:`SUMMARY_STATS` (means over heads,
    and the minimum effective rank), and model-wide ``spectra/{qk|ov}_erank_mean``; under grouped-query
    attention or rotary embeddings also :func:`group_summary`'s per-layer figures.
    """
    metrics: dict[str, float] = {}
    rows = report.layer_summary()
    for row in rows:
        kind = row.get("attention", "self")
        where = f"spectra/L{row['layer']}" if kind == "self" else f"spectra/{kind}/L{row['layer']}"
        for product in PRODUCTS:
            for stat in SUMMARY_STATS:
                if f"{product}_{stat}" in row:
                    metrics[f"{where}/{product}_{stat}"] = float(row[f"{product}_{stat}"])
            if row.get(f"{product}_nonfinite_heads"):  # the tag appears only when there is something to flag
                metrics[f"{where}/{product}_nonfinite_heads"] = float(row[f"{product}_nonfinite_heads"])
    for product in PRODUCTS:
        values = [r[f"{product}_erank_mean"] for r in rows if f"{product}_erank_mean" in r]
        if values:
            metrics[f"spectra/{product}_erank_mean"] = sum(values) / len(values)
    for row in group_summary(report):
        kind = row["attention"]
        where = f"spectra/L{row['layer']}" if kind == "self" else f"spectra/{kind}/L{row['layer']}"
        for key, value in row.items():
            if key not in ("attention", "layer"):
                metrics[f"{where}/{key}"] = float(value)
    return metrics
