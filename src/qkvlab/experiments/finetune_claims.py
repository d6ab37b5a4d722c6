"""Paper 001's claims on MiniLM + real labelled data: ``qkvlab repro finetune``.

Grid (issue 5): on ``rotten-tomatoes``, targets {QKV, QV, V, QK, K} at λ = 1, and λ ∈ {2, 4, 8}
for QV and QKV, each with full fine-tuning and with LoRA r = 8, over seeds; plus full
fine-tuning of the whole model as the reference. On ``tweet-sentiment``: QKV against QV at
λ = 1 and at λ = 4 (LoRA). Every run writes ``runs/<name>/result.json``; a run with a result is
skipped, so an interrupted grid resumes where it stopped. Runs can go in parallel processes.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkvlab.finetune import FinetuneConfig, finetune
from qkvlab.train.checkpoint import write_atomic

__all__ = ["GridPoint", "grid", "run_grid", "summarize"]


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


# Learning rates: the usual ones for each method on BERT-size models (LoRA needs ~10× the full rate).
LR = {"full": 5e-5, "lora": 5e-4}


def grid() -> list[GridPoint]:
    points = []
    for method in ("full", "lora"):
        for targets in (("q", "k", "v"), ("q", "v"), ("v",), ("q", "k"), ("k",)):
            points.append(GridPoint("rotten-tomatoes", targets, method, 1.0))
        for targets in (("q", "v"), ("q", "k", "v")):
            for lam in (2.0, 4.0, 8.0):
                points.append(GridPoint("rotten-tomatoes", targets, method, lam))
    points.append(GridPoint("rotten-tomatoes", ("all",), "full", 1.0))
    for targets in (("q", "k", "v"), ("q", "v")):
        for lam in (1.0, 4.0):
            points.append(GridPoint("tweet-sentiment", targets, "lora", lam))
    return points


def _run_one(args: tuple[GridPoint, int, Path, dict[str, Any]]) -> dict[str, Any]:
    point, seed, out, settings = args
    run_dir = out / "runs" / point.name(seed)
    if (run_dir / "result.json").is_file():
        return {"name": point.name(seed), "status": "skipped (complete)"}
    threads = settings.pop("threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    config = FinetuneConfig(
        model=settings.pop("model", "minilm"),
        data=point.data,
        targets=list(point.targets),
        method=point.method,
        lr=LR[point.method],
        lr_ratio=point.lr_ratio,
        seed=seed,
        save_model=False,
        out=str(run_dir),
        **settings,
    )
    started = time.perf_counter()
    finetune(config, progress=False)
    return {"name": point.name(seed), "status": "ran", "seconds": time.perf_counter() - started}


def run_grid(
    out: Path,
    seeds: list[int],
    *,
    jobs: int = 1,
    max_steps: int = 300,
    device: str = "auto",
    echo: Any = print,
) -> list[dict[str, Any]]:
    points = grid()
    settings = {"max_steps": max_steps, "device": device, "eval_every": max(1, max_steps // 12)}
    if jobs > 1:
        settings["threads"] = max(1, (os.cpu_count() or 1) // jobs)
    tasks = [(p, s, out, dict(settings)) for p in points for s in seeds]
    echo(f"repro finetune: {len(tasks)} runs in {out}, {jobs} at a time")
    started = time.perf_counter()
    if jobs > 1:
        import multiprocessing

        # spawn, not fork: a forked CUDA context is unusable in the children
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run_one, tasks))
    else:
        results = [_run_one(t) for t in tasks]
    for r in results:
        echo(f"  {r['status']:<20} {r['name']}")
    wall = time.perf_counter() - started
    write_atomic(
        out / "grid.json", json.dumps({"seeds": seeds, "runs": results, "wall_seconds": wall}, indent=1)
    )
    return results


def _load(out: Path) -> dict[GridPoint, list[dict[str, Any]]]:
    by_point: dict[GridPoint, list[dict[str, Any]]] = {}
    for point in grid():
        for path in sorted((out / "runs").glob(f"{point.name(0)[: -len('seed0')]}seed*/result.json")):
            by_point.setdefault(point, []).append(json.loads(path.read_text()))
    return by_point


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(out: Path) -> str:
    """Markdown tables (mean ± std over seeds) of every grid point with results."""
    rows = []
    for point, results in _load(out).items():
        test_acc = [r["test"]["accuracy"] for r in results]
        f1 = [r["test"]["macro_f1"] for r in results]
        mcc = [r["test"]["mcc"] for r in results]
        steps = [r["steps_to_95pct_of_best"] for r in results]
        rows.append(
            f"| {point.label} | {len(results)} | {_mean_std(test_acc)} | {_mean_std(f1)} | {_mean_std(mcc)} | "
            f"{_mean_std([float(s) for s in steps], 1.0, 0)} | {results[0]['trainable_parameters']:,} | "
            f"{statistics.median(r['seconds_per_step'] for r in results) * 1e3:.0f} | "
            f"{max(r.get('peak_gpu_allocated_gib', r['peak_rss_gib']) for r in results):.2f} |"
        )
    header = (
        "| setting | seeds | test accuracy (%) | test macro-F1 (%) | test MCC (×100) | steps to 95% of best val | "
        "trainable params | ms/step | peak memory (GiB) |\n|---|---|---|---|---|---|---|---|---|"
    )
    return header + "\n" + "\n".join(rows)
