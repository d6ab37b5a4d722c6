"""Beyond the papers: ``qkvlab repro logits``, whether weight decay on attention holds logits down as QK-clip does.

The questions (issue 34; answered in FINDINGS.md §3 with the seed spread): does attention weight decay
hold the largest attention logits down as well as QK-clip does, and at what cost in rank and loss? Does
QK-clip change rank at all? Does Muon need clipping where AdamW with decay does not? Paper 000's
theory links them: for every head σ₁(W_KᵀW_Q) ≤ ‖W_KᵀW_Q‖_* ≤ ½(‖W_Q‖² + ‖W_K‖²), so decay on the
factors bounds the largest logit through the nuclear norm (docs/logits.md).

Everything below was fixed before any run of this experiment, and is kept in code so the command
reproduces it.

**Setting.** The Shakespeare GPT of ``repro wd-rank`` and ``repro optimizer-rank`` (4 layers, 4 heads of
d_head 32, 2,000 steps, cosine schedule, gradient clipping 1.0), Muon with ``muon_adjust_lr=
match_rms_adamw`` so that one η means the same for both optimisers. No weight decay anywhere but on
q, k, v and o. The spectral monitor fires every 100 steps (``MONITOR_EVERY``): each firing records every
head's largest logit S_max^h on that step's batch (qkvlab.logits), the ceiling from the weights, and
both products' spectra.

**The learning rate (a pilot, seed 100, not reported).** For each optimiser, without decay and without
clipping, one run at each of {1, 2, 4, 8} × 1e-3 (``LR_LADDER``). The study runs each optimiser at the
*largest* rate on the ladder whose pilot finishes without a non-finite stop and ends within 5 %
(``LOSS_TOLERANCE``) of that optimiser's best pilot validation loss: the most aggressive rate a user
would still pick, where logits grow most. If that is the ladder's top, the ladder grows by a factor of
2 past it, at most twice, and the choice is reported as at the edge. The pilot's logit growth (the
largest logit at the last firing over that at the first after step 0) is reported.

**τ, fixed from the pilot before any study run.** τ = ½ × the largest logit (any head, layer and firing)
of the AdamW pilot at AdamW's chosen rate, to two significant digits (``TAU_FRACTION``), the same for
both optimisers: clipping then binds for AdamW without decay by construction, and whether decay or
Muon keeps a run under it is a result.

**The grid.** {AdamW, Muon} × attention decay Σₜη_tλ_t ∈ {0, 1, 3} (λ = budget / Σₜη_t, as in
``repro optimizer-rank``) × QK-clip {off, τ} × seeds {0, 1, 2}: 36 runs.

**Measures** (per run; mean ± std over seeds, and seed-paired differences against the same optimiser
without decay and without clipping):

- ``logit_peak``: the largest logit of any head over all firings; ``logit_final``: the largest at the
  last firing; the per-head trajectories are kept for the plot.
- ``clipped_heads``: head-steps QK-clip scaled back (the train log's ``qk_clipped_heads``, summed).
- ``qk_effective_rank``, ``ov_effective_rank``: means over heads of the final weights' products.
- ``val_loss``: the final validation loss.
- ``loss_spikes``: logged training losses (every 10 steps) after the warm-up that exceed 1.3 × the
  median of the 10 logged before them (``SPIKE_FACTOR``, ``SPIKE_WINDOW``).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from qkvlab.grid.runner import Run
from qkvlab.repro.optimizer_rank.claim import decay_for, variant_overrides
from qkvlab.repro.paper000.claim import GPT_BASE
from qkvlab.repro.registry import Experiment, register

__all__ = ["OPTIMIZERS", "choose_lr", "loss_spikes", "run_experiment", "tau_from"]

OPTIMIZERS = ("adamw", "muon")
BUDGETS = (0.0, 1.0, 3.0)
LR_LADDER = (1e-3, 2e-3, 4e-3, 8e-3)
MAX_EXTENSIONS = 2
LOSS_TOLERANCE = 0.05
TAU_FRACTION = 0.5
SELECT_SEED = 100
MONITOR_EVERY = 100
SPIKE_FACTOR = 1.3
SPIKE_WINDOW = 10
STOPPED_FILE = "stopped.json"

BASE: dict[str, Any] = {
    **GPT_BASE,
    "muon_adjust_lr": "match_rms_adamw",
    "weight_decay": 0.0,
    "spectra_every": MONITOR_EVERY,
    "log_every": 10,
}


def run_name(point: dict[str, Any], seed: int) -> str:
    clip = f"clip={point['qk_clip']:g}" if point["qk_clip"] else "noclip"
    return f"{point['variant']},sum={point['budget']:g},lr={point['lr']:g},{clip},seed={seed}"


def make_run(optimizer: str, budget: float, lr: float, clip: float, seed: int) -> Run:
    point = {"variant": optimizer, "budget": float(budget), "lr": float(lr), "qk_clip": float(clip)}
    return Run(run_name(point, seed), point, seed)


def overrides(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The run-config keys of one grid point: the optimiser, lr, λ on q, k, v, o, and QK-clip."""
    return {**variant_overrides(base, point), "qk_clip": point["qk_clip"]}


# -- the worker ----------------------------------------------------------------------------------


def status(run_dir: Path) -> str:
    from qkvlab.grid.training import train_status

    if (run_dir / STOPPED_FILE).is_file():
        return "complete"  # stopped on a non-finite value: a result, it would stop again
    return train_status(run_dir)


def worker(run_dir: Path, point: dict[str, Any], seed: int, settings: dict[str, Any]) -> None:
    from qkvlab.errors import TrainingStopped
    from qkvlab.files import write_atomic
    from qkvlab.grid.training import train_worker

    try:
        train_worker(run_dir, overrides(settings["overrides"], point), seed, settings)
    except TrainingStopped as exc:
        write_atomic(run_dir / STOPPED_FILE, json.dumps({"reason": str(exc)}, indent=1))


# -- what a run gives ------------------------------------------------------------------------------


def loss_spikes(losses: list[float], skip: int = 0) -> int:
    """How many of ``losses`` (after the first ``skip``) exceed SPIKE_FACTOR × the median of the
    SPIKE_WINDOW before them."""
    return sum(
        1
        for i in range(max(skip, SPIKE_WINDOW), len(losses))
        if losses[i] > SPIKE_FACTOR * statistics.median(losses[i - SPIKE_WINDOW : i])
    )


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """One run reduced to its measures and logit trajectories; ``{"stopped": why}`` for a run that met a
    non-finite value; None while unfinished."""
    from qkvlab.grid.training import final_measures, read_training_run

    if (run_dir / STOPPED_FILE).is_file():
        return {"stopped": json.loads((run_dir / STOPPED_FILE).read_text())["reason"]}
    result = read_training_run(run_dir)
    if result is None or not result.get("spectra"):
        return None
    fired = [r for r in result["spectra"] if r.get("logits")]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    by_step = {x["step"]: x for x in lines}  # a resumed run logs a step again: the last counts
    train = [by_step[s] for s in sorted(by_step)]
    warmup = int(result["config"].get("warmup_steps", 0))
    measures = final_measures(result)
    peaks = [max(max(layer) for layer in r["logits"]["max"]) for r in fired]
    measures.update(
        {
            "logit_peak": max(peaks) if peaks else math.nan,
            "logit_final": peaks[-1] if peaks else math.nan,
            "clipped_heads": float(sum(x.get("qk_clipped_heads", 0) for x in train)),
            "loss_spikes": float(
                loss_spikes([x["loss"] for x in train], skip=sum(1 for x in train if x["step"] <= warmup))
            ),
        }
    )
    return {
        "measures": measures,
        "steps": [r["step"] for r in fired],
        "per_head": [r["logits"]["max"] for r in fired],  # [firing][layer][head]
    }


# -- the pilot: learning rates and τ -------------------------------------------------------------


def choose_lr(losses: dict[float, float]) -> float:
    """The largest rate whose pilot finished (a finite loss) within LOSS_TOLERANCE of the best one."""
    finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
    if not finite:
        raise ValueError("every pilot run stopped on a non-finite value")
    best = min(finite.values())
    return max(lr for lr, loss in finite.items() if loss <= best * (1 + LOSS_TOLERANCE))


def tau_from(peak: float) -> float:
    """TAU_FRACTION × the AdamW pilot's largest logit, to two significant digits."""
    value = TAU_FRACTION * peak
    return float(f"{value:.2g}")


def shared_settings(changes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"experiment": "logits", "overrides": {**BASE, **(changes or {})}, "lr_ladder": list(LR_LADDER)}


def _grid(out: Path, runs: list[Run], settings: dict[str, Any], jobs: int, echo: Any, stage: str) -> None:
    from qkvlab.grid.runner import run_stage

    run_stage(out, runs, worker, status, settings=settings, jobs=jobs, echo=echo, label="logits", stage=stage)


def pilot(out: Path, settings: dict[str, Any], jobs: int = 1, echo: Any = print) -> dict[str, Any] | None:
    """Stage 1 (see the module): each optimiser's rate and τ, written to OUT/pilot.json; None while a
    pilot run is unfinished."""
    from qkvlab.files import write_atomic

    ladders = {o: list(LR_LADDER) for o in OPTIMIZERS}
    results: dict[str, dict[float, dict[str, Any] | None]] = {}
    for extension in range(MAX_EXTENSIONS + 1):
        runs = [make_run(o, 0.0, lr, 0.0, SELECT_SEED) for o in OPTIMIZERS for lr in ladders[o]]
        _grid(out, runs, settings, jobs, echo, "pilot")
        results = {
            o: {lr: read_run(make_run(o, 0.0, lr, 0.0, SELECT_SEED).folder(out)) for lr in ladders[o]}
            for o in OPTIMIZERS
        }
        if any(r is None for by_lr in results.values() for r in by_lr.values()):
            return None
        grown = False
        for o in OPTIMIZERS:
            chosen = choose_lr({lr: _loss(r) for lr, r in results[o].items()})
            if extension < MAX_EXTENSIONS and chosen == ladders[o][-1]:
                ladders[o].append(chosen * 2)
                grown = True
        if not grown:
            break
    chosen = {o: choose_lr({lr: _loss(r) for lr, r in results[o].items()}) for o in OPTIMIZERS}
    record = {
        o: {
            "chosen": chosen[o],
            "at_edge": chosen[o] == ladders[o][-1],
            "runs": {
                f"{lr:g}": None
                if "stopped" in r
                else {
                    "val_loss": r["measures"]["val_loss"],
                    "logit_peak": r["measures"]["logit_peak"],
                    "logit_growth": _growth(r),
                }
                for lr, r in results[o].items()
            },
        }
        for o in OPTIMIZERS
    }
    record["tau"] = tau_from(results["adamw"][chosen["adamw"]]["measures"]["logit_peak"])
    write_atomic(out / "pilot.json", json.dumps(record, indent=1))
    return record


def _loss(result: dict[str, Any]) -> float:
    return math.inf if "stopped" in result else float(result["measures"]["val_loss"])


def _growth(result: dict[str, Any]) -> float | None:
    """The largest logit at the last firing over that at the first after step 0."""
    peaks = [max(max(layer) for layer in firing) for firing in result["per_head"]]
    return peaks[-1] / peaks[0] if len(peaks) > 1 and peaks[0] > 0 else None


def main_runs(pilot_record: dict[str, Any], budgets: list[float], seeds: list[int]) -> list[Run]:
    """Stage 2, seed by seed (an interrupted grid holds whole seeds first)."""
    tau = pilot_record["tau"]
    return [
        make_run(o, b, pilot_record[o]["chosen"], clip, s)
        for s in seeds
        for o in OPTIMIZERS
        for b in budgets
        for clip in (0.0, tau)
    ]


def run_experiment(
    out: Path,
    seeds: list[int],
    *,
    budgets: list[float] | None = None,
    changes: dict[str, Any] | None = None,
    jobs: int = 1,
    echo: Any = print,
) -> bool:
    """Both stages into ``out`` (resumable); False while the pilot is unfinished (a run failed)."""
    from qkvlab.config import load_config
    from qkvlab.grid.training import refuse_run_keys

    refuse_run_keys(changes or {}, "--set")
    settings = shared_settings(changes)
    load_config(None, settings["overrides"])  # a bad --set fails here, before any run
    record = pilot(out, settings, jobs, echo)
    if record is None:
        echo("the pilot is unfinished (a run failed: see its train.log); run again to resume")
        return False
    echo(
        "learning rates: "
        + ", ".join(
            f"{o} {record[o]['chosen']:g}" + " (at the ladder's edge)" * record[o]["at_edge"]
            for o in OPTIMIZERS
        )
        + f"; τ = {record['tau']:g}"
    )
    _grid(out, main_runs(record, list(budgets or BUDGETS), seeds), settings, jobs, echo, "main")
    return True


# -- results -------------------------------------------------------------------------------------

COMPARED = ("logit_peak", "logit_final", "qk_effective_rank", "ov_effective_rank", "val_loss")


def aggregate(out: Path) -> dict[str, Any]:
    """Every (optimiser, budget, clip) cell: mean ± std over the reported seeds, and seed-paired
    differences against the same optimiser without decay or clipping."""
    from qkvlab.grid.runner import load_runs, mean_std, paired, point_key

    summary: dict[str, Any] = {"pilot": None, "cells": []}
    path = out / "pilot.json"
    if not path.is_file():
        return summary
    record = json.loads(path.read_text())
    summary["pilot"] = record
    runs = load_runs(out, read_run)
    base = json.loads((out / "settings.json").read_text())["overrides"]
    budgets = sorted({float(dict(key)["budget"]) for key in runs})

    def found(o: str, budget: float, clip: float) -> dict[int, dict[str, Any]]:
        point = {
            "variant": o,
            "budget": float(budget),
            "lr": float(record[o]["chosen"]),
            "qk_clip": float(clip),
        }
        return {s: r for s, r in runs.get(point_key(point), {}).items() if s != SELECT_SEED}

    def measure(results: dict[int, dict[str, Any]], name: str) -> dict[int, float]:
        return {s: r["measures"][name] for s, r in results.items() if "measures" in r}

    for o in OPTIMIZERS:
        reference = found(o, 0.0, 0.0)
        for budget in budgets:
            for clip in (0.0, record["tau"]):
                results = found(o, budget, clip)
                if not results:
                    continue
                done = {s: r for s, r in results.items() if "measures" in r}
                names = sorted({n for r in done.values() for n in r["measures"]})
                cell: dict[str, Any] = {
                    "optimizer": o,
                    "budget": budget,
                    "clip": clip,
                    "lr": record[o]["chosen"],
                    "lambda": decay_for(base, o, budget, record[o]["chosen"]),
                    "seeds": sorted(done),
                    "stopped": sorted(s for s, r in results.items() if "stopped" in r),
                    "measures": {n: mean_std(measure(done, n).values()) for n in names},
                    "vs_plain": {n: paired(measure(done, n), measure(reference, n)) for n in COMPARED},
                }
                if done:
                    cell.update(_trajectories(done))
                summary["cells"].append(cell)
    return summary


def _trajectories(done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The largest logit of any head at each firing (mean and std over seeds, at the firings every seed
    has), and every head's on the lowest seed."""
    from qkvlab.grid.runner import mean_std

    steps = sorted(set.intersection(*(set(r["steps"]) for r in done.values())))
    peaks = {
        s: {t: max(max(layer) for layer in heads) for t, heads in zip(r["steps"], r["per_head"], strict=True)}
        for s, r in done.items()
    }
    stats = [mean_std(peaks[s][t] for s in done) for t in steps]
    first = min(done)
    return {
        "trajectory": {"steps": steps, "mean": [x["mean"] for x in stats], "std": [x["std"] for x in stats]},
        "per_head": {"seed": first, "steps": done[first]["steps"], "max": done[first]["per_head"]},
    }


def tables(summary: dict[str, Any]) -> str:
    """The pilot, the grid (mean ± std over seeds) and the seed-paired differences, as Markdown."""
    from qkvlab.render.tables import diff_text, markdown_table, pm

    record = summary["pilot"]
    if record is None:
        return ""
    rows = []
    for o in OPTIMIZERS:
        for lr, run in record[o]["runs"].items():
            mark = ""
            if float(lr) == record[o]["chosen"]:
                mark = " (chosen, at the ladder's edge)" if record[o]["at_edge"] else " (chosen)"
            if run is None:
                rows.append([o, lr + mark, "stopped (non-finite)", "—", "—"])
                continue
            growth = "—" if run["logit_growth"] is None else f"{run['logit_growth']:.2f}×"
            rows.append([o, lr + mark, f"{run['val_loss']:.4f}", f"{run['logit_peak']:.2f}", growth])
    lines = [
        "Pilot (seed 100, not reported; no decay, no clipping): the largest rate within 5 % of the best "
        f"loss is chosen; τ = {record['tau']:g} is half of AdamW's largest pilot logit at its rate.",
        "",
        *markdown_table(
            ["optimiser", "lr", "val loss", "largest logit", "growth (last / first firing)"], rows
        ),
    ]
    cells = summary["cells"]
    if not cells:
        return "\n".join(lines)

    def head(c: dict[str, Any]) -> list[str]:
        clip = f"τ={c['clip']:g}" if c["clip"] else "off"
        seeds = f"{len(c['seeds'])}" + (f" (+{len(c['stopped'])} stopped)" if c["stopped"] else "")
        return [c["optimizer"], f"{c['budget']:g}", clip, seeds]

    m = lambda c, name, digits=2: pm(c["measures"].get(name), digits)  # noqa: E731
    lines += [
        "",
        "Largest logit of any head (over training, and at the last firing), head-steps clipped, final "
        "effective ranks (mean over heads), validation loss and loss spikes; mean ± std over seeds.",
        "",
        *markdown_table(
            [
                "optimiser",
                "Σηλ",
                "QK-clip",
                "seeds",
                "peak logit",
                "final logit",
                "clipped",
                "QK erank",
                "OV erank",
                "val loss",
                "spikes",
            ],
            [
                [
                    *head(c),
                    m(c, "logit_peak"),
                    m(c, "logit_final"),
                    m(c, "clipped_heads", 0),
                    m(c, "qk_effective_rank"),
                    m(c, "ov_effective_rank"),
                    m(c, "val_loss", 4),
                    m(c, "loss_spikes", 1),
                ]
                for c in cells
            ],
        ),
        "",
        "Seed-paired differences against the same optimiser without decay and without clipping "
        "(mean ± std, and on how many seeds the difference is > 0).",
        "",
        *markdown_table(
            [
                "optimiser",
                "Σηλ",
                "QK-clip",
                "seeds",
                "Δ peak logit",
                "Δ final logit",
                "Δ QK erank",
                "Δ OV erank",
                "Δ val loss",
            ],
            [
                [*head(c), *(diff_text(c["vs_plain"][n], 4 if n == "val_loss" else 2) for n in COMPARED)]
                for c in cells
                if c["budget"] or c["clip"]
            ],
        ),
    ]
    return "\n".join(lines)


def finish(out: Path, plot: str | None) -> int:
    from qkvlab.grid.training import pack_spectra, publish

    pack_spectra(out)
    summary = aggregate(out)
    from qkvlab.repro.logits.render import plot_logits

    return publish(out, summary, tables(summary), plot, plot_logits)


# -- `qkvlab repro logits` -----------------------------------------------------------------------


def _arguments(parser: Any) -> None:
    from qkvlab.repro.common import add_grid_arguments

    add_grid_arguments(parser, "runs/logits")
    parser.add_argument(
        "--budgets",
        default=",".join(f"{b:g}" for b in BUDGETS),
        help="Σₜ η_t λ_t on the attention matrices (default %(default)s)",
    )


def _main(args: Any) -> int:
    from qkvlab.errors import UserError
    from qkvlab.repro.common import nonnegative_list, prepare

    out, seeds, changes = prepare(args, "runs/logits")
    if SELECT_SEED in seeds:
        raise UserError(f"seed {SELECT_SEED} is the pilot's; accepted: --seeds without it")
    budgets = nonnegative_list(args.budgets, "--budgets")
    if not args.summary_only:
        run_experiment(out, seeds, budgets=budgets, changes=changes, jobs=args.jobs)
    return finish(out, args.plot)


def _is_folder(folder: Path) -> bool:
    settings = folder / "settings.json"
    return settings.is_file() and json.loads(settings.read_text()).get("experiment") == "logits"


register(
    Experiment(
        "logits",
        "beyond the papers: whether attention weight decay holds the largest logits down as QK-clip does, "
        "with AdamW and Muon, and at what rank and loss",
        _arguments,
        _main,
        detect=_is_folder,
    )
)
