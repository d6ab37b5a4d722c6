"""Does the rank guard earn its keep? ``qkvlab repro rank-guard`` (issue 16).

The guard (:mod:`qkvlab.guard`) replaces a sweep over attention weight decay by a controller inside
one run. This experiment runs it on paper 000's Shakespeare GPT (``repro wd-rank``'s setting: λ_rest =
0.1 on the MLP, 0.1 on the embeddings, AdamW, 2,000 steps, the monitor every 100 steps) and compares
it with the fixed attention decays of ``repro wd-rank``/``decouple`` in a reference folder (default
``results/paper000-gpt``), seed by seed (same seeds: same initialisation and batch order).

Fixed before any guard run, from the fixed-decay runs' final smallest-head effective ranks (as a
fraction of d_head = 32, per layer: QK 0.27–0.33 and OV 0.45–0.67 at λ_attn = 0; 0.19–0.26 / 0.37–0.63
at 0.3; 0.11–0.15 / 0.18–0.48 at 1; 0.05–0.08 / 0.07–0.21 at 3):

- three targets (QK, OV): ``mild`` (0.22, 0.40), about the ranks fixed λ_attn = 0.3 leaves;
  ``medium`` (0.13, 0.25), about λ_attn = 1's; ``strong`` (0.06, 0.12), about λ_attn = 3's;
- the guard's defaults (κ = 2, λ_min = 10⁻³) with λ_max = 3, the largest decay of the fixed grid;
  it starts from the coupled decay, λ_attn = 0.1.

The comparison counts runs: the fixed grid needed every λ_attn × seed to find its best; the guard
needs one run per seed for a target (and every target tried counts).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from qkvlab.grid.runner import Run
from qkvlab.repro.registry import Experiment, register

__all__ = ["TARGETS", "guard_settings", "loss_at_rank"]

TARGETS: dict[str, tuple[float, float]] = {
    "mild": (0.22, 0.40),
    "medium": (0.13, 0.25),
    "strong": (0.06, 0.12),
}
GUARD_KEYS: dict[str, Any] = {"rank_guard_kappa": 2.0, "rank_guard_min": 1e-3, "rank_guard_max": 3.0}
START_ATTN = 0.1
REST = 0.1
REFERENCE = "results/paper000-gpt"


def guard_settings(changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every run shares (OUT/settings.json): paper 000's GPT, its λ_rest and embedding decay, the guard's constants."""
    from qkvlab.repro.paper000.claim import GPT_BASE, gpt_overrides, gpt_point

    return {
        "experiment": "rank-guard",
        "overrides": {
            **GPT_BASE,
            **gpt_overrides(gpt_point(START_ATTN, REST)),
            **GUARD_KEYS,
            **(changes or {}),
        },
    }


def runs(targets: list[str], seeds: list[int]) -> list[Run]:
    return [
        Run(
            f"target={t},seed={s}",
            {"target": t, "rank_guard_qk": TARGETS[t][0], "rank_guard_ov": TARGETS[t][1]},
            s,
        )
        for s in seeds
        for t in targets
    ]


def worker(run_dir: Path, point: dict[str, Any], seed: int, settings: dict[str, Any]) -> None:
    from qkvlab.grid.training import train_worker

    train_worker(run_dir, {k: v for k, v in point.items() if k != "target"}, seed, settings)


# -- results -------------------------------------------------------------------------------------


def _guard_trajectory(run_dir: Path) -> dict[str, Any]:
    """The guard's λ per (layer, pair) at every firing, from metrics.jsonl (last record per step)."""
    from qkvlab.grid.training import _json_lines, _last_per_step

    path = run_dir / "metrics.jsonl"
    lines = [r for r in _json_lines(path.read_bytes(), path) if r.get("split") == "guard"]
    lines = _last_per_step(lines)
    keys = sorted({k for r in lines for k in r if k.endswith("_lambda")})
    return {"steps": [r["step"] for r in lines], **{k: [r[k] for r in lines] for k in keys}}


def decay_integrals(
    config: dict[str, Any], steps: list[int], trajectories: dict[str, list[float]], start: float
) -> dict[str, float]:
    """Σₜ η_t λ_t of each λ trajectory under the run's schedule (``config``: its saved config.json), λ_t
    piecewise constant: ``start`` (clipped into the guard's bounds) until the first firing, then each
    firing's value from the step after it."""
    from qkvlab.config import TrainConfig
    from qkvlab.train.schedule import lr_lambda

    resolved = TrainConfig.from_dict(config)
    factor = lr_lambda(resolved)
    etas = [resolved.lr * factor(t) for t in range(resolved.max_steps)]  # the schedule, once per run
    first = min(max(start, resolved.rank_guard_min), resolved.rank_guard_max)
    out = {}
    for key, lambdas in trajectories.items():
        total, k, lam = 0.0, 0, first
        for t, eta in enumerate(etas):
            while k < len(steps) and steps[k] <= t:  # a firing after step s sets λ for steps s+1, …
                lam = lambdas[k]
                k += 1
            total += eta * lam
        out[key] = total
    return out


def _measures(result: dict[str, Any]) -> dict[str, float]:
    """final_measures, with ``{qk,ov}_layer_min`` (the final mean over layers of each layer's smallest-head
    effective rank: what the guard holds) and ``d_head``."""
    from qkvlab.grid.training import final_measures, layer_min_erank

    last = result["spectra"][-1]
    smallest = layer_min_erank(last)
    return {
        **final_measures(result),
        "qk_layer_min": smallest["qk"],
        "ov_layer_min": smallest["ov"],
        # as measured: the config may leave it to d_model / n_head
        "d_head": float(last["architecture"]["d_head"]),
    }


def _layer_min_over_time(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    from qkvlab.grid.training import PRODUCTS, layer_min_erank

    values = [layer_min_erank(r) for r in records]
    return {p: [v[p] for v in values] for p in PRODUCTS}


def _read(run_dir: Path) -> dict[str, Any] | None:
    from qkvlab.grid.training import erank_over_time, read_training_run

    result = read_training_run(run_dir)
    if result is None or not result.get("spectra"):
        return None
    trajectory = _guard_trajectory(run_dir)
    lambdas = {k: v for k, v in trajectory.items() if k.endswith("_lambda")}
    integrals = decay_integrals(result["config"], trajectory["steps"], lambdas, START_ATTN)
    mean = {  # over layers
        pair: math.fsum(v for k, v in integrals.items() if k.endswith(f"{pair}_lambda"))
        / max(1, sum(k.endswith(f"{pair}_lambda") for k in integrals))
        for pair in ("qk", "ov")
    }
    records = result["spectra"]
    return {
        "measures": {**_measures(result), "qk_eta_lambda": mean["qk"], "ov_eta_lambda": mean["ov"]},
        "guard": trajectory,
        "steps": [r["step"] for r in records],
        "erank": erank_over_time(records),
        "layer_min": _layer_min_over_time(records),
    }


def _fixed_cells(reference: Path) -> list[dict[str, Any]]:
    """The fixed-decay runs at λ_rest = 0.1 of the reference folder: λ_attn → seed → measures."""
    from qkvlab.grid.runner import load_runs
    from qkvlab.grid.training import read_training_run

    def read(run_dir: Path) -> dict[str, Any] | None:
        result = read_training_run(run_dir)
        if result is None or not result.get("spectra"):
            return None
        records = result["spectra"]
        return {
            **_measures(result),
            "steps": [r["step"] for r in records],
            "layer_min": _layer_min_over_time(records),
        }

    cells = []
    for key, by_seed in load_runs(reference, read).items():
        point = dict(key)
        if point.get("rest_weight_decay") == REST:
            cells.append({"attn": point["attn_weight_decay"], "runs": by_seed})
    return sorted(cells, key=lambda c: c["attn"])


def aggregate(out: Path, reference: Path | None) -> dict[str, Any]:
    """Per target: mean ± std of each measure, the λ trajectories (mean over seeds), and seed-paired
    differences against the best fixed decay (lowest mean validation loss) and against fixed λ_attn = 0;
    the fixed cells themselves; and the run counts of each approach."""
    from qkvlab.grid.runner import load_runs, mean_std, paired

    found = load_runs(out, _read)
    fixed = _fixed_cells(reference) if reference is not None and (reference / "runs").is_dir() else []
    summary: dict[str, Any] = {"targets": [], "fixed": [], "reference": str(reference) if fixed else None}
    for c in fixed:
        first = next(iter(c["runs"].values()))
        names = sorted(n for n, v in first.items() if isinstance(v, float | int))
        summary["fixed"].append(
            {
                "attn": c["attn"],
                "seeds": sorted(c["runs"]),
                "measures": {n: mean_std(r[n] for r in c["runs"].values()) for n in names},
                "layer_min_over_time": _mean_series(list(c["runs"].values()), "layer_min"),
            }
        )
    best = min(fixed, key=lambda c: summary_mean(c["runs"], "val_loss")) if fixed else None
    zero = next((c for c in fixed if c["attn"] == 0), None)
    summary["best_fixed"] = best["attn"] if best else None
    for key, by_seed in found.items():
        point = dict(key)
        names = sorted(next(iter(by_seed.values()))["measures"])
        loss = {s: r["measures"]["val_loss"] for s, r in by_seed.items()}
        entry: dict[str, Any] = {
            "target": point["target"],
            "target_qk": point["rank_guard_qk"],
            "target_ov": point["rank_guard_ov"],
            "seeds": sorted(by_seed),
            "measures": {n: mean_std(r["measures"][n] for r in by_seed.values()) for n in names},
        }
        for label, cell in (("vs_best_fixed", best), ("vs_fixed_0", zero)):
            if cell is not None:
                entry[label] = {
                    "val_loss": paired(loss, {s: r["val_loss"] for s, r in cell["runs"].items()}),
                    **{
                        f"{p}_effective_rank": paired(
                            {s: r["measures"][f"{p}_effective_rank"] for s, r in by_seed.items()},
                            {s: r[f"{p}_effective_rank"] for s, r in cell["runs"].items()},
                        )
                        for p in ("qk", "ov")
                    },
                }
        if fixed:
            entry["vs_fixed_at_rank"] = _vs_fixed_at_rank(by_seed, fixed)
        first = next(iter(by_seed.values()))
        common = [k for k in first["guard"] if k.endswith("_lambda")]
        steps = first["guard"]["steps"]
        same = [r for r in by_seed.values() if r["guard"]["steps"] == steps]
        entry["lambda"] = {
            "steps": steps,
            **{
                k: [math.fsum(r["guard"][k][i] for r in same) / len(same) for i in range(len(steps))]
                for k in common
            },
        }
        entry["erank_over_time"] = _mean_series(list(by_seed.values()), "erank")
        entry["layer_min_over_time"] = _mean_series(list(by_seed.values()), "layer_min")
        summary["targets"].append(entry)
    order = list(TARGETS)
    summary["targets"].sort(key=lambda e: order.index(e["target"]) if e["target"] in order else len(order))
    seeds = max((len(e["seeds"]) for e in summary["targets"]), default=0)
    summary["runs"] = {
        "fixed_grid": sum(len(c["runs"]) for c in fixed),
        "fixed_grid_cells": len(fixed),
        "guard_per_target": seeds,
        "guard_all_targets": sum(len(e["seeds"]) for e in summary["targets"]),
    }
    return summary


def _mean_series(runs: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """``{steps, qk, ov}``: the mean over runs of ``run[key][product]`` at each monitor step, over the runs
    whose monitor steps are the first run's."""
    steps = runs[0]["steps"]
    same = [r for r in runs if r["steps"] == steps]
    return {
        "steps": steps,
        **{
            p: [math.fsum(r[key][p][i] for r in same) / len(same) for i in range(len(steps))]
            for p in ("qk", "ov")
        },
    }


def loss_at_rank(points: list[tuple[float, float]], rank: float) -> float | None:
    """The validation loss the fixed decays would have at ``rank``: linear interpolation in the final rank
    between the two fixed runs (``points``: (final rank, val loss), one per λ_attn, of one seed) whose ranks
    bracket it; None outside their range (no extrapolation)."""
    ordered = sorted(points)
    for (r0, l0), (r1, l1) in itertools.pairwise(ordered):
        if r0 <= rank <= r1:
            return l0 if r1 == r0 else l0 + (l1 - l0) * (rank - r0) / (r1 - r0)
    return None


def _vs_fixed_at_rank(by_seed: dict[int, Any], fixed: list[dict[str, Any]]) -> dict[str, Any]:
    """Post hoc (not in the design fixed before the runs): per seed, the guard's loss against the fixed
    decays' loss interpolated at the guard's final smallest-head rank, for QK and for OV apart (a fixed
    λ_attn moves both; the guard sets them apart)."""
    from qkvlab.grid.runner import paired

    out: dict[str, Any] = {}
    guard = {s: r["measures"]["val_loss"] for s, r in by_seed.items()}
    for p in ("qk", "ov"):
        matched = {}
        for s, r in by_seed.items():
            points = [
                (c["runs"][s][f"{p}_layer_min"], c["runs"][s]["val_loss"]) for c in fixed if s in c["runs"]
            ]
            value = loss_at_rank(points, r["measures"][f"{p}_layer_min"])
            if value is not None:
                matched[s] = value
        out[p] = paired(guard, matched)
    return out


def summary_mean(runs: dict[int, dict[str, Any]], name: str) -> float:
    return math.fsum(r[name] for r in runs.values()) / len(runs)


def finish(out: Path, reference: Path | None, plot: str | None) -> int:
    from qkvlab.grid.training import pack_spectra, publish
    from qkvlab.repro.rank_guard.render import plot_rank_guard, tables

    pack_spectra(out)
    summary = aggregate(out, reference)
    return publish(out, summary, tables(summary), plot, plot_rank_guard)


# -- `qkvlab repro rank-guard` ---------------------------------------------------------------------


def _arguments(parser: Any) -> None:
    from qkvlab.repro.common import add_grid_arguments

    add_grid_arguments(parser, "runs/rank-guard")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="; ".join(f"{n}: QK {qk:g}, OV {ov:g} of d_head" for n, (qk, ov) in TARGETS.items()),
    )
    parser.add_argument(
        "--reference",
        default=REFERENCE,
        help="a repro wd-rank/decouple folder with the fixed decays to compare with (default %(default)s)",
    )


def _main(args: Any) -> int:
    from qkvlab.config import load_config
    from qkvlab.errors import UserError
    from qkvlab.grid.runner import run_grid
    from qkvlab.grid.training import refuse_run_keys, train_status
    from qkvlab.repro.common import prepare

    out, seeds, changes = prepare(args, "runs/rank-guard")
    targets = list(dict.fromkeys(t.strip() for t in args.targets.split(",") if t.strip()))
    if not targets or any(t not in TARGETS for t in targets):
        raise UserError(f"--targets {args.targets!r}; accepted: a subset of {', '.join(TARGETS)}")
    reference = Path(args.reference)
    if not (reference / "runs").is_dir():
        raise UserError(
            f"--reference {reference} holds no runs"
            + (f" (it is relative to this folder, {Path.cwd()})" if not reference.is_absolute() else "")
            + "; accepted: a repro wd-rank or decouple folder"
        )
    from qkvlab.repro.paper000.claim import SETTING_KEYS, is_gpt_folder

    settings = guard_settings(changes)
    ours = settings["overrides"]
    theirs = (
        json.loads((reference / "settings.json").read_text())["overrides"] if is_gpt_folder(reference) else {}
    )
    if not theirs or any(str(theirs.get(k)) != str(ours.get(k)) for k in SETTING_KEYS):
        raise UserError(
            f"--reference {reference} is not a `repro wd-rank` or `decouple` folder of this run's model and "
            f"data ({', '.join(f'{k}={ours.get(k)}' for k in SETTING_KEYS if ours.get(k) is not None)}); "
            "accepted: such a folder (the default, results/paper000-gpt)"
        )
    if not args.summary_only:
        refuse_run_keys(changes, "--set")
        load_config(None, settings["overrides"])  # a bad --set fails here, before any run
        run_grid(
            out,
            runs(targets, seeds),
            worker,
            settings=settings,
            status=train_status,
            jobs=args.jobs,
            log="train.log",
            label="rank guard",
            session={"seeds": seeds, "targets": targets},
        )
    return finish(out, reference, args.plot)


def _is_folder(folder: Path) -> bool:
    settings = folder / "settings.json"
    return settings.is_file() and json.loads(settings.read_text()).get("experiment") == "rank-guard"


def _report(folder: Path, figures: Path) -> list[Any]:
    from qkvlab.render.page import Figure, Markdown, Section
    from qkvlab.repro.rank_guard.render import plot_rank_guard, tables

    saved = folder / "summary.json"  # the reference the command compared with, else the default
    named = json.loads(saved.read_text()).get("reference") if saved.is_file() else None
    reference = Path(named or REFERENCE)
    summary = aggregate(folder, reference if (reference / "runs").is_dir() else None)
    if not summary["targets"]:
        return []
    blocks: list[Any] = [Markdown(tables(summary))]
    blocks += [Figure(p, p.stem.replace("_", " ")) for p in plot_rank_guard(summary, figures)]
    return [Section(f"Rank guard ({folder.name})", blocks)]


register(
    Experiment(
        "rank-guard",
        "beyond the papers: attention weight decay that adapts to hold rank, against the best fixed decay",
        _arguments,
        _main,
        detect=_is_folder,
        report=_report,
    )
)
