"""The ``qkvlab`` command line. It only arranges calls into the library.

User mistakes print one line and exit with code 2; our own bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from qkvlab.args import check_outputs, positive_int
from qkvlab.args import seeds as seeds_list
from qkvlab.errors import TrainingInterrupted, TrainingStopped, UserError
from qkvlab.grid.slurm import GridSubmitted

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        print(f"{self.prog}: error: {_closest_choice(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _closest_choice(message: str) -> str:
    """argparse's "invalid choice: 'wd-rnak' (choose from …)" with the closest choice named first."""
    import difflib
    import re

    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not found:
        return message
    choices = re.findall(r"'([^']*)'", found.group(2)) or [c.strip() for c in found.group(2).split(",")]
    close = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.5)
    return f"{message}; did you mean {close[0]}?" if close else message


def _rtol(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got '{text}'") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def _version() -> str:
    """The installed distribution's version (importing qkvlab itself would import torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qkvlab")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _build_parser() -> argparse.ArgumentParser:
    from qkvlab.attention.families import FAMILIES
    from qkvlab.attention.packaged import PACKAGED_MODELS
    from qkvlab.conventions import DEFAULT_RTOL, SPECTRUM_METHODS

    parser = _Parser(prog="qkvlab", description="See and control what optimisation does to attention layers.")
    parser.add_argument("--version", action="version", version=f"qkvlab {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    insp = sub.add_parser(
        "inspect",
        help="exact per-head spectra and ranks of W_KᵀW_Q and P·W_V",
        description="Exact per-head spectra of QK = W_KᵀW_Q and OV = P·W_V for every attention layer, "
        "computed from the factors (never forming the d×d products). Checkpoints stream layer by layer.",
    )
    insp.add_argument(
        "source",
        nargs="+",
        help=f"HF model folder, .safetensors file, training run, or a packaged name ({', '.join(PACKAGED_MODELS)}). "
        "Several, or a folder of checkpoints (checkpoint-N, stepN, …): one record per checkpoint in step "
        "order, and a table and plots of rank and gap against the step",
    )
    insp.add_argument("--json", metavar="FILE", help="write every head's metrics (fixed schema) to FILE")
    insp.add_argument(
        "--download",
        action="store_true",
        help="fetch a Hub name that is not in the local Hugging Face cache (otherwise hub names are read "
        "from the cache only, never downloaded)",
    )
    insp.add_argument(
        "--step",
        type=_non_negative_int,
        default=None,
        help="the training step of a checkpoint loaded by hand, recorded in --json (report then draws "
        "several such files against the step)",
    )
    insp.add_argument("--csv", metavar="FILE", help="write one row per (layer, head, product) to FILE")
    insp.add_argument("--plot", metavar="DIR", help="write effective-rank heatmaps and singular-value curves")
    insp.add_argument(
        "--rtol",
        type=_rtol,
        default=DEFAULT_RTOL,
        help=f"rank counts σᵢ > rtol·σ₁ (default {DEFAULT_RTOL:g})",
    )
    insp.add_argument(
        "--spectrum-method",
        choices=SPECTRUM_METHODS,
        default="auto",
        help="how each factor's R is computed, always in float64: qr (Householder) or gram (Gram matrix and "
        "Cholesky, about twice as fast, error bound far below bf16/fp16/quantised storage's own rounding); "
        "auto (default) uses gram for such weights and qr otherwise. --json states the error bound",
    )
    insp.add_argument("--family", choices=[f.name for f in FAMILIES], help="skip architecture detection")
    insp.add_argument("--n-heads", type=positive_int, help="override the config's number of heads")
    insp.add_argument("--n-kv-heads", type=positive_int, help="override the config's number of KV heads")
    insp.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    insp.add_argument(
        "--compare",
        metavar="TUNED",
        help="spectra of what fine-tuning changed: ΔW_QK, ΔW_OV and each ΔW, from SOURCE (base) to TUNED",
    )
    insp.set_defaults(handler=_cmd_inspect)

    from qkvlab.presets import PRESETS

    presets = "; ".join(
        f"{p.name} ({', '.join(f'{k}={v:g}' for k, v in p.defaults.items())})" for p in PRESETS.values()
    )
    tr = sub.add_parser(
        "train",
        help="train a GPT / ViT / in-context regression model from scratch",
        description="Train qkvlab's own models on offline data, with per-role optimiser control, a spectral "
        "monitor, safe checkpoints and bit-identical resume. Under `torchrun --nproc_per_node K -m qkvlab train` "
        "it runs DDP with the same global batch.",
    )
    tr.add_argument(
        "config", nargs="?", help="YAML config (optional; defaults: char-level GPT on shakespeare)"
    )
    tr.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=3e-4 model.n_layer=6"
    )
    tr.add_argument("--preset", help=f"optimiser preset NAME[:key=value,...]: {presets}")
    tr.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
    )
    tr.add_argument(
        "--help-keys", action="store_true", help="list every config key with its default and exit"
    )
    tr.set_defaults(handler=_cmd_train)

    sw = sub.add_parser(
        "sweep",
        help="run a grid of training runs × seeds; resumable",
        description="Each grid point × seed is a run folder; completed runs are skipped, interrupted ones resumed.",
    )
    sw.add_argument("config", nargs="?", help="YAML config shared by every run")
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="overrides shared by every run")
    sw.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="a grid axis (repeatable)"
    )
    sw.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    sw.add_argument("--jobs", type=positive_int, default=1, help="runs at a time (default 1)")
    sw.add_argument("--out", metavar="DIR", help="sweep folder (default runs/sweep-<config name>)")
    from qkvlab.grid.slurm import add_executor_arguments

    add_executor_arguments(sw)
    sw.set_defaults(handler=_cmd_sweep)

    grid = sub.add_parser(
        "grid",
        help="a grid folder's runs: where each stands (and, for Slurm, the command each array task runs)",
        description="`qkvlab grid status OUT` lists every run of a grid folder (a `repro` or `sweep` folder) as "
        "pending, queued, running, done or failed, with its Slurm task and the last line of its log.",
    )
    grid_sub = grid.add_subparsers(dest="grid_command", required=True)
    gs = grid_sub.add_parser("status", help="every run: pending, queued, running, done or failed")
    gs.add_argument("out", metavar="OUT", help="the grid folder")
    gs.set_defaults(handler=_cmd_grid_status)
    gc = grid_sub.add_parser("cell", help="run one task of a Slurm job array (what the array's script runs)")
    gc.add_argument("out", metavar="OUT")
    gc.add_argument("array", type=int)
    gc.add_argument("index", type=int)
    gc.set_defaults(handler=_cmd_grid_cell)

    from qkvlab.finetune.data import FINETUNE_DATA

    ft = sub.add_parser(
        "finetune",
        help="fine-tune chosen attention matrices (full or LoRA) of a pretrained model",
        description="Fine-tune only the chosen attention matrices of a pretrained HF model on labelled text, "
        "with η_V = λ·η_QK (paper 001). Targets are roles, mapped to module names per architecture.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ft.add_argument(
        "--model",
        default="minilm",
        help="a packaged name (minilm, mpnet, or the GGUF decoders smollm2-135m, gemma3-270m, qwen2.5-0.5b), "
        "a local HF model folder, a .gguf file, or a cached Hub name",
    )
    ft.add_argument(
        "--data", default="rotten-tomatoes", help="; ".join(f"{k}: {v}" for k, v in FINETUNE_DATA.items())
    )
    ft.add_argument("--targets", default="q,v", help="roles to train: a subset of q,k,v,o, or all")
    ft.add_argument(
        "--method", default="lora", choices=["full", "lora"], help="full matrices or LoRA adapters"
    )
    ft.add_argument("--rank", type=positive_int, default=8, help="LoRA rank")
    ft.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    ft.add_argument("--lr", type=float, default=1e-4, help="η_QK, the rate of every trained matrix but V")
    ft.add_argument("--lr-ratio", type=float, default=1.0, help="λ: η_V = λ·η_QK")
    ft.add_argument("--loraplus-ratio", type=float, default=None, help="LoRA+: lora_B rate × R")
    ft.add_argument(
        "--preset", default=None, help="optimiser preset NAME[:key=value,...], merged per role and key"
    )
    ft.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay λ")
    ft.add_argument("--max-steps", type=positive_int, default=300, help="optimiser steps")
    ft.add_argument(
        "--epochs", type=float, default=None, help="passes over the training split, instead of --max-steps"
    )
    ft.add_argument("--batch-size", type=positive_int, default=32, help="examples per step")
    ft.add_argument("--max-length", type=positive_int, default=64, help="tokens per example")
    ft.add_argument("--eval-every", type=positive_int, default=25, help="steps between validation scores")
    ft.add_argument(
        "--max-train-examples", type=positive_int, default=None, help="subsample the training split"
    )
    ft.add_argument(
        "--max-val-examples",
        type=positive_int,
        default=None,
        help="learning curve on a fixed subset of the validation split (test is always scored in full)",
    )
    ft.add_argument("--seed", type=int, default=0, help="batch order and new weights' initialisation")
    ft.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    ft.add_argument("--out", metavar="RUN_DIR", help="write result.json (and the fine-tuned model) here")
    ft.add_argument("--no-save", action="store_true", help="do not save the fine-tuned model")
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    ft.set_defaults(handler=_cmd_finetune)

    from qkvlab.repro.registry import experiments

    known = experiments()
    theory = known["theory"]
    th = sub.add_parser(
        "theory",
        help=theory.help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=theory.description,
    )
    theory.add_arguments(th)
    th.set_defaults(handler=theory.main)

    rep = sub.add_parser(
        "report",
        help="turn runs, sweeps, inspect/theory JSON and repro folders into one HTML page (+ Markdown twin)",
        description="Each PATH is recognised from its own files: an `inspect --json` file, a training run "
        "folder, a sweep folder, a fine-tuning run, a `theory --json` file or a `repro` results folder. "
        "Several PATHs of one kind are overlaid on shared axes. The page is self-contained (figures "
        "embedded, nothing loaded from the network); its path is the last line printed.",
    )
    rep.add_argument("paths", nargs="+", metavar="PATH")
    rep.add_argument(
        "--out", metavar="DIR", help="where to write (default runs/report-<name of the first PATH>)"
    )
    rep.set_defaults(handler=_cmd_report)

    demo = sub.add_parser(
        "demo",
        help="the main job in a few minutes: three GPT runs (coupled, decoupled, strong attention weight "
        "decay), the theory toy, MiniLM's spectra, one report",
        description="What `make demo` runs (resumable: a second run skips what is done). The report's path "
        "is the last line printed.",
    )
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="default %(default)s")
    demo.add_argument("--jobs", type=positive_int, default=2, help="runs in parallel (default %(default)s)")
    demo.set_defaults(handler=_cmd_demo)

    rp = sub.add_parser(
        "repro",
        help="reproduce a paper claim: " + ", ".join(f"`repro {name}`" for name in known),
        description="Each claim is a resumable grid of runs × seeds in --out; --summary-only reprints its "
        "tables from the results there (theory, the toy, writes one --json file; `qkvlab theory` is it too).",
    )
    claims = rp.add_subparsers(dest="claim", required=True, metavar="CLAIM", parser_class=_Parser)
    for name, experiment in known.items():
        claim = claims.add_parser(
            name,
            help=experiment.help,
            description=experiment.description or experiment.help,
            formatter_class=argparse.RawDescriptionHelpFormatter
            if experiment.description
            else argparse.HelpFormatter,
        )
        experiment.add_arguments(claim)
        claim.set_defaults(handler=_failing_runs_exit(experiment.main))
    return parser


def _failing_runs_exit(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A repro command whose grid ended with failed runs still prints what it has, then exits 1, as
    ``sweep`` does (a job script or a Slurm dependency sees that the study is not finished)."""

    def run(args: argparse.Namespace) -> int:
        from qkvlab.grid.runner import track_failures

        with track_failures() as failed:
            code = handler(args)
        if failed and code == 0:
            shown = ", ".join(str(folder) for folder in failed[:3]) + (" …" if len(failed) > 3 else "")
            print(
                f"qkvlab repro {args.claim}: {len(failed)} run(s) failed (their logs are in their folders: "
                f"{shown}); run the same command again to retry them",
                file=sys.stderr,
            )
            return 1
        return code

    return run


def _tqdm_progress(iterable, total):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    # delay: the bar only appears when a checkpoint takes more than a moment; disable=None: and only on a
    # terminal, so a log, a pipe or CI gets the results and the one-line errors without a bar's residue
    return tqdm(
        iterable,
        total=total,
        desc="layers",
        unit="layer",
        delay=0.5,
        leave=False,
        file=sys.stderr,
        disable=None,
    )


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {value}")
    return value


def _cmd_inspect(args: argparse.Namespace) -> int:
    import warnings

    from qkvlab.inspection import expand_sources, inspect, inspect_series
    from qkvlab.render.tables import inspect_text, series_text

    check_outputs(files=[args.json, args.csv], folders=[args.plot])
    if args.download:
        from pathlib import Path

        from qkvlab.attention.sources import PACKAGED_MODELS, _hub_cache_folder, download_hub_model

        args.source = [
            s
            if s in PACKAGED_MODELS or Path(s).exists()
            else str(_hub_cache_folder(s) or download_hub_model(s))
            for s in args.source
        ]
    sources = expand_sources(args.source)
    if args.step is not None and (len(sources) != 1 or args.compare or not args.json):
        raise UserError(
            "--step records the step of one checkpoint in its --json; accepted: one SOURCE with --json"
        )
    if args.compare:
        if len(sources) != 1:
            raise UserError(
                f"--compare takes one base SOURCE, got {len(sources)}; accepted: SOURCE --compare TUNED"
            )
        args.source = sources[0]
        return _cmd_compare(args)
    run, text = (inspect_series, series_text) if len(sources) > 1 else (inspect, inspect_text)
    with warnings.catch_warnings():  # the terminal gets them once, as notes under the table
        warnings.simplefilter("ignore")
        result = run(
            sources if len(sources) > 1 else sources[0],
            rtol=args.rtol,
            family=args.family,
            n_heads=args.n_heads,
            n_kv_heads=args.n_kv_heads,
            progress=None if args.quiet else _tqdm_progress,
            method=args.spectrum_method,
        )
    return _write_and_print(result, args, text)


def _write_and_print(result: Any, args: argparse.Namespace, text: Callable[[Any], str]) -> int:
    """--json, --csv and --plot of an inspect, series or compare result, then its text unless --quiet."""
    from qkvlab.inspection import InspectSeries
    from qkvlab.report import inspect_plots

    if args.json:
        step = getattr(args, "step", None)
        result.to_json(args.json, **({"step": step} if step is not None else {}))
    if args.csv:
        result.to_csv(args.csv)
    written = [p for p in (args.json, args.csv) if p]
    if args.plot:
        plot = (
            inspect_plots.plot_series
            if isinstance(result, InspectSeries)
            else inspect_plots.plot_compare
            if args.compare
            else inspect_plots.plot_report
        )
        written += [str(p) for p in plot(result, args.plot)]
    if not args.quiet:
        print(text(result))
        for path in written:
            print(f"wrote {path}")
    return 0


def _train_overrides(args: argparse.Namespace) -> dict[str, str]:
    from qkvlab.config import parse_assignments

    items = list(args.overrides)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml", ".json")):
        items.insert(0, args.config)  # `qkvlab train lr=1e-3` with no config file
        args.config = None
    overrides = parse_assignments(items)
    if getattr(args, "preset", None):
        overrides["preset"] = args.preset
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qkvlab.config import (
        RESUME_CHANGEABLE,
        TrainConfig,
        apply_overrides,
        config_keys,
        load_config,
        saved_config,
    )
    from qkvlab.train import train

    if args.help_keys:
        from qkvlab.config import KEY_HELP

        defaults = TrainConfig()
        for key in config_keys():
            target = defaults.model if key.startswith("model.") else defaults
            note = (
                " (changeable on --resume)"
                if key in RESUME_CHANGEABLE
                else " (changeable on --resume with schedule=constant)"
                if key == "max_steps"
                else ""
            )
            default = f"{key} = {getattr(target, key.removeprefix('model.'))!r}"
            print(f"{default:<34} {KEY_HELP.get(key, '')}{note}")
        print("every other key is fixed for a run: a --resume that changes it is refused")
        return 0
    overrides = _train_overrides(args)
    if args.resume:
        run_dir = Path(args.resume)
        config = saved_config(run_dir)
        config.stop_at = None  # an earlier stop_at ended the first leg; give it again to stop again
        apply_overrides(config, overrides)
        result = train(config, resume=run_dir, command=args.invocation)
    else:
        config = load_config(args.config, overrides)
        check_outputs(files=[], folders=[str(config.run_dir())])
        result = train(config, command=args.invocation)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        state = (
            "complete"
            if result.complete
            else f"stopped at step {result.step} (resume with --resume {result.run_dir})"
        )
        loss = f", train loss {result.final_train_loss:.4f}" if result.final_train_loss is not None else ""
        evals = "".join(f", val {k} {v:.4f}" for k, v in result.final_eval.items())
        print(f"{result.run_dir}: {state}{loss}{evals}, {result.wall_seconds:.1f} s")
    return 0


def _cmd_grid_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qkvlab.grid.slurm import grid_status
    from qkvlab.render.tables import markdown_table

    out = Path(args.out)
    if not (out / "runs").is_dir():
        raise UserError(
            f"{out} is not a grid folder (no runs/ in it); accepted: the --out of `qkvlab repro` or `sweep`"
        )
    rows = grid_status(out)
    table = markdown_table(
        ["run", "state", "Slurm task", "last log line"],
        [[r["name"], r["state"], r["task"] or "", r["last"]] for r in rows],
    )
    print("\n".join(table))
    counts = {
        s: sum(r["state"] == s for r in rows) for s in ("pending", "queued", "running", "done", "failed")
    }
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 0


def _cmd_grid_cell(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qkvlab.grid.slurm import cell

    return cell(Path(args.out), args.array, args.index)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qkvlab.grid.sweep import parse_grid, run_sweep, sweep_summary
    from qkvlab.render.tables import sweep_table

    overrides = _train_overrides(args)
    if not args.grid:
        raise UserError("give at least one --grid KEY=V1,V2,...")
    seeds = seeds_list(args.seeds)
    stem = Path(args.config).stem if args.config else "default"
    sweep_dir = Path(args.out) if args.out else Path("runs") / f"sweep-{stem}"
    check_outputs(files=[], folders=[str(sweep_dir)])
    results = run_sweep(
        Path(args.config) if args.config else None,
        parse_grid(args.grid),
        seeds,
        sweep_dir,
        jobs=args.jobs,
        extra=overrides,
    )
    failed = [r for r in results if r["status"].startswith("failed")]
    print(sweep_table(sweep_summary(sweep_dir)))
    print(
        f"wrote {sweep_dir / 'sweep.json'}"
        + (
            f"; {len(failed)} run(s) failed, see "
            + ("their train.log" if args.jobs > 1 else "the messages above")
            if failed
            else ""
        )
    )
    return 1 if failed else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from qkvlab.inspection import compare
    from qkvlab.render.tables import compare_text

    return _write_and_print(compare(args.source, args.compare, rtol=args.rtol), args, compare_text)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qkvlab.report.build import default_report_folder, write_report
    from qkvlab.repro.registry import experiments

    paths = [Path(p) for p in args.paths]
    out = Path(args.out) if args.out else default_report_folder(paths)
    check_outputs(files=[], folders=[out])
    html_path, md_path = write_report(paths, out, claims=experiments())
    print(f"wrote {md_path}")
    print(html_path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qkvlab.demo import run_demo

    check_outputs(files=[], folders=[args.out])
    print(run_demo(Path(args.out), jobs=args.jobs))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from qkvlab.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        model=args.model,
        data=args.data,
        targets=[t.strip() for t in args.targets.split(",") if t.strip()],
        method=args.method,
        rank=args.rank,
        alpha=args.alpha,
        lr=args.lr,
        lr_ratio=args.lr_ratio,
        loraplus_ratio=args.loraplus_ratio,
        preset=args.preset,
        weight_decay=args.weight_decay,
        max_steps=None if args.epochs is not None else args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        eval_every=args.eval_every,
        seed=args.seed,
        device=args.device,
        max_train_examples=args.max_train_examples,
        max_val_examples=args.max_val_examples,
        save_model=not args.no_save,
        out=args.out,
    )
    result = finetune(config, progress=not args.quiet)
    from qkvlab.render.tables import finetune_text

    print(finetune_text(result))
    if config.out:
        print(f"wrote {config.out}/result.json" + (f" and {config.out}/model" if config.save_model else ""))
    return 0


def _other_rank() -> bool:
    """Under torchrun, a process other than rank 0 (whose messages would repeat rank 0's)."""
    import os

    return os.environ.get("RANK", "0") != "0"


def _did_you_mean(command: str, extra: list[str], argv: Sequence[str] | None) -> str:
    """``train --lr 3e-4``: config keys are key=value, not options; say so with the line to type.
    (Without loading the config schema: it imports torch, and a mistake should answer at once.)"""
    if command not in ("train", "sweep"):
        return ""
    import re

    line = list(sys.argv[1:] if argv is None else argv)
    for token in extra:
        match = re.fullmatch(r"--([a-z][a-z0-9_.-]*)(?:=(.*))?", token)
        if match:
            name, value = match[1].replace("-", "_"), match[2]
            after = line.index(token) + 1 if token in line else len(line)
            if value is None:
                value = line[after] if after < len(line) and not line[after].startswith("-") else "VALUE"
            return f"; config keys are given as key=value: did you mean {name}={value}? (`qkvlab train --help-keys`)"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    import shlex

    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    # the command line as typed, which the trainer records so a report shows the command behind a run
    args.invocation = shlex.join(["qkvlab", *(sys.argv[1:] if argv is None else argv)])
    if extra:  # `train CONFIG --preset X lr=1e-3`: key=value overrides may come after options too
        if args.command in ("train", "sweep") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(
                f"unrecognized arguments: {' '.join(extra)}{_did_you_mean(args.command, extra, argv)}"
            )
    try:
        if getattr(args, "executor", "local") == "slurm":
            from qkvlab.grid.runner import use_executor
            from qkvlab.grid.slurm import options_from

            with use_executor("slurm", options_from(args)):
                return args.handler(args)
        return args.handler(args)
    except GridSubmitted as exc:  # the runs are on Slurm: this command's work is done for now
        print(exc)
        return 0
    except UserError as exc:
        if not (isinstance(exc, TrainingStopped) and _other_rank()):  # every rank stops; rank 0 says so
            print(f"qkvlab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
        # the file system refused a path the user gave us
        print(f"qkvlab {args.command}: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `qkvlab ... | head`: the reader left; stop quietly, as other tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        import errno

        if exc.errno == errno.ENAMETOOLONG:  # a path the user gave has a name over the file system's limit
            print(f"qkvlab {args.command}: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
            return EXIT_USER_ERROR
        if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EFBIG, errno.EDQUOT, errno.EACCES):
            raise  # anything else is our bug, with its traceback
        # disk full, read-only, file-size or quota limit: nothing the program can fix, one clear line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"qkvlab {args.command}: error: cannot write{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        if not _other_rank():
            print(f"qkvlab {args.command}: {exc.message}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
