"""Beyond the papers: ``qkvlab repro optimizer-rank``, what each optimiser does to attention rank.

The question (issue 15): does Muon keep attention full-rank where AdamW lowers it, at what cost or
gain in loss, and what does per-head orthogonalisation change? Everything below was fixed before any
run of this experiment was looked at, and is kept in code so the command reproduces it.

**Variants.** Six update rules, each with weight decay on the attention matrices only:

=================  =====================================================================================
``adamw``          AdamW, decoupled decay p ← p(1 − η_t λ)
``adam-l2``        Adam with coupled L2: λ/2 ‖θ‖² in the loss (the decay then passes through Adam's
                   normalisation, so λ is nominal)
``adamw-corrected``  AdamW with corrected decay λ_t = λ η_t / η_max ("AdamC"), on every decayed group
``muon``           torch's Muon on every 2-D hidden matrix (q, k, v, o, MLP), whole matrices; AdamW on
                   embeddings, norms and the head; decoupled decay p ← p(1 − η_t λ)
``muon-head``      the same with each head's rows of q, k, v and columns of o orthogonalised apart
``muon-corrected`` Muon (whole) with corrected decay
=================  =====================================================================================

Muon uses ``muon_adjust_lr=match_rms_adamw`` (Moonshot's rule: the update's RMS matches AdamW's),
so one learning rate serves the Muon and the AdamW parts of the model, and η means the same thing in
Σηλ for every variant. ``muon-head`` is left out where there is one head per layer (associative
recall), since it is then ``muon``.

**Decay budget.** Each variant is run at the same Σₜ η_t λ_t ∈ {0, 1, 3} (``--budgets``) on q, k, v
and o, and no decay anywhere else (MLP, embeddings, norms), so the only decay in the model is the one
under study. λ = budget / Σₜη_t, and for corrected decay λ = budget · η_max / Σₜη_t² (so that
Σₜ η_t λ_t is the budget; its decay comes late in the schedule's peak instead of evenly). For
Adam + L2 the same λ is the L2 coefficient.

**Learning rates.** A property of the update rule, chosen once per rule at budget 0 (where AdamW,
Adam + L2 and corrected AdamW are one and the same optimiser, Adam, and so are Muon and corrected
Muon), from {½, 1, 2} × the setting's learning rate (``LR_FACTORS``), by the final validation loss of
one run on seed 100 (``SELECT_SEED``, apart from the seeds that are reported). If the best is at an
edge of the grid, the grid is extended by one factor of 2 past it, at most twice. The decay is then
varied at that learning rate, so Σηλ is comparable across budgets. Budget-0 runs are shared: the
Adam-family cells at budget 0 are one run per seed, and so are the Muon ones.

**Settings.** ``gpt``: the Shakespeare GPT of ``repro wd-rank`` (4 layers, 4 heads of d_head 32,
2,000 steps, lr 1e-3); ``recall``: its associative-recall setting (2 layers, 1 head of d_head 64,
4,000 steps online, lr 3e-3). Same steps and tokens for every variant; the wall-clock is reported.

Each run also writes ``factors.json``: the spectral norms of W_Q, W_K, W_V and W_O (whole matrix, and
each head's slice), which are what Muon's decay constrains, beside the spectral monitor's ranks,
nuclear and spectral norms of the products and gaps over training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from qkvlab.grid.runner import Run
from qkvlab.repro.paper000.claim import GPT_BASE, RECALL_BASE
from qkvlab.repro.registry import Experiment, register

__all__ = ["SETTINGS", "VARIANTS", "decay_for", "variant_overrides"]


class Variant(NamedTuple):
    """One update rule: its run-config keys, the rule whose learning rate it uses, and whether its decay follows the schedule."""

    keys: dict[str, Any]
    algorithm: str  # the variant whose budget-0 run and learning rate this one shares
    corrected: bool
    help: str


VARIANTS: dict[str, Variant] = {
    "adamw": Variant({"optimizer": "adamw"}, "adamw", False, "AdamW, decoupled decay"),
    "adam-l2": Variant({"optimizer": "adam-l2"}, "adamw", False, "Adam with coupled L2 in the loss"),
    "adamw-corrected": Variant(
        {"optimizer": "adamw", "corrected_weight_decay": "all"}, "adamw", True, "AdamW, λ_t = λ·η_t/η_max"
    ),
    "muon": Variant({"optimizer": "muon"}, "muon", False, "Muon on whole matrices"),
    "muon-head": Variant(
        {"optimizer": "muon", "muon_per_head": "q,k,v,o"}, "muon-head", False, "Muon per attention head"
    ),
    "muon-corrected": Variant(
        {"optimizer": "muon", "corrected_weight_decay": "all"}, "muon", True, "Muon, λ_t = λ·η_t/η_max"
    ),
}
BUDGETS = (0.0, 1.0, 3.0)
LR_FACTORS = (0.5, 1.0, 2.0)
MAX_EXTENSIONS = 2
SELECT_SEED = 100
ATTENTION = ("q", "k", "v", "o")


class Setting(NamedTuple):
    base: dict[str, Any]
    variants: tuple[str, ...]
    help: str


_SHARED = {"muon_adjust_lr": "match_rms_adamw", "weight_decay": 0.0}
SETTINGS: dict[str, Setting] = {
    "gpt": Setting(
        {**GPT_BASE, **_SHARED}, tuple(VARIANTS), "the char-level Shakespeare GPT (4 heads a layer)"
    ),
    "recall": Setting(
        {**RECALL_BASE, **_SHARED},
        tuple(v for v in VARIANTS if v != "muon-head"),
        "associative recall, fully online (1 head a layer, so per-head Muon is Muon)",
    ),
}


def canonical(variant: str, budget: float) -> str:
    """The variant whose run stands for ``variant`` at ``budget``: at budget 0 the shared one of its rule."""
    return VARIANTS[variant].algorithm if budget == 0 else variant


def decay_for(base: dict[str, Any], variant: str, budget: float, lr: float) -> float:
    """λ on the attention matrices such that Σₜ η_t λ_t = ``budget`` under ``base``'s schedule at peak ``lr``."""
    from qkvlab.config import load_config
    from qkvlab.train.schedule import lr_lambda

    if budget == 0:
        return 0.0
    config = load_config(None, {**base, "lr": lr})
    factor = lr_lambda(config)
    steps = range(config.max_steps)
    if VARIANTS[variant].corrected:  # λ_t = λ f_t, η_t = lr f_t: Σ η_t λ_t = λ · lr · Σ f_t²
        return budget / (lr * math.fsum(factor(t) ** 2 for t in steps))
    return budget / (lr * math.fsum(factor(t) for t in steps))


def variant_overrides(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The run-config keys of one grid point (variant, budget, lr): its optimiser keys, lr, and λ on q, k, v, o."""
    variant, budget, lr = point["variant"], float(point["budget"]), float(point["lr"])
    lam = decay_for(base, variant, budget, lr)
    overrides = {role: {"weight_decay": lam} for role in ATTENTION}
    overrides["embed"] = {"weight_decay": 0.0}
    return {**VARIANTS[variant].keys, "lr": lr, "weight_decay": 0.0, "overrides": overrides}


def run_name(point: dict[str, Any], seed: int) -> str:
    return f"{point['variant']},sum={point['budget']:g},lr={point['lr']:g},seed={seed}"


def make_run(variant: str, budget: float, lr: float, seed: int) -> Run:
    point = {"variant": canonical(variant, budget), "budget": float(budget), "lr": float(lr)}
    return Run(run_name(point, seed), point, seed)


# -- the worker ----------------------------------------------------------------------------------

FACTORS_FILE = "factors.json"


def status(run_dir: Path) -> str:
    """Complete once training finished and the factor norms are written."""
    from qkvlab.grid.training import train_status

    if (run_dir / STOPPED_FILE).is_file():
        return "complete"  # stopped on a non-finite value: it would stop again
    if (run_dir / "final.json").is_file():
        return "complete" if (run_dir / FACTORS_FILE).is_file() else "partial"
    return train_status(run_dir)


def worker(run_dir: Path, point: dict[str, Any], seed: int, settings: dict[str, Any]) -> None:
    from qkvlab.errors import TrainingStopped
    from qkvlab.files import write_atomic
    from qkvlab.grid.training import train_worker

    base = settings["overrides"]
    if not (run_dir / "final.json").is_file():
        try:
            train_worker(run_dir, variant_overrides(base, point), seed, settings)
        except TrainingStopped as exc:  # a learning rate too high for this rule: a result, not a failure
            write_atomic(run_dir / STOPPED_FILE, json.dumps({"reason": str(exc)}, indent=1))
            return
    if (run_dir / "final.json").is_file():
        write_atomic(run_dir / FACTORS_FILE, json.dumps(factor_norms(run_dir), indent=1))


def factor_norms(source: Any) -> dict[str, Any]:
    """Spectral norms of W_Q, W_K, W_V, W_O of a model or run folder: ``{"q": {"matrix": [per layer],
    "heads": [[per head] per layer]}, …}``. A head's slice is its d_head rows of W_Q, W_K, W_V and its
    d_head columns of W_O (the pieces per-head Muon orthogonalises)."""
    import torch

    from qkvlab.attention.extract import AttentionFactors
    from qkvlab.attention.sources import load_source

    factors = AttentionFactors(load_source(source))
    info = factors.info
    out: dict[str, Any] = {r: {"matrix": [], "heads": []} for r in ATTENTION}
    for index in range(len(factors)):
        _, block, _ = factors.units[index]
        mats = dict(zip(ATTENTION, factors._projections(block, factors.units[index][0]), strict=True))
        for role, w in mats.items():
            w = w.detach().to(torch.float64)
            heads = info.n_heads if role in ("q", "o") else info.n_kv_heads
            pieces = (
                w.reshape(w.shape[0], heads, info.d_head).permute(1, 0, 2)
                if role == "o"
                else w.reshape(heads, info.d_head, w.shape[1])
            )
            out[role]["matrix"].append(float(torch.linalg.matrix_norm(w, ord=2)))
            out[role]["heads"].append(torch.linalg.matrix_norm(pieces, ord=2).tolist())
    return out


STOPPED_FILE = "stopped.json"


# -- the grid: learning-rate selection, then the main runs -----------------------------------------


def shared_settings(setting: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every run of a results folder shares (guarded in OUT/settings.json)."""
    return {
        "experiment": "optimizer-rank",
        "setting": setting,
        "overrides": {**SETTINGS[setting].base, **(changes or {})},
        "lr_factors": list(LR_FACTORS),
        "select_seed": SELECT_SEED,
    }


def _grid(out: Path, runs: list[Run], settings: dict[str, Any], jobs: int, echo: Any, stage: str) -> None:
    from qkvlab.grid.runner import run_stage

    run_stage(
        out,
        runs,
        worker,
        status,
        settings=settings,
        jobs=jobs,
        echo=echo,
        label=f"optimizer-rank, {settings['setting']}",
        stage=stage,
    )


def _final_loss(run_dir: Path) -> float | None:
    """The run's final validation loss; inf if it stopped on a non-finite value; None if not finished."""
    if (run_dir / STOPPED_FILE).is_file():
        return math.inf
    final = run_dir / "final.json"
    if not final.is_file():
        return None
    return float(json.loads(final.read_text())["eval"]["loss"])


def select_lrs(
    out: Path, settings: dict[str, Any], variants: tuple[str, ...], jobs: int = 1, echo: Any = print
) -> dict[str, Any] | None:
    """Stage 1: each rule's learning rate at budget 0 on the selection seed (see the module's docstring).

    Returns ``{rule: {"losses": {lr: loss}, "chosen": lr, "at_edge": bool}}`` (also written to
    OUT/selection.json), or None while some selection run is unfinished.
    """
    from qkvlab.files import write_atomic

    base_lr = float(settings["overrides"]["lr"])
    rules = list(dict.fromkeys(VARIANTS[v].algorithm for v in variants))
    grids = {rule: [base_lr * f for f in LR_FACTORS] for rule in rules}
    for extension in range(MAX_EXTENSIONS + 1):
        runs = [make_run(rule, 0.0, lr, SELECT_SEED) for rule in rules for lr in grids[rule]]
        _grid(out, runs, settings, jobs, echo, "learning-rate selection")
        losses = {
            rule: {lr: _final_loss(make_run(rule, 0.0, lr, SELECT_SEED).folder(out)) for lr in grids[rule]}
            for rule in rules
        }
        if any(loss is None for by_lr in losses.values() for loss in by_lr.values()):
            return None
        grown = False
        for rule in rules:
            best = min(grids[rule], key=lambda lr, r=rule: losses[r][lr])
            if extension < MAX_EXTENSIONS and best in (grids[rule][0], grids[rule][-1]):
                grids[rule] = sorted([*grids[rule], best / 2 if best == grids[rule][0] else best * 2])
                grown = True
        if not grown:
            break
    selection = {}
    for rule in rules:
        best = min(grids[rule], key=lambda lr, r=rule: losses[r][lr])
        selection[rule] = {
            "losses": {f"{lr:g}": losses[rule][lr] for lr in grids[rule]},
            "chosen": best,
            "at_edge": best in (grids[rule][0], grids[rule][-1]),
        }
    path = out / "selection.json"  # a run with fewer --variants keeps the other rules' choices
    kept = json.loads(path.read_text()) if path.is_file() else {}
    write_atomic(path, json.dumps({**kept, **selection}, indent=1))
    return selection


def main_runs(
    variants: tuple[str, ...], budgets: list[float], seeds: list[int], selection: dict[str, Any]
) -> list[Run]:
    """Stage 2, seed by seed (an interrupted grid holds whole seeds first); budget-0 runs shared."""
    runs = [
        make_run(v, b, selection[VARIANTS[v].algorithm]["chosen"], s)
        for s in seeds
        for b in budgets
        for v in variants
    ]
    return list(dict.fromkeys(runs))


def run_experiment(
    out: Path,
    setting: str,
    seeds: list[int],
    *,
    budgets: list[float] | None = None,
    variants: tuple[str, ...] | None = None,
    changes: dict[str, Any] | None = None,
    jobs: int = 1,
    echo: Any = print,
) -> bool:
    """Both stages into ``out`` (resumable); False if the selection is not finished (a run failed)."""
    from qkvlab.config import load_config
    from qkvlab.grid.training import refuse_run_keys

    refuse_run_keys(changes or {}, "--set")
    settings = shared_settings(setting, changes)
    load_config(None, settings["overrides"])  # a bad --set fails here, before any run
    variants = variants or SETTINGS[setting].variants
    selection = select_lrs(out, settings, variants, jobs, echo)
    if selection is None:
        echo(
            "the learning-rate selection is unfinished (a run failed: see its train.log); run again to resume"
        )
        return False
    echo(
        "learning rates: "
        + ", ".join(
            f"{rule} {s['chosen']:g}" + (" (at the grid's edge)" * s["at_edge"])
            for rule, s in selection.items()
        )
    )
    _grid(out, main_runs(variants, list(budgets or BUDGETS), seeds, selection), settings, jobs, echo, "main")
    return True


# -- `qkvlab repro optimizer-rank` ---------------------------------------------------------------


def _arguments(parser: Any) -> None:
    from qkvlab.repro.common import add_grid_arguments

    add_grid_arguments(parser, "runs/optimizer-rank-SETTING")
    parser.add_argument(
        "--setting",
        choices=list(SETTINGS),
        default="gpt",
        help="; ".join(f"{name}: {s.help}" for name, s in SETTINGS.items()),
    )
    parser.add_argument(
        "--budgets",
        default=",".join(f"{b:g}" for b in BUDGETS),
        help="Σₜ η_t λ_t on the attention matrices (default %(default)s)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="a subset of " + ", ".join(VARIANTS) + " (default: all the setting has)",
    )


def _variants(text: str | None, setting: str) -> tuple[str, ...]:
    from qkvlab.errors import UserError

    allowed = SETTINGS[setting].variants
    if text is None:
        return allowed
    chosen = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    wrong = [v for v in chosen if v not in allowed]
    if wrong or not chosen:
        raise UserError(f"--variants {text!r}; accepted for --setting {setting}: {', '.join(allowed)}")
    return chosen


def _main(args: Any) -> int:
    from qkvlab.repro.common import nonnegative_list, prepare, refuse_other_setting

    out, seeds, changes = prepare(args, f"runs/optimizer-rank-{args.setting}")
    recorded = out / "settings.json"
    refuse_other_setting(
        out, json.loads(recorded.read_text()).get("setting") if recorded.is_file() else None, args.setting
    )
    if SELECT_SEED in seeds:
        from qkvlab.errors import UserError

        raise UserError(f"seed {SELECT_SEED} chooses the learning rates; accepted: --seeds without it")
    budgets = nonnegative_list(args.budgets, "--budgets")
    variants = _variants(args.variants, args.setting)
    if not args.summary_only:
        run_experiment(
            out, args.setting, seeds, budgets=budgets, variants=variants, changes=changes, jobs=args.jobs
        )
    return finish(out, args.plot)


def _is_folder(folder: Path) -> bool:
    settings = folder / "settings.json"
    return settings.is_file() and json.loads(settings.read_text()).get("experiment") == "optimizer-rank"


register(
    Experiment(
        "optimizer-rank",
        "beyond the papers: what AdamW, Adam + L2, Muon (whole or per head) and corrected weight decay "
        "do to attention rank (--setting: " + ", ".join(SETTINGS) + ")",
        _arguments,
        _main,
        detect=_is_folder,
        report=lambda folder, figures: report_sections(folder, figures),
    )
)


# -- results -------------------------------------------------------------------------------------


def _factor_measures(factors: dict[str, Any]) -> dict[str, float]:
    """Per factor: the spectral norm of the whole matrix and of a head's slice (means over layers and heads),
    and the ratio of the largest head's to the smallest head's (mean over layers)."""
    out: dict[str, float] = {}
    for role in ATTENTION:
        matrix, heads = factors[role]["matrix"], factors[role]["heads"]
        out[f"{role}_matrix_norm"] = math.fsum(matrix) / len(matrix)
        out[f"{role}_head_norm"] = math.fsum(x for layer in heads for x in layer) / sum(map(len, heads))
        out[f"{role}_head_spread"] = math.fsum(max(layer) / min(layer) for layer in heads) / len(heads)
    return out


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """One finished run reduced to what the tables and plots use; ``{"stopped": why}`` for a run that met a
    non-finite value; None while unfinished."""
    from qkvlab.grid.training import erank_over_time, final_measures, head_measures, read_training_run

    if (run_dir / STOPPED_FILE).is_file():
        return {"stopped": json.loads((run_dir / STOPPED_FILE).read_text())["reason"]}
    if not (run_dir / FACTORS_FILE).is_file():
        return None
    result = read_training_run(run_dir)
    if result is None or not result.get("spectra"):
        return None
    records = result["spectra"]
    return {
        "measures": {
            **final_measures(result),
            **_factor_measures(json.loads((run_dir / FACTORS_FILE).read_text())),
        },
        "init": head_measures(records[0]) if records[0]["step"] == 0 else None,
        "steps": [r["step"] for r in records],
        "erank": erank_over_time(records),
        "device": result["final"].get("device_name", "not recorded"),
    }


def aggregate(out: Path) -> dict[str, Any]:
    """Every (variant, budget) cell that has runs: mean ± std over the reported seeds (not the selection
    seed) of each measure, seed-paired differences against AdamW at the same budget and against the
    variant's own budget 0, the mean rank over training, and the learning-rate selection."""
    from qkvlab.grid.runner import load_runs, mean_std, paired, point_key

    settings = json.loads((out / "settings.json").read_text())
    selection_path = out / "selection.json"
    summary: dict[str, Any] = {"setting": settings["setting"], "cells": [], "selection": None}
    if not selection_path.is_file():
        return summary
    selection = json.loads(selection_path.read_text())
    summary["selection"] = selection
    runs = load_runs(out, read_run)
    base = settings["overrides"]
    budgets = sorted({float(dict(key)["budget"]) for key in runs})

    def results(variant: str, budget: float) -> dict[int, dict[str, Any]]:
        lr = selection[VARIANTS[variant].algorithm]["chosen"]
        key = point_key({"variant": canonical(variant, budget), "budget": float(budget), "lr": float(lr)})
        return {s: r for s, r in runs.get(key, {}).items() if s != SELECT_SEED}

    def measure(found: dict[int, dict[str, Any]], name: str) -> dict[int, float]:
        return {s: r["measures"][name] for s, r in found.items() if "measures" in r}

    compared = ("val_loss", "qk_effective_rank", "ov_effective_rank")
    for variant in SETTINGS[settings["setting"]].variants:
        if VARIANTS[variant].algorithm not in selection:
            continue
        ran = any(results(variant, b) for b in budgets if b > 0)
        for budget in budgets:
            found = results(variant, budget)
            finished = {s: r for s, r in found.items() if "measures" in r}
            if not found or (budget == 0 and not ran and variant != VARIANTS[variant].algorithm):
                continue  # a variant that was not run: not shown through the run it would share
            names = sorted({n for r in finished.values() for n in r["measures"]})
            cell: dict[str, Any] = {
                "variant": variant,
                "rule": VARIANTS[variant].algorithm,
                "budget": budget,
                "lr": selection[VARIANTS[variant].algorithm]["chosen"],
                "lambda": decay_for(base, variant, budget, selection[VARIANTS[variant].algorithm]["chosen"]),
                "seeds": sorted(finished),
                "stopped": sorted(s for s, r in found.items() if "stopped" in r),
                "measures": {n: mean_std(measure(finished, n).values()) for n in names},
                "devices": sorted({r["device"] for r in finished.values()}),
            }
            cell["minutes_by_device"] = {  # wall-clock means only within one device
                d: mean_std(r["measures"]["wall_minutes"] for r in finished.values() if r["device"] == d)
                for d in cell["devices"]
            }
            inits = [r["init"] for r in finished.values() if r["init"]]
            cell["init"] = (
                {
                    n: mean_std(i[n] for i in inits)
                    for n in ("qk_effective_rank", "ov_effective_rank", "qk_nuclear_norm", "ov_nuclear_norm")
                }
                if inits
                else None
            )
            adamw = results("adamw", budget) if "adamw" in selection else {}
            own_zero = results(variant, 0.0) if 0.0 in budgets else {}
            cell["vs_adamw"] = {n: paired(measure(finished, n), measure(adamw, n)) for n in compared}
            cell["vs_budget0"] = {n: paired(measure(finished, n), measure(own_zero, n)) for n in compared}
            if finished:
                steps = min((r["steps"] for r in finished.values()), key=len)
                cell["trajectory"] = {
                    "steps": steps,
                    **{
                        p: [
                            math.fsum(r["erank"][p][r["steps"].index(t)] for r in finished.values())
                            / len(finished)
                            for t in steps
                        ]
                        for p in ("qk", "ov")
                    },
                }
            summary["cells"].append(cell)
    return summary


def finish(out: Path, plot: str | None) -> int:
    """Pack the spectra, print the tables, write OUT/summary.json and (with ``plot``) the figures."""
    from qkvlab.grid.training import pack_spectra, publish
    from qkvlab.repro.optimizer_rank.render import plot_optimizer_rank, tables

    pack_spectra(out)
    summary = aggregate(out)
    return publish(out, summary, tables(summary), plot, plot_optimizer_rank)


def report_sections(folder: Path, figures: Path) -> list[Any]:
    """The tables and figures of a results folder, for ``qkvlab report``."""
    from qkvlab.render.page import Figure, Markdown, Section
    from qkvlab.repro.optimizer_rank.render import plot_optimizer_rank, tables

    summary = aggregate(folder)
    if not summary["cells"]:
        return []
    blocks: list[Any] = [Markdown(tables(summary))]
    blocks += [Figure(p, p.stem.replace("_", " ")) for p in plot_optimizer_rank(summary, figures)]
    return [Section(f"Optimisers and attention rank ({folder.name}, {summary['setting']})", blocks)]
