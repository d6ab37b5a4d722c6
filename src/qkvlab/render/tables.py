"""Plain-text tables for the terminal."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned columns; floats with 2 decimals (3 significant digits when < 1)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def markdown_table(headers: Sequence[object], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table: ``| h1 | h2 |``, ``|---|---|``, then ``| c1 | c2 |`` per row.

    Cells are written as ``str(cell)``, unescaped: callers with text from outside qkvlab (file names)
    escape it first (:func:`qkvlab.render.page.table_markdown` does).
    """
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def pm(stats: dict[str, float] | None, digits: int = 4, scale: float = 1.0) -> str:
    """``mean ± std`` of a :func:`qkvlab.grid.runner.mean_std` result; "—" for none.

    A single value has no spread, so it prints as the bare mean rather than a misleading "± 0".
    """
    if not stats:
        return "—"
    if stats.get("n") == 1:
        return f"{stats['mean'] * scale:.{digits}f}"
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def diff_text(stats: dict | None, digits: int = 2) -> str:
    """A seed-paired difference (:func:`qkvlab.grid.runner.paired`) as "+m ± s (wins/n > 0)"; "—" for none."""
    if not stats:
        return "—"
    mean = stats["mean"] if round(stats["mean"], digits) != 0 else 0.0  # no "-0.0000"
    spread = f" ± {stats['std']:.{digits}f}" if stats["n"] > 1 else ""  # one seed has no spread
    return f"{mean:+.{digits}f}{spread} ({stats['wins']}/{stats['n']} > 0)"


def sweep_table(points: Sequence[dict]) -> str:
    """One row per sweep grid point: its settings, seeds, final train loss and val metrics (mean ± std)."""
    if not points:
        return "no complete runs yet"
    metrics = sorted({k for p in points for k in p if k == "train_loss" or k.startswith("val_")})
    headers = ["point", "seeds", *metrics]
    rows = [
        [
            ",".join(f"{k}={v}" for k, v in p["point"].items()),
            len(p["seeds"]),
            *(pm(p.get(m)) for m in metrics),
        ]
        for p in points
    ]
    return format_table(headers, rows)


INSPECT_LEGEND = (
    "erank: Roy–Vetterli effective rank (mean, min over heads); rank: mean #σᵢ > rtol·σ₁; "
    "gap: mean ½(‖A‖²+‖B‖²) − ‖ABᵀ‖_*"
)


def inspect_rows(report: object) -> tuple[list[str], list[list[object]]]:
    """Headers and rows of an :class:`qkvlab.InspectReport`'s per-layer summary."""
    headers = ["layer", "QK erank", "QK min", "QK rank", "QK gap", "OV erank", "OV min", "OV rank", "OV gap"]
    fields = ["erank_mean", "erank_min", "rank_mean", "gap_mean"]
    rows = [
        [row["layer"], *(row[f"qk_{f}"] for f in fields), *(row[f"ov_{f}"] for f in fields)]
        for row in report.layer_summary()  # type: ignore[attr-defined]
    ]
    return headers, rows


GROUP_LEGEND = (
    "group gap: Σ gap / Σ ‖·‖_* of the KV groups' products (the heads of a group side by side for QK, stacked "
    "for OV), what weight decay bounds under GQA; plane imbalance: mean |Σ_h‖Q^(p)‖² − ‖K^(p)‖²| / sum per "
    "rotary plane (0 = balanced); docs/spectra.md"
)

#: How the terminal and the report name each kind of attention.
ATTENTION_TITLES = {
    "self": "self-attention",
    "decoder_self": "decoder self-attention",
    "cross": "cross-attention (decoder queries, encoder keys and values)",
}


def inspect_text(report: object) -> str:
    """What ``qkvlab inspect`` prints: one line on the model, the per-layer table, the legend. With
    several kinds of attention (T5): one table per kind."""
    kinds = report.attention_kinds()  # type: ignore[attr-defined]
    if len(kinds) > 1:
        arch = report.architecture  # type: ignore[attr-defined]
        lines = [
            f"{report.source}: {arch.family}, "  # type: ignore[attr-defined]
            + ", ".join(
                f"{n} {'encoder self-attention' if k == 'self' else ATTENTION_TITLES.get(k, k).split(' (')[0]} layers"
                for k, n in arch.attention_layers.items()
            )
            + f"; {arch.n_heads} heads, d_model={arch.d_model}, d_head={arch.d_head}, rank rtol={report.rtol:g}"  # type: ignore[attr-defined]
        ]
        for kind in kinds:
            sub = report.for_attention(kind)  # type: ignore[attr-defined]
            body = inspect_text(dataclasses.replace(sub, notes=[])).splitlines()
            title = "encoder self-attention" if kind == "self" else ATTENTION_TITLES.get(kind, kind)
            lines += ["", f"{title}:", *[x for x in body[1:] if x != INSPECT_LEGEND]]
        lines += [INSPECT_LEGEND, *(f"note: {n}" for n in report.notes)]  # type: ignore[attr-defined]
        return "\n".join(lines)
    arch = report.architecture  # type: ignore[attr-defined]
    head = (
        f"{report.source}: {arch.family}, {arch.n_layers} layers, {arch.n_heads} heads "  # type: ignore[attr-defined]
        f"({arch.n_kv_heads} KV), d_model={arch.d_model}, d_head={arch.d_head}, "
        f"rank rtol={report.rtol:g}"  # type: ignore[attr-defined]
    )
    lines = [head, format_table(*inspect_rows(report)), INSPECT_LEGEND]
    bad = [
        f"layer {r['layer']} {p.upper()} heads "
        + ",".join(str(h["head"]) for h in report.select(p, r["layer"]) if h["effective_rank"] is None)  # type: ignore[attr-defined]
        for r in report.layer_summary()  # type: ignore[attr-defined]
        for p in ("qk", "ov")
        if r.get(f"{p}_nonfinite_heads")
    ]
    if bad:
        lines.append("WARNING: non-finite weights (left out of the statistics above): " + "; ".join(bad))
    grouped = report.group_summary() if hasattr(report, "group_summary") else []
    if grouped:  # what weight decay bounds under grouped-query attention and rotary embeddings
        columns = [
            ("qk_group_gap_rel", "QK group gap/‖·‖_*"),
            ("ov_group_gap_rel", "OV group gap/‖·‖_*"),
            ("qk_plane_imbalance", "QK plane imbalance"),
        ]
        shown = [c for c in columns if any(c[0] in row for row in grouped)]
        rows = [[row["layer"], *(f"{row[k]:.2%}" if k in row else "—" for k, _ in shown)] for row in grouped]
        lines += ["", format_table(["layer", *(t for _, t in shown)], rows), GROUP_LEGEND]
    lines += [f"note: {n}" for n in getattr(report, "notes", [])]
    return "\n".join(lines)


def series_text(series: object) -> str:
    """What ``qkvlab inspect SRC1 SRC2 …`` prints: one row per checkpoint, in order."""
    rows_in = series.rows()  # type: ignore[attr-defined]
    arch = series.reports[0].architecture  # type: ignore[attr-defined]
    headers = [
        "step",
        "source",
        "QK erank",
        "QK min",
        "QK rank",
        "QK gap",
        "OV erank",
        "OV min",
        "OV rank",
        "OV gap",
    ]
    fields = ["erank_mean", "erank_min", "rank_mean", "gap_mean"]
    rows = [
        [
            "?" if r["step"] is None else r["step"],
            r["source"],
            *(r[f"qk_{f}"] for f in fields),
            *(r[f"ov_{f}"] for f in fields),
        ]
        for r in rows_in
    ]
    lines = [
        f"{len(rows)} checkpoints: {arch.family}, {arch.n_layers} layers, {arch.n_heads} heads "
        f"({arch.n_kv_heads} KV), d_head={arch.d_head}; over every head of every layer",
        format_table(headers, rows),
        INSPECT_LEGEND,
    ]
    bad = [
        f"{r['source']}: {r['qk_nonfinite_heads'] + r['ov_nonfinite_heads']} heads"
        for r in rows_in
        if r["qk_nonfinite_heads"] or r["ov_nonfinite_heads"]
    ]
    if bad:
        lines.append("WARNING: non-finite weights (left out of the statistics above): " + "; ".join(bad))
    notes = dict.fromkeys(n for rep in series.reports for n in rep.notes)  # type: ignore[attr-defined]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def compare_text(report: object) -> str:
    """What ``qkvlab inspect --compare`` prints: per layer, mean over heads of ‖Δ‖_* and rank (one
    table per kind of attention for T5)."""
    import statistics

    kinds = report.attention_kinds()  # type: ignore[attr-defined]
    if len(kinds) > 1:
        parts = []
        for kind in kinds:
            title = "encoder self-attention" if kind == "self" else ATTENTION_TITLES.get(kind, kind)
            parts += [f"{title}:", compare_text(report.for_attention(kind))]  # type: ignore[attr-defined]
        return "\n".join(parts)

    products = [p for p in ("dqk", "dov", "dq", "dk", "dv", "do") if p in report.products()]  # type: ignore[attr-defined]
    arch = report.architecture  # type: ignore[attr-defined]
    rows = []
    for layer in range(arch.n_layers):
        row: list[object] = [layer]
        for product in products:
            recs = report.select(product, layer)  # type: ignore[attr-defined]
            row += [
                statistics.fmean(r["nuclear_norm"] for r in recs),
                statistics.fmean(r["rank"] for r in recs),
            ]
        rows.append(row)
    headers = ["layer"] + [f"{p} {m}" for p in products for m in ("‖·‖_*", "rank")]
    return "\n".join(
        [
            f"{report.source}: {arch.family}, {arch.n_layers} layers, {arch.n_heads} heads; what fine-tuning changed",  # type: ignore[attr-defined]
            format_table(headers, rows),
            "mean over heads; dqk = ΔW_KᵀW_Q, dov = Δ(P·W_V) (rank ≤ 2·d_head), dq/dk/dv/do = per-head ΔW; "
            f"rank: #σᵢ > {report.rtol:g}·σ₁",  # type: ignore[attr-defined]
        ]
    )


def finetune_text(result: dict) -> str:
    """What ``qkvlab finetune`` prints about a finished run (``result.json``'s numbers)."""
    config, metric = result["config"], result["main_metric"]
    return "\n".join(
        [
            str(result["data"]),
            f"{config['method']} {','.join(config['targets'])} λ={config['lr_ratio']:g}: "
            f"{result['trainable_parameters']:,} of {result['total_parameters']:,} parameters trained; "
            f"{result['seconds_per_step'] * 1e3:.0f} ms/step; peak RSS {result['peak_rss_gib']:.2f} GiB",
            f"val {metric}: best {result['best_val']:.4f}, final {result['final_val']:.4f}, 95% of best at step "
            f"{result['steps_to_95pct_of_best']}; test: "
            + ", ".join(f"{k} {v:.4f}" for k, v in result["test"].items()),
        ]
    )
