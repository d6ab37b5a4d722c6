"""Tables of paper 001's tuned study (``qkvlab repro finetune``): the rate search of every cell, the
reported runs at each cell's rate, and the seed-paired comparisons the claims rest on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkvlab.render.page import Table, table_markdown
from qkvlab.repro.paper001.tuned import SELECTION_SEED, best_lambda, comparisons, curve_mean, rate, summarize

__all__ = ["curve_band", "plot_study", "study_markdown"]


def _pm(values: list[float], scale: float = 100.0) -> str:
    import statistics

    if not values:
        return "–"
    mean = scale * statistics.fmean(values)
    spread = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def _diff(d: dict[str, Any] | None) -> str:
    if d is None:
        return "–"
    return f"{d['mean']:+.1f} ± {d['std']:.1f} ({d['wins']}/{d['n']})"


def study_markdown(out: Path) -> str:
    summary = summarize(out)
    rows = summary["rows"]
    search = Table(
        ["cell", "η_QK tried: final val acc on seed 100", "chosen η_QK", "η_V", "at an edge"],
        [
            [
                cell.label,
                ", ".join(
                    f"{rate(k):.3g}: "
                    + (f"{100 * row['search']['scores'][k]:.1f}" if k in row["search"]["scores"] else "…")
                    for k in row["search"]["exponents"]
                ),
                "…" if row["search"]["chosen"] is None else f"{rate(row['search']['chosen']):.3g}",
                "…"
                if row["search"]["chosen"] is None
                else f"{cell.lr_ratio * rate(row['search']['chosen']):.3g}",
                "…"
                if row["search"]["at_edge"] is None
                else ("yes, after 2 extensions" if row["search"]["at_edge"] else "no"),
            ]
            for cell, row in rows.items()
        ],
        "Rate search: one run per rate on the selection seed (100, never reported); the chosen rate has the best "
        "final validation accuracy; a best rate at an edge of the grid extends it by a half-decade, at most twice.",
    )
    thresholds = ", ".join(f"{m} {100 * t:.1f} %" for m, t in sorted(summary["thresholds"].items()) if t)
    reported = Table(
        [
            "cell",
            "η_QK",
            "seeds",
            "test acc (%)",
            "final val acc (%)",
            "mean val curve (%)",
            "steps to threshold",
        ],
        [
            [
                cell.label,
                f"{rate(row['search']['chosen']):.3g}",
                ",".join(map(str, sorted(row["runs"]))),
                _pm([r["test"]["accuracy"] for r in row["runs"].values()]),
                _pm([r["final_val"] for r in row["runs"].values()]),
                _pm([curve_mean(r) for r in row["runs"].values()]),
                " / ".join(
                    "never" if v is None else str(v) for _, v in sorted(row["steps_to_threshold"].items())
                ),
            ]
            for cell, row in rows.items()
            if row["runs"]
        ],
        "Each cell at its own tuned rate, seeds 0, 1, 2 (mean ± std). Threshold for convergence: 95 % of the best "
        f"cell's mean final validation accuracy ({thresholds or 'not yet known'}); validation every 80 steps of 637.",
    )
    control_rows = [
        [
            f"{c['cell'].label} at η_QK = η_V = {rate(c['exponent']):.3g} (from {c['from'].label})",
            ",".join(map(str, sorted(c["runs"]))),
            _pm([r["test"]["accuracy"] for r in c["runs"].values()]),
            _pm([r["final_val"] for r in c["runs"].values()]),
            _pm([curve_mean(r) for r in c["runs"].values()]),
        ]
        for c in summary["controls"]
        if c["runs"]
    ]
    controls = Table(
        ["equal-rate control", "seeds", "test acc (%)", "final val acc (%)", "mean val curve (%)"],
        control_rows,
        "λ = 1 with every trained matrix at the value rate η_V of the best λ > 1 cell.",
    )
    paired = Table(
        ["claim", "a", "b", "test a − b (pts)", "final val a − b", "mean val curve a − b"],
        [
            [c["claim"], c["a"], c["b"], _diff(c["test"]), _diff(c["final_val"]), _diff(c["auc"])]
            for c in comparisons(summary)
        ],
        "Seed-paired differences in percentage points, mean ± std (seeds where a is ahead / seeds).",
    )
    parts = [table_markdown(search), table_markdown(reported)]
    if control_rows:
        parts.append(table_markdown(controls))
    if paired.rows:
        parts.append(table_markdown(paired))
    best = _best_lambda_table(summary)
    if best.rows:
        parts.append(table_markdown(best))
    return "\n\n".join(parts)


def _best_lambda_table(summary: dict[str, Any]) -> Table:
    """The best λ of each (method, targets) with every λ finished, and each seed's own best as its spread."""
    rows = []
    for method in sorted({c.method for c in summary["rows"]}):
        for targets in (("q", "v"), ("q", "k", "v")):
            found = best_lambda(summary, method, targets)
            if found is None or len(found["lambdas"]) < 2:
                continue
            rows.append(
                [
                    f"{method} {''.join(targets).upper()}",
                    ", ".join(
                        f"λ={x:g}: {100 * found['means'][x]:.1f} ± {100 * found['stds'][x]:.1f}"
                        for x in found["lambdas"]
                    ),
                    f"{found['best']:g}",
                    " / ".join(f"{found['per_seed'][s]:g}" for s in sorted(found["per_seed"])),
                ]
            )
    return Table(
        ["targets", "final val acc (%) at each λ's tuned rate", "best λ (mean)", "best λ per seed"],
        rows,
        "Best λ by the mean final validation accuracy of the reported seeds at each λ's tuned rate (ties go to "
        "the smaller λ; the test split is not consulted), with each seed's own best λ as its spread "
        "(this table was added after MiniLM's study had finished, before any reported run of mpnet's).",
    )


# -- figures ---------------------------------------------------------------------------------------

_MODEL_NAMES = {"minilm": "MiniLM-L6", "mpnet": "mpnet-base"}
_PANELS = ((("q", "v"),), (("q", "k", "v"),), (("v",), ("k",)))


def curve_band(runs: dict[int, dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """Validation accuracy (%) over the steps every run evaluated at: mean and sample std over seeds."""
    import statistics

    by_step: dict[int, list[float]] = {}
    for result in runs.values():
        for point in result["curve"]:
            by_step.setdefault(int(point["step"]), []).append(100 * point["accuracy"])
    steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))
    mean = [statistics.fmean(by_step[s]) for s in steps]
    std = [statistics.stdev(by_step[s]) if len(runs) > 1 else 0.0 for s in steps]
    return steps, mean, std


def plot_study(out: Path, folder: Path) -> list[Path]:
    """Two figures per method: the rate search (final validation accuracy on the selection seed against
    η_QK, one line per λ, the chosen rate filled) and the validation curves of the reported seeds at
    each cell's tuned rate (mean ± std), with the equal-rate control dashed."""
    import json

    from qkvlab.report.figures import pyplot, save

    plt = pyplot()
    summary = summarize(out)
    settings = out / "settings.json"
    model = json.loads(settings.read_text()).get("model", "?") if settings.is_file() else "?"
    name = _MODEL_NAMES.get(model, Path(model).name)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for method in sorted({c.method for c in summary["rows"]}):
        rows = {c: r for c, r in summary["rows"].items() if c.method == method}
        panels = [p for p in _PANELS if any(c.targets in p for c in rows)]

        size = (max(4.6 * len(panels), 6.4), 3.6)  # one panel still fits the title
        fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False, sharey=True)
        for ax, panel in zip(axes[0], panels, strict=True):
            tried = sorted({k for c, r in rows.items() if c.targets in panel for k in r["search"]["scores"]})
            for cell, row in rows.items():
                if cell.targets not in panel:
                    continue
                scores = row["search"]["scores"]
                ks = sorted(scores)
                label = f"λ = {cell.lr_ratio:g}" if len(panel) == 1 else "".join(cell.targets).upper()
                (line,) = ax.plot(
                    [rate(k) for k in ks], [100 * scores[k] for k in ks], marker="o", ms=4, label=label
                )
                chosen = row["search"]["chosen"]
                if chosen is not None:
                    ax.plot([rate(chosen)], [100 * scores[chosen]], marker="*", ms=13, color=line.get_color())
            ax.set_xscale("log")
            ax.minorticks_off()  # the rates tried, not log-axis minor labels that collide
            ax.set_xticks([rate(k) for k in tried], [f"{rate(k):.2g}" for k in tried], fontsize=8)
            ax.set_xlabel("η_QK")
            ax.set_title(f"{method} {' vs '.join(''.join(t).upper() for t in panel)}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("final validation accuracy (%)")
        fig.suptitle(
            f"{name}, {method}: rate search on the selection seed ({SELECTION_SEED}; ★ chosen)", fontsize=10
        )
        written.append(save(fig, folder / f"tuned_{model}_{method}_rates.png"))

        fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False, sharey=True)
        for ax, panel in zip(axes[0], panels, strict=True):
            drawn = [(c, r["runs"]) for c, r in rows.items() if c.targets in panel and r["runs"]]
            drawn += [
                (control["cell"], control["runs"], control)
                for control in summary["controls"]
                if control["cell"].method == method and control["cell"].targets in panel and control["runs"]
            ]
            for cell, runs, *control in drawn:
                steps, mean, std = curve_band(runs)
                if control:
                    label, style = f"λ = 1 at η = {rate(control[0]['exponent']):.3g} (control)", "--"
                else:
                    chosen = rate(rows[cell]["search"]["chosen"])
                    what = f"λ = {cell.lr_ratio:g}" if len(panel) == 1 else "".join(cell.targets).upper()
                    label, style = f"{what}, η_QK = {chosen:.3g}", "-"
                (line,) = ax.plot(steps, mean, style, marker="o", ms=3, label=label)
                ax.fill_between(
                    steps,
                    [m - s for m, s in zip(mean, std, strict=True)],
                    [m + s for m, s in zip(mean, std, strict=True)],
                    color=line.get_color(),
                    alpha=0.15,
                )
            ax.set_xlabel("step")
            ax.set_title(f"{method} {' vs '.join(''.join(t).upper() for t in panel)}, tuned rates")
            ax.grid(alpha=0.3)
            if drawn:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no reported runs yet", ha="center", va="center", transform=ax.transAxes)
        axes[0][0].set_ylabel("validation accuracy (%)")
        fig.suptitle(f"{name}, {method}: validation curves, mean ± std over the reported seeds", fontsize=10)
        written.append(save(fig, folder / f"tuned_{model}_{method}_curves.png"))
    return written
