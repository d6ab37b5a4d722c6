"""Tables (Markdown, as ``qkvlab repro optimizer-rank`` prints them) and figures of the optimiser × rank study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkvlab.conventions import PRODUCT_NAMES
from qkvlab.render.tables import diff_text, markdown_table, pm

__all__ = ["plot_optimizer_rank", "tables"]


def _row_head(c: dict[str, Any]) -> list[str]:
    """The first four cells of a cell's row: variant, Σηλ, λ, seeds."""
    seeds = f"{len(c['seeds'])}" + (f" (+{len(c['stopped'])} stopped)" if c["stopped"] else "")
    return [c["variant"], f"{c['budget']:g}", f"{c['lambda']:.3g}", seeds]


def _selection_table(selection: dict[str, Any]) -> list[str]:
    lines = [
        "Learning rate of each update rule: final validation loss at Σηλ = 0 on the selection seed "
        "(a grid of ½, 1, 2 × the setting's lr, extended past an edge winner at most twice); "
        "AdamW, Adam + L2 and corrected AdamW share Adam's, Muon and corrected Muon share Muon's.",
        "",
    ]
    rows = []
    for rule, s in selection.items():
        # A task solved at every lr (associative recall) has losses of 1e-8: shown, not rounded to 0.0000.
        losses = ", ".join(
            f"{lr}: {loss:.4f}" if loss >= 1e-3 else f"{lr}: {loss:.1e}" for lr, loss in s["losses"].items()
        )
        edge = " (at the grid's edge)" if s["at_edge"] else ""
        rows.append([rule, losses, f"{s['chosen']:g}{edge}"])
    return lines + markdown_table(["rule", "val loss per lr", "chosen"], rows)


SWITCHED_OFF = 0.01
"""A product whose mean nuclear norm ends below this fraction of its value at initialisation is switched off."""


def switched_off(cell: dict[str, Any], product: str) -> bool:
    """Whether ``product`` ("qk" or "ov") of a summary cell ended numerically zero (see SWITCHED_OFF)."""
    init = (cell.get("init") or {}).get(f"{product}_nuclear_norm")
    final = cell["measures"].get(f"{product}_nuclear_norm")
    return bool(init and final and final["mean"] < SWITCHED_OFF * init["mean"])


def _minutes(cell: dict[str, Any], devices: list[str]) -> str:
    """Wall-clock minutes of a cell: one mean ± std when every run of the table had one device, else per
    device (the run on an H200 and the one on a laptop CPU are not two samples of one quantity)."""
    by_device = cell.get("minutes_by_device")
    if len(devices) <= 1 or not by_device:
        return pm(cell["measures"].get("wall_minutes"), 1)
    return ", ".join(f"{pm(v, 1)} ({d})" for d, v in by_device.items())


def tables(summary: dict[str, Any]) -> str:
    """Every table of a summary: selection, ranks and loss, norms, factors, and the paired differences."""
    if not summary.get("selection"):
        return ""
    lines = _selection_table(summary["selection"])
    # At Σηλ = 0 the Adam rules are one run, and so are the Muon ones: each shown once.
    cells = [c for c in summary["cells"] if c["budget"] > 0 or c["variant"] == c["rule"]]
    if not cells:
        return "\n".join(lines)
    accuracy = any("val_accuracy" in c["measures"] for c in cells)
    devices = sorted({d for c in cells for d in c["devices"]})
    m = lambda c, name, digits=2, scale=1.0: pm(c["measures"].get(name), digits, scale)  # noqa: E731
    lines += [
        "",
        "Final weights, mean over every head of every layer (erank: effective rank; rank: #σᵢ > 10⁻³·σ₁; "
        "min: the smallest head's erank), mean ± std over seeds; Σηλ on q, k, v, o only; λ the attention "
        f"weight decay that gives it; minutes of wall-clock on {', '.join(devices)} (shared machines; "
        "with runs on more than one device, per device: a mean across devices would mean nothing).",
        "",
    ]
    headers = [
        "variant",
        "Σηλ",
        "λ",
        "seeds",
        "val loss",
        *(["val accuracy (%)"] if accuracy else []),
        "QK erank",
        "QK min",
        "QK rank",
        "OV erank",
        "OV min",
        "OV rank",
        "minutes",
    ]
    rows = []
    init = next((c["init"] for c in cells if c.get("init")), None)
    if init:
        rows.append(
            [
                "init",
                "—",
                "—",
                "—",
                "—",
                *(["—"] if accuracy else []),
                pm(init["qk_effective_rank"], 2),
                "—",
                "—",
                pm(init["ov_effective_rank"], 2),
                "—",
                "—",
                "—",
            ]
        )
    marked = False
    for c in cells:
        cols = []
        for p in ("qk", "ov"):
            dead = switched_off(c, p)
            marked |= dead
            cols += [
                m(c, name, digits) + (" †" if dead else "")
                for name, digits in (
                    (f"{p}_effective_rank", 2),
                    (f"{p}_effective_rank_min", 2),
                    (f"{p}_rank", 1),
                )
            ]
        cols[3] = " " + cols[3]  # as printed so far: two spaces before the OV erank
        rows.append(
            [
                *_row_head(c),
                m(c, "val_loss", 4),
                *([m(c, "val_accuracy", 1, 100)] if accuracy else []),
                *cols,
                _minutes(c, devices),
            ]
        )
    lines += markdown_table(headers, rows)
    if marked:
        lines += [
            "",
            f"† the product's nuclear norm is below {SWITCHED_OFF:.0%} of its value at initialisation: that "
            "path of attention is switched off, and its ranks are those of numerical noise.",
        ]
    lines += [
        "",
        "Norms of the products (mean over heads): nuclear ‖·‖_*, spectral ‖·‖₂, and the gap "
        "½(‖A‖²_F + ‖B‖²_F) − ‖ABᵀ‖_* between the factors' Frobenius cost and the nuclear norm.",
        "",
    ]
    lines += markdown_table(
        ["variant", "Σηλ", "λ", "seeds", "QK ‖·‖_*", "QK ‖·‖₂", "QK gap", "OV ‖·‖_*", "OV ‖·‖₂", "OV gap"],
        [
            [
                *_row_head(c),
                *(
                    cell
                    for p in ("qk", "ov")
                    for cell in (
                        # as printed so far: two spaces before the OV ‖·‖_*
                        (" " if p == "ov" else "") + m(c, f"{p}_nuclear_norm", 3),
                        m(c, f"{p}_spectral_norm", 3),
                        m(c, f"{p}_gap", 3),
                    )
                ),
            ]
            for c in cells
        ],
    )
    lines += [
        "",
        "Spectral norms of the factors (what Muon's decay bounds): the whole matrix / a head's slice "
        "(d_head rows of W_Q, W_K, W_V; d_head columns of W_O), and the largest head's over the smallest "
        "head's (×), means over layers.",
        "",
    ]
    lines += markdown_table(
        ["variant", "Σηλ", "λ", "seeds", "W_Q", "W_K", "W_V", "W_O"],
        [
            [
                *_row_head(c),
                # as printed so far: two spaces before W_K's, W_V's and W_O's cells
                *(
                    ("" if r == "q" else " ")
                    + f"{m(c, f'{r}_matrix_norm', 3)} / {m(c, f'{r}_head_norm', 3)} ({m(c, f'{r}_head_spread', 2)}×)"
                    for r in ("q", "k", "v", "o")
                ),
            ]
            for c in cells
        ],
    )
    for key, title in (
        ("vs_budget0", "Seed-paired differences from the same variant at Σηλ = 0: what its decay does."),
        ("vs_adamw", "Seed-paired differences from AdamW at the same Σηλ: what the update rule changes."),
    ):
        # A rank difference involving a switched-off path is a difference of numerical noise: marked †.
        dagger = lambda c, p: " †" if switched_off(c, p) else ""  # noqa: E731
        diffs = [
            [
                c["variant"],
                f"{c['budget']:g}",
                diff_text(c[key]["val_loss"], 4),
                diff_text(c[key]["qk_effective_rank"]) + dagger(c, "qk"),
                diff_text(c[key]["ov_effective_rank"]) + dagger(c, "ov"),
            ]
            for c in cells
            if c[key]["val_loss"]
            and not (c["budget"] == 0 if key == "vs_budget0" else c["variant"] == "adamw")
        ]
        if diffs:
            lines += ["", title, ""]
            lines += markdown_table(["variant", "Σηλ", "Δ val loss", "Δ QK erank", "Δ OV erank"], diffs)
    return "\n".join(lines)


def _by_variant(cells: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        if c["seeds"]:
            out.setdefault(c["variant"], []).append(c)
    return out


def _budget_axis(ax: Any, budgets: list[float]) -> None:
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.set_xlabel("Σₜ η_t λ_t on q, k, v, o")
    ax.grid(alpha=0.3)


def plot_optimizer_rank(summary: dict[str, Any], folder: Path) -> list[Path]:
    """Rank and loss against the decay budget per variant, rank over training per budget, factor norms."""
    from qkvlab.report.figures import pyplot, save

    variants = _by_variant(summary["cells"])
    if not variants:
        return []
    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    budgets = sorted({c["budget"] for cs in variants.values() for c in cs})
    seeds = max(len(c["seeds"]) for cs in variants.values() for c in cs)
    setting = summary["setting"]
    written = []

    def series(ax: Any, name: str, product: str | None = None) -> None:
        """One line per variant; with ``product``, its switched-off points (ranks of noise) drawn hollow
        and off the line."""
        for variant, cs in variants.items():
            dead = [product is not None and switched_off(c, product) for c in cs]
            live = [c for c, d in zip(cs, dead, strict=True) if not d]
            stats = [c["measures"][name] for c in live]
            line = ax.errorbar(
                [c["budget"] for c in live],
                [s["mean"] for s in stats],
                yerr=[s["std"] for s in stats],
                marker="o",
                ms=4,
                capsize=3,
                label=variant,
            )
            off = [c for c, d in zip(cs, dead, strict=True) if d]
            if off:
                ax.plot(
                    [c["budget"] for c in off],
                    [c["measures"][name]["mean"] for c in off],
                    ls="none",
                    marker="o",
                    ms=7,
                    mfc="none",
                    color=line[0].get_color(),
                    label=f"{variant} † (switched off: noise)",
                )
        _budget_axis(ax, budgets)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, product in zip(axes[:2], ("qk", "ov"), strict=True):
        series(ax, f"{product}_effective_rank", product)
        init = next((c["init"] for cs in variants.values() for c in cs if c.get("init")), None)
        if init:
            ax.axhline(init[f"{product}_effective_rank"]["mean"], color="grey", ls="--", lw=1, label="init")
        ax.set_ylabel("effective rank (mean over heads)")
        ax.set_title(f"{PRODUCT_NAMES[product]} per head")
        ax.legend(fontsize=7)
    series(axes[2], "val_loss")
    axes[2].set_ylabel("final validation loss")
    axes[2].set_title("validation loss")
    axes[2].legend(fontsize=7)
    fig.suptitle(
        f"Optimisers and attention rank ({setting}; mean ± std over up to {seeds} seed{'s' * (seeds > 1)})",
        fontsize=10,
    )
    written.append(save(fig, folder / "rank_and_loss_vs_budget.png"))

    fig, axes = plt.subplots(len(budgets), 2, figsize=(11, 3.4 * len(budgets)), squeeze=False)
    for i, budget in enumerate(budgets):
        for j, product in enumerate(("qk", "ov")):
            ax = axes[i][j]
            for variant, cs in variants.items():
                c = next((c for c in cs if c["budget"] == budget and c.get("trajectory")), None)
                if c:
                    t = c["trajectory"]
                    dead = switched_off(c, product)  # by the end: its later ranks are noise, dotted
                    label = f"{variant} † (switched off)" if dead else variant
                    ax.plot(t["steps"], t[product], ls=":" if dead else "-", label=label)
            ax.set_xlabel("step")
            ax.set_ylabel("effective rank")
            ax.set_title(f"{PRODUCT_NAMES[product]}, Σηλ = {budget:g}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Effective rank over training ({setting}; mean over heads and seeds)", fontsize=10)
    written.append(save(fig, folder / "rank_over_time.png"))

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, role in zip(axes, ("q", "k", "v", "o"), strict=True):
        series(ax, f"{role}_matrix_norm")
        ax.set_ylabel("spectral norm (whole matrix)")
        ax.set_title(f"W_{role.upper()}")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Spectral norms of the attention factors ({setting}; mean over layers, ± std over seeds)",
        fontsize=10,
    )
    written.append(save(fig, folder / "factor_norms.png"))
    plt.close("all")
    return written
