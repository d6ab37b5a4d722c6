"""Paper 001's claims on MiniLM + real labelled data: ``qkvlab repro finetune``.

Grid (issue 5): on ``rotten-tomatoes``, targets {QKV, QV, V, QK, K} at λ = 1, and λ ∈ {2, 4, 8}
for QV and QKV, each with full fine-tuning and with LoRA r = 8, over seeds; plus full
fine-tuning of the whole model as the reference. On ``tweet-sentiment``: LoRA QKV against QV at
λ = 1 and at the λ that did best for LoRA QV on rotten-tomatoes (validation), chosen after that
part finishes. Every run writes ``runs/<name>/result.json``; a run with a result is skipped, so an
interrupted grid resumes where it stopped, and resuming with other settings is refused. Runs can
go in parallel processes.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qkvlab.args import check_outputs, positive_int
from qkvlab.args import seeds as seeds_list
from qkvlab.errors import UserError
from qkvlab.experiments import grid as grid_layer
from qkvlab.experiments.grid import Run
from qkvlab.finetune import FinetuneConfig, finetune
from qkvlab.report.tables import pm
from qkvlab.train.checkpoint import write_atomic

__all__ = [
    "DEFAULTS",
    "LR",
    "GridPoint",
    "aggregate",
    "grid",
    "plot_convergence",
    "run_grid",
    "summarize",
    "write_summary",
]


@dataclass(frozen=True)
class GridPoint:
    data: str
    targets: tuple[str, ...]
    method: str
    lr_ratio: float

    @property
    def label(self) -> str:
        targets = "ALL" if self.targets == ("all",) else "".join(t.upper() for t in self.targets)
        return f"{self.data} {self.method} {targets} λ={self.lr_ratio:g}"

    def name(self, seed: int) -> str:
        return f"{self.data}_{self.method}_{'-'.join(self.targets)}_lam{self.lr_ratio:g}_seed{seed}"


LAMBDAS = (2.0, 4.0, 8.0)


def grid(tweet_lambda: float | None = None) -> list[GridPoint]:
    """The rotten-tomatoes grid; with ``tweet_lambda``, also QKV and QV at λ = 1 and that λ on tweets."""
    points = []
    for method in ("full", "lora"):
        for targets in (("q", "k", "v"), ("q", "v"), ("v",), ("q", "k"), ("k",)):
            points.append(GridPoint("rotten-tomatoes", targets, method, 1.0))
        for targets in (("q", "v"), ("q", "k", "v")):
            for lam in LAMBDAS:
                points.append(GridPoint("rotten-tomatoes", targets, method, lam))
    points.append(GridPoint("rotten-tomatoes", ("all",), "full", 1.0))
    if tweet_lambda is not None:
        for lam in sorted({1.0, tweet_lambda}):
            for targets in (("q", "k", "v"), ("q", "v")):
                points.append(GridPoint("tweet-sentiment", targets, "lora", lam))
    return points


def best_lambda(out: Path, seeds: list[int]) -> float | None:
    """The λ with the best final validation score for LoRA QV on rotten-tomatoes, mean over ``seeds``.

    The final score, because the test score is taken there (the best of a noisy curve is biased
    upward). Only λ with a result for every one of ``seeds`` compete; None if there is none.
    The first choice is kept in ``OUT/tweet_lambda.json``, so adding seeds later never changes it.
    """
    chosen = out / "tweet_lambda.json"
    if chosen.is_file():
        return float(json.loads(chosen.read_text())["lambda"])
    scores = {}
    for point, results in _load(out).items():
        if point.data == "rotten-tomatoes" and point.method == "lora" and point.targets == ("q", "v"):
            by_seed = {r["config"]["seed"]: r for r in results}
            if all(s in by_seed for s in seeds):
                scores[point.lr_ratio] = statistics.fmean(by_seed[s]["final_val"] for s in seeds)
    if not scores:
        return None
    best = max(scores, key=scores.get)
    write_atomic(chosen, json.dumps({"lambda": best, "seeds": seeds, "mean_final_val": scores}, indent=1))
    return best


# Learning rates (η_QK; η_V = λ·η_QK), each chosen by a pilot on the *baseline* only (QKV, λ = 1,
# seed 0, validation split), before any other grid point was looked at; no claim was consulted.
# Full: the usual BERT rate 5e-5 still predicted the majority class after 200 steps of batch 16;
# 2e-4 reached 77% validation accuracy. LoRA: 5e-4 (the LoRA paper's RoBERTa-base rate) stayed on
# the majority class for all 150 steps (so did QV and V at λ = 1, which ran before the grid was
# stopped); of 1e-3 and 2e-3, 2e-3 ended higher (78.6% vs 76.2%). The pilots' results are kept
# in results/pilots/.
LR = {"full": 2e-4, "lora": 2e-3}

# What one run costs on a 2-core CPU (~0.34 s per step with two 1-thread workers): 150 steps of
# batch 16 (2,400 training examples, about a quarter of an epoch), a 6-point learning curve on a
# fixed 500-example validation subset, the whole test split at the end.
DEFAULTS = {"max_steps": 150, "batch_size": 16, "eval_every": 25, "max_val_examples": 500, "max_length": 64}


def _worker(run_dir: Path, point: dict[str, Any], seed: int, settings: dict[str, Any]) -> None:
    """One fine-tuning run of the grid (the experiment layer's worker): writes ``run_dir/result.json``."""
    data = settings.get("data_sources", {}).get(point["data"], point["data"])
    common = {k: v for k, v in settings.items() if k in DEFAULTS or k in ("model", "device")}
    config = FinetuneConfig(
        data=data,
        targets=list(point["targets"]),
        method=point["method"],
        lr=settings["lr"][point["method"]],
        lr_ratio=point["lr_ratio"],
        seed=seed,
        save_model=False,
        out=str(run_dir),
        **common,
    )
    finetune(config, progress=False)


def _status(run_dir: Path) -> str:
    return "complete" if (run_dir / "result.json").is_file() else "new"


def _run(point: GridPoint, seed: int) -> Run:
    return Run(point.name(seed), {**asdict(point), "targets": list(point.targets)}, seed)


def _point(data: dict[str, Any]) -> GridPoint:
    return GridPoint(data["data"], tuple(data["targets"]), data["method"], float(data["lr_ratio"]))


def run_grid(
    out: Path,
    seeds: list[int],
    *,
    jobs: int = 1,
    device: str = "auto",
    model: str = "minilm",
    points: list[GridPoint] | None = None,
    data_sources: dict[str, str] | None = None,
    lr: dict[str, float] | None = None,
    echo: Any = print,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Run every grid point × seed that has no ``result.json`` yet; return one status per run.

    ``overrides`` change the per-run settings of :data:`DEFAULTS` (``max_steps``, ``batch_size``, …).
    They are written to ``OUT/settings.json``; resuming with different settings is refused, so one
    results folder never mixes runs made differently. ``data_sources`` maps a grid data name to
    another source (tests use a tiny CSV); ``lr`` replaces :data:`LR` (η_QK per method, for
    follow-up grids). Runs go seed by seed, so an interrupted grid holds complete seeds first.
    """
    seeds = list(dict.fromkeys(seeds))
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown grid settings {sorted(unknown)}")
    settings: dict[str, Any] = {**DEFAULTS, **overrides, "model": model, "lr": dict(lr or LR)}
    if data_sources:
        settings["data_sources"] = dict(data_sources)
    results: list[dict[str, Any]] = []
    # the tweet comparison uses the best λ found on rotten-tomatoes, so it runs second (None)
    phases = [points] if points is not None else [grid(), None]
    for phase in phases:
        tweet_lambda = None
        if phase is None:
            tweet_lambda = best_lambda(out, seeds)
            if tweet_lambda is None:
                continue
            phase = grid(tweet_lambda)[len(grid()) :]
            echo(
                "repro finetune: tweet-sentiment at λ = 1"
                + (f" and λ = {tweet_lambda:g}" if tweet_lambda != 1.0 else "")
                + f" (the best final validation score of LoRA QV above was at λ = {tweet_lambda:g})"
            )
        results += grid_layer.run_grid(
            out,
            [_run(p, s) for s in seeds for p in phase],
            _worker,
            settings=settings,
            worker_settings={**settings, "device": device},
            status=_status,
            jobs=jobs,
            log="finetune.log",
            echo=echo,
            label="repro finetune",
            session={"seeds": seeds, "device": device, "tweet_lambda": tweet_lambda},
        )
    return results


def _legacy(folder: Path) -> tuple[dict[str, Any], int] | None:
    """Runs written before run.json: their point and seed from the config in result.json."""
    path = folder / "result.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())["config"]
    return {k: config[k] for k in ("data", "targets", "method", "lr_ratio")}, int(config["seed"])


def _read(folder: Path) -> dict[str, Any] | None:
    path = folder / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _load(out: Path) -> dict[GridPoint, list[dict[str, Any]]]:
    """Grid point → its results (one per seed), points in grid order, from what each run stored."""
    found = {
        _point(dict(key)): list(by_seed.values())
        for key, by_seed in grid_layer.load_runs(out, _read, _legacy).items()
    }
    candidates = grid(1.0) + [p for lam in LAMBDAS for p in grid(lam)[len(grid()) :] if p.lr_ratio != 1.0]
    order = {p: i for i, p in enumerate(dict.fromkeys(candidates))}
    return {p: found[p] for p in sorted(found, key=lambda p: order.get(p, len(order)))}


_stats = grid_layer.mean_std


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _run_peaks(results: list[dict[str, Any]]) -> list[float]:
    """Per-run peak RSS figures; older results measured the whole worker process and are left out."""
    return [r["peak_rss_gib"] for r in results if r.get("peak_rss_scope") == "run"]


def aggregate(out: Path) -> list[dict[str, Any]]:
    """Per grid point with results: mean/std over seeds of every reported number (``summary.json``).

    ``val_curve_mean`` is the validation score averaged over the learning curve's points: the
    area under the curve, a convergence measure that uses every evaluation rather than one
    threshold crossing.
    """
    rows = []
    for point, results in _load(out).items():
        metric = results[0]["main_metric"]
        steps = [c["step"] for c in results[0]["curve"]]
        curves = [
            [c[metric] for c in r["curve"]] for r in results if [c["step"] for c in r["curve"]] == steps
        ]
        rows.append(
            {
                "label": point.label,
                "data": point.data,
                "method": point.method,
                "targets": list(point.targets),
                "lr_ratio": point.lr_ratio,
                "lr": results[0]["config"]["lr"],
                "seeds": sorted(r["config"]["seed"] for r in results),
                "metric": metric,
                "test": {k: _stats([r["test"][k] for r in results]) for k in results[0]["test"]},
                "best_val": _stats([r["best_val"] for r in results]),
                "final_val": _stats([r["final_val"] for r in results]),
                "val_curve_mean": _stats([statistics.fmean(c) for c in curves]),
                "steps_to_95pct_of_best": _stats([float(r["steps_to_95pct_of_best"]) for r in results]),
                "curve": {
                    "step": steps,
                    "mean": [statistics.fmean(v) for v in zip(*curves, strict=True)],
                    "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*curves, strict=True)],
                },
                "trainable_parameters": results[0]["trainable_parameters"],
                "seconds_per_step_median": statistics.median(r["seconds_per_step"] for r in results),
                "peak_rss_gib_median": _median_or_none(_run_peaks(results)),
                "peak_gpu_allocated_gib_max": max(
                    (r["peak_gpu_allocated_gib"] for r in results if "peak_gpu_allocated_gib" in r),
                    default=None,
                ),
                "device": results[0]["device"],
            }
        )
    return rows


def _memory(row: dict[str, Any]) -> str:
    if row["peak_gpu_allocated_gib_max"] is not None:
        return f"{row['peak_gpu_allocated_gib_max']:.2f} GPU"
    return "—" if row["peak_rss_gib_median"] is None else f"{row['peak_rss_gib_median']:.2f} RSS"


def summarize(out: Path) -> str:
    """A markdown table (mean ± std over seeds) of every grid point with results."""
    lines = [
        "| setting | η_QK | seeds | test score (%)† | test macro-F1 (%) | test MCC (×100) | best val (%) | "
        "mean val over curve (%) | steps to 95% of best | trainable params | ms/step | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in aggregate(out):
        test = row["test"]
        f1 = pm(test["macro_f1"], 1, scale=100) if "macro_f1" in test else "—"
        mcc = pm(test["mcc"], 1, scale=100) if "mcc" in test else "—"
        lines.append(
            f"| {row['label']} | {row['lr']:g} | {len(row['seeds'])} | {pm(test[row['metric']], 1, scale=100)} | {f1} | {mcc} | "
            f"{pm(row['best_val'], 1, scale=100)} | {pm(row['val_curve_mean'], 1, scale=100)} | "
            f"{pm(row['steps_to_95pct_of_best'], 0)} | {row['trainable_parameters']:,} | "
            f"{row['seconds_per_step_median'] * 1e3:.0f} | {_memory(row)} |"
        )
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


def write_summary(out: Path) -> Path:
    """``OUT/summary.json``: :func:`aggregate` plus the grid settings, for reports."""
    settings = json.loads((out / "settings.json").read_text()) if (out / "settings.json").is_file() else {}
    path = out / "summary.json"
    write_atomic(
        path, json.dumps({"schema_version": 1, "settings": settings, "points": aggregate(out)}, indent=1)
    )
    return path


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


def _versus(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> str:
    """Test score of a, of b, and a − b paired by seed on test and on mean validation, over common seeds."""
    a, b = _common(a, b)
    return f"{_cell(a, _test)} | {_cell(b, _test)} | {_paired(a, b, _test)} | {_paired(a, b, _curve_mean)}"


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
    lines = [
        "| method | QV λ | QV test acc | QKV (λ = 1) test acc | QV − QKV, test | QV − QKV, mean val over curve |",
        "|---|---|---|---|---|---|",
    ]
    for method in ("full", "lora"):
        base = runs.get((rt, method, ("q", "k", "v"), 1.0))
        for lam in (1.0, *LAMBDAS):
            qv = runs.get((rt, method, ("q", "v"), lam))
            if qv and base:
                lines.append(f"| {method} | {lam:g} | {_versus(qv, base)} |")
    sections.append(("QV vs QKV (rotten-tomatoes)", lines))

    # 2. V vs K
    lines = [
        "| method | comparison | first | second | first − second, test | first − second, mean val |",
        "|---|---|---|---|---|---|",
    ]
    for method in ("full", "lora"):
        for first, second in ((("v",), ("k",)), (("q", "v"), ("q", "k"))):
            a, b = runs.get((rt, method, first, 1.0)), runs.get((rt, method, second, 1.0))
            if a and b:
                lines.append(f"| {method} | {name(first)} vs {name(second)} | {_versus(a, b)} |")
    sections.append(("V vs K at λ = 1 (rotten-tomatoes)", lines))

    # 3 and 4. λ: convergence and stability
    lines = [
        "| method | targets | λ | η_V | val acc at ⅓ of the run | mean val over curve | steps to 95% of best* | "
        "final test acc | runs collapsed to one class | best − final val |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in ("full", "lora"):
        for targets in (("q", "v"), ("q", "k", "v")):
            for lam in (1.0, *LAMBDAS):
                r = runs.get((rt, method, targets, lam))
                if not r:
                    continue
                any_run = next(iter(r.values()))
                lines.append(
                    f"| {method} | {name(targets)} | {lam:g} | {any_run['config']['lr'] * lam:.2g} | "
                    f"{_cell(r, _early)} | {_cell(r, _curve_mean)} | "
                    f"{_cell(r, lambda x: x['steps_to_95pct_of_best'], 1.0, 0)} | {_cell(r, _test)} | "
                    f"{sum(_collapsed(x) for x in r.values())}/{len(r)} | "
                    f"{_cell(r, lambda x: x['best_val'] - x['final_val'])} |"
                )
    lines.append("")
    lines.append(
        "*A run that never leaves the majority class reaches 95% of its (flat) best at the first "
        "evaluation, so read this column together with the collapsed count and the curve mean."
    )
    sections.append(("λ = η_V/η_QK: convergence and stability (rotten-tomatoes)", lines))

    # 5. cost
    lines = [
        "| method | targets | trainable params | ms/step (median)‡ | peak RSS per run (GiB, median) |",
        "|---|---|---|---|---|",
    ]
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
            lines.append(
                f"| {method} | {name(targets)} | {values[0]['trainable_parameters']:,} | "
                f"{statistics.median(x['seconds_per_step'] for x in values) * 1e3:.0f} | {_peak_rss(values)} |"
            )
    lines.append("")
    lines.append(
        "‡Measured inside the grid: with `--jobs N` the workers share the machine, so read these as "
        "relative figures. BENCHMARKS.md measures the same configurations one at a time."
    )
    sections.append(("Cost per configuration (rotten-tomatoes, λ = 1)", lines))

    # tweets
    lines = [
        "| λ | QV test acc | QKV test acc | QV − QKV, test | QV test macro-F1 | QKV test macro-F1 |",
        "|---|---|---|---|---|---|",
    ]
    for lam in sorted({k[3] for k in runs if k[0] == "tweet-sentiment"}):
        qv = runs.get(("tweet-sentiment", "lora", ("q", "v"), lam))
        qkv = runs.get(("tweet-sentiment", "lora", ("q", "k", "v"), lam))
        if qv and qkv:
            qv, qkv = _common(qv, qkv)
            f1 = lambda x: x["test"]["macro_f1"]  # noqa: E731
            lines.append(
                f"| {lam:g} | {_cell(qv, _test)} | {_cell(qkv, _test)} | {_paired(qv, qkv, _test)} | "
                f"{_cell(qv, f1)} | {_cell(qkv, f1)} |"
            )
    sections.append(("tweet-sentiment, LoRA r = 8: QV vs QKV", lines))
    return "\n\n".join(
        f"### {title}\n\n" + "\n".join(body)
        for title, body in sections
        if sum(line.startswith("| ") for line in body) > 1
    )


# -- `qkvlab repro finetune` ---------------------------------------------------------------------


def _arguments(parser: Any) -> None:
    parser.add_argument("--out", default="runs/repro-finetune", help="results folder (resumable)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs in parallel processes")
    parser.add_argument("--max-steps", type=positive_int, default=150, help="steps per run (default 150)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--eval-every", type=positive_int, default=25)
    parser.add_argument(
        "--max-val-examples", type=positive_int, default=500, help="learning-curve subset of validation"
    )
    parser.add_argument("--plot", metavar="DIR", default=None, help="write convergence plots (PNG) here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--model", default="minilm", help="the pretrained model (default: the packaged MiniLM)"
    )
    parser.add_argument("--summary-only", action="store_true", help="print the tables from existing results")


def _main(args: Any) -> int:
    seeds = seeds_list(args.seeds)
    check_outputs([], [args.out, args.plot])  # before hours of runs, not after
    out = Path(args.out)
    if not args.summary_only:
        run_grid(
            out,
            seeds,
            jobs=args.jobs,
            device=args.device,
            model=args.model,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            eval_every=args.eval_every,
            max_val_examples=args.max_val_examples,
        )
    elif not (out / "runs").is_dir():
        raise UserError(f"{out} holds no runs; run `qkvlab repro finetune --out {out}` first")
    print(summarize(out))
    print()
    print(claims_markdown(out))
    print(f"\nwrote {write_summary(out)}")
    if args.plot:
        for path in plot_convergence(out, Path(args.plot)):
            print(f"wrote {path}")
    return 0


def _report(folder: Path, figures: Path) -> list[Any]:
    """Sections for ``qkvlab report``: every setting's numbers, the per-claim tables and the curves."""
    from qkvlab.report.page import Figure, Markdown, Section

    figures.mkdir(parents=True, exist_ok=True)
    curves = [Figure(p, p.stem.replace("_", " ")) for p in plot_convergence(folder, figures)]
    return [
        Section(f"Fine-tuning settings ({folder.name})", [Markdown(summarize(folder))]),
        Section(f"Paper 001's claims ({folder.name})", [Markdown(claims_markdown(folder)), *curves]),
    ]


EXPERIMENT = grid_layer.register(
    grid_layer.Experiment(
        "finetune",
        "paper 001 on MiniLM: QV vs QKV, V vs K, λ = η_V/η_QK (full and LoRA)",
        _arguments,
        _main,
        report=_report,
        detect=lambda folder: (
            (folder / "tweet_lambda.json").is_file() or any((folder / "runs").glob("*/result.json"))
        ),
    )
)
