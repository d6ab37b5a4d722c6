"""Plots of an ``InspectReport``: effective-rank heatmaps and singular-value curves."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np

from qkvlab.inspection import PRODUCTS, InspectReport, InspectSeries
from qkvlab.report.figures import pyplot, save

_TITLES = {
    "qk": "QK = W_Kᵀ W_Q",
    "ov": "OV = P W_V",
    "dqk": "ΔQK = Δ(W_Kᵀ W_Q)",
    "dov": "ΔOV = Δ(P W_V)",
    "dq": "ΔW_Q",
    "dk": "ΔW_K",
    "dv": "ΔW_V",
    "do": "ΔW_O",
}


def _integer_ticks(ax) -> None:  # type: ignore[no-untyped-def]
    """Heads and layers are whole numbers: no 0.5 ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def effective_rank_heatmap(report: InspectReport, path: Path) -> Path:
    """Layer × head heatmap of the effective rank, one panel per product, shared colour scale."""
    plt = pyplot()
    arch = report.architecture
    grids = {}
    for product in PRODUCTS:
        grid = np.zeros((arch.n_layers, arch.n_heads))
        for rec in report.select(product):
            grid[rec["layer"], rec["head"]] = rec["effective_rank"]
        grids[product] = grid
    width = min(4 + 0.35 * arch.n_heads, 20)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, 1.5 + 0.35 * arch.n_layers), squeeze=False)
    for ax, product in zip(axes[0], PRODUCTS, strict=True):
        image = ax.imshow(grids[product], vmin=0, vmax=arch.d_head, cmap="viridis", aspect="auto")
        ax.set_title(f"effective rank of {_TITLES[product]} (max {arch.d_head})")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        _integer_ticks(ax)
        fig.colorbar(image, ax=ax, label="effective rank")
    fig.suptitle(f"{report.source} ({arch.family})")
    return save(fig, path, dpi=120)


def singular_value_curves(report: InspectReport, product: str, path: Path) -> Path:
    """One panel per layer, one curve per head: σᵢ/σ₁ on a log scale against index i."""
    plt = pyplot()
    arch = report.architecture
    cols = min(4, arch.n_layers)
    rows = math.ceil(arch.n_layers / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False, sharey=True, layout="constrained"
    )
    colours = plt.cm.viridis(np.linspace(0, 1, arch.n_heads))
    for layer in range(arch.n_layers):
        ax = axes[layer // cols][layer % cols]
        for rec in report.select(product, layer):
            sv = np.asarray(rec["singular_values"])
            if sv[0] > 0:
                ax.semilogy(
                    np.arange(1, len(sv) + 1), np.maximum(sv / sv[0], 1e-12), color=colours[rec["head"]]
                )
        ax.axhline(report.rtol, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("index i")
        ax.set_ylabel("σᵢ / σ₁")
    for extra in range(arch.n_layers, rows * cols):
        axes[extra // cols][extra % cols].axis("off")
    fig.suptitle(f"singular values of {_TITLES.get(product, product)}, per head (dotted: rtol)")
    # Heads are told apart by colour: a colour bar over the head index is the legend.
    heads = plt.cm.ScalarMappable(norm=plt.Normalize(-0.5, arch.n_heads - 0.5), cmap="viridis")
    bar = fig.colorbar(heads, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    bar.set_label("head")
    if arch.n_heads <= 16:
        bar.set_ticks(range(arch.n_heads))
    return save(fig, path)


def plot_report(report: InspectReport, folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = report.attention_kinds()
    if len(kinds) > 1:  # T5: each kind of attention in its own subfolder
        return [p for kind in kinds for p in plot_report(report.for_attention(kind), folder / kind)]
    paths = [effective_rank_heatmap(report, folder / "effective_rank_heatmap.png")]
    paths += [singular_value_curves(report, p, folder / f"singular_values_{p}.png") for p in PRODUCTS]
    return paths


def change_heatmap(report: InspectReport, path: Path) -> Path:
    """A compare report: layer × head heatmap of ‖Δ‖_* for ΔQK and ΔOV (what fine-tuning changed where)."""
    plt = pyplot()
    arch = report.architecture
    products = [p for p in ("dqk", "dov") if p in report.products()]
    width = min(4 + 0.35 * arch.n_heads, 20)
    fig, axes = plt.subplots(
        1, len(products), figsize=(len(products) * width, 1.5 + 0.35 * arch.n_layers), squeeze=False
    )
    for ax, product in zip(axes[0], products, strict=True):
        grid = np.zeros((arch.n_layers, arch.n_heads))
        for rec in report.select(product):
            grid[rec["layer"], rec["head"]] = rec["nuclear_norm"]
        image = ax.imshow(grid, vmin=0, vmax=max(float(grid.max()), 1e-12), cmap="magma", aspect="auto")
        if grid.max() == 0:
            ax.text(0.5, 0.5, "no change in any head", transform=ax.transAxes, ha="center", color="white")
        ax.set_title(f"nuclear norm of {_TITLES[product]}")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        _integer_ticks(ax)
        fig.colorbar(image, ax=ax, label="‖Δ‖_* (weight units)")
    fig.suptitle("\n".join(textwrap.wrap(f"{report.source}: what fine-tuning changed, per head", 100)))
    return save(fig, path, dpi=120)


def plot_compare(report: InspectReport, folder: str | Path) -> list[Path]:
    kinds = report.attention_kinds()
    if len(kinds) > 1:
        return [p for kind in kinds for p in plot_compare(report.for_attention(kind), Path(folder) / kind)]
    return _plot_compare_one(report, folder)


def _plot_compare_one(report: InspectReport, folder: str | Path) -> list[Path]:
    """``inspect --compare --plot``: the ‖Δ‖_* heatmap and the singular values of ΔQK and ΔOV per head
    (of those that changed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [change_heatmap(report, folder / "change_heatmap.png")]
    paths += [
        singular_value_curves(report, p, folder / f"singular_values_{p}.png")
        for p in ("dqk", "dov")
        if p in report.products() and any(r["singular_values"][0] > 0 for r in report.select(p))
    ]  # a product that did not change at all has no spectrum to draw (the heatmap says so)
    return paths


SERIES_METRICS = (
    ("effective_rank", "effective rank"),
    ("rank", "rank at rtol"),
    ("gap", "gap ½(‖A‖²+‖B‖²) − ‖ABᵀ‖_*"),
)


def _head_values(report: InspectReport, product: str, metric: str, layer: int | None = None) -> list[float]:
    return [r[metric] for r in report.select(product, layer) if r[metric] is not None]


def series_figure(series: InspectSeries, path: Path) -> Path:
    """Effective rank, rank at rtol and gap against the step, per product: the mean over every head of every
    layer, with the range over heads shaded, and each layer's mean as a thin line."""
    plt = pyplot()
    x, xlabel = series.x()
    layers = series.reports[0].architecture.n_layers
    colours = plt.get_cmap("viridis")
    fig, axes = plt.subplots(len(SERIES_METRICS), 2, figsize=(11, 10), sharex=True)
    for col, product in enumerate(PRODUCTS):
        for row, (metric, label) in enumerate(SERIES_METRICS):
            ax = axes[row][col]
            values = [_head_values(rep, product, metric) for rep in series.reports]
            means = [float(np.mean(v)) if v else float("nan") for v in values]
            low = [min(v) if v else float("nan") for v in values]
            high = [max(v) if v else float("nan") for v in values]
            ax.fill_between(x, low, high, color="0.85", label="range over heads")
            for layer in range(layers if len(series.reports[0].attention_kinds()) == 1 else 0):
                per_layer = [
                    float(np.mean(_head_values(rep, product, metric, layer) or [np.nan]))
                    for rep in series.reports
                ]
                ax.plot(
                    x, per_layer, lw=0.8, color=colours(layer / max(layers - 1, 1)), label=f"layer {layer}"
                )
            ax.plot(x, means, "o-", color="black", lw=2, label="mean over heads and layers")
            _series_axes(ax, product, metric, label, x, xlabel if row == len(SERIES_METRICS) - 1 else None)
            if metric == "rank":
                ax.set_title(f"{_TITLES[product]}: rank (#σᵢ > {series.reports[0].rtol:g}·σ₁)")
            ax.legend(fontsize=7, ncol=2)
    try:
        common = os.path.commonpath([r.source for r in series.reports])
    except ValueError:  # packaged names and paths mixed
        common = ""
    fig.suptitle(f"{len(series.reports)} checkpoints of {common or 'one model'}", fontsize=10)
    return save(fig, path)


def _series_axes(ax, product: str, metric: str, label: str, x: list[float], xlabel: str | None) -> None:  # type: ignore[no-untyped-def]
    ax.set_title(f"{_TITLES[product]}: {label}")
    ax.set_ylabel("gap" if metric == "gap" else f"{label} (dimensions)")
    if xlabel:
        ax.set_xlabel(xlabel)
    if x and min(x) > 0 and max(x) / min(x) > 100:  # Pythia-style steps: 1, 2, 4, …, 143000
        ax.set_xscale("log")


def series_overlay_figure(runs: list[tuple[str, InspectSeries]], path: Path) -> Path:
    """Several runs' series on shared axes: per product, effective rank, rank at rtol and gap against the
    step, each run's mean over every head of every layer as one line, the range over its heads shaded."""
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "viridis")
    fig, axes = plt.subplots(len(SERIES_METRICS), 2, figsize=(11, 10), sharex=True)
    xlabels = set()
    for index, (name, series) in enumerate(runs):
        x, xlabel = series.x()
        xlabels.add(xlabel)
        colour = cmap(index % 10) if len(runs) <= 10 else cmap(index / max(len(runs) - 1, 1))
        for col, product in enumerate(PRODUCTS):
            for row, (metric, _) in enumerate(SERIES_METRICS):
                values = [_head_values(rep, product, metric) for rep in series.reports]
                ax = axes[row][col]
                ax.fill_between(
                    x,
                    [min(v) if v else np.nan for v in values],
                    [max(v) if v else np.nan for v in values],
                    color=colour,
                    alpha=0.12,
                )
                ax.plot(
                    x, [np.mean(v) if v else np.nan for v in values], "o-", ms=3, color=colour, label=name
                )
    xlabel = xlabels.pop() if len(xlabels) == 1 else "step (or checkpoint position)"
    for col, product in enumerate(PRODUCTS):
        for row, (metric, label) in enumerate(SERIES_METRICS):
            ax = axes[row][col]
            all_x = [float(v) for _, s in runs for v in s.x()[0]]
            _series_axes(
                ax, product, metric, label, all_x, xlabel if row == len(SERIES_METRICS) - 1 else None
            )
            ax.legend(fontsize=7)
    fig.suptitle(
        f"{len(runs)} runs overlaid: mean over every head (line) and range over heads (band)", fontsize=10
    )
    return save(fig, path)


def plot_series(series: InspectSeries, folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [series_figure(series, folder / "rank_and_gap_over_checkpoints.png")]
