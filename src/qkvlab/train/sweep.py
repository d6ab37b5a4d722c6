"""Grids of training runs that survive interruption: ``qkvlab sweep``.

Each grid point × seed is one run folder under the sweep folder, named after its settings
(``weight_decay=0.1,seed=2``). A run with ``final.json`` is complete and skipped; one with a
checkpoint is resumed; anything else starts fresh. Runs are subprocesses of ``qkvlab train``
(``--jobs N`` at a time, each limited to its share of the CPU threads), so one crashing run
is reported and the others go on. ``sweep.json`` summarises all runs.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkvlab.config import config_keys, load_config
from qkvlab.errors import UserError
from qkvlab.train.checkpoint import latest_checkpoint, write_atomic

__all__ = ["SweepRun", "parse_grid", "plan_sweep", "run_sweep"]


@dataclass
class SweepRun:
    name: str
    overrides: dict[str, str]
    run_dir: Path

    @property
    def status(self) -> str:
        if (self.run_dir / "final.json").is_file():
            return "complete"
        if self.run_dir.is_dir() and latest_checkpoint(self.run_dir) is not None:
            return "partial"
        return "new"


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["weight_decay=0,0.1,1", "lr=1e-3,3e-3"]`` → {key: [values]}; keys are validated."""
    grid: dict[str, list[str]] = {}
    valid = set(config_keys())
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise UserError(f"--grid {item!r} must look like key=v1,v2,... (e.g. weight_decay=0,0.1,1)")
        if key not in valid:
            raise UserError(f"--grid key {key!r} is not a config key; see `qkvlab train --help-keys`")
        if key == "seed":
            raise UserError("put seeds in --seeds, not in --grid")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+,-]", "_", text)


def plan_sweep(grid: dict[str, list[str]], seeds: list[int], sweep_dir: Path) -> list[SweepRun]:
    runs = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        for seed in seeds:
            overrides = {**dict(zip(keys, values, strict=True)), "seed": str(seed)}
            name = _safe(",".join(f"{k}={v}" for k, v in overrides.items()))
            runs.append(SweepRun(name, overrides, sweep_dir / name))
    return runs


def _command(config_path: Path | None, run: SweepRun, extra: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "qkvlab", "train"]
    if run.status == "partial":
        return [*cmd, "--resume", str(run.run_dir)]
    if config_path is not None:
        cmd.append(str(config_path))
    settings = {**extra, **run.overrides, "name": run.name, "out": str(run.run_dir), "progress": "false"}
    return cmd + [f"{k}={v}" for k, v in settings.items()]


def _execute(config_path: Path | None, run: SweepRun, extra: dict[str, str], threads: int) -> dict[str, Any]:
    status_before = run.status
    if status_before == "complete":
        return {"name": run.name, "status": "skipped (complete)", "overrides": run.overrides, **_final(run)}
    run.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with (run.run_dir / "train.log").open("a") as log:
        result = subprocess.run(
            _command(config_path, run, extra), stdout=log, stderr=subprocess.STDOUT, env=env, check=False
        )
    outcome = "resumed" if status_before == "partial" else "ran"
    status = (
        outcome
        if result.returncode == 0 and run.status == "complete"
        else f"failed (exit {result.returncode})"
    )
    return {
        "name": run.name,
        "status": status,
        "overrides": run.overrides,
        "seconds": time.perf_counter() - started,
        **_final(run),
    }


def _final(run: SweepRun) -> dict[str, Any]:
    path = run.run_dir / "final.json"
    return {"final": json.loads(path.read_text())} if path.is_file() else {}


def run_sweep(
    config_path: Path | None,
    grid: dict[str, list[str]],
    seeds: list[int],
    sweep_dir: Path,
    *,
    jobs: int = 1,
    extra: dict[str, str] | None = None,
    echo: Any = print,
) -> list[dict[str, Any]]:
    """Run (or continue) every grid point × seed; returns one summary dict per run."""
    extra = dict(extra or {})
    load_config(config_path, {**extra, **{k: v[0] for k, v in grid.items()}})  # fail fast on bad keys/values
    if jobs < 1:
        raise UserError(f"--jobs must be ≥ 1, got {jobs}")
    runs = plan_sweep(grid, seeds, sweep_dir)
    counts = {s: sum(r.status == s for r in runs) for s in ("complete", "partial", "new")}
    echo(
        f"sweep {sweep_dir}: {len(runs)} runs ({counts['complete']} complete, {counts['partial']} to resume, "
        f"{counts['new']} new), {jobs} at a time"
    )
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_execute, config_path, run, extra, threads) for run in runs]
        results = []
        for future in futures:
            result = future.result()
            echo(f"  {result['status']:<22} {result['name']}")
            results.append(result)
    write_atomic(
        sweep_dir / "sweep.json", json.dumps({"grid": grid, "seeds": seeds, "runs": results}, indent=1)
    )
    return results
