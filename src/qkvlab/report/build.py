"""`qkvlab report PATH…`: recognise what each PATH is from its own files, and turn it into sections.

Kinds (each output file carries ``schema_version`` and ``kind``; files that predate those fields
are recognised by their shape):

- ``inspect``: an ``inspect --json`` file;
- ``inspect-series``: an ``inspect SRC1 SRC2 … --json`` file (many checkpoints of one model);
- ``training-run``: a ``qkvlab train`` run folder (``config.json`` + ``metrics.jsonl``);
- ``sweep``: a ``qkvlab sweep`` folder (``sweep.json``);
- ``finetune-run``: a ``qkvlab finetune`` run folder or its ``result.json``;
- ``repro:NAME``: an output of a claim the caller hands in (``claims``; the command line hands every
  claim of ``qkvlab.repro.registry``): a ``qkvlab repro NAME`` results folder, or ``repro:theory`` for a
  ``qkvlab theory --json`` file. The report itself imports no claim.

Several PATHs of one kind are overlaid on shared axes (loss and rank curves of three runs on one
plot); every figure goes through :func:`qkvlab.report.figures.save` and so through its readability check.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from qkvlab.conventions import PRODUCT_NAMES
from qkvlab.errors import UserError
from qkvlab.render.page import Figure, Page, Preformatted, Section, Table, Text
from qkvlab.report.figures import pyplot, save

__all__ = ["build_page", "detect", "write_report"]

KINDS = ("inspect", "inspect-series", "training-run", "sweep", "finetune-run", "repro:NAME")


class Claim(Protocol):
    """What the report needs of a claim (``qkvlab.repro.registry.Experiment`` is one): whether a path is
    its output, and that output's sections (figures drawn under the folder it is given)."""

    def detect(self, path: Path) -> bool: ...

    def report(self, path: Path, figures: Path) -> list[Section]: ...


_PRODUCT = {p: f"{p.upper()} = {name}" for p, name in PRODUCT_NAMES.items()}  # "QK = W_KᵀW_Q"


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a JSON file qkvlab wrote ({exc.__class__.__name__})") from None


def _inspect_file(path: Path, kind: Any) -> Any:
    """``kind.from_dict`` of an inspect file; a file that lacks what inspect writes is one line."""
    try:
        return kind.from_dict(_json(path))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(
            f"{path} is damaged: not what `qkvlab inspect --json` writes ({exc!r} missing or wrong)"
        ) from None


def _is_spectra_log(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            first = json.loads(fh.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "heads" in first and "architecture" in first


def _series(path: Path) -> Any:
    from qkvlab.inspection import InspectSeries

    if path.is_dir():  # a Monitor's or a callback's folder (HF output_dir, Lightning log_dir)
        return InspectSeries.from_jsonl(path / "spectra.jsonl")
    return InspectSeries.from_jsonl(path) if path.suffix == ".jsonl" else _inspect_file(path, InspectSeries)


def detect(path: Path, claims: Mapping[str, Claim] | None = None) -> str:
    """The kind of ``path`` (see the module docstring); a UserError naming the accepted kinds if none fits.

    ``claims`` (name → :class:`Claim`; the command line hands it ``qkvlab.repro.registry.experiments()``)
    recognise the outputs of ``qkvlab repro NAME`` and ``qkvlab theory``: ``repro:NAME``.
    """
    claims = claims or {}
    if path.is_file() and path.suffix == ".json":
        data = _json(path)
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind in ("inspect", "inspect-series", "finetune-run"):
            return kind
        if isinstance(data, dict) and "heads" in data and "architecture" in data:
            return "inspect"  # inspect --json before it carried a kind
        if isinstance(data, dict) and "curve" in data and "main_metric" in data:
            return "finetune-run"
        if path.name in ("sweep.json", "summary.json", "settings.json", "final.json", "config.json"):
            return detect(path.parent, claims)
    elif path.is_file() and path.suffix == ".jsonl" and _is_spectra_log(path):
        return "inspect-series"  # qkvlab.record_spectra / hf.SpectraCallback: one inspect record a step
    elif path.is_dir():
        if (path / "sweep.json").is_file():
            return "sweep"
        if (path / "config.json").is_file() and (path / "metrics.jsonl").is_file():
            return "training-run"
        if (path / "result.json").is_file():
            return "finetune-run"
        if (path / "spectra.jsonl").is_file() and _is_spectra_log(path / "spectra.jsonl"):
            return "inspect-series"  # qkvlab.Monitor(out=folder), the HF and Lightning callbacks' folders
    elif not path.exists():
        raise UserError(
            f"{path} does not exist; accepted: a run folder, a grid or repro results folder, or an inspect JSON"
        )
    for name, claim in claims.items():
        if claim.detect(path):
            return f"repro:{name}"
    raise UserError(
        f"cannot tell what {path} is; accepted: an `inspect --json` file (one or many checkpoints), a spectra log "
        "(spectra.jsonl of qkvlab.Monitor or a callback, or the folder holding it), a training run folder, a sweep "
        "folder, a fine-tuning run, a `theory --json` file, or a `repro` results folder"
    )


def _label(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def _colours(n: int) -> list[Any]:
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "viridis")
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


# -- inspect ---------------------------------------------------------------------------------------


def _inspect_summary_table(report: Any) -> Table:
    from qkvlab.render.tables import inspect_rows

    headers, rows = inspect_rows(report)
    arch = report.architecture
    return Table(
        headers,
        rows,
        caption=f"{report.source}: {arch.family}, {arch.n_layers} layers, {arch.n_heads} heads "
        f"({arch.n_kv_heads} KV), d_head {arch.d_head}, rank rtol {report.rtol:g}. erank: Roy–Vetterli "
        "effective rank (mean, min over heads); rank: mean #σᵢ > rtol·σ₁; gap: mean ½(‖A‖²+‖B‖²) − ‖ABᵀ‖_*",
    )


def _group_table(report: Any) -> Table | None:
    """Per layer, what weight decay bounds under grouped-query attention and rotary embeddings
    (``qkvlab.inspection.group_summary``); None if the report holds neither."""
    from qkvlab.inspection import group_summary

    rows = group_summary(report)
    if not rows:
        return None
    columns = [
        ("qk_group_erank_mean", "QK group erank", "{:.2f}"),
        ("qk_group_gap_rel", "QK group gap/‖·‖_*", "{:.2%}"),
        ("ov_group_erank_mean", "OV group erank", "{:.2f}"),
        ("ov_group_gap_rel", "OV group gap/‖·‖_*", "{:.2%}"),
        ("qk_plane_imbalance", "QK plane imbalance", "{:.2%}"),
    ]
    shown = [c for c in columns if any(c[0] in row for row in rows)]
    return Table(
        ["layer", *(title for _, title, _ in shown)],
        [
            [row["layer"], *(fmt.format(row[key]) if key in row else "—" for key, _, fmt in shown)]
            for row in rows
        ],
        caption="What weight decay bounds here (docs/spectra.md): per KV group, the group's heads' products "
        "side by side (QK) or stacked (OV), their mean effective rank and Σ gap / Σ ‖·‖_* (0 = weight decay is "
        "exactly the nuclear norm); per rotary plane, |Σ_h‖Q^(p)‖² − ‖K^(p)‖²| / (Σ_h‖Q^(p)‖² + ‖K^(p)‖²), "
        "averaged over planes and groups (0 = balanced).",
    )


def _inspect_sections(reports: list[tuple[str, Any]], figures: Path, prefix: str) -> list[Section]:
    from qkvlab.render.tables import compare_text
    from qkvlab.report.inspect_plots import effective_rank_heatmap, plot_compare, singular_value_curves

    sections = []
    split = []
    for name, report in reports:  # T5: each kind of attention as its own input
        kinds = report.attention_kinds()
        split += (
            [(name, report)]
            if len(kinds) == 1
            else [(f"{name}, {k}", report.for_attention(k)) for k in kinds]
        )
    reports = split
    spectra = [(n, r) for n, r in reports if "qk" in r.products()]
    if len(spectra) > 1:
        overlay = _overlay_layer_rank(spectra, figures / f"{prefix}_layer_rank.png")
        sections.append(Section(f"Effective rank per layer, {len(spectra)} inputs overlaid", [overlay]))
    for index, (name, report) in enumerate(reports):
        stem = f"{prefix}{index}"
        if "qk" not in report.products():  # an `inspect --compare` report: what fine-tuning changed
            written = plot_compare(report, figures / stem)
            blocks = [Preformatted(compare_text(report))]
            blocks += [Figure(p, f"{p.stem.replace('_', ' ')} of the change, per head") for p in written]
            sections.append(Section(f"Change: {name}", blocks))
            continue
        grouped = _group_table(report)
        blocks = [
            _inspect_summary_table(report),
            *([grouped] if grouped is not None else []),
            Figure(
                effective_rank_heatmap(report, figures / f"{stem}_erank_heatmap.png"),
                "Effective rank of each head's product (layer × head); the colour scale runs to d_head.",
            ),
        ]
        blocks += [
            Figure(
                singular_value_curves(report, product, figures / f"{stem}_sv_{product}.png"),
                f"Singular values of {_PRODUCT[product]}, normalised by the largest, one curve per head.",
            )
            for product in ("qk", "ov")
        ]
        sections.append(Section(f"Spectra: {name}", blocks))
    return sections


def _overlay_layer_rank(reports: list[tuple[str, Any]], path: Path) -> Figure:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for (name, report), colour in zip(reports, _colours(len(reports)), strict=True):
        summary = report.layer_summary()
        for ax, product in zip(axes, ("qk", "ov"), strict=True):
            layers = [row["layer"] for row in summary]
            ax.plot(layers, [row[f"{product}_erank_mean"] for row in summary], "o-", color=colour, label=name)
    for ax, product in zip(axes, ("qk", "ov"), strict=True):
        ax.set_title(f"{_PRODUCT[product]}: mean effective rank over heads")
        ax.set_xlabel("layer")
        ax.set_ylabel("effective rank (dimensions)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    return Figure(save(fig, path), "Mean effective rank per layer.")


# -- training runs ---------------------------------------------------------------------------------


def _read_run(folder: Path) -> dict[str, Any]:
    """A training run, complete or not: config, train and val curves, monitor records, final.json."""
    from qkvlab.grid.training import read_metrics, read_spectra

    metrics = read_metrics(folder)
    return {
        "name": folder.name,
        "folder": folder,
        "config": _json(folder / "config.json"),
        "train": metrics["train"],
        "val": metrics["val"],
        "spectra": read_spectra(folder),
        "final": _json(folder / "final.json") if (folder / "final.json").is_file() else None,
    }


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _loss_figure(runs: list[dict[str, Any]], figures: Path, stem: str) -> Figure:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for run, colour in zip(runs, _colours(len(runs)), strict=True):
        steps = [r["step"] for r in run["train"] if "loss" in r]
        losses = [r["loss"] for r in run["train"] if "loss" in r]
        if steps:
            ax.plot(steps, _smooth(losses, 5), color=colour, alpha=0.6, label=f"{run['name']} train")
        val = [(r["step"], r["loss"]) for r in run["val"] if "loss" in r]
        if val:
            ax.plot(*zip(*val, strict=True), "o-", color=colour, markersize=3, label=f"{run['name']} val")
    ax.set_title("Loss over training (train: running mean of 5 logged values)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.legend(fontsize=7)
    return Figure(save(fig, figures / f"{stem}_loss.png"), "Training and validation loss.")


def _accuracy_figure(runs: list[dict[str, Any]], figures: Path, stem: str) -> Figure | None:
    series = [(run, [(r["step"], r["accuracy"]) for r in run["val"] if "accuracy" in r]) for run in runs]
    series = [(run, points) for run, points in series if points]
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for (run, points), colour in zip(series, _colours(len(series)), strict=True):
        steps, acc = zip(*points, strict=True)
        ax.plot(steps, [100 * a for a in acc], "o-", color=colour, markersize=3, label=run["name"])
    ax.set_title("Validation accuracy over training")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    return Figure(save(fig, figures / f"{stem}_accuracy.png"), "Validation accuracy.")


def _head_values(record: dict[str, Any], product: str, metric: str) -> list[float]:
    return [h[metric] for h in record["heads"] if h["product"] == product and h.get(metric) is not None]


def _rank_over_time_figure(runs: list[dict[str, Any]], figures: Path, stem: str) -> Figure | None:
    runs = [r for r in runs if r["spectra"]]
    if not runs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for run, colour in zip(runs, _colours(len(runs)), strict=True):
        steps = [rec["step"] for rec in run["spectra"]]
        for ax, product in zip(axes, ("qk", "ov"), strict=True):
            values = [_head_values(rec, product, "effective_rank") for rec in run["spectra"]]
            mean = [math.fsum(v) / len(v) for v in values]
            ax.plot(steps, mean, "-", color=colour, label=run["name"])
            ax.fill_between(
                steps, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.15
            )
    d_head = runs[0]["spectra"][0]["architecture"]["d_head"]
    for ax, product in zip(axes, ("qk", "ov"), strict=True):
        ax.set_title(f"{_PRODUCT[product]}: effective rank (mean; band: min–max over heads)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(f"effective rank (of d_head = {d_head})")
        ax.legend(fontsize=7)
    return Figure(
        save(fig, figures / f"{stem}_rank_over_time.png"),
        "Effective rank over training, from the spectral monitor: mean over every head of every layer, "
        "with the range over heads shaded.",
    )


def _decay_figure(runs: list[dict[str, Any]], figures: Path, stem: str) -> Figure | None:
    """Measured per-step decay of the imbalance and gap against the gradient-flow predictions."""
    runs = [r for r in runs if any(rec.get("imbalance_decay_per_step") for rec in r["spectra"])]
    if not runs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for run, colour in zip(runs, _colours(len(runs)), strict=True):
        records = [rec for rec in run["spectra"] if rec.get("imbalance_decay_per_step")]
        steps = [rec["step"] for rec in records]
        for col, product in enumerate(("qk", "ov")):
            imb = [rec["imbalance_decay_per_step"] for rec in records]
            gap = [rec["gap_decay_per_step"] for rec in records]
            ax = axes[0][col]
            ax.plot(
                steps, [r["measured"][product] for r in imb], "o-", ms=3, color=colour, label=f"{run['name']}"
            )
            ax.plot(
                steps,
                [r["predicted_weight_decay_part"][product] for r in imb],
                "--",
                color=colour,
                label=f"{run['name']}: 2ηλ",
            )
            ax = axes[1][col]
            ax.plot(
                steps, [r["measured"][product] for r in gap], "o-", ms=3, color=colour, label=f"{run['name']}"
            )
            low = [r["predicted_range"][product][0] for r in gap]
            high = [r["predicted_range"][product][1] for r in gap]
            ax.fill_between(steps, low, high, color=colour, alpha=0.15, label=f"{run['name']}: [2ηλ, 4ηλ]")
    for col, product in enumerate(("qk", "ov")):
        axes[0][col].set_title(f"{_PRODUCT[product]}: imbalance decay per step", fontsize=9)
        axes[1][col].set_title(f"{_PRODUCT[product]}: gap decay per step", fontsize=9)
        for row in range(2):
            axes[row][col].set_ylabel("decay rate (per step)")
            axes[row][col].legend(fontsize=6)
        axes[1][col].set_xlabel("step")
    return Figure(
        save(fig, figures / f"{stem}_gap_imbalance.png"),
        "Measured per-step decay of the imbalance ½|‖A‖²−‖B‖²| and of the gap ½(‖A‖²+‖B‖²) − ‖ABᵀ‖_* "
        "between monitor records (markers), against gradient flow's prediction from weight decay alone "
        "(dashed: 2ηλ; band: [2ηλ, 4ηλ]). Under Adam/AdamW the prediction is a reference line, not a law.",
    )


def _run_table(runs: list[dict[str, Any]]) -> Table:
    keys = sorted({k for run in runs if run["final"] for k in run["final"].get("eval", {})})
    headers = ["run", "steps", "final train loss", *(f"val {k}" for k in keys), "wall (s)", "status"]
    rows = []
    for run in runs:
        final = run["final"] or {}
        step = final.get("step", run["train"][-1]["step"] if run["train"] else 0)
        rows.append(
            [
                run["name"],
                step,
                final.get("train_loss", "—"),
                *(final.get("eval", {}).get(k, "—") for k in keys),
                round(final["wall_seconds"], 1) if "wall_seconds" in final else "—",
                "complete" if run["final"] else "incomplete",
            ]
        )
    return Table(headers, rows, caption="Final numbers of each run (val: the last evaluation).")


def _command(run: dict[str, Any]) -> str:
    final = run["final"] or {}
    if final.get("command"):
        return final["command"]
    return f"qkvlab train {run['folder'] / 'config.json'}  # its resolved config: the same settings"


def _settings_blocks(runs: list[dict[str, Any]]) -> list[Any]:
    blocks: list[Any] = []
    for run in runs:
        blocks.append(Preformatted(_command(run), caption=f"`{run['name']}`: command"))
        blocks.append(
            Preformatted(json.dumps(run["config"], indent=1), caption=f"`{run['name']}`: config.json")
        )
    return blocks


def _final_record_report(run: dict[str, Any]) -> Any:
    from qkvlab.inspection import InspectReport

    record = dict(run["spectra"][-1])
    record["source"] = f"{run['name']} at step {record['step']}"
    return InspectReport.from_dict(record)


def _training_sections(
    runs: list[dict[str, Any]], figures: Path, stem: str, heads: bool = True
) -> list[Section]:
    curves = [_loss_figure(runs, figures, stem), _accuracy_figure(runs, figures, stem)]
    sections = [Section("Training curves", [_run_table(runs), *(f for f in curves if f)])]
    rank = [_rank_over_time_figure(runs, figures, stem), _decay_figure(runs, figures, stem)]
    if any(rank):
        sections.append(Section("Attention rank over training", [f for f in rank if f]))
    if heads:
        finals = [(run["name"], _final_record_report(run)) for run in runs if run["spectra"]]
        for section in _inspect_sections(finals, figures, f"{stem}_final"):
            section.title = section.title.replace("Spectra: ", "Last monitor record: ")
            sections.append(section)
    sections.append(Section("Commands and settings", _settings_blocks(runs)))
    return sections


# -- sweep, fine-tuning, theory, repro ----------------------------------------------------------


def _sweep_sections(folder: Path, figures: Path, stem: str) -> list[Section]:
    from qkvlab.render.tables import sweep_table

    sweep = _json(folder / "sweep.json")
    runs = [_read_run(d) for d in sorted((folder / "runs").glob("*")) if (d / "metrics.jsonl").is_file()]
    blocks: list[Any] = [
        Preformatted(sweep_table(sweep.get("points", [])), caption="Per grid point, mean ± std over seeds."),
        Preformatted(json.dumps({"grid": sweep.get("grid"), "seeds": sweep.get("seeds")}, indent=1), "Grid"),
    ]
    sections = [Section(f"Sweep: {folder.name}", blocks)]
    return sections + _training_sections(runs, figures, stem, heads=False)


def _finetune_sections(paths: list[Path], figures: Path, stem: str) -> list[Section]:
    results = [(_label(p), _json(p / "result.json" if p.is_dir() else p)) for p in paths]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for (name, result), colour in zip(results, _colours(len(results)), strict=True):
        curve = result["curve"]
        steps = [c["step"] for c in curve]
        axes[0].plot(steps, [c["train_loss"] for c in curve], "o-", ms=3, color=colour, label=name)
        axes[1].plot(steps, [c[result["main_metric"]] for c in curve], "o-", ms=3, color=colour, label=name)
    axes[0].set_title("Training loss (mean since the previous evaluation)", fontsize=9)
    axes[0].set_ylabel("loss (nats)")
    axes[1].set_title(f"Validation {results[0][1]['main_metric']}", fontsize=9)
    axes[1].set_ylabel(results[0][1]["main_metric"])
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    figure = Figure(
        save(fig, figures / f"{stem}_finetune_curves.png"), "Convergence of each fine-tuning run."
    )
    rows = [
        [
            name,
            r["config"].get("method", "?"),
            ",".join(r["config"].get("targets") or []) or "?",
            r["trainable_parameters"],
            r["best_val"],
            r["final_val"],
            *(r["test"].get(k, "—") for k in ("accuracy", "macro_f1")),
        ]
        for name, r in results
    ]
    table = Table(
        [
            "run",
            "method",
            "trained",
            "trainable params",
            "best val",
            "final val",
            "test accuracy",
            "test macro-F1",
        ],
        rows,
        caption="Fine-tuning runs (val: the learning-curve subset; test: reported once at the end).",
    )
    settings = [
        Preformatted(json.dumps(r["config"], indent=1), caption=f"`{name}`: config") for name, r in results
    ]
    return [Section("Fine-tuning", [table, figure]), Section("Commands and settings", settings)]


def _repro_sections(name: str, claim: Claim, folder: Path, figures: Path) -> list[Section]:
    if claim.report is None:
        return [Section(f"repro {name}: {folder}", [Text("This experiment has no report sections yet.")])]
    sections = claim.report(folder, figures)
    if not folder.is_dir():  # a file (`theory --json`): its sections carry its command
        return sections
    command = f"qkvlab repro {name} --out {folder} --summary-only"
    settings = folder / "settings.json"
    blocks: list[Any] = [Preformatted(command, caption="Reprints these tables from the runs in the folder")]
    if settings.is_file():
        blocks.append(Preformatted(settings.read_text(), caption="settings.json (shared by every run)"))
    return [*sections, Section(f"repro {name}: command and settings", blocks)]


# -- the page --------------------------------------------------------------------------------------


def _series_sections(series: Any, label: str, figures: Path, stem: str) -> list[Section]:
    from qkvlab.render.tables import series_text
    from qkvlab.report.inspect_plots import series_figure

    figure = series_figure(series, figures / f"{stem}_series.png")
    caption = (
        "Effective rank, rank at rtol and gap of each product against the step: the mean over every head "
        "(black), each layer's mean, and the range over heads (grey)."
    )
    return [
        Section(
            f"Over {len(series.reports)} checkpoints: {label}",
            [Preformatted(series_text(series)), Figure(figure, caption)],
        )
    ]


def _run_label(path: Path) -> str:
    """A run's name in a legend: its folder's name for ``…/run/spectra.jsonl``, else the file's stem."""
    if path.is_file() and path.name == "spectra.jsonl":
        return path.parent.name or path.stem
    return _label(path)


def _overlay_sections(runs: list[tuple[str, Any]], figures: Path, stem: str) -> list[Section]:
    from qkvlab.report.inspect_plots import series_overlay_figure

    figure = series_overlay_figure(runs, figures / f"{stem}_overlay.png")
    caption = (
        f"{len(runs)} runs on shared axes: each run's mean over every head of every layer (line) and the range "
        "over its heads (band), for effective rank, rank at rtol and gap."
    )
    return [Section(f"{len(runs)} runs overlaid", [Figure(figure, caption)])]


def build_page(
    paths: Sequence[Path],
    figures: Path,
    title: str | None = None,
    intro: str = "",
    claims: Mapping[str, Claim] | None = None,
) -> Page:
    """Detect each path (``claims`` as for :func:`detect`), group by kind (one overlay per kind) and build
    the sections."""
    claims = claims or {}
    figures.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, list[Path]] = {}
    for path in paths:
        kinds.setdefault(detect(path, claims), []).append(path)
    sections: list[Section] = []
    for index, (kind, group) in enumerate(kinds.items()):
        stem = f"k{index}"
        if kind == "inspect":
            from qkvlab.inspection import InspectReport

            reports = [(_label(p), _inspect_file(p, InspectReport)) for p in group]
            steps = [_json(p).get("step") for p in group]
            if len(group) > 1 and all(isinstance(x, int) for x in steps):  # to_json(step=…): one series
                from qkvlab.inspection import InspectSeries

                order = sorted(range(len(group)), key=lambda i: steps[i])
                series = InspectSeries([reports[i][1] for i in order], [steps[i] for i in order])
                sections += _series_sections(series, f"{len(group)} inspect files", figures, f"{stem}_steps")
            sections += _inspect_sections(reports, figures, f"{stem}_inspect")
        elif kind == "inspect-series":
            runs = [(_run_label(p), _series(p)) for p in group]
            if len(runs) > 1:
                sections += _overlay_sections(runs, figures, stem)
            for j, (label, series) in enumerate(runs):
                sections += _series_sections(series, label, figures, f"{stem}_{j}")
        elif kind == "training-run":
            sections += _training_sections([_read_run(p) for p in group], figures, stem)
        elif kind == "sweep":
            for j, folder in enumerate(group):
                sections += _sweep_sections(folder, figures, f"{stem}_{j}")
        elif kind == "finetune-run":
            sections += _finetune_sections(group, figures, stem)
        else:
            name = kind.split(":", 1)[1]
            for j, folder in enumerate(group):
                sections += _repro_sections(name, claims[name], folder, figures / f"{stem}_{j}")
    described = ", ".join(f"{len(g)} {k}" for k, g in kinds.items())
    if title is None:
        title = "qkvlab report: " + ", ".join(_label(p) for p in paths[:3]) + (" …" if len(paths) > 3 else "")
    if intro:
        sections.insert(0, Section("What this page shows", [Text(line) for line in intro.split("\n\n")]))
    return Page(title, sections, subtitle=f"From {described}: " + " ".join(f"`{p}`" for p in paths))


def default_report_folder(paths: Sequence[Path], root: Path = Path("runs")) -> Path:
    """``runs/report-<name of the first PATH>``; when that folder holds a report of other paths (two
    runs both called ``run``), ``…-2``, ``…-3``: a report never silently replaces another one."""
    first = paths[0].resolve()
    base = f"report-{first.stem if first.is_file() else first.name}"
    wanted = sorted(str(p.resolve()) for p in paths)
    for n in range(1, 10_000):
        out = root / (base if n == 1 else f"{base}-{n}")
        try:
            sources = json.loads((out / SOURCES).read_text())["paths"]
        except (OSError, ValueError, KeyError, TypeError):
            sources = None
        if not out.exists() or sources == wanted:
            return out
    raise UserError(f"{root} holds 9,999 reports named {base}; give one with --out")


SOURCES = "report.json"  # the paths a report was made from, so a later report of others picks its own folder


def write_report(
    paths: Sequence[Path],
    out: Path,
    title: str | None = None,
    intro: str = "",
    claims: Mapping[str, Claim] | None = None,
) -> tuple[Path, Path]:
    """Write ``OUT/report.html`` (self-contained) and ``OUT/report.md`` with ``OUT/figures/``.

    ``intro``: paragraphs (blank-line separated) for a first section, "What this page shows".
    The figures are drawn into a temporary folder and moved into place only when the whole page was
    built: a report that fails leaves no empty or half-drawn folder behind (and no ``OUT`` it created).
    """
    import dataclasses
    import shutil
    import tempfile

    from qkvlab.files import refuse_links, write_atomic
    from qkvlab.render.page import Figure, write_html, write_markdown

    figures = out / "figures"
    if figures.exists() and not (out / "report.html").is_file():
        raise UserError(f"{out} holds a figures folder that is not a qkvlab report's; give another --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        refuse_links(out)  # an earlier report's folder may come from someone else
        drawing = Path(tempfile.mkdtemp(dir=out, prefix=".figures-"))
        try:
            page = build_page(paths, drawing, title, intro, claims)
        except BaseException as exc:
            shutil.rmtree(drawing, ignore_errors=True)
            if isinstance(exc, OSError) and exc.filename and str(exc.filename).startswith(str(drawing)):
                # name the place the user will look for (a disk-full message), not the temporary folder
                exc.filename = str(figures) + str(exc.filename)[len(str(drawing)) :]
            raise
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if figures.is_dir():  # an earlier report's figures
        shutil.rmtree(figures)
    os.replace(drawing, figures)

    def moved(block: Any) -> Any:
        if isinstance(block, Figure) and Path(block.path).is_relative_to(drawing):
            return dataclasses.replace(block, path=figures / Path(block.path).relative_to(drawing))
        return block

    for section in page.sections:
        section.blocks = [moved(b) for b in section.blocks]
    written = write_html(page, out / "report.html"), write_markdown(page, out / "report.md")
    write_atomic(out / SOURCES, json.dumps({"paths": sorted(str(p.resolve()) for p in paths)}, indent=1))
    return written
