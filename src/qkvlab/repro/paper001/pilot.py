"""Paper 001's pilot grid on MiniLM + real labelled data: ``qkvlab repro finetune --pilot``.

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

from qkvlab.errors import UserError
from qkvlab.files import write_atomic
from qkvlab.grid import runner as grid_layer
from qkvlab.grid.runner import Run

__all__ = [
    "DEFAULTS",
    "LR",
    "GridPoint",
    "aggregate",
    "grid",
    "run_grid",
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
    from qkvlab.finetune import FinetuneConfig, finetune

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
    result = grid_layer.read_result(folder)
    if result is None:
        return None
    config = result.get("config")
    if not isinstance(config, dict) or not {"data", "targets", "method", "lr_ratio", "seed"} <= set(config):
        raise UserError(f"{folder / 'result.json'} is damaged (no run config in it)")
    return {k: config[k] for k in ("data", "targets", "method", "lr_ratio")}, int(config["seed"])


def _read(folder: Path) -> dict[str, Any] | None:
    return grid_layer.read_result(folder)


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


def write_summary(out: Path) -> Path:
    """``OUT/summary.json``: :func:`aggregate` plus the grid settings, for reports."""
    settings = json.loads((out / "settings.json").read_text()) if (out / "settings.json").is_file() else {}
    path = out / "summary.json"
    write_atomic(
        path,
        json.dumps(
            {"schema_version": 1, "kind": "finetune-claims", "settings": settings, "points": aggregate(out)},
            indent=1,
        ),
    )
    return path
