"""Tables and figures of paper 001's claims (``qkvlab repro finetune``): the per-setting table, the
per-claim tables and the convergence curves. The numbers come from
:mod:`qkvlab.repro.paper001.pilot`; this module only arranges them."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from qkvlab.grid import runner as grid_layer
from qkvlab.render.tables import markdown_table, pm
from qkvlab.repro.paper001.pilot import LAMBDAS, _load, _run_peaks, aggregate

_stats = grid_layer.mean_std

__all__ = ["claims_markdown", "plot_convergence", "summarize"]


def _memory(row: dict[str, Any]) -> str:
    if row["peak_gpu_allocated_gib_max"] is not None:
        return f"{row['peak_gpu_allocated_gib_max']:.2f} GPU"
    return "—" if row["peak_rss_gib_median"] is None else f"{row['peak_rss_gib_median']:.2f} RSS"


def summarize(out: Path) -> str:
    """A markdown table (mean ± std over seeds) of every grid point with results."""
    headers = [
        "setting",
        "η_QK",
        "seeds",
        "test score (%)†",
        "test macro-F1 (%)",
        "test MCC (×100)",
        "best val (%)",
        "mean val over curve (%)",
        "steps to 95% of best",
        "trainable params",
        "ms/step",
        "peak memory (GiB)",
    ]
    rows = []
    for row in aggregate(out):
        test = row["test"]
        rows.append(
            [
                row["label"],
                f"{row['lr']:g}",
                len(row["seeds"]),
                pm(test[row["metric"]], 1, scale=100),
                pm(test["macro_f1"], 1, scale=100) if "macro_f1" in test else "—",
                pm(test["mcc"], 1, scale=100) if "mcc" in test else "—",
                pm(row["best_val"], 1, scale=100),
                pm(row["val_curve_mean"], 1, scale=100),
                pm(row["steps_to_95pct_of_best"], 0),
                f"{row['trainable_parameters']:,}",
                f"{row['seconds_per_step_median'] * 1e3:.0f}",
                _memory(row),
            ]
        )
    lines = markdown_table(headers, rows)
    lines.append("")
    lines.append(
        "†accuracy for classes, Pearson r for a regression label; mean ± sample std over seeds. "
        "Peak memory: GPU max allocated, or the median per-run peak RSS on CPU."
    )
    return "\n".join(lines)


def plot_convergence(out: Path, folder: Path) -> list[Path]:
    """Validation learning curves (mean ± std over seeds): per λ for QV and QKV, and per target set."""
    from qkvlab.report.figures import pyplot, save

    plt = pyplot()

    rows = aggregate(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    settings = out / "settings.json"
    model = json.loads(settings.read_text()).get("model", "?") if settings.is_file() else "?"
    model = {"minilm": "MiniLM-L6"}.get(model, Path(model).name)

    def draw(ax, selected: list[dict[str, Any]], key) -> None:
        for row in selected:
            steps, mean, std = row["curve"]["step"], row["curve"]["mean"], row["curve"]["std"]
            (line,) = ax.plot(steps, [m * 100 for m in mean], marker="o", ms=3, label=key(row))
            ax.fill_between(
                steps,
                [(m - s) * 100 for m, s in zip(mean, std, strict=True)],
                [(m + s) * 100 for m, s in zip(mean, std, strict=True)],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    for data in dict.fromkeys(r["data"] for r in rows):
        for method in ("full", "lora"):
            mine = [r for r in rows if r["data"] == data and r["method"] == method]
            if not mine:
                continue
            target_sets = [t for t in (["q", "v"], ["q", "k", "v"]) if any(r["targets"] == t for r in mine)]
            fig, axes = plt.subplots(
                1, len(target_sets) + 1, figsize=(5 * (len(target_sets) + 1), 3.6), squeeze=False, sharey=True
            )
            for ax, targets in zip(axes[0], target_sets, strict=False):
                selected = sorted((r for r in mine if r["targets"] == targets), key=lambda r: r["lr_ratio"])
                draw(ax, selected, lambda r: f"λ = {r['lr_ratio']:g}")
                ax.set_title(f"{method} {''.join(targets).upper()}: η_V = λ·η_QK")
            at_one = [r for r in mine if r["lr_ratio"] == 1.0]
            draw(axes[0][-1], at_one, lambda r: "".join(r["targets"]).upper())
            axes[0][-1].set_title(f"{method}: which matrices, λ = 1")
            axes[0][0].set_ylabel(f"validation {mine[0]['metric']} (%)")
            n_seeds = max(len(r["seeds"]) for r in mine)
            fig.suptitle(
                f"{data}, {model}: validation curves, mean ± std over {n_seeds} seed{'s' * (n_seeds > 1)}",
                fontsize=10,
            )
            written.append(save(fig, folder / f"convergence_{data}_{method}.png"))
    return written


def _runs(out: Path) -> dict[tuple[str, str, tuple[str, ...], float], dict[int, dict[str, Any]]]:
    """(data, method, targets, λ) → seed → result."""
    return {
        (p.data, p.method, p.targets, p.lr_ratio): {r["config"]["seed"]: r for r in results}
        for p, results in _load(out).items()
    }


def _paired(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], key) -> str:
    """mean ± std over the seeds both have of key(a) − key(b), in points; 'n/a' without common seeds."""
    diff = grid_layer.paired({s: key(r) for s, r in a.items()}, {s: key(r) for s, r in b.items()}, 100)
    if diff is None:
        return "n/a"
    return f"{diff['mean']:+.1f} ± {diff['std']:.1f} ({diff['wins']}/{diff['n']} seeds > 0)"


def _cell(runs: dict[int, dict[str, Any]] | None, key, scale: float = 100.0, digits: int = 1) -> str:
    if not runs:
        return "—"
    return pm(_stats([key(r) for r in runs.values()]), digits, scale)


def _curve_mean(r: dict[str, Any]) -> float:
    return statistics.fmean(c[r["main_metric"]] for c in r["curve"])


def _early(r: dict[str, Any]) -> float:
    """The validation score at the first evaluation at or after a third of the run's steps."""
    third = r["curve"][-1]["step"] / 3
    return next(c for c in r["curve"] if c["step"] >= third)[r["main_metric"]]


def _test(r: dict[str, Any]) -> float:
    return r["test"][r["main_metric"]]


def _collapsed(r: dict[str, Any]) -> bool:
    """The run ends putting ≥ 95% of the test examples in one class (results written before the
    class counts were recorded: test |MCC| < 0.05, i.e. no better than a constant guess)."""
    counts = r.get("test_predicted_counts")
    if counts:
        return max(counts) >= 0.95 * sum(counts)
    return "mcc" in r["test"] and abs(r["test"]["mcc"]) < 0.05


def _common(a: dict[int, Any], b: dict[int, Any]) -> tuple[dict[int, Any], dict[int, Any]]:
    seeds = set(a) & set(b)
    return {s: a[s] for s in seeds}, {s: b[s] for s in seeds}


def _versus(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> list[str]:
    """Four cells: test score of a, of b, and a − b paired by seed on test and on mean validation, over
    common seeds."""
    a, b = _common(a, b)
    return [_cell(a, _test), _cell(b, _test), _paired(a, b, _test), _paired(a, b, _curve_mean)]


def _peak_rss(runs: list[dict[str, Any]]) -> str:
    """Median per-run peak RSS, with how many runs it covers."""
    values = _run_peaks(runs)
    return f"{statistics.median(values):.2f} (n={len(values)})" if values else "—"


def claims_markdown(out: Path) -> str:
    """The comparisons each paper-001 claim rests on, as markdown tables computed from the results.

    Differences are paired by seed (same seed: same batch order and head initialisation) and given
    as mean ± std over seeds in percentage points, with how many seeds favour the first setting.
    """
    runs = _runs(out)
    rt = "rotten-tomatoes"
    sections = []

    def name(targets: tuple[str, ...]) -> str:
        return "ALL" if targets == ("all",) else "".join(t.upper() for t in targets)

    # 1. QV ≥ QKV
    rows = []
    for method in ("full", "lora"):
        base = runs.get((rt, method, ("q", "k", "v"), 1.0))
        for lam in (1.0, *LAMBDAS):
            qv = runs.get((rt, method, ("q", "v"), lam))
            if qv and base:
                rows.append([method, f"{lam:g}", *_versus(qv, base)])
    headers = [
        "method",
        "QV λ",
        "QV test acc",
        "QKV (λ = 1) test acc",
        "QV − QKV, test",
        "QV − QKV, mean val over curve",
    ]
    sections.append(("QV vs QKV (rotten-tomatoes)", markdown_table(headers, rows)))

    # 2. V vs K
    rows = []
    for method in ("full", "lora"):
        for first, second in ((("v",), ("k",)), (("q", "v"), ("q", "k"))):
            a, b = runs.get((rt, method, first, 1.0)), runs.get((rt, method, second, 1.0))
            if a and b:
                rows.append([method, f"{name(first)} vs {name(second)}", *_versus(a, b)])
    headers = ["method", "comparison", "first", "second", "first − second, test", "first − second, mean val"]
    sections.append(("V vs K at λ = 1 (rotten-tomatoes)", markdown_table(headers, rows)))

    # 3 and 4. λ: convergence and stability
    rows = []
    for method in ("full", "lora"):
        for targets in (("q", "v"), ("q", "k", "v")):
            for lam in (1.0, *LAMBDAS):
                r = runs.get((rt, method, targets, lam))
                if not r:
                    continue
                any_run = next(iter(r.values()))
                rows.append(
                    [
                        method,
                        name(targets),
                        f"{lam:g}",
                        f"{any_run['config']['lr'] * lam:.2g}",
                        _cell(r, _early),
                        _cell(r, _curve_mean),
                        _cell(r, lambda x: x["steps_to_95pct_of_best"], 1.0, 0),
                        _cell(r, _test),
                        f"{sum(_collapsed(x) for x in r.values())}/{len(r)}",
                        _cell(r, lambda x: x["best_val"] - x["final_val"]),
                    ]
                )
    headers = [
        "method",
        "targets",
        "λ",
        "η_V",
        "val acc at ⅓ of the run",
        "mean val over curve",
        "steps to 95% of best*",
        "final test acc",
        "runs collapsed to one class",
        "best − final val",
    ]
    lines = markdown_table(headers, rows)
    lines.append("")
    lines.append(
        "*A run that never leaves the majority class reaches 95% of its (flat) best at the first "
        "evaluation, so read this column together with the collapsed count and the curve mean."
    )
    sections.append(("λ = η_V/η_QK: convergence and stability (rotten-tomatoes)", lines))

    # 5. cost
    rows = []
    for method, targets in (
        ("full", ("all",)),
        ("full", ("q", "k", "v")),
        ("full", ("q", "v")),
        ("lora", ("q", "k", "v")),
        ("lora", ("q", "v")),
    ):
        r = runs.get((rt, method, targets, 1.0))
        if r:
            values = list(r.values())
            rows.append(
                [
                    method,
                    name(targets),
                    f"{values[0]['trainable_parameters']:,}",
                    f"{statistics.median(x['seconds_per_step'] for x in values) * 1e3:.0f}",
                    _peak_rss(values),
                ]
            )
    headers = ["method", "targets", "trainable params", "ms/step (median)‡", "peak RSS per run (GiB, median)"]
    lines = markdown_table(headers, rows)
    lines.append("")
    lines.append(
        "‡Measured inside the grid: with `--jobs N` the workers share the machine, so read these as "
        "relative figures. BENCHMARKS.md measures the same configurations one at a time."
    )
    sections.append(("Cost per configuration (rotten-tomatoes, λ = 1)", lines))

    # tweets
    rows = []
    for lam in sorted({k[3] for k in runs if k[0] == "tweet-sentiment"}):
        qv = runs.get(("tweet-sentiment", "lora", ("q", "v"), lam))
        qkv = runs.get(("tweet-sentiment", "lora", ("q", "k", "v"), lam))
        if qv and qkv:
            qv, qkv = _common(qv, qkv)
            f1 = lambda x: x["test"]["macro_f1"]  # noqa: E731
            rows.append(
                [
                    f"{lam:g}",
                    _cell(qv, _test),
                    _cell(qkv, _test),
                    _paired(qv, qkv, _test),
                    _cell(qv, f1),
                    _cell(qkv, f1),
                ]
            )
    headers = ["λ", "QV test acc", "QKV test acc", "QV − QKV, test", "QV test macro-F1", "QKV test macro-F1"]
    sections.append(("tweet-sentiment, LoRA r = 8: QV vs QKV", markdown_table(headers, rows)))
    return "\n\n".join(
        f"### {title}\n\n" + "\n".join(body)
        for title, body in sections
        if sum(line.startswith("| ") for line in body) > 1
    )
