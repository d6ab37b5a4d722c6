"""Tables of paper 001's tuned study (``qkvlab repro finetune``): the rate search of every cell, the
reported runs at each cell's rate, and the seed-paired comparisons the claims rest on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkvlab.render.page import Table, table_markdown
from qkvlab.repro.paper001.tuned import comparisons, curve_mean, rate, summarize

__all__ = ["study_markdown"]


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
    return "\n\n".join(parts)
