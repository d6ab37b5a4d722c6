"""Tables and figures of a ``qkvlab theory`` result (the JSON ``run_theory`` returns)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qkvlab.render.tables import format_table
from qkvlab.report.figures import pyplot, save

__all__ = ["plot_theory", "theory_tables"]


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.1e}"
    return f"{value:.{digits}g}"


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "–"
    return _num(mean, digits) + (f" ± {_num(std, 2)}" if std else "")


def _sv(values: Sequence[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def _toy_table(toy: dict[str, Any], with_values: bool) -> str:
    headers = ["λ"]
    if with_values:
        headers.append("σ(ABᵀ) after GD")
    headers += [
        "max|GD−closed|",
        "max|SVT−closed|",
        "imbalance rate",
        "2λ",
        "−ln(1−2ηλ)/η",
        "−ln((1−ηλ)²)/η",
        "gap rate",
        "rule",
        "rule, discrete",
        "gap/‖W‖_* end",
    ]
    rows = []
    for i, lam in enumerate(toy["lambda"]):
        row: list[object] = [f"{lam:g}"]
        if with_values:
            row.append(_sv(toy["final_singular_values"][i]))
        imbalance = _pm(toy["decay_rate_measured"][i], toy["decay_rate_measured_std"][i])
        if toy["decay_rate_measured"][i] is None and toy["imbalance_relative_drift"][i] is not None:
            imbalance = f"drift {toy['imbalance_relative_drift'][i]:+.1e}"
        row += [
            _num(toy["max_abs_error_vs_closed_form"][i]),
            _num(toy["svt_max_abs_error_vs_closed_form"][i]),
            imbalance,
            _num(toy["decay_rate_predicted"][i]),
            _num(toy["decay_rate_predicted_discrete"][i]),
            _num(toy["decay_rate_weight_decay_only"][i]),
            _pm(toy["gap_decay_rate_measured"][i], toy["gap_decay_rate_measured_std"][i]),
            _num(toy["gap_decay_rate_predicted"][i]),
            _num(toy["gap_decay_rate_predicted_discrete"][i]),
            _num(toy["final_relative_gap"][i], 2),
        ]
        rows.append(row)
    return format_table(headers, rows)


def _optimizer_table(optimizers: dict[str, Any]) -> str:
    headers = [
        "optimiser",
        "λ",
        "σ(ABᵀ) at the end",
        "max|σ−closed|",
        "imbalance rate",
        "predicted",
        "gap rate",
        "‖AᵀA−BᵀB‖ end",
        "gap/‖W‖_* end",
        "λ·max|entry|",
        "2ηλ/(1−β)²",
    ]
    rows = []
    for name, entry in optimizers.items():
        for i, lam in enumerate(entry["lambda"]):
            rows.append(
                [
                    name if i == 0 else "",
                    f"{lam:g}",
                    _sv(entry["final_singular_values"][i]),
                    _pm(
                        entry["max_abs_error_vs_closed_form"][i],
                        entry["max_abs_error_vs_closed_form_std"][i],
                        2,
                    ),
                    _pm(entry["decay_rate_measured"][i], entry["decay_rate_measured_std"][i], 3),
                    _num(entry["decay_rate_predicted"][i]),
                    _pm(entry["gap_decay_rate_measured"][i], entry["gap_decay_rate_measured_std"][i], 3),
                    _num(entry["final_imbalance"][i], 2),
                    _num(entry["final_relative_gap"][i], 2),
                    _num(entry["final_lambda_max_entry"][i], 3),
                    _num(entry["small_step_parameter"][i], 2),
                ]
            )
    return format_table(headers, rows)


def _completion_table(completion: dict[str, Any]) -> str:
    headers = [
        "λ",
        "rank of W*",
        "F(A,B)",
        "G(W*)",
        "(F−G)/G, max",
        "‖ABᵀ−W*‖/‖W*‖, max",
        "test RMSE, factored",
        "test RMSE, nuclear",
        "soft-impute its",
    ]
    rows = []
    for i, lam in enumerate(completion["lambda"]):
        rows.append(
            [
                f"{lam:g}",
                _num(completion["rank_nuclear"][i], 3),
                _pm(completion["objective_factored"][i], completion["objective_factored_std"][i], 6),
                _pm(completion["objective_nuclear"][i], completion["objective_nuclear_std"][i], 6),
                _num(completion["relative_objective_difference_max"][i], 2),
                _num(completion["relative_distance_max"][i], 2),
                _pm(completion["test_rmse_factored"][i], completion["test_rmse_factored_std"][i], 3),
                _pm(completion["test_rmse_nuclear"][i], completion["test_rmse_nuclear_std"][i], 3),
                completion["soft_impute_iterations"][i],
            ]
        )
    return format_table(headers, rows)


def _pretrained_table(model: dict[str, Any]) -> str:
    headers = ["layer"]
    for product in ("QK", "OV"):
        headers += [
            f"{product} ½(‖A‖²+‖B‖²)",
            f"{product} ‖ABᵀ‖_*",
            f"{product} gap/‖·‖_*",
            "norm part",
            "random",
        ]
    grouped = "qk_group_relative_gap" in model["layers"][0]
    planes = "qk_plane_relative_imbalance" in model["layers"][0]
    headers += ["QK group gap/‖·‖_*", "OV group gap/‖·‖_*"] if grouped else []
    headers += ["QK plane imbalance"] if planes else []
    rows = []
    for layer in model["layers"]:
        row: list[object] = [layer["layer"]]
        for product in ("qk", "ov"):
            row += [
                f"{layer[f'{product}_l2_half']:.1f}",
                f"{layer[f'{product}_nuclear_norm']:.1f}",
                f"{layer[f'{product}_relative_gap']:.2%}",
                f"{layer[f'{product}_norm_part']:.2%}",
                f"{layer[f'{product}_random_relative_gap']:.2%}",
            ]
        if grouped:
            row += [f"{layer[f'{product}_group_relative_gap']:.2%}" for product in ("qk", "ov")]
        if planes:
            row.append(f"{layer['qk_plane_relative_imbalance']:.2%}")
        rows.append(row)
    return format_table(headers, rows)


def theory_tables(result: dict[str, Any]) -> str:
    """Every table of a theory result, with one line saying what each is."""
    blocks = []
    if "lambda" in result:
        eta, steps = result["lr"], result["steps"]
        blocks.append(
            f"Fig. 1 toy: gradient descent on 5×5 factors, ½‖ABᵀ − D‖² + (λ/2)(‖A‖² + ‖B‖²), "
            f"D = diag({', '.join(f'{d:g}' for d in result['target_singular_values'])}); η = {eta:g}, "
            f"{steps} steps (t = {result['t_end']:g}), seeds {','.join(map(str, result['seeds']))}. "
            "Closed form σᵢ = max(dᵢ − λ, 0); SVT = proximal gradient on ½‖W − D‖² + λ‖W‖_*. Rates per unit t, "
            "mean ± std over seeds."
        )
        blocks.append(
            "Rates: least-squares slope of ln(curve) against t over the last 40% of the decades the curve falls "
            "before float64 rounding (1e-13 of ½(‖A‖²+‖B‖²) for the imbalance; 1e-26 for the gap, computed as a "
            "sum of squares); the JSON keeps every seed's window and the slopes of its two halves "
            "(fit_windows_per_seed; the figure draws seed 0's)."
        )
        blocks.append(_toy_table(result, with_values=True))
    if "rotated" in result:
        blocks.append("Same, target U·D·Vᵀ with seeded random orthogonal U, V:")
        blocks.append(_toy_table(result["rotated"], with_values=False))
    if "optimizers" in result:
        lines = []
        for name, entry in result["optimizers"].items():
            detail = (
                f"η = {entry['lr']:g}, {entry['steps']} steps (t = {entry['t_end']:.3g}), {entry['schedule']}"
            )
            if entry["momentum"] is not None:
                detail += f", β = {entry['momentum']:g}; predicted 2λ/(1 − β)"
            if entry["betas"] is not None:
                detail += f", β = ({entry['betas'][0]:g}, {entry['betas'][1]:g}), ε = {entry['eps']:g}"
                detail += f"; σ {entry['final_values']}; rates on {entry['rates_fitted_on']}"
            lines.append(f"  {name}: {entry['description']}; {detail}")
        blocks.append("The same toy under other optimisers (diagonal target):\n" + "\n".join(lines))
        blocks.append(_optimizer_table(result["optimizers"]))
    if "completion" in result:
        c = result["completion"]
        blocks.append(
            f"Matrix completion: M = UVᵀ ({c['size']}×{c['size']}, rank {c['rank']}), {c['observed']:.0%} observed; "
            f"factors of width {c['width']} trained by GD (η = {c['lr']:g}, {c['steps']} steps) on "
            "F = ½‖P_Ω(ABᵀ − M)‖² + (λ/2)(‖A‖² + ‖B‖²), against soft-impute on G = ½‖P_Ω(W − M)‖² + λ‖W‖_*; "
            f"seeds {','.join(map(str, c['seeds']))}. Test RMSE on the unobserved entries "
            f"(filling them with 0: {c['test_rmse_zero_fill']:.3f})."
        )
        blocks.append(_completion_table(c))
    for model in result.get("pretrained", []):
        arch = model["architecture"]
        blocks.append(
            f"Pretrained balance (Fig. 4): {model['source']} ({arch['family']}, {arch['n_layers']} layers, "
            f"{arch['n_heads']} heads, d_head {arch['d_head']}). Sums over heads per layer. gap/‖·‖_* = 0 means "
            "L2 on the factors is exactly the nuclear norm; norm part: the share forced by ‖A‖ ≠ ‖B‖ alone; "
            "random: Gaussian factors with each head's norms."
        )
        blocks.append(_pretrained_table(model))
    if "command" in result:
        blocks.append(f"{result['command']}  ({result.get('seconds', '?')} s)")
    return "\n\n".join(blocks)


# -- figures ----------------------------------------------------------------------------------------


def _lambda_colours(lambdas: Sequence[float]):  # type: ignore[no-untyped-def]
    plt = pyplot()
    cmap = plt.get_cmap("viridis")
    top = max(lambdas) or 1.0
    return [cmap(0.9 * lam / top) for lam in lambdas]


def _closed_form_lines(ax, targets: Sequence[float], top: float) -> None:  # type: ignore[no-untyped-def]
    grid = [top * k / 200 for k in range(201)]
    for j, d in enumerate(targets):
        ax.plot(
            grid,
            [max(d - x, 0.0) for x in grid],
            color="0.55",
            lw=1,
            label="closed form max(dᵢ − λ, 0)" if j == 0 else None,
        )


def _plot_singular_values(result: dict[str, Any], folder: Path) -> Path:
    plt = pyplot()
    toys = [("diagonal target D", result)] + (
        [("rotated target U·D·Vᵀ", result["rotated"])] if "rotated" in result else []
    )
    fig, axes = plt.subplots(1, len(toys), figsize=(5.5 * len(toys), 4), squeeze=False)
    for ax, (title, toy) in zip(axes[0], toys, strict=True):
        lambdas = toy["lambda"]
        _closed_form_lines(ax, toy["target_singular_values"], max(lambdas) * 1.05)
        for j in range(len(toy["target_singular_values"])):
            ax.plot(
                lambdas,
                [sv[j] for sv in toy["final_singular_values"]],
                "o",
                color="C0",
                ms=6,
                label="gradient descent on A, B" if j == 0 else None,
            )
            ax.plot(
                lambdas,
                [sv[j] for sv in toy["svt_singular_values"]],
                "x",
                color="C3",
                ms=8,
                label="SVT (proximal gradient on W)" if j == 0 else None,
            )
        ax.set_xlabel("λ (weight decay on each factor)")
        ax.set_ylabel("singular values of ABᵀ")
        ax.set_title(f"σᵢ(ABᵀ) against λ, {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, folder / "theory_singular_values.png", dpi=120)


def _anchored_slope(
    ax, t: Sequence[float], y: Sequence[float], rate: float, window: dict, label: str | None
) -> None:  # type: ignore[no-untyped-def]
    """A black dashed line of slope −rate on a log axis, 30× above the curve at the middle of its fit
    window (on the curve it would hide it), spanning the window."""
    middle = 0.5 * (window["t_start"] + window["t_end"])
    k = min(range(len(t)), key=lambda i: abs(t[i] - middle))
    if y[k] <= 0:
        return
    span = [window["t_start"], window["t_end"]]
    ax.plot(
        span, [30 * y[k] * math.exp(-rate * (s - t[k])) for s in span], "--", color="k", lw=1, label=label
    )


def _above_floor(t: Sequence[float], y: Sequence[float], floor: Sequence[float] | None) -> tuple[list, list]:
    """The curve up to where it first reaches the rounding floor (below it is float64 noise)."""
    kept_t, kept_y = [], []
    for i, (a, b) in enumerate(zip(t, y, strict=True)):
        if b <= 0 or (floor is not None and b <= floor[i]):
            break
        kept_t.append(a)
        kept_y.append(b)
    return kept_t, kept_y


def _plot_decay(result: dict[str, Any], folder: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    curves = result["curves"]
    colours = _lambda_colours(result["lambda"])
    panels = [
        (
            axes[0],
            "imbalance",
            "decay_rate_predicted",
            "fit_window",
            "‖AᵀA − BᵀB‖_F",
            "imbalance; dashed: slope 2λ",
        ),
        (
            axes[1],
            "gap",
            "gap_decay_rate_predicted",
            "gap_fit_window",
            "½(‖A‖² + ‖B‖²) − ‖ABᵀ‖_*",
            "gap; dashed: slope from the rule",
        ),
    ]
    for ax, key, predicted, window_key, ylabel, title in panels:
        floor_key = "imbalance_floor" if key == "imbalance" else "gap_floor"
        slope_label = "predicted slope, at the fit window (30× above)"
        for i, lam in enumerate(result["lambda"]):
            floor = curves[floor_key][i] if floor_key in curves else None
            t, y = _above_floor(curves["t"], curves[key][i], floor)
            ax.semilogy(t, y, color=colours[i], lw=1.5, label=f"λ = {lam:g}")
            if result[predicted][i] is not None and result[window_key][i] is not None:
                _anchored_slope(
                    ax, curves["t"], curves[key][i], result[predicted][i], result[window_key][i], slope_label
                )
                slope_label = None
        ax.set_xlabel("t = η × steps")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="major")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"Gradient descent on the 5×5 toy, seed {result['seeds'][0]}: imbalance and gap close exponentially "
        "(curves stop at float64 rounding)"
    )
    return save(fig, folder / "theory_decay.png", dpi=120)


def _plot_rates(result: dict[str, Any], folder: Path) -> Path:
    from qkvlab.theory import predicted_gap_rate

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lambdas = [x for x in result["lambda"] if x > 0]
    grid = [max(lambdas) * 1.05 * k / 400 for k in range(1, 401)]
    index = [i for i, x in enumerate(result["lambda"]) if x > 0]
    toys = [("diagonal", result, "o", "C0")] + (
        [("rotated", result["rotated"], "s", "C1")] if "rotated" in result else []
    )
    axes[0].plot(grid, [2 * x for x in grid], color="0.3", lw=1, label="gradient flow: 2λ")
    # The rule is piecewise: sample densely but never on a dᵢ, where it is not defined as a rate.
    gap_grid = [x for x in grid if all(abs(x - d) > 1e-9 for d in result["target_singular_values"])]
    axes[1].plot(
        gap_grid,
        [predicted_gap_rate(result["target_singular_values"], x) for x in gap_grid],
        color="0.3",
        lw=1,
        label="rule: min(4λ, 2(λ + dᵢ) for dᵢ ≤ λ)",
    )
    for name, toy, marker, colour in toys:
        for ax, key in ((axes[0], "decay_rate_measured"), (axes[1], "gap_decay_rate_measured")):
            # a rate that could not be fitted (too few steps to see the decay) is left out, not drawn at 0
            fitted = [i for i in index if toy[key][i] is not None]
            means = [toy[key][i] for i in fitted]
            stds = [toy[f"{key}_std"][i] or 0.0 for i in fitted]
            if not fitted:
                ax.text(0.5, 0.5, f"{name}: no rate could be fitted", transform=ax.transAxes, ha="center")
                continue
            ax.errorbar(
                [result["lambda"][i] for i in fitted],
                means,
                yerr=stds,
                fmt=marker,
                color=colour,
                ms=5,
                capsize=3,
                label=f"measured, {name} target (mean ± std, {len(toy['seeds'])} seeds)",
            )
    for ax, title in ((axes[0], "imbalance ‖AᵀA − BᵀB‖ decay rate"), (axes[1], "gap decay rate")):
        ax.set_xlabel("λ")
        ax.set_ylabel("rate per unit t (1/t)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, folder / "theory_rates.png", dpi=120)


def _plot_optimizers(result: dict[str, Any], folder: Path) -> Path:
    plt = pyplot()
    entries = [("gd", result)] if "lambda" in result else []
    entries += list(result["optimizers"].items())
    fig, axes = plt.subplots(2, len(entries), figsize=(4.2 * len(entries), 7.5), squeeze=False)
    for column, (name, entry) in enumerate(entries):
        ax = axes[0][column]
        lambdas = entry["lambda"]
        _closed_form_lines(ax, entry["target_singular_values"], max(lambdas) * 1.05)
        for j in range(len(entry["final_singular_values"][0])):
            ax.plot(
                lambdas,
                [sv[j] for sv in entry["final_singular_values"]],
                "o",
                color="C0",
                ms=5,
                label="σᵢ(ABᵀ) at the end" if j == 0 else None,
            )
        ax.set_title(f"{name}: σᵢ(ABᵀ) against λ")
        ax.set_xlabel("λ")
        ax.set_ylabel("singular values of ABᵀ")
        ax.grid(alpha=0.3)
        if column == 0:
            ax.legend(fontsize=7)
        ax = axes[1][column]
        colours = _lambda_colours(lambdas)
        for i, lam in enumerate(lambdas):
            points = [
                (a, b)
                for a, b in zip(entry["curves"]["t"], entry["curves"]["imbalance"][i], strict=True)
                if b > 0
            ]
            ax.semilogy(
                [p[0] for p in points], [p[1] for p in points], color=colours[i], lw=1.2, label=f"λ = {lam:g}"
            )
        ax.set_title(f"{name}: imbalance over time")
        ax.set_xlabel("t = Σ η_k")
        ax.set_ylabel("‖AᵀA − BᵀB‖_F")
        ax.set_ylim(bottom=1e-18)
        ax.grid(alpha=0.3)
        if column == 0:
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(
        "Does weight decay act as a nuclear-norm penalty under each optimiser? (5×5 toy, seed 0 curves)"
    )
    return save(fig, folder / "theory_optimizers.png", dpi=120)


def _lambda_axis(ax, lambdas: Sequence[float]) -> None:  # type: ignore[no-untyped-def]
    ax.set_xscale("log")
    ax.set_xticks(lambdas, [f"{x:g}" for x in lambdas])
    ax.minorticks_off()
    ax.set_xlabel("λ (log scale)")


def _plot_completion(completion: dict[str, Any], folder: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    colours = _lambda_colours(completion["lambda"])
    ax = axes[0]
    for i, lam in enumerate(completion["lambda"]):
        nuclear = completion["singular_values_nuclear"][i]
        factored = completion["singular_values_factored"][i]
        ax.semilogy(
            range(1, len(nuclear) + 1),
            [max(v, 1e-16) for v in nuclear],
            "-",
            color=colours[i],
            label=f"nuclear (soft-impute), λ = {lam:g}",
        )
        ax.semilogy(
            range(1, len(factored) + 1),
            [max(v, 1e-16) for v in factored],
            "o",
            color=colours[i],
            ms=4,
            mfc="none",
            label=f"factored (GD, width {completion['width']}), λ = {lam:g}",
        )
    ax.set_xlabel("index i")
    ax.set_ylabel("σᵢ (floored at 1e-16)")
    ax.set_title("spectra of the two solutions (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax = axes[1]
    lambdas = completion["lambda"]
    ax.errorbar(
        lambdas,
        completion["test_rmse_nuclear"],
        yerr=completion["test_rmse_nuclear_std"],
        fmt="-",
        color="C3",
        label="nuclear norm (soft-impute)",
    )
    ax.errorbar(
        lambdas,
        completion["test_rmse_factored"],
        yerr=completion["test_rmse_factored_std"],
        fmt="o",
        color="C0",
        mfc="none",
        label="factored + weight decay (GD)",
    )
    ax.axhline(completion["test_rmse_zero_fill"], color="0.5", ls=":", label="fill with 0")
    _lambda_axis(ax, lambdas)
    ax.set_ylabel("RMSE on unobserved entries")
    ax.set_title("test error against λ (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.semilogy(
        lambdas,
        [max(abs(v), 1e-17) for v in completion["relative_objective_difference_max"]],
        "o-",
        label="|F(A,B) − G(W*)| / G(W*)",
    )
    ax.semilogy(
        lambdas,
        [max(v, 1e-17) for v in completion["relative_distance_max"]],
        "s-",
        label="‖ABᵀ − W*‖_F / ‖W*‖_F",
    )
    ax.axhline(1e-4, color="C3", ls=":", label="1e-4")
    _lambda_axis(ax, lambdas)
    ax.set_ylabel("relative difference (max over seeds)")
    ax.set_title("factored vs nuclear-norm solution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, folder / "theory_completion.png", dpi=120)


def _plot_pretrained(model: dict[str, Any], folder: Path, index: int) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    layers = [row["layer"] for row in model["layers"]]
    for ax, product, title in ((axes[0], "qk", "QK = W_Kᵀ W_Q"), (axes[1], "ov", "OV = P W_V")):
        width = 0.38
        ax.bar(
            [x - width / 2 for x in layers],
            [r[f"{product}_l2_half"] for r in model["layers"]],
            width,
            label="Σ_h ½(‖A‖² + ‖B‖²)",
        )
        ax.bar(
            [x + width / 2 for x in layers],
            [r[f"{product}_nuclear_norm"] for r in model["layers"]],
            width,
            label="Σ_h ‖ABᵀ‖_*",
        )
        ax.set_xlabel("layer")
        ax.set_ylabel("sum over heads")
        ax.set_title(f"{title}: L2 penalty vs nuclear norm")
        ax.set_xticks(layers)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    for product, colour in (("qk", "C0"), ("ov", "C1")):
        ax.plot(
            layers,
            [100 * r[f"{product}_relative_gap"] for r in model["layers"]],
            "o-",
            color=colour,
            label=f"{product.upper()}: {model['source']}",
        )
        ax.plot(
            layers,
            [100 * r[f"{product}_random_relative_gap"] for r in model["layers"]],
            "x--",
            color=colour,
            label=f"{product.upper()}: random factors, same norms",
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("gap / nuclear norm (%)")
    ax.set_title("how far from balanced")
    ax.set_xticks(layers)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"Fig. 4: are the attention factors of {model['source']} balanced?")
    name = Path(str(model["source"])).name.replace(" ", "_") or f"model{index}"
    return save(fig, folder / f"theory_pretrained_{name}.png", dpi=120)


def plot_theory(result: dict[str, Any], folder: str | Path) -> list[Path]:
    """Every figure the result has data for; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if "lambda" in result:
        written += [
            _plot_singular_values(result, folder),
            _plot_decay(result, folder),
            _plot_rates(result, folder),
        ]
    if "optimizers" in result:
        written.append(_plot_optimizers(result, folder))
    if "completion" in result:
        written.append(_plot_completion(result["completion"], folder))
    for index, model in enumerate(result.get("pretrained", [])):
        written.append(_plot_pretrained(model, folder, index))
    return written
