"""Tables and figures of paper 000's real-training claims (``qkvlab repro wd-rank`` / ``decouple``).

Every table is markdown (it goes into REPRODUCTION.md as printed) and every figure is titled, has
labelled axes and a legend. Σηλ (the schedule's Σₜηₜ times λ) is printed beside every λ.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qkvlab.conventions import PRODUCT_NAMES
from qkvlab.render.tables import diff_text, markdown_table, pm

__all__ = ["decouple_table", "plot_decouple", "plot_wd_rank", "wd_rank_tables"]

_NAMES = {"effective_rank": "erank", "stable_rank": "stable rank", "rank": "rank", "nuclear_norm": "‖·‖_*"}


def _early_table(cells: list[dict[str, Any]]) -> list[str]:
    """Claim 2, "early in training": the paired Δ effective rank at a few steps, and its share of the final Δ."""
    early = [c for c in cells if c.get("early", {}).get("steps")]
    if not early:
        return []
    steps = early[-1]["early"]["steps"]
    lines = [
        "",
        "How early: seed-paired Δ effective rank against λ_attn = 0 during training, and in brackets that Δ "
        "as a share of its value at the end (mean over seeds). In each step's header, the share of Σₜηₜ spent by "
        "then: the share a Δ that grew in proportion to Σηλ would have reached.",
        "",
    ]
    headers = [
        "product",
        "λ_attn",
        "Σηλ_attn",
        *(
            f"step {t} (Σηₜ {share:.0%})"
            for t, share in zip(steps, early[-1]["early"]["eta_share"], strict=True)
        ),
    ]
    rows = []
    for product in ("qk", "ov"):
        for c in early:
            e = c["early"]
            if e["steps"] != steps:
                continue
            values = [
                f"{diff_text(d)} [{format(share['mean'], '.0%') if share else '—'}]"
                for d, share in zip(e[product], e[f"{product}_fraction"], strict=True)
            ]
            rows.append(
                [product.upper(), f"{c['attn_weight_decay']:g}", f"{c['eta_lambda_attn']:.3g}", *values]
            )
    return lines + markdown_table(headers, rows)


def _balance_table(cells: list[dict[str, Any]]) -> list[str]:
    """Fig. 2: the factors' relative imbalance and Gram-norm mismatch, at the initialisation and at the end."""
    rows = [c for c in cells if c.get("balance")]
    if not rows:
        return []
    lines = [
        "",
        "Factor balance (paper 000, Fig. 2). A, B = W_K, W_Q for QK and P, W_V for OV; ⟨·⟩ is the mean over a "
        "layer's heads; every number is the mean over layers, then mean ± std over the seeds that recorded it. "
        "end/init: ⟨‖AᵀA − BᵀB‖_F⟩ at the end over at init, which gradient flow keeps at 1 without decay and "
        "brings to e^(−2Σηλ) with it. relative: ⟨‖AᵀA − BᵀB‖_F⟩ / ½(⟨‖AᵀA‖_F⟩ + ⟨‖BᵀB‖_F⟩), init → end (0 = "
        "balanced), and in brackets the Gram-norm mismatch |⟨‖AᵀA‖_F⟩ − ⟨‖BᵀB‖_F⟩| / the same mean at the end, "
        "which asks only whether the two factors are the same size (a lower bound of the relative imbalance).",
        "",
    ]
    headers = [
        "λ_attn",
        "Σηλ_attn",
        "seeds",
        "e^(−2Σηλ)",
        "QK end/init",
        "OV end/init",
        "QK relative",
        "OV relative",
    ]

    def relative(b: dict[str, Any], product: str) -> str:
        start = pm(b[f"{product}_init"], 3)
        return f"{start} → {pm(b[f'{product}_end'], 3)} ({pm(b[f'{product}_norm_end'], 3)})"

    table = [
        [
            f"{c['attn_weight_decay']:g}",
            f"{c['eta_lambda_attn']:.3g}",
            len(c["balance"]["seeds"]),
            f"{math.exp(-2 * c['eta_lambda_attn']):.3g}",
            pm(c["balance"]["qk_ratio"], 3),
            pm(c["balance"]["ov_ratio"], 3),
            relative(c["balance"], "qk"),
            relative(c["balance"], "ov"),
        ]
        for c in rows
    ]
    return lines + markdown_table(headers, table)


def _gd_table(cells: list[dict[str, Any]]) -> list[str]:
    """In-context regression against one step of gradient descent (von Oswald et al. 2023), where the runs have it."""
    rows = [c for c in cells if "gd_mse" in c["val"]]
    if not rows:
        return []
    lines = [
        "",
        "In-context regression against one step of gradient descent from w = 0 with the best expected step "
        "(von Oswald et al. 2023), on the same validation tasks; predicting 0 scores about 1. Distance: the mean "
        "squared difference between the model's predictions and GD's (0 = the model is one GD step).",
        "",
    ]
    table = []
    for c in rows:
        d = c.get("vs_attn_0") or {}
        table.append(
            [
                f"{c['attn_weight_decay']:g}",
                f"{c['eta_lambda_attn']:.3g}",
                len(c["seeds"]),
                pm(c["val"]["loss"], 4),
                pm(c["val"]["gd_mse"], 4),
                pm(c["val"].get("gd_distance"), 4),
                "—" if c["attn_weight_decay"] == 0 else diff_text(d.get("val_loss"), 4),
            ]
        )
    lines += markdown_table(
        [
            "λ_attn",
            "Σηλ_attn",
            "seeds",
            "val MSE",
            "one-step GD MSE",
            "distance to GD",
            "Δ val MSE vs λ_attn = 0",
        ],
        table,
    )
    weights = [c for c in rows if c.get("gd_alignment")]
    if weights:
        lines += [
            "",
            "The same in weight space (`qkvlab.repro.paper000.icl_gd`), from the final weights read in token space "
            "(through the embedding and the head): T = (1/N) Σ_heads u ⊗ M, with M = EᵀW_KᵀW_QE and u = EᵀW_VᵀPᵀh, "
            "against one GD step's η*·e_y ⊗ [I; 0]. cos T: 1 = the same function up to scale (softmax: its "
            "small-score part only); step: T along GD's direction as a multiple of the best step η*; QK, OV: "
            "per head, cos of M with [I; 0] and |u_y|/‖u‖; direct: ‖Eᵀh‖² on x, the residual path GD lacks.",
            "",
        ]
        lines += markdown_table(
            ["λ_attn", "Σηλ_attn", "cos T", "step / η*", "QK cos", "OV cos", "direct"],
            [
                [
                    f"{c['attn_weight_decay']:g}",
                    f"{c['eta_lambda_attn']:.3g}",
                    pm(c["gd_alignment"]["cosine"], 4),
                    pm(c["gd_alignment"]["step_ratio"], 3),
                    pm(c["gd_alignment"]["qk_cosine"], 4),
                    pm(c["gd_alignment"]["ov_cosine"], 4),
                    pm(c["gd_alignment"]["direct"], 5),
                ]
                for c in weights
            ],
        )
    return lines


def _devices(cells: list[dict[str, Any]]) -> str:
    """The devices the runs ran on; runs whose final.json predates the device field are noted apart."""
    known = sorted({d for c in cells for d in c["devices"]} - {"not recorded"})
    unknown = any("not recorded" in c["devices"] for c in cells)
    if not known:
        return "not recorded"
    return ", ".join(known) + (" (runs older than the record of it: not recorded)" if unknown else "")


def _lambda_axis(ax: Any, eta: float, lams: list[float]) -> None:
    """Σηλ on a symlog axis: linear up to the smallest nonzero value (so λ = 0 shows), log above, nothing below 0."""
    positive = [eta * x for x in lams if x > 0]
    threshold = min(positive) if positive else 1e-2
    ax.set_xscale("symlog", linthresh=threshold)
    ax.set_xlim(-0.1 * threshold, 1.5 * max(positive, default=threshold))
    # Ticks at the grid's own Σηλ values: symlog's default ticks crowd "0" and "10⁻²" together.
    ticks = sorted({0.0, *positive})
    ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
    from matplotlib.ticker import NullLocator

    ax.xaxis.set_minor_locator(NullLocator())


def _mean_over_time(runs: list[dict[str, Any]], product: str, metric: str) -> tuple[list[int], list[float]]:
    """The monitor's steps and ``metric`` averaged over layers (each already a mean over heads), then over
    the seeds recorded at the same steps as the first."""
    steps = runs[0]["steps"]
    series = [
        [sum(t[product][metric]) / len(t[product][metric]) for t in r["trajectory"]]
        for r in runs
        if r["steps"] == steps
    ]
    return steps, [sum(v) / len(v) for v in zip(*series, strict=True)]


def _cells(summary: dict[str, Any], rest: float) -> list[dict[str, Any]]:
    return [c for c in summary["cells"] if c["rest_weight_decay"] == rest]


def wd_rank_tables(summary: dict[str, Any], rest: float) -> str:
    """Ranks and validation loss against λ_attn at one λ_rest, model-wide and per layer."""
    cells = _cells(summary, rest)
    if not cells:
        return f"no complete runs at λ_rest = {rest:g}"
    rtol = summary.get("rtol", 1e-3)
    accuracy = "accuracy" in cells[0]["val"]
    init = next((c["init"] for c in cells if c["init"]), None)
    lines = [
        f"Model-wide mean over layers and heads (mean ± std over seeds); λ_rest = {rest:g}, "
        f"Σₜηₜ = {cells[0]['eta_sum']:.4g}; rank at rtol = {rtol:g}; device: {_devices(cells)}.",
        "",
    ]
    headers = [
        "λ_attn",
        "Σηλ_attn",
        "seeds",
        "val loss",
        *(["val accuracy (%)"] if accuracy else []),
        *(
            f"{p} {_NAMES[m]}"
            for p in ("QK", "OV")
            for m in ("effective_rank", "stable_rank", "rank", "nuclear_norm")
        ),
    ]
    measures = ("effective_rank", "stable_rank", "rank", "nuclear_norm")
    rows = []
    if init:
        rows.append(
            [
                "init",
                "—",
                len(cells[0]["seeds"]),
                "—",
                *(["—"] if accuracy else []),
                *(pm(init.get(f"{p}_{m}"), 2) for p in ("qk", "ov") for m in measures),
            ]
        )
    for c in cells:
        rows.append(
            [
                f"{c['attn_weight_decay']:g}",
                f"{c['eta_lambda_attn']:.3g}",
                len(c["seeds"]),
                pm(c["val"].get("loss"), 4),
                *([pm(c["val"].get("accuracy"), 1, scale=100)] if accuracy else []),
                *(pm(c["final"][f"{p}_{m}"], 2) for p in ("qk", "ov") for m in measures),
            ]
        )
    lines += markdown_table(headers, rows)
    lines += [
        "",
        "Seed-paired differences from λ_attn = 0 (same λ_rest): the effect of attention weight decay "
        "beyond what training alone does.",
        "",
    ]
    lines += markdown_table(
        [
            "λ_attn",
            "Σηλ_attn",
            "Δ val loss",
            "Δ QK erank",
            "Δ OV erank",
            "Δ QK stable rank",
            "Δ OV stable rank",
        ],
        [
            [
                f"{c['attn_weight_decay']:g}",
                f"{c['eta_lambda_attn']:.3g}",
                diff_text(d["val_loss"], 4),
                diff_text(d["qk_effective_rank"]),
                diff_text(d["ov_effective_rank"]),
                diff_text(d["qk_stable_rank"]),
                diff_text(d["ov_stable_rank"]),
            ]
            for c in cells
            if (d := c.get("vs_attn_0")) and c["attn_weight_decay"] != 0
        ],
    )
    lines += _gd_table(cells)
    lines += _early_table(cells)
    lines += _balance_table(cells)
    n_layers = len(cells[0]["final"]["qk_effective_rank_per_layer"])
    for product in ("qk", "ov"):
        lines += [
            "",
            f"{product.upper()} effective rank per layer (mean over heads; mean ± std over seeds).",
            "",
        ]
        rows = (
            [["init", "—", *(pm(s, 2) for s in init[f"{product}_effective_rank_per_layer"])]] if init else []
        )
        rows += [
            [
                f"{c['attn_weight_decay']:g}",
                f"{c['eta_lambda_attn']:.3g}",
                *(pm(s, 2) for s in c["final"][f"{product}_effective_rank_per_layer"]),
            ]
            for c in cells
        ]
        lines += markdown_table(["λ_attn", "Σηλ_attn", *(f"layer {i}" for i in range(n_layers))], rows)
    return "\n".join(lines)


def decouple_table(summary: dict[str, Any]) -> str:
    """Validation perplexity over λ_attn × λ_rest, and each cell against λ_attn = λ_rest (seed-paired)."""
    import math

    rests = sorted({c["rest_weight_decay"] for c in summary["cells"]})
    rows = []
    for rest in rests:
        for c in _cells(summary, rest):
            loss = c["val"].get("loss")
            ppl = f"{math.exp(loss['mean']):.3f}" if loss else "—"
            same = c["attn_weight_decay"] == rest
            rows.append(
                [
                    f"{rest:g}",
                    f"{c['attn_weight_decay']:g}",
                    f"{c['eta_lambda_attn']:.3g}",
                    len(c["seeds"]),
                    pm(loss, 4),
                    ppl,
                    pm(c["train_tail"], 4) if c.get("train_tail") else "—",
                    "(reference)" if same else diff_text((c.get("vs_coupled") or {}).get("val_loss"), 4),
                    pm(c["final"]["qk_effective_rank"], 2),
                    pm(c["final"]["ov_effective_rank"], 2),
                ]
            )
    headers = [
        "λ_rest",
        "λ_attn",
        "Σηλ_attn",
        "seeds",
        "val loss",
        "val perplexity",
        "train loss, last 100 steps",
        "Δ val loss vs λ_attn = λ_rest",
        "QK erank",
        "OV erank",
    ]
    lines = markdown_table(headers, rows)
    lines += [
        "",
        "Perplexity is exp(mean val loss). A negative Δ means lower loss than coupled weight decay "
        "(λ_attn = λ_rest); (k/n > 0) counts the seeds where the cell's loss is higher. The tied "
        "embedding keeps λ = 0.1 in every cell, λ_rest = 0 included.",
    ]
    contrasts = summary.get("contrasts") or []
    if contrasts:
        delta = contrasts[0]["delta"]
        lines += [""]
        lines += markdown_table(
            ["contrast", "λ", "a (λ_attn, λ_rest)", "b (λ_attn, λ_rest)", "val loss a − b", "reading"],
            [
                [
                    c["contrast"],
                    f"{c['lambda']:g}",
                    "({:g}, {:g})".format(*c["a"]),
                    "({:g}, {:g})".format(*c["b"]),
                    diff_text(c["val_loss"], 4),
                    c["reading"],
                ]
                for c in contrasts
            ],
        )
        lines += [
            "",
            f"Seed-paired; a reading is lower (higher) when the mean is below −{delta:g} "
            f"(above {delta:g}) nats and every seed has that sign, otherwise within noise; pending until "
            "every seed of both cells has finished.",
        ]
    return "\n".join(lines)


def _key(cell: dict[str, Any]) -> tuple[float, float]:
    return cell["attn_weight_decay"], cell["rest_weight_decay"]


def plot_wd_rank(
    summary: dict[str, Any],
    runs_of: dict[tuple[float, float], list[dict[str, Any]]],
    rest: float,
    folder: Path,
) -> list[Path]:
    """Rank against λ_attn per layer, rank over training, gap and imbalance over training, val loss."""
    from qkvlab.report.figures import pyplot, save

    plt = pyplot()

    cells = _cells(summary, rest)
    if not cells:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fewest, most = min(len(c["seeds"]) for c in cells), max(len(c["seeds"]) for c in cells)
    seeds_text = f"{fewest}–{most} seeds" if fewest < most else f"{most} seed{'s' * (most > 1)}"
    lams = [c["attn_weight_decay"] for c in cells]
    eta = cells[0]["eta_sum"]
    n_layers = len(cells[0]["final"]["qk_effective_rank_per_layer"])

    # 1. rank against λ, per layer, with the init and λ = 0 baselines
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, product in zip(axes, ("qk", "ov"), strict=True):
        for layer in range(n_layers):
            stats = [c["final"][f"{product}_effective_rank_per_layer"][layer] for c in cells]
            ax.errorbar(
                [eta * x for x in lams],
                [s["mean"] for s in stats],
                yerr=[s["std"] for s in stats],
                marker="o",
                ms=4,
                capsize=3,
                label=f"layer {layer}",
            )
        init = next((c["init"] for c in cells if c["init"]), None)
        if init:
            ax.axhline(
                init[f"{product}_effective_rank"]["mean"], color="grey", ls="--", lw=1, label="random init"
            )
        _lambda_axis(ax, eta, lams)
        ax.set_xlabel(f"Σₜηₜ·λ_attn  (Σₜηₜ = {eta:.3g})")
        ax.set_ylabel("effective rank (mean over heads)")
        ax.set_title(f"{PRODUCT_NAMES[product]} per head")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Effective rank against attention weight decay (λ_rest = {rest:g}; mean ± std over {seeds_text})",
        fontsize=10,
    )
    written.append(save(fig, folder / f"rank_vs_lambda_rest{rest:g}.png"))

    # 2. rank over training and 3. gap / imbalance over training, per λ (mean over seeds and layers)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for kind, metrics in (
        ("rank_over_time", ("effective_rank",)),
        ("balance_over_time", ("gap", "imbalance")),
    ):
        fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.6 * len(metrics)), squeeze=False)
        for j, product in enumerate(("qk", "ov")):
            for i, metric in enumerate(metrics):
                ax = axes[i][j]
                for k, c in enumerate(cells):
                    runs = list(runs_of[_key(c)])
                    steps, mean = _mean_over_time(runs, product, metric)
                    colour = colours[k % len(colours)]
                    ax.plot(
                        steps,
                        mean,
                        color=colour,
                        label=f"λ_attn = {c['attn_weight_decay']:g} (Σηλ {c['eta_lambda_attn']:.2g})",
                    )
                    if metric == "imbalance" and c["attn_weight_decay"] > 0:
                        # prediction e^(−2Σηλ) from the first firing, using the recorded per-step 2ηλ
                        rates = runs[0]["predicted_imbalance_rate"]
                        value, predicted = mean[0], [mean[0]]
                        for a, b, rate in zip(steps, steps[1:], rates[1:], strict=False):
                            value *= pow(2.718281828459045, -(rate.get(product) or 0.0) * (b - a))
                            predicted.append(value)
                        ax.plot(steps, predicted, color=colour, ls=":", lw=1)
                if metric in ("gap", "imbalance"):
                    ax.set_yscale("log")
                ax.set_xlabel("step")
                ax.set_ylabel(
                    {
                        "effective_rank": "effective rank",
                        "gap": "gap ½(‖A‖²+‖B‖²) − ‖ABᵀ‖_*",
                        "imbalance": "imbalance ‖AᵀA − BᵀB‖_F",
                    }[metric]
                )
                ax.set_title(f"{PRODUCT_NAMES[product]}: {metric.replace('_', ' ')} (mean over heads)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        note = (
            " (dotted: e^(−2Σηλ) from step 0, the gradient-flow prediction)"
            if kind == "balance_over_time"
            else ""
        )
        fig.suptitle(f"λ_rest = {rest:g}, mean over {seeds_text}{note}", fontsize=10)
        written.append(save(fig, folder / f"{kind}_rest{rest:g}.png"))

    # 4. validation loss (and accuracy, where the task has one) against λ
    metrics = [m for m in ("loss", "accuracy") if m in cells[0]["val"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = [c["val"][metric] for c in cells]
        scale = 100.0 if metric == "accuracy" else 1.0
        ax.errorbar(
            [eta * x for x in lams],
            [s["mean"] * scale for s in values],
            yerr=[s["std"] * scale for s in values],
            marker="o",
            capsize=3,
            label=f"λ_rest = {rest:g}",
        )
        _lambda_axis(ax, eta, lams)
        ax.set_xlabel("Σₜηₜ·λ_attn")
        if metric == "loss" and "gd_mse" in cells[0]["val"]:
            ax.axhline(cells[0]["val"]["gd_mse"]["mean"], color="grey", ls="--", lw=1, label="one step of GD")
        ax.set_ylabel(
            "validation accuracy (%)"
            if metric == "accuracy"
            else "validation MSE"
            if "gd_mse" in cells[0]["val"]
            else "validation loss (nats/token)"
        )
        ax.set_title(f"Validation {metric} against attention weight decay ({seeds_text})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    written.append(save(fig, folder / f"val_loss_vs_lambda_rest{rest:g}.png"))

    # 5. every head's effective rank, layer by layer, with the mean over heads (paper 000's ViT figure)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, product in zip(axes, ("qk", "ov"), strict=True):
        for k, c in enumerate(cells):
            runs = list(runs_of[_key(c)])
            per_seed = [r["final_heads"][product] for r in runs if r.get("final_heads")]
            if not per_seed:
                continue
            colour = colours[k % len(colours)]
            # heads are interchangeable between seeds, so every head of every seed is a dot
            layers = [
                [seed[layer][h] for seed in per_seed for h in range(len(seed[layer]))]
                for layer in range(n_layers)
            ]
            offset = (k - (len(cells) - 1) / 2) * 0.6 / max(1, len(cells))
            for layer, values in enumerate(layers):
                ax.scatter([layer + offset] * len(values), values, color=colour, s=10, alpha=0.6)
            ax.plot(
                [layer + offset for layer in range(n_layers)],
                [sum(v) / len(v) for v in layers],
                color=colour,
                marker="_",
                ms=14,
                label=f"λ_attn = {c['attn_weight_decay']:g} (Σηλ {c['eta_lambda_attn']:.2g})",
            )
        ax.set_xticks(range(n_layers))
        ax.set_xlabel("layer")
        ax.set_ylabel("effective rank (dots: heads; line: their mean)")
        ax.set_title(f"{PRODUCT_NAMES[product]}: every head at the end of training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Per-head effective rank by layer (λ_rest = {rest:g}; every head of {seeds_text})",
        fontsize=10,
    )
    written.append(save(fig, folder / f"rank_per_head_rest{rest:g}.png"))

    # 6. the two sides of the imbalance converging (paper 000, Fig. 2), where the runs recorded them
    first = runs_of[_key(cells[0])][0]
    if "left_gram" in first["trajectory"][0]["ov"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, product in zip(axes, ("qk", "ov"), strict=True):
            names = ("‖W_KW_Kᵀ‖", "‖W_QW_Qᵀ‖") if product == "qk" else ("‖PᵀP‖", "‖W_VW_Vᵀ‖")
            for k, c in enumerate(cells):
                runs = list(runs_of[_key(c)])
                colour = colours[k % len(colours)]
                for side, style in (("left_gram", "-"), ("right_gram", "--")):
                    steps, mean = _mean_over_time(runs, product, side)
                    label = f"{names[side == 'right_gram']}, λ_attn = {c['attn_weight_decay']:g}"
                    ax.plot(steps, mean, color=colour, ls=style, label=label)
            ax.set_xlabel("step")
            ax.set_ylabel("Frobenius norm (mean over heads and layers)")
            ax.set_title(f"{PRODUCT_NAMES[product]}: factor Gram norms")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
        fig.suptitle(
            f"Factor Gram norms over training, solid ‖AᵀA‖ and dashed ‖BᵀB‖ (paper 000, Fig. 2: they converge); {seeds_text}",
            fontsize=10,
        )
        written.append(save(fig, folder / f"gram_norms_over_time_rest{rest:g}.png"))
    return written


def plot_decouple(
    summary: dict[str, Any], runs_of: dict[tuple[float, float], list[dict[str, Any]]], folder: Path
) -> list[Path]:
    """Paper 000's Table 1 as a figure: validation loss against λ_attn, one line per λ_rest (mean ± std,
    every seed a dot), and beside it the control's seed-paired contrasts (mean ± std, with the ±δ band
    inside which a contrast reads as noise). Nothing where the folder holds a single λ_rest."""
    from qkvlab.report.figures import pyplot, save

    rests = sorted({c["rest_weight_decay"] for c in summary["cells"]})
    if len(rests) < 2:
        return []
    plt = pyplot()
    contrasts = summary.get("contrasts") or []
    fig, axes = plt.subplots(1, 2 if contrasts else 1, figsize=(12 if contrasts else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    eta = summary["cells"][0]["eta_sum"]
    lams = sorted({c["attn_weight_decay"] for c in summary["cells"]})
    for k, rest in enumerate(rests):
        cells = [c for c in _cells(summary, rest) if "loss" in c["val"]]
        if not cells:
            continue
        colour = colours[k % len(colours)]
        x = [eta * c["attn_weight_decay"] for c in cells]
        ax.errorbar(
            x,
            [c["val"]["loss"]["mean"] for c in cells],
            yerr=[c["val"]["loss"]["std"] for c in cells],
            color=colour,
            marker="o",
            capsize=3,
            label=f"λ_rest = {rest:g}",
        )
        for c in cells:
            seeds = [r["val"]["loss"] for r in runs_of[_key(c)] if "loss" in r["val"]]
            ax.scatter([eta * c["attn_weight_decay"]] * len(seeds), seeds, color=colour, s=9, alpha=0.45)
        coupled = [c for c in cells if c["attn_weight_decay"] == rest]
        if coupled:  # the coupled reference of this row: an open ring
            ax.scatter(
                [eta * rest], [coupled[0]["val"]["loss"]["mean"]], s=110, facecolors="none", edgecolors=colour
            )
    _lambda_axis(ax, eta, lams)
    ax.set_xlabel(f"Σₜηₜ·λ_attn  (Σₜηₜ = {eta:.3g})")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("Validation loss (rings: coupled, λ_attn = λ_rest; dots: seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if contrasts:
        ax = axes[0][1]
        delta = contrasts[0]["delta"]
        ax.axvspan(-delta, delta, color="grey", alpha=0.15, lw=0, label=f"±δ = {delta:g} nats: noise")
        ax.axvline(0, color="grey", lw=1)
        labels = []
        for i, c in enumerate(contrasts):
            diff = c["val_loss"]
            y = len(contrasts) - 1 - i
            ax.errorbar([diff["mean"]], [y], xerr=[diff["std"]], color="k", marker="s", capsize=3)
            labels.append(
                f"{c['contrast'].split(':')[0]} at λ = {c['lambda']:g}: "
                + "({:g}, {:g}) − ({:g}, {:g})".format(*c["a"], *c["b"])
                + f"\n{c['reading']}"
            )
        ax.set_yticks(range(len(contrasts)), labels[::-1], fontsize=7)
        ax.set_ylabel("contrast, and its reading")
        ax.set_xlabel("seed-paired Δ validation loss, a − b (nats); (λ_attn, λ_rest)")
        ax.set_title("The control's contrasts (mean ± std over seeds)", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, loc="upper left")
    seeds = sorted({s for c in summary["cells"] for s in c["seeds"]})
    fig.suptitle(
        f"Attention weight decay apart from the MLP's (paper 000, Table 1); seeds {', '.join(map(str, seeds))}",
        fontsize=10,
    )
    folder.mkdir(parents=True, exist_ok=True)
    return [save(fig, folder / "decouple_val_loss.png")]
