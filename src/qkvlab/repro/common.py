"""What every grid claim shares: its command-line options, its results folder and seeds, number lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["add_grid_arguments", "nonnegative_list", "prepare", "refuse_other_kind", "refuse_other_setting"]


def add_grid_arguments(parser: Any, default_out: str) -> None:
    """The options every grid claim takes: --out, --seeds, --jobs, --set, --plot, --summary-only."""
    from qkvlab.args import positive_int

    parser.add_argument("--out", default=None, help=f"results folder, resumable (default {default_out})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument(
        "--jobs", type=positive_int, default=1, help="runs at a time, each in its own process"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the shared run config (a `qkvlab train` key, e.g. device=cuda model.d_model=384); "
        "recorded in OUT/settings.json, so a folder never mixes settings",
    )
    parser.add_argument("--plot", metavar="DIR", help="write the figures (PNG) here")
    parser.add_argument(
        "--summary-only", action="store_true", help="print the tables from the results in --out"
    )
    from qkvlab.grid.slurm import add_executor_arguments

    add_executor_arguments(parser)


def prepare(args: Any, default_out: str) -> tuple[Path, list[int], dict[str, Any]]:
    """The results folder (``default_out`` when --out is not given), the seeds and the --set changes,
    checked; --summary-only on a folder without runs is refused in one line."""
    from qkvlab.args import check_outputs
    from qkvlab.args import seeds as seeds_list
    from qkvlab.config import parse_assignments
    from qkvlab.errors import UserError

    seeds = seeds_list(args.seeds)
    if args.out is None:
        args.out = default_out
    check_outputs([], [args.out, args.plot])
    out = Path(args.out)
    if args.summary_only and not (out / "settings.json").is_file():
        raise UserError(f"{out} holds no runs; run `qkvlab repro {args.claim} --out {out}` first")
    refuse_other_kind(out, args.claim)
    return out, seeds, parse_assignments(args.set)


def refuse_other_kind(out: Path, claim: str) -> None:
    """Refuse, in one line, a results folder that another claim wrote (its settings.json says so), before
    anything reads it as this claim's or writes into it."""
    from qkvlab.errors import UserError
    from qkvlab.repro.registry import REGISTRY

    experiment = REGISTRY.get(claim)
    if experiment is None or not (out / "settings.json").is_file() or experiment.detect(out):
        return
    other = next((e.name for e in REGISTRY.values() if e.name != claim and e.detect(out)), None)
    held = f"`qkvlab repro {other}` results" if other else "results of another kind"
    raise UserError(f"{out} holds {held}; accepted: a folder of `qkvlab repro {claim}`, or a new --out")


def refuse_other_setting(out: Path, held: str | None, setting: str) -> None:
    """Refuse, in one line, a folder whose runs are another ``--setting``'s (``held``; None: unknown)."""
    from qkvlab.errors import UserError

    if held is not None and held != setting:
        raise UserError(
            f"{out} holds the {held!r} setting's runs, not {setting!r}; accepted: --setting {held} for this "
            "folder, or a new --out"
        )


def nonnegative_list(text: str, what: str) -> list[float]:
    """A comma-separated list of numbers ≥ 0 (weight decays, budgets), duplicates dropped in order."""
    from qkvlab.args import number_list
    from qkvlab.errors import UserError

    values = list(dict.fromkeys(number_list(text, what)))
    if min(values) < 0:
        raise UserError(f"{what} {text!r}; accepted: numbers ≥ 0")
    return values


def pending(have: int, want: int) -> str | None:
    """A reading's placeholder while a folder is still running: "pending (n of N seeds)" while fewer than
    ``want`` seeds have ended in the compared cells (one seed would "agree" with itself), else None."""
    return f"pending ({have} of {want} seeds)" if have < want else None
