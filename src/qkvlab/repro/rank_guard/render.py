"""Tables (Markdown, as ``qkvlab repro rank-guard`` prints them) and figures of the rank-guard study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkvlab.conventions import PRODUCT_NAMES
from qkvlab.render.tables import diff_text, markdown_table, pm

__all__ = ["plot_rank_guard", "tables"]


def _ranks(measures: dict[str, Any]) -> list[str]:
    """Four cells: QK erank, QK min, OV erank, OV min."""
    return [pm(measures.get(f"{p}_{m}"), 2) for p in ("qk", "ov") for m in ("effective_rank", "layer_min")]


PAIRS = {"qk": "(q, k)", "ov": "(v, o)"}
RANKS = (
    "erank: the effective rank, mean over every head; min: each layer's smallest head, mean over layers "
    "(what the guard holds)"
)


def tables(summary: dict[str, Any]) -> str:
    """The fixed decays, the guard's targets, the seed-paired comparison, the final λ per layer, the run counts."""
    lines: list[str] = []
    if summary["fixed"]:
        lines += [
            f"Fixed attention weight decay (λ_rest = 0.1; from {summary['reference']}); {RANKS}; mean ± std "
            "over seeds.",
            "",
        ]
        lines += markdown_table(
            ["λ_attn", "seeds", "val loss", "QK erank", "QK min", "OV erank", "OV min"],
            [
                [
                    f"{c['attn']:g}" + (" (best)" if c["attn"] == summary["best_fixed"] else ""),
                    len(c["seeds"]),
                    pm(c["measures"]["val_loss"], 4),
                    *_ranks(c["measures"]),
                ]
                for c in summary["fixed"]
            ],
        )
    targets = summary["targets"]
    if not targets:
        return "\n".join(lines)
    lines += [
        "",
        "Rank guard: the target smallest-head effective rank per layer as a fraction of d_head (and in ranks); "
        f"{RANKS}; Σηλ the decay it applied, Σₜ η_t λ_t (mean over layers); minutes of wall-clock (shared "
        "machine).",
        "",
    ]
    rows = []
    for e in targets:
        m = e["measures"]
        d = m["d_head"]["mean"] if "d_head" in m else None
        ranks = f" ({e['target_qk'] * d:.1f}, {e['target_ov'] * d:.1f})" if d else ""
        rows.append(
            [
                e["target"],
                f"{e['target_qk']:g}, {e['target_ov']:g}{ranks}",
                len(e["seeds"]),
                pm(m["val_loss"], 4),
                *_ranks(m),
                pm(m["qk_eta_lambda"], 3),
                pm(m["ov_eta_lambda"], 3),
                pm(m["wall_minutes"], 1),
            ]
        )
    headers = [
        "target",
        "QK, OV",
        "seeds",
        "val loss",
        "QK erank",
        "QK min",
        "OV erank",
        "OV min",
        "Σηλ (q, k)",
        "Σηλ (v, o)",
        "minutes",
    ]
    lines += markdown_table(headers, rows)
    comparisons = [
        (
            "vs_best_fixed",
            f"Seed-paired differences from the best fixed decay (λ_attn = {summary['best_fixed']:g}",
        )
    ]
    if summary["best_fixed"] == 0:  # one comparison, said once
        comparisons[0] = (comparisons[0][0], comparisons[0][1] + ": no attention decay).")
    else:
        comparisons = [
            (comparisons[0][0], comparisons[0][1] + ")."),
            ("vs_fixed_0", "Seed-paired differences from no attention decay (λ_attn = 0)."),
        ]
    for key, title in comparisons:
        if not any(key in e for e in targets):
            continue
        lines += ["", title, ""]
        lines += markdown_table(
            ["target", "Δ val loss", "Δ QK erank", "Δ OV erank"],
            [
                [
                    e["target"],
                    diff_text(d["val_loss"], 4),
                    diff_text(d["qk_effective_rank"]),
                    diff_text(d["ov_effective_rank"]),
                ]
                for e in targets
                if (d := e.get(key))
            ],
        )
    if any(e.get("vs_fixed_at_rank") for e in targets):
        lines += [
            "",
            "Post hoc (not in the design fixed before the runs): the guard's validation loss minus the fixed "
            "decays' at the same final rank (each seed's fixed runs interpolated linearly in their final "
            "smallest-head effective rank, per layer then averaged; — where the guard's rank lies outside "
            "the fixed runs' range), matched on QK and on OV apart.",
            "",
        ]
        lines += markdown_table(
            ["target", "Δ val loss at the guard's QK min", "Δ val loss at the guard's OV min"],
            [
                [e["target"], *(diff_text((e.get("vs_fixed_at_rank") or {}).get(p), 4) for p in ("qk", "ov"))]
                for e in targets
            ],
        )
    layers = sorted({int(k[1:].split("/")[0]) for e in targets for k in e["lambda"] if k.endswith("_lambda")})
    lines += [
        "",
        "The guard's final λ per layer (mean over seeds), (q, k) / (v, o).",
        "",
    ]
    rows = []
    for e in targets:
        lam = e["lambda"]
        cells = [
            f"{lam[f'L{i}/qk_lambda'][-1]:.3g} / {lam[f'L{i}/ov_lambda'][-1]:.3g}"
            if f"L{i}/qk_lambda" in lam and f"L{i}/ov_lambda" in lam
            else "—"
            for i in layers
        ]
        rows.append([e["target"], *cells])
    lines += markdown_table(["target", *(f"layer {i}" for i in layers)], rows)
    r = summary["runs"]
    lines += [
        "",
        f"Runs: the fixed grid {r['fixed_grid']} ({r['fixed_grid_cells']} decays × seeds) to find its best; the guard "
        f"{r['guard_per_target']} per target, {r['guard_all_targets']} for every target tried.",
    ]
    return "\n".join(lines)


def plot_rank_guard(summary: dict[str, Any], folder: Path) -> list[Path]:
    """λ over training per layer, rank over training, and loss against rank (fixed decays and guard targets)."""
    from qkvlab.report.figures import pyplot, save

    targets = summary["targets"]
    if not targets:
        return []
    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    fig, axes = plt.subplots(len(targets), 2, figsize=(11, 3.2 * len(targets)), squeeze=False)
    for i, e in enumerate(targets):
        for j, pair in enumerate(("qk", "ov")):
            ax = axes[i][j]
            lam = e["lambda"]
            for key in sorted(k for k in lam if k.endswith(f"{pair}_lambda")):
                ax.plot(lam["steps"], lam[key], marker=".", label=f"layer {key[1:].split('/')[0]}")
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("λ")
            ax.set_title(f"{e['target']}: {PAIRS[pair]} decay, target {e[f'target_{pair}']:g}·d_head")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("The rank guard's λ per layer (mean over seeds)", fontsize=10)
    written.append(save(fig, folder / "guard_lambda.png"))

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, product in zip(axes, ("qk", "ov"), strict=True):
        for shade, c in enumerate(summary["fixed"]):
            t = c.get("layer_min_over_time")
            if t:
                grey = str(0.25 + 0.5 * shade / max(1, len(summary["fixed"]) - 1))
                ax.plot(
                    t["steps"], t[product], color=grey, lw=1, ls=":", label=f"fixed λ_attn = {c['attn']:g}"
                )
        for i, e in enumerate(targets):
            t, colour = e.get("layer_min_over_time") or e["erank_over_time"], colours[i % len(colours)]
            ax.plot(t["steps"], t[product], color=colour, lw=2, label=f"guard, {e['target']}")
            d = e["measures"].get("d_head", {}).get("mean")
            if d:
                ax.axhline(e[f"target_{product}"] * d, color=colour, ls="--", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("smallest head's effective rank (mean over layers)")
        ax.set_title(f"{PRODUCT_NAMES[product]} (dashed: the guard's targets)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(
        "What the guard holds, over training: guarded runs and fixed decays (mean over seeds)", fontsize=10
    )
    written.append(save(fig, folder / "guard_rank_over_time.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, product in zip(axes, ("qk", "ov"), strict=True):
        x = f"{product}_layer_min"
        if summary["fixed"]:
            f = [c for c in summary["fixed"] if x in c["measures"]]
            ax.errorbar(
                [c["measures"][x]["mean"] for c in f],
                [c["measures"]["val_loss"]["mean"] for c in f],
                yerr=[c["measures"]["val_loss"]["std"] for c in f],
                marker="o",
                capsize=3,
                color="grey",
                label="fixed λ_attn",
            )
            for c in f:
                ax.annotate(
                    f"{c['attn']:g}",
                    (c["measures"][x]["mean"], c["measures"]["val_loss"]["mean"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        for i, e in enumerate(targets):
            if x not in e["measures"]:
                continue
            ax.errorbar(
                [e["measures"][x]["mean"]],
                [e["measures"]["val_loss"]["mean"]],
                yerr=[e["measures"]["val_loss"]["std"]],
                marker="s",
                capsize=3,
                ls="none",
                color=colours[i % len(colours)],
                label=f"guard, {e['target']}",
            )
        ax.set_xlabel(f"{PRODUCT_NAMES[product]}: smallest head's effective rank (mean over layers)")
        ax.set_ylabel("final validation loss")
        ax.set_title("loss against rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Loss at a given rank: fixed decays and the guard (mean ± std over seeds)", fontsize=10)
    written.append(save(fig, folder / "guard_loss_vs_rank.png"))
    plt.close("all")
    return written
