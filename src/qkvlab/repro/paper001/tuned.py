"""Paper 001 with every cell tuned: ``qkvlab repro finetune`` (the 150-step grid is its pilot).

The design below was fixed in code before the first run of this study; nothing in it was chosen
after looking at its results. Anything added later is labelled post hoc where it is reported.

**Question.** Paper 001 says that a larger learning rate for W_V than for W_Q and W_K
(η_V = λ·η_QK, λ > 1) makes fine-tuning converge sooner and end better, that tuning Q and V beats
Q, K and V, and that V matters more than K. A claim about a *ratio* of rates can only be told
apart from "a larger rate" if every ratio gets its own best rate; this study gives it one.

**Cells.** For each method (full fine-tuning of the chosen matrices plus the task head; LoRA
r = 8, α = 16 on them, head trained in full):

- targets QV and QKV at λ ∈ {1, 2, 4, 8};
- V alone and K alone (λ = 1: one rate for the one matrix).

That is 2 × (2 × 4 + 2) = 20 cells per model.

**Rates.** One grid of η_QK per method, the same for every λ, in half-decades
(η = 10^(k/2)): full k ∈ {−9, −8, −7, −6} (3.2e-5 … 1e-3), LoRA k ∈ {−7, −6, −5, −4}
(3.2e-4 … 1e-2). It spans the rates where the best λ = 1 run (η_V = η_QK) and the best λ = 8 run
(η_V = 8·η_QK) could sit. A cell whose best rate is at an edge of its grid gets the next
half-decade beyond that edge, at most twice; a best rate still at an edge then is reported as such.

**Selection.** Each (cell, η) runs once on the selection seed 100, which is never reported. The
cell's rate is the one with the best *final* validation accuracy (the test score is taken at the
same point, so the final is what a user would keep); ties go to the smaller rate.

**Reported runs.** Seeds 0, 1, 2 at each cell's chosen rate; the test split is scored once, at
the end of each run.

**Equal-rate controls.** For QV and QKV of each method, λ = 1 at η_QK = η_V of the best λ > 1
cell (best by its selection-seed final validation accuracy), seeds 0, 1, 2. If λ > 1 wins only
against an under-tuned λ = 1, this control and the tuned λ = 1 say so.

**Training.** One epoch of rotten-tomatoes' training split (10,202 examples; batch 16, 637 steps,
10,192 examples seen), sequences cut to 64 tokens, AdamW without weight decay, 6 % linear warm-up
then linear decay to 0, gradients clipped at 1. The validation split (1,275 examples, all of it)
is scored every 80 steps and at the end.

**Convergence** is measured per run, at each cell's tuned rate, in two ways: the step at which
validation accuracy first reaches 95 % of the best mean final validation accuracy of any cell of that
model and method (a run that never reaches it has not converged); and the mean of the validation
curve (area under it).

**Second model.** ``mpnet`` (all-mpnet-base-v2: 12 layers, d 768, 12 heads, RoBERTa-base's shape)
gets a reduced grid, sized from one measured run: LoRA only, QV and QKV at λ ∈ {1, λ*, 2λ*} where
λ* is MiniLM's best LoRA QV λ (best mean final validation accuracy of its reported seeds at its
tuned rate; the test split is not consulted), three rates (MiniLM's tuned η_QK of LoRA QV at λ*
and the half-decades on either side, extended at an edge as above); the same selection seed,
reported seeds, controls and training (:func:`second_model_design`). The measured run is the first
of that grid (LoRA QV λ = 1 at the lowest rate, selection seed); if the grid at its cost would pass
SECOND_MODEL_HOURS core-hours (what the study's budget of about 45 leaves after MiniLM's), the grid
keeps LoRA QV only (written before that run, added after MiniLM's study had finished). Theorem 2 (η_QK = Θ(1/n), η_V = Θ(1)) predicts a best λ about 2× larger at width 768 than at
384; the models also differ in depth and pretraining, so it is an exploratory comparison. Each
model's best λ per target set is reported by the λ* rule above, with each reported seed's own best λ
as its spread (:func:`best_lambda`; added after MiniLM's study had finished, before any reported run
of mpnet's).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkvlab.grid import runner as grid_layer
from qkvlab.grid.runner import Run

__all__ = [
    "CELLS",
    "CONTROL_SEEDS",
    "RATE_EXPONENTS",
    "REPORTED_SEEDS",
    "SELECTION_SEED",
    "SETTINGS",
    "Cell",
    "plan",
    "run_study",
]

SELECTION_SEED = 100
REPORTED_SEEDS = (0, 1, 2)
CONTROL_SEEDS = REPORTED_SEEDS
LAMBDAS = (1.0, 2.0, 4.0, 8.0)
MAX_EXTENSIONS = 2

# η = 10^(k/2): half-decades, exact and printable; the same grid for every λ of a method
RATE_EXPONENTS = {"full": (-9, -8, -7, -6), "lora": (-7, -6, -5, -4)}

SETTINGS: dict[str, Any] = {
    "data": "rotten-tomatoes",
    "epochs": 1.0,
    "batch_size": 16,
    "max_length": 64,
    "eval_every": 80,
    "max_val_examples": None,  # the whole validation split
    "warmup_ratio": 0.06,
    "weight_decay": 0.0,
    "rank": 8,
    "alpha": 16.0,
}


def rate(exponent: int) -> float:
    return 10 ** (exponent / 2)


@dataclass(frozen=True)
class Cell:
    method: str
    targets: tuple[str, ...]
    lr_ratio: float

    @property
    def label(self) -> str:
        return f"{self.method} {''.join(t.upper() for t in self.targets)} λ={self.lr_ratio:g}"

    def run(self, exponent: float, seed: int) -> Run:
        """A run of this cell at η_QK = 10^(exponent/2) (a control's exponent need not be whole)."""
        point = {
            "method": self.method,
            "targets": list(self.targets),
            "lr_ratio": self.lr_ratio,
            "lr_exponent": exponent,
        }
        name = (
            f"{self.method}_{'-'.join(self.targets)}_lam{self.lr_ratio:g}_lr{rate(exponent):.3g}_seed{seed}"
        )
        return Run(name, point, seed)


def cells(methods: Iterable[str] = ("full", "lora"), lambdas: Iterable[float] = LAMBDAS) -> list[Cell]:
    out = []
    for method in methods:
        for targets in (("q", "v"), ("q", "k", "v")):
            out += [Cell(method, targets, float(lam)) for lam in lambdas]
        out += [Cell(method, ("v",), 1.0), Cell(method, ("k",), 1.0)]
    return out


CELLS = cells()

#: the cells a results folder runs, written by :func:`run_study` (not a setting: the guard ignores it),
#: so that its tables show that design and not the default one
CELLS_FILE = "cells.json"


def write_cells(out: Path, cell_list: list[Cell]) -> None:
    """Record ``cell_list`` in ``out``, or refuse if the folder was run with other cells."""
    from qkvlab.errors import UserError
    from qkvlab.files import write_atomic

    recorded = read_cells(out)
    if recorded is not None:
        if recorded != list(cell_list):
            raise UserError(
                f"{out} was run with other cells ({', '.join(c.label for c in recorded)}); "
                "resume with the same design or use another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    record = [{"method": c.method, "targets": list(c.targets), "lr_ratio": c.lr_ratio} for c in cell_list]
    write_atomic(out / CELLS_FILE, json.dumps(record, indent=1))


def read_cells(out: Path) -> list[Cell] | None:
    """The cells ``out`` was run with (None for a folder from before this record existed)."""
    path = out / CELLS_FILE
    if not path.is_file():
        return None
    return [
        Cell(c["method"], tuple(c["targets"]), float(c["lr_ratio"])) for c in json.loads(path.read_text())
    ]


# -- what to run next, from what has finished ------------------------------------------------------


def _results(out: Path) -> dict[tuple[Cell, float, int], dict[str, Any]]:
    """(cell, lr exponent, seed) → result.json of every finished run."""

    found = {}
    for key, by_seed in grid_layer.load_runs(out, grid_layer.read_result).items():
        point = dict(key)
        cell = Cell(point["method"], tuple(point["targets"]), float(point["lr_ratio"]))
        for seed, result in by_seed.items():
            found[cell, float(point["lr_exponent"]), seed] = result
    return found


def selection(
    cell: Cell, results: dict[tuple[Cell, float, int], dict[str, Any]], exponents: tuple[int, ...]
) -> dict[str, Any]:
    """The state of one cell's rate search: the rates tried, the scores, and the choice if made.

    Returns ``{"exponents", "scores", "pending", "chosen", "at_edge", "extensions"}``; ``pending``
    lists the exponents still to run on the selection seed; ``chosen`` is None until none is.
    """
    tried = list(exponents)
    extensions = 0
    while True:
        scores = {
            k: results[cell, float(k), SELECTION_SEED]["final_val"]
            for k in tried
            if (cell, float(k), SELECTION_SEED) in results
        }
        pending = [k for k in tried if k not in scores]
        state = {"exponents": sorted(tried), "scores": scores, "pending": pending, "extensions": extensions}
        if pending:
            return {**state, "chosen": None, "at_edge": None}
        best = max(sorted(tried), key=lambda k: scores[k])  # ties: the smaller rate (first in order)
        low, high = min(tried), max(tried)
        edge = best in (low, high)
        if not edge or extensions == MAX_EXTENSIONS:
            return {**state, "chosen": best, "at_edge": edge}
        tried.append(low - 1 if best == low else high + 1)
        extensions += 1


def plan(out: Path, cell_list: list[Cell] | None = None, exponents: dict[str, tuple[int, ...]] | None = None):
    """Every run the design calls for *now*, given the finished runs in ``out``, and each cell's state.

    Returns ``(runs, states)``: the runs (finished ones included: the grid layer skips them) and
    ``{cell: selection state}``. Runs appear as soon as what they depend on is known: a cell's
    reported seeds once its rate is chosen, a control once every λ > 1 cell of its targets is.
    """
    cell_list = CELLS if cell_list is None else cell_list
    exponents = RATE_EXPONENTS if exponents is None else exponents
    results = _results(out)
    states = {cell: selection(cell, results, exponents[cell.method]) for cell in cell_list}
    runs: list[Run] = []
    for cell, state in states.items():  # the selection seed first: it gates everything else
        runs += [cell.run(k, SELECTION_SEED) for k in state["exponents"]]
    for cell, state in states.items():
        if state["chosen"] is not None:
            runs += [cell.run(state["chosen"], seed) for seed in REPORTED_SEEDS]
    for control in controls(states):
        runs += [control["cell"].run(control["exponent"], seed) for seed in CONTROL_SEEDS]
    return runs, states


def controls(states: dict[Cell, dict[str, Any]]) -> list[dict[str, Any]]:
    """λ = 1 at η = η_V of the best λ > 1 cell, for each method × {QV, QKV} whose λ > 1 cells are chosen."""
    found = []
    for method in sorted({c.method for c in states}):
        for targets in (("q", "v"), ("q", "k", "v")):
            above = {
                c: s
                for c, s in states.items()
                if c.method == method and c.targets == targets and c.lr_ratio > 1
            }
            if not above or any(s["chosen"] is None for s in above.values()):
                continue
            best = max(
                sorted(above, key=lambda c: c.lr_ratio), key=lambda c: above[c]["scores"][above[c]["chosen"]]
            )
            # η_V = λ·η_QK = 10^(k/2)·λ → exponent k + 2·log10(λ)
            exponent = above[best]["chosen"] + 2 * math.log10(best.lr_ratio)
            found.append({"cell": Cell(method, targets, 1.0), "exponent": exponent, "from": best})
    return found


#: core-hours of this machine the second model's grid may take (the study's ~45 less MiniLM's ~28)
SECOND_MODEL_HOURS = 17.0


def planned_runs(cell_list: list[Cell], rates: int) -> int:
    """Runs a design takes when no rate needs an extension: the rate search, the reported seeds and the
    equal-rate controls (one per method × target set that has a λ > 1 cell)."""
    controls = {(c.method, c.targets) for c in cell_list if c.lr_ratio > 1}
    return len(cell_list) * (rates + len(REPORTED_SEEDS)) + len(controls) * len(CONTROL_SEEDS)


def second_model_design(
    first: Path, cost_hours: float | None = None
) -> tuple[list[Cell], dict[str, tuple[int, ...]], float]:
    """The reduced grid of the second model (mpnet), from the first model's finished study in ``first``.

    λ* is the λ of LoRA QV whose reported runs (seeds 0, 1, 2, at the cell's tuned rate) have the best
    mean final *validation* accuracy (the test split is not looked at); the cells are LoRA QV and QKV
    at λ ∈ {1, λ*, 2λ*}, and the rate grid is the first model's tuned rate of LoRA QV at λ* and the
    half-decades on either side (extended at an edge as for the first model). With ``cost_hours`` (one
    measured run's core-hours), a grid that would take more than SECOND_MODEL_HOURS keeps LoRA QV only.
    """
    from qkvlab.errors import UserError

    if not (first / "settings.json").is_file():
        raise UserError(
            f"--reference {first} holds no finished study; accepted: the first model's results folder of "
            "`qkvlab repro finetune` (default results/finetune-tuned/minilm)"
        )
    found = best_lambda(summarize(first), "lora", ("q", "v"))
    if found is None:
        raise UserError(
            f"{first}: LoRA QV is not finished for every λ; the second model's grid is sized from it"
        )
    lam = found["best"]
    chosen = int(found["exponents"][lam])
    cells = [
        Cell("lora", targets, x)
        for targets in (("q", "v"), ("q", "k", "v"))
        for x in sorted({1.0, lam, 2 * lam})
    ]
    exponents = {"lora": (chosen - 1, chosen, chosen + 1)}
    if cost_hours is not None and cost_hours * planned_runs(cells, 3) > SECOND_MODEL_HOURS:
        cells = [c for c in cells if c.targets == ("q", "v")]
    return cells, exponents, lam


# -- running -------------------------------------------------------------------------------------


def _worker(run_dir: Path, point: dict[str, Any], seed: int, settings: dict[str, Any]) -> None:
    """One fine-tuning run of the study: writes ``run_dir/result.json``."""
    from qkvlab.finetune import FinetuneConfig, finetune

    keep = {
        k: v for k, v in settings.items() if k in SETTINGS or k in ("model", "device", "max_train_examples")
    }
    config = FinetuneConfig(
        targets=list(point["targets"]),
        method=point["method"],
        lr=rate(point["lr_exponent"]),
        lr_ratio=point["lr_ratio"],
        seed=seed,
        save_model=False,
        max_steps=None,
        out=str(run_dir),
        **keep,
    )
    finetune(config, progress=False)


def _status(run_dir: Path) -> str:
    return "complete" if (run_dir / "result.json").is_file() else "new"


def run_study(
    out: Path,
    *,
    model: str = "minilm",
    jobs: int = 1,
    device: str = "auto",
    cell_list: list[Cell] | None = None,
    exponents: dict[str, tuple[int, ...]] | None = None,
    echo: Any = print,
    limit: int | None = None,
    **overrides: Any,
) -> dict[Cell, dict[str, Any]]:
    """Run the design to the end (resumable): plan, run what is new, plan again until nothing is;
    with ``limit``, only the first ``limit`` runs still to do, then return.

    ``overrides`` replace entries of :data:`SETTINGS` (tests use a tiny CSV and a few steps); they are
    guarded in ``OUT/settings.json`` like every grid's settings.
    """
    unknown = set(overrides) - set(SETTINGS) - {"max_train_examples"}
    if unknown:
        raise TypeError(f"unknown study settings {sorted(unknown)}")
    settings = {
        **SETTINGS,
        **overrides,
        "model": model,
        "rate_exponents": {k: list(v) for k, v in (exponents or RATE_EXPONENTS).items()},
    }
    worker_settings = {**settings, "device": device}
    worker_settings.pop("rate_exponents")
    write_cells(out, CELLS if cell_list is None else cell_list)
    while True:
        runs, states = plan(out, cell_list, exponents)
        todo = [r for r in runs if _status(r.folder(out)) != "complete"]
        if not todo or limit == 0:
            return states
        if limit is not None:
            todo, limit = todo[:limit], limit - len(todo[:limit])
        results = grid_layer.run_grid(
            out,
            todo,
            _worker,
            settings=settings,
            worker_settings=worker_settings,
            status=_status,
            jobs=jobs,
            log="finetune.log",
            echo=echo,
            label="repro finetune",
            session={"device": device},
        )
        if any(r["status"].startswith("failed") for r in results):
            failed = [r["name"] for r in results if r["status"].startswith("failed")]
            raise RuntimeError(
                f"{len(failed)} runs failed ({', '.join(failed[:3])}…); see their finetune.log"
            )


# -- what the runs say -----------------------------------------------------------------------------


def curve_mean(result: dict[str, Any]) -> float:
    """Mean validation accuracy over the learning curve (the area under it, per evaluation)."""
    return sum(c["accuracy"] for c in result["curve"]) / len(result["curve"])


def summarize(
    out: Path, cell_list: list[Cell] | None = None, exponents: dict[str, tuple[int, ...]] | None = None
):
    """Every cell's rate search and reported runs, the controls, and the paired comparisons (plain data).

    Convergence: per method, the threshold is 95 % of the best mean final validation accuracy of any
    cell at its tuned rate; a run's step to it is its first evaluation at or above it (None: never).
    """
    import statistics

    settings_path = out / "settings.json"
    exponents = exponents or (
        {k: tuple(v) for k, v in json.loads(settings_path.read_text())["rate_exponents"].items()}
        if settings_path.is_file()
        else RATE_EXPONENTS
    )
    cell_list = cell_list or read_cells(out) or [c for c in CELLS if c.method in exponents]
    _, states = plan(out, cell_list, exponents)
    results = _results(out)

    def runs_at(cell: Cell, exponent: float, seeds: Iterable[int]) -> dict[int, dict[str, Any]]:
        return {s: results[cell, float(exponent), s] for s in seeds if (cell, float(exponent), s) in results}

    rows: dict[Cell, dict[str, Any]] = {}
    for cell, state in states.items():
        row: dict[str, Any] = {"cell": cell, "search": state, "runs": {}}
        if state["chosen"] is not None:
            row["runs"] = runs_at(cell, state["chosen"], REPORTED_SEEDS)
        rows[cell] = row
    thresholds = {}
    for method in {c.method for c in rows}:
        means = [
            statistics.fmean(r["final_val"] for r in row["runs"].values())
            for c, row in rows.items()
            if c.method == method and row["runs"]
        ]
        thresholds[method] = 0.95 * max(means) if means else None
    for cell, row in rows.items():
        threshold = thresholds[cell.method]
        row["steps_to_threshold"] = {
            s: next((c["step"] for c in r["curve"] if c["accuracy"] >= threshold), None)
            if threshold
            else None
            for s, r in row["runs"].items()
        }
    found_controls = []
    for control in controls(states):
        found_controls.append(
            {**control, "runs": runs_at(control["cell"], control["exponent"], CONTROL_SEEDS)}
        )
    return {
        "rows": rows,
        "thresholds": thresholds,
        "controls": found_controls,
    }


def best_lambda(summary: dict[str, Any], method: str, targets: tuple[str, ...]) -> dict[str, Any] | None:
    """Which λ of (method, targets) is best: by the mean final *validation* accuracy of the reported seeds
    at each λ's tuned rate (ties: the smaller λ; the test split is not consulted), and, as its spread, the
    best λ of each seed alone. None until every λ of the set has all its reported seeds.

    Returns ``{"lambdas", "means" (λ → mean), "stds" (λ → sample std), "best", "per_seed" (seed → λ),
    "exponents" (λ → chosen rate exponent)}``.
    """
    import statistics

    rows = {c: r for c, r in summary["rows"].items() if c.method == method and c.targets == targets}
    if not rows or any(len(r["runs"]) < len(REPORTED_SEEDS) for r in rows.values()):
        return None
    by_lambda = {c.lr_ratio: _metric(row["runs"], "final_val") for c, row in rows.items()}
    lambdas = sorted(by_lambda)
    means = {x: statistics.fmean(by_lambda[x].values()) for x in lambdas}
    seeds = sorted(set.intersection(*(set(v) for v in by_lambda.values())))
    return {
        "lambdas": lambdas,
        "means": means,
        "stds": {x: statistics.stdev(by_lambda[x].values()) for x in lambdas},
        "best": max(lambdas, key=lambda x: means[x]),  # max keeps the first of equals: the smaller λ
        "per_seed": {s: max(lambdas, key=lambda x: by_lambda[x][s]) for s in seeds},
        "exponents": {c.lr_ratio: row["search"]["chosen"] for c, row in rows.items()},
    }


def _metric(runs: dict[int, dict[str, Any]], name: str) -> dict[int, float]:
    if name == "auc":
        return {s: curve_mean(r) for s, r in runs.items()}
    if name == "test":
        return {s: r["test"]["accuracy"] for s, r in runs.items()}
    return {s: r[name] for s, r in runs.items()}


def comparisons(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The paired comparisons the claims rest on, each at both cells' tuned rates (seed-paired)."""
    rows = summary["rows"]
    out = []

    def add(claim: str, a: Cell | dict, b: Cell | dict) -> None:
        runs_a = a["runs"] if isinstance(a, dict) else rows.get(a, {}).get("runs", {})
        runs_b = b["runs"] if isinstance(b, dict) else rows.get(b, {}).get("runs", {})
        if not runs_a or not runs_b:
            return
        label_a = f"{a['cell'].label} at η = {rate(a['exponent']):.3g}" if isinstance(a, dict) else a.label
        label_b = f"{b['cell'].label} at η = {rate(b['exponent']):.3g}" if isinstance(b, dict) else b.label
        out.append(
            {
                "claim": claim,
                "a": label_a,
                "b": label_b,
                **{
                    m: grid_layer.paired(_metric(runs_a, m), _metric(runs_b, m), 100)
                    for m in ("test", "final_val", "auc")
                },
            }
        )

    methods = sorted({c.method for c in rows})
    for method in methods:
        for targets in (("q", "v"), ("q", "k", "v")):
            base = Cell(method, targets, 1.0)
            for lam in LAMBDAS[1:]:
                add("λ > 1 beats tuned λ = 1", Cell(method, targets, lam), base)
        for lam in LAMBDAS:
            add(
                "QV beats QKV at the same λ",
                Cell(method, ("q", "v"), lam),
                Cell(method, ("q", "k", "v"), lam),
            )
        add("V beats K (each at its own rate)", Cell(method, ("v",), 1.0), Cell(method, ("k",), 1.0))
    for control in summary["controls"]:
        best = control["from"]
        add("best λ > 1 beats λ = 1 at its η_V", best, control)
    return out
