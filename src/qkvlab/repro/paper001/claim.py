"""Paper 001 on MiniLM: ``qkvlab repro finetune``, the claim's command and report.

The tuned study (every cell at its own tuned rate, whole epochs) is :mod:`qkvlab.repro.paper001.tuned`
with its tables in ``render_tuned``; the earlier 150-step pilot grid is :mod:`qkvlab.repro.paper001.pilot`
with its tables in ``render``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qkvlab.args import check_outputs, positive_int
from qkvlab.args import seeds as seeds_list
from qkvlab.errors import UserError
from qkvlab.repro.paper001.pilot import run_grid, write_summary
from qkvlab.repro.registry import Experiment, register

__all__ = ["EXPERIMENT"]


# -- `qkvlab repro finetune` ---------------------------------------------------------------------


_PILOT_ONLY = {"--max-steps": 150, "--batch-size": 16, "--eval-every": 25, "--max-val-examples": 500}


def _arguments(parser: Any) -> None:
    parser.add_argument(
        "--out",
        default=None,
        help="results folder, resumable (default runs/finetune-tuned/MODEL; with --pilot runs/repro-finetune)",
    )
    parser.add_argument(
        "--pilot",
        action="store_true",
        help="the earlier 150-step grid at two fixed rates (a pilot: its rates were not tuned per λ)",
    )
    parser.add_argument(
        "--seeds", default=None, help="--pilot only (default 0,1,2); the tuned study fixes its own"
    )
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs in parallel processes")
    from qkvlab.grid.slurm import add_executor_arguments

    add_executor_arguments(parser)
    for option, default in _PILOT_ONLY.items():
        parser.add_argument(option, type=positive_int, default=None, help=f"--pilot only (default {default})")
    parser.add_argument("--plot", metavar="DIR", default=None, help="write convergence plots (PNG) here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--model", default="minilm", help="the pretrained model (default: the packaged MiniLM)"
    )
    parser.add_argument("--summary-only", action="store_true", help="print the tables from existing results")
    parser.add_argument(
        "--reference",
        default="results/finetune-tuned/minilm",
        help="with a model other than minilm: MiniLM's finished study, which sizes its reduced grid",
    )


def _main(args: Any) -> int:
    seeds = seeds_list(args.seeds or "0,1,2")
    pilot_only = [o for o in ["--seeds", *_PILOT_ONLY] if getattr(args, o[2:].replace("-", "_")) is not None]
    if not args.pilot:
        if pilot_only:
            raise UserError(
                f"{pilot_only[0]} belongs to the 150-step pilot (add --pilot); the tuned study fixes its seeds "
                "(selection 100; reported 0, 1, 2), one epoch, batch 16 and validation every 80 steps in its design"
            )
        return _main_tuned(args)
    for option, default in _PILOT_ONLY.items():
        name = option[2:].replace("-", "_")
        setattr(args, name, getattr(args, name) or default)
    args.out = args.out or "runs/repro-finetune"
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
    elif not any((out / "runs").glob("*/result.json")):
        raise UserError(
            f"{out} holds no finished runs; run `qkvlab repro finetune --pilot --out {out}` first"
        )
    from qkvlab.repro.paper001.render import claims_markdown, plot_convergence, summarize

    print(summarize(out))
    print()
    print(claims_markdown(out))
    print(f"\nwrote {write_summary(out)}")
    if args.plot:
        for path in plot_convergence(out, Path(args.plot)):
            print(f"wrote {path}")
    return 0


def _main_tuned(args: Any) -> int:
    """The tuned study (``experiments/finetune_tuned``): every cell at its own rate, whole epochs."""
    from qkvlab.repro.paper001.render_tuned import study_markdown
    from qkvlab.repro.paper001.tuned import run_study

    args.out = args.out or f"runs/finetune-tuned/{Path(args.model).name}"
    check_outputs([], [args.out, args.plot])
    out = Path(args.out)
    if not args.summary_only:
        design = {}
        if args.model != "minilm":  # the second model's reduced grid is sized from MiniLM's study
            design = _second_model(out, args)
        run_study(out, model=args.model, jobs=args.jobs, device=args.device, **design)
    elif not any((out / "runs").glob("*/result.json")):
        raise UserError(f"{out} holds no finished runs; run `qkvlab repro finetune --out {out}` first")
    print(study_markdown(out))
    if args.plot:
        from qkvlab.repro.paper001.render_tuned import plot_study

        for path in plot_study(out, Path(args.plot)):
            print(f"wrote {path}")
    return 0


COST_FILE = "cost.json"


def _second_model(out: Path, args: Any) -> dict[str, Any]:
    """The second model's grid: sized from MiniLM's study and from one measured run of its own (the
    grid's first, timed here and kept in OUT/cost.json), as ``tuned.second_model_design`` says."""
    import time

    import torch

    from qkvlab.files import write_atomic
    from qkvlab.repro.paper001.tuned import run_study, second_model_design

    reference = Path(args.reference)
    cost = out / COST_FILE
    if not cost.is_file():
        cells, exponents, _ = second_model_design(reference)
        started = time.perf_counter()
        run_study(
            out, model=args.model, jobs=1, device=args.device, cell_list=cells, exponents=exponents, limit=1
        )
        seconds = time.perf_counter() - started
        threads = torch.get_num_threads()
        record = {
            "wall_seconds": seconds,
            "threads": threads,
            "core_hours": seconds * threads / 3600,
            "note": "one run, timed around the grid call on this machine (whatever else it ran)",
        }
        write_atomic(cost, json.dumps(record, indent=1))
    hours = json.loads(cost.read_text())["core_hours"]
    cells, exponents, lam = second_model_design(reference, cost_hours=hours)
    print(f"second model: λ* = {lam:g}; one run costs {hours:.2f} core-hours; {len(cells)} cells")
    return {"cell_list": cells, "exponents": exponents}


def _report(folder: Path, figures: Path) -> list[Any]:
    """Sections for ``qkvlab report``: every setting's numbers, the per-claim tables and the curves."""
    from qkvlab.render.page import Figure, Markdown, Section
    from qkvlab.repro.paper001.render import claims_markdown, plot_convergence, summarize

    settings = folder / "settings.json"
    if settings.is_file() and "rate_exponents" in json.loads(settings.read_text()):
        from qkvlab.repro.paper001.render_tuned import plot_study, study_markdown

        figures.mkdir(parents=True, exist_ok=True)
        drawn = [Figure(p, p.stem.replace("_", " ")) for p in plot_study(folder, figures)]
        return [
            Section(
                f"Paper 001, every cell tuned ({folder.name})", [Markdown(study_markdown(folder)), *drawn]
            )
        ]

    figures.mkdir(parents=True, exist_ok=True)
    curves = [Figure(p, p.stem.replace("_", " ")) for p in plot_convergence(folder, figures)]
    return [
        Section(f"Fine-tuning settings ({folder.name})", [Markdown(summarize(folder))]),
        Section(f"Paper 001's claims ({folder.name})", [Markdown(claims_markdown(folder)), *curves]),
    ]


EXPERIMENT = register(
    Experiment(
        "finetune",
        "paper 001: QV vs QKV, V vs K, λ = η_V/η_QK (full and LoRA), each cell at its tuned rate; MiniLM, or mpnet as the second model",
        _arguments,
        _main,
        report=_report,
        detect=lambda folder: (
            (folder / "tweet_lambda.json").is_file() or any((folder / "runs").glob("*/result.json"))
        ),
    )
)
