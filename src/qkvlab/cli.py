"""The ``qkvlab`` command line. It only arranges calls into the library.

User mistakes print one line and exit with code 2; our own bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qkvlab.errors import UserError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _rtol(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got '{text}'") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    from qkvlab.attention.families import FAMILIES
    from qkvlab.attention.sources import PACKAGED_MODELS
    from qkvlab.spectra import DEFAULT_RTOL

    parser = _Parser(prog="qkvlab", description="See and control what optimisation does to attention layers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    insp = sub.add_parser(
        "inspect",
        help="exact per-head spectra and ranks of W_KᵀW_Q and P·W_V",
        description="Exact per-head spectra of QK = W_KᵀW_Q and OV = P·W_V for every attention layer, "
        "computed from the factors (never forming the d×d products). Checkpoints stream layer by layer.",
    )
    insp.add_argument(
        "source",
        help=f"HF model folder, .safetensors file, or a packaged name ({', '.join(PACKAGED_MODELS)})",
    )
    insp.add_argument("--json", metavar="FILE", help="write every head's metrics (fixed schema) to FILE")
    insp.add_argument("--csv", metavar="FILE", help="write one row per (layer, head, product) to FILE")
    insp.add_argument("--plot", metavar="DIR", help="write effective-rank heatmaps and singular-value curves")
    insp.add_argument(
        "--rtol",
        type=_rtol,
        default=DEFAULT_RTOL,
        help=f"rank counts σᵢ > rtol·σ₁ (default {DEFAULT_RTOL:g})",
    )
    insp.add_argument("--family", choices=[f.name for f in FAMILIES], help="skip architecture detection")
    insp.add_argument("--n-heads", type=_positive_int, help="override the config's number of heads")
    insp.add_argument("--n-kv-heads", type=_positive_int, help="override the config's number of KV heads")
    insp.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    insp.set_defaults(handler=_cmd_inspect)
    return parser


def _tqdm_progress(iterable, total):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    # delay: the bar only appears when a checkpoint takes more than a moment.
    return tqdm(iterable, total=total, desc="layers", unit="layer", delay=0.5, leave=False, file=sys.stderr)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from qkvlab.inspect import inspect
    from qkvlab.report.tables import format_table

    report = inspect(
        args.source,
        rtol=args.rtol,
        family=args.family,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        progress=None if args.quiet else _tqdm_progress,
    )
    if args.json:
        report.to_json(args.json)
    if args.csv:
        report.to_csv(args.csv)
    written = [p for p in (args.json, args.csv) if p]
    if args.plot:
        from qkvlab.report.inspect_plots import plot_report

        written += [str(p) for p in plot_report(report, args.plot)]
    if not args.quiet:
        arch = report.architecture
        print(
            f"{report.source}: {arch.family}, {arch.n_layers} layers, {arch.n_heads} heads "
            f"({arch.n_kv_heads} KV), d_model={arch.d_model}, d_head={arch.d_head}, rank rtol={report.rtol:g}"
        )
        headers = [
            "layer",
            "QK erank",
            "QK min",
            "QK rank",
            "QK gap",
            "OV erank",
            "OV min",
            "OV rank",
            "OV gap",
        ]
        rows = [
            [
                row["layer"],
                row["qk_erank_mean"],
                row["qk_erank_min"],
                row["qk_rank_mean"],
                row["qk_gap_mean"],
                row["ov_erank_mean"],
                row["ov_erank_min"],
                row["ov_rank_mean"],
                row["ov_gap_mean"],
            ]
            for row in report.layer_summary()
        ]
        print(format_table(headers, rows))
        print(
            "erank: Roy–Vetterli effective rank (mean, min over heads); rank: mean #σᵢ > rtol·σ₁; gap: mean ½(‖A‖²+‖B‖²) − ‖ABᵀ‖_*"
        )
        for path in written:
            print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"qkvlab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
