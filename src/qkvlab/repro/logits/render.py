"""Figures of ``qkvlab repro logits``: the largest logit over training per cell, and every head's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_logits"]


def plot_logits(summary: dict[str, Any], folder: Path, tau: float, lr: float) -> list[Path]:
    """``largest_logit_over_training.png`` (per optimiser: each cell's largest logit of any head per 10
    steps, mean ± std over seeds, τ dotted) and ``logits_per_head.png`` (every head of every layer, one
    seed, a panel per cell). ``tau`` and ``lr`` are the grid's, from ``claim.grid_rate``."""
    from qkvlab.report.figures import pyplot, save

    cells = [c for c in summary["cells"] if c.get("trajectory")]
    if not cells:
        return []
    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    optimizers = list(dict.fromkeys(c["optimizer"] for c in cells))
    budgets = sorted({c["budget"] for c in cells})
    posthoc = f" (post hoc: lr {lr:g})" if summary.get("posthoc") else ""
    colours = {b: f"C{i}" for i, b in enumerate(budgets)}
    written = []

    fig, axes = plt.subplots(1, len(optimizers), figsize=(6 * len(optimizers), 4), squeeze=False)
    for ax, optimizer in zip(axes[0], optimizers, strict=True):
        for c in (c for c in cells if c["optimizer"] == optimizer):
            t = c["trajectory"]
            style = "--" if c["clip"] else "-"
            label = f"Σηλ={c['budget']:g}, " + (f"clip τ={c['clip']:g}" if c["clip"] else "no clip")
            ax.plot(t["steps"], t["mean"], style, color=colours[c["budget"]], label=label)
            low = [m - s for m, s in zip(t["mean"], t["std"], strict=True)]
            high = [m + s for m, s in zip(t["mean"], t["std"], strict=True)]
            ax.fill_between(t["steps"], low, high, color=colours[c["budget"]], alpha=0.12)
        ax.axhline(tau, color="grey", ls=":", lw=1, label=f"τ = {tau:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("largest logit of any head (q·k/√d_head)")
        ax.set_title(f"{optimizer}: mean ± std over seeds" + posthoc)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    written.append(save(fig, folder / "largest_logit_over_training.png"))

    rows = [(o, clip) for o in optimizers for clip in (False, True)]
    fig, axes = plt.subplots(
        len(rows), len(budgets), figsize=(4 * len(budgets), 2.8 * len(rows)), squeeze=False, sharey=True
    )
    for i, (optimizer, clipped) in enumerate(rows):
        for j, budget in enumerate(budgets):
            ax = axes[i][j]
            cell = next(
                (
                    c
                    for c in cells
                    if c["optimizer"] == optimizer and c["budget"] == budget and bool(c["clip"]) == clipped
                ),
                None,
            )
            title = f"{optimizer}, Σηλ={budget:g}, " + ("clip" if clipped else "no clip")
            if cell is None:
                ax.set_title(f"{title}: not run", fontsize=8)
                continue
            heads = cell["per_head"]
            layers = len(heads["max"][0])
            for layer in range(layers):
                for head in range(len(heads["max"][0][layer])):
                    ax.plot(
                        heads["steps"],
                        [firing[layer][head] for firing in heads["max"]],
                        color=f"C{layer}",
                        lw=0.8,
                        alpha=0.8,
                        label=f"layer {layer}" if head == 0 else None,
                    )
            if clipped:
                ax.axhline(tau, color="grey", ls=":", lw=1)
            ax.set_title(f"{title} (seed {heads['seed']})", fontsize=8)
            ax.grid(alpha=0.3)
            ax.set_xlabel("step", fontsize=7)
            ax.set_ylabel("largest logit per head", fontsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    written.append(save(fig, folder / "logits_per_head.png"))
    return written
