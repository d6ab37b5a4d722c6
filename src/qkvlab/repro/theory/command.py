"""``qkvlab theory`` as a claim of the registry: its arguments, its run, how ``qkvlab report`` finds and
draws its JSON. Importable without torch (the command line's help is built from it)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from qkvlab.args import check_outputs, number_list, positive_int
from qkvlab.repro.registry import Experiment, register
from qkvlab.repro.theory.settings import KIND, PARTS, TheorySettings

__all__ = ["EXPERIMENT"]

DESCRIPTION = """Paper 000's theorem, measured on small problems (well under a minute with the defaults).

Convention (ours): factored loss ½‖ABᵀ − M‖² + (λ/2)(‖A‖² + ‖B‖²), nuclear loss ½‖W − M‖² + λ‖W‖_*;
torch's weight_decay=λ is this λ. The minimiser thresholds singular values at λ: σᵢ = max(dᵢ − λ, 0).
The paper also writes the penalty as λ(‖A‖² + ‖B‖²): with a ½ data loss that thresholds at 2λ (halve
its λ to get ours). In general c_d‖ABᵀ − M‖² + c_p(‖A‖² + ‖B‖²) thresholds at c_p/c_d.
Time is t = Σ η_k; rates are per unit t. Predictions: imbalance ‖AᵀA − BᵀB‖ at 2λ (2λ/(1 − β) with
momentum β); gap ½(‖A‖² + ‖B‖²) − ‖ABᵀ‖_* at the slowest of 4λ (if some dᵢ > λ) and 2(λ + dᵢ) for dᵢ ≤ λ.

Parts: toy (GD on the Fig. 1 toy, diagonal and rotated target, beside SVT and the closed form),
optimizers (heavy-ball SGD, Adam + coupled L2, AdamW), completion (factorised vs soft-impute),
pretrained (how balanced a pretrained model's factor pairs are, Fig. 4). docs/theory.md has the rest."""


def _arguments(th: argparse.ArgumentParser) -> None:
    defaults = TheorySettings()
    th.add_argument(
        "--lambdas",
        default=",".join(f"{x:g}" for x in defaults.lambdas),
        help="toy λ grid, comma-separated, ≥ 0 (default %(default)s)",
    )
    th.add_argument(
        "--steps",
        type=positive_int,
        default=defaults.steps,
        help="toy GD steps (default %(default)s)",
    )
    th.add_argument(
        "--lr", type=float, default=defaults.lr, help="toy GD learning rate η (default %(default)s)"
    )
    th.add_argument("--seeds", default=",".join(map(str, defaults.seeds)), help="default %(default)s")
    th.add_argument(
        "--optimizers",
        default=",".join(defaults.optimizers),
        help="optimiser variants: a subset of sgd-momentum,adam-l2,adamw, or none (default %(default)s)",
    )
    th.add_argument("--parts", default=",".join(PARTS), help="what to run (default %(default)s)")
    th.add_argument(
        "--completion-lambdas",
        default=",".join(f"{x:g}" for x in defaults.completion_lambdas),
        help="matrix-completion λ grid (default %(default)s)",
    )
    th.add_argument(
        "--model",
        action="append",
        metavar="SOURCE",
        help="pretrained balance of this model (anything `inspect` reads; repeatable; default minilm)",
    )
    th.add_argument("--json", metavar="FILE", help="write every number (schema_version 1, kind theory)")
    th.add_argument("--plot", metavar="DIR", help="write the figures (PNG) here")
    th.add_argument("--quiet", action="store_true", help="no tables, no progress lines")


def _main(args: argparse.Namespace) -> int:
    from qkvlab.repro.theory.claim import run_theory

    check_outputs([args.json], [args.plot])
    optimizers = (
        ()
        if args.optimizers.strip() == "none"
        else tuple(o.strip() for o in args.optimizers.split(",") if o.strip())
    )
    settings = TheorySettings(
        lambdas=number_list(args.lambdas, "--lambdas"),
        seeds=number_list(args.seeds, "--seeds", int),
        steps=args.steps,
        lr=args.lr,
        optimizers=optimizers,
        parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
        completion_lambdas=number_list(args.completion_lambdas, "--completion-lambdas"),
        models=tuple(args.model) if args.model else TheorySettings().models,
    )
    opened = {}
    if "pretrained" in settings.parts:  # a model that cannot be read is refused before any part runs
        from qkvlab.attention import load_source

        opened = {model: load_source(model) for model in settings.models}
    start = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - start:5.1f} s] {message}", file=sys.stderr, flush=True)

    result = run_theory(settings, progress, opened)
    result["command"] = settings.command()
    result["seconds"] = round(time.perf_counter() - start, 2)
    written = []
    if args.json:
        from qkvlab.files import write_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.json), json.dumps(result, indent=1, allow_nan=False))
        written.append(args.json)
    if args.plot:
        from qkvlab.repro.theory.render import plot_theory

        written += [str(p) for p in plot_theory(result, args.plot)]
    if not args.quiet:
        from qkvlab.repro.theory.render import theory_tables

        print(theory_tables(result))
        for path in written:
            print(f"wrote {path}")
    return 0


def _detect(path: Path) -> bool:
    """A ``theory --json`` file: a JSON object whose ``kind`` is ``theory``."""
    if not (path.is_file() and path.suffix == ".json"):
        return False
    try:
        with path.open("rb") as handle:
            return json.loads(handle.read(10_000_000)).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def _report(path: Path, figures: Path) -> list[Any]:
    from qkvlab.render.page import Figure, Preformatted, Section
    from qkvlab.repro.theory.render import plot_theory, theory_tables

    result = json.loads(path.read_text())
    written = plot_theory(result, figures)
    label = path.stem
    blocks: list[Any] = [
        Preformatted(theory_tables(result), caption="Every number, as `qkvlab theory` prints it.")
    ]
    blocks += [Figure(p, p.stem.replace("_", " ")) for p in written]
    settings = [Preformatted(json.dumps(result.get("settings", {}), indent=1), caption="Settings")]
    if result.get("command"):
        settings.insert(0, Preformatted(result["command"], caption="Command"))
    return [Section(f"Theory: {label}", blocks), Section("Theory: command and settings", settings)]


EXPERIMENT = register(
    Experiment(
        "theory",
        "paper 000's theorem measured: L2 on factors = nuclear norm, exponential balancing",
        _arguments,
        _main,
        detect=_detect,
        report=_report,
        description=DESCRIPTION,
    )
)
