"""Grids of training runs that survive interruption: ``qkvlab sweep``, on the experiment layer.

Each grid point × seed is one ``qkvlab train`` run folder, ``SWEEP/runs/NAME`` with NAME its
settings (``weight_decay=0.1,seed=2``). A complete run is skipped, a partial one resumed, and a
sweep folder refuses runs made with another base config (``SWEEP/settings.json``); see
:mod:`qkvlab.grid.runner` for the rules. ``SWEEP/sweep.json`` lists every run with its
``final.json``, and the mean ± std over seeds of each grid point's final numbers.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from qkvlab.config import coerce_value, config_keys, load_config
from qkvlab.errors import UserError
from qkvlab.files import write_atomic
from qkvlab.grid.runner import Run, load_runs, mean_std, run_grid
from qkvlab.grid.training import read_training_run, refuse_run_keys, train_status, train_worker

__all__ = ["parse_grid", "plan_sweep", "run_sweep", "sweep_summary"]

# Per-run settings that never change a run's numbers, left out of the settings guard.
_UNGUARDED = ("name", "out", "seed", "progress", "stop_at", "device")


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
        if key in grid:
            raise UserError(f"--grid names {key} twice; accepted: each key once, with all its values")
        grid[key] = [v.strip() for v in values.split(",")]
        if not all(grid[key]):  # "lr=,,," or "lr=1e-3,,3e-3": a typo, not a value
            raise UserError(f"--grid {item!r} has an empty value; accepted: key=v1,v2,... with no empty item")
        # the values as training reads them: lr=1e-3,0.001 is one value twice, refused before any run
        parsed = [coerce_value(key, v) for v in grid[key]]
        repeated = next((v for i, v in enumerate(grid[key]) if parsed[i] in parsed[:i]), None)
        if repeated is not None:
            raise UserError(
                f"--grid {item!r} gives the value {repeated} of {key} twice; accepted: distinct values"
            )
    return grid


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+,-]", "_", text)


def plan_sweep(grid: dict[str, list[str]], seeds: list[int]) -> list[Run]:
    """Every grid point × seed, seed by seed (an interrupted sweep holds whole seeds first)."""
    keys = list(grid)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
    return [
        Run(_safe(",".join(f"{k}={v}" for k, v in {**point, "seed": seed}.items())), point, seed)
        for seed in seeds
        for point in points
    ]


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
    refuse_run_keys(extra, "override")
    for values in itertools.product(*grid.values()):  # fail fast on a bad key or value in any cell
        base = load_config(config_path, {**extra, **dict(zip(grid, values, strict=True))})
    resolved = base.to_dict()
    shared = {k: v for k, v in resolved.items() if k not in _UNGUARDED and k not in grid}
    shared["model"] = {k: v for k, v in resolved["model"].items() if f"model.{k}" not in grid}
    runs = plan_sweep(grid, seeds)
    statuses = run_grid(
        sweep_dir,
        runs,
        train_worker,
        settings={"config": shared},
        worker_settings={"config": str(config_path) if config_path else None, "overrides": extra},
        status=train_status,
        jobs=jobs,
        log="train.log",
        echo=echo,
        label="sweep",
        session={"grid": grid, "seeds": seeds},
    )
    results = []
    for run, status in zip(runs, statuses, strict=True):
        final = run.folder(sweep_dir) / "final.json"
        entry = {**status, "overrides": {**run.point, "seed": str(run.seed)}}
        if final.is_file():
            entry["final"] = json.loads(final.read_text())
        results.append(entry)
    write_atomic(
        sweep_dir / "sweep.json",
        json.dumps(
            {
                "schema_version": 1,
                "kind": "sweep",
                "grid": grid,
                "seeds": seeds,
                "runs": results,
                "points": sweep_summary(sweep_dir),
            },
            indent=1,
        ),
    )
    return results


def sweep_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Per grid point with complete runs: mean ± std over seeds of the final train loss and evals."""
    rows = []
    for point, by_seed in load_runs(sweep_dir, lambda d: read_training_run(d, spectra=False)).items():
        finals = [r["final"] for r in by_seed.values()]
        row: dict[str, Any] = {"point": dict(point), "seeds": sorted(by_seed)}
        losses = [f["train_loss"] for f in finals if f.get("train_loss") is not None]
        if losses:
            row["train_loss"] = mean_std(losses)
        for key in sorted({k for f in finals for k in f.get("eval", {})}):
            values = [f["eval"][key] for f in finals if key in f.get("eval", {})]
            row[f"val_{key}"] = mean_std(values)
        rows.append(row)
    return rows
