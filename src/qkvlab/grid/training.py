"""Training runs as grid runs: the worker, status and reader that ``qkvlab sweep`` and the paper-000
experiments share with the experiment layer (:mod:`qkvlab.grid.runner`).

The worker's settings are ``{"config": YAML path or None, "overrides": {key: value}}``; a grid
point is more overrides (``{"weight_decay": "0.1"}``). A run folder is a ``qkvlab train`` run
folder: ``final.json`` means complete, a checkpoint means it resumes from there.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path
from typing import Any

from qkvlab.errors import UserError
from qkvlab.train.checkpoint import latest_checkpoint

__all__ = [
    "erank_over_time",
    "final_measures",
    "head_measures",
    "layer_min_erank",
    "pack_spectra",
    "publish",
    "read_metrics",
    "read_spectra",
    "read_training_run",
    "refuse_run_keys",
    "train_status",
    "train_tail",
    "train_worker",
]

# What a run that died before its first checkpoint leaves behind; removed before it starts over.
_DEBRIS = ("metrics.jsonl", "spectra.jsonl", "tb", "config.json")


# Keys the grid sets for every run itself; given as shared overrides they would be silently replaced.
_SET_PER_RUN = {
    "out": "the grid's folder is --out, and each run gets a folder in it",
    "name": "each run is named after its grid point",
    "seed": "seeds go in --seeds",
}


def refuse_run_keys(overrides: dict[str, Any], option: str) -> None:
    """A UserError if ``overrides`` (given with ``option``) sets a key the grid sets per run."""
    from qkvlab.errors import UserError

    for key, why in _SET_PER_RUN.items():
        if key in overrides:
            raise UserError(f"{option} {key}={overrides[key]} would be ignored: {why}")


def train_status(run_dir: Path) -> str:
    if (run_dir / "final.json").is_file():
        return "complete"
    if run_dir.is_dir() and latest_checkpoint(run_dir) is not None:
        return "partial"
    return "new"


def train_worker(run_dir: Path, point: dict[str, Any], seed: int, settings: dict[str, Any]) -> None:
    """Train (or resume) one run of a grid into ``run_dir``."""
    from qkvlab.config import load_config, saved_config
    from qkvlab.train import train

    if train_status(run_dir) == "partial":
        config = saved_config(run_dir)
        config.stop_at = None
        train(config, resume=run_dir)
        return
    for name in _DEBRIS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    overrides = {
        **settings.get("overrides", {}),
        **point,
        "seed": seed,
        "name": run_dir.name,
        "out": str(run_dir),
        "progress": False,
    }
    train(load_config(settings.get("config"), overrides))


def _last_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step (a resumed run may repeat a step: the last wins), ordered by step."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def _json_lines(data: bytes, path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a damaged line is a UserError naming the file and the line.
    A last line without its newline is a write cut short by a crash (or a run still writing): skipped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is damaged (not UTF-8 text)") from None
    lines = text.split("\n")
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"{path} is damaged (line {number} is not JSON)") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path} is damaged (line {number} has no step)")
        records.append(record)
    return records


def read_metrics(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """``metrics.jsonl`` as ``{"train": [...], "val": [...]}``, one record per step in each."""
    path = run_dir / "metrics.jsonl"
    records = _json_lines(path.read_bytes(), path) if path.is_file() else []
    return {name: _last_per_step([r for r in records if r.get("split") == name]) for name in ("train", "val")}


def read_spectra(run_dir: Path) -> list[dict[str, Any]]:
    """The spectral monitor's records (``spectra.jsonl``, or its packed ``.gz``), one per step."""
    path, packed = run_dir / "spectra.jsonl", run_dir / "spectra.jsonl.gz"
    if path.is_file():
        return _last_per_step(_json_lines(path.read_bytes(), path))
    if packed.is_file():
        try:
            data = gzip.decompress(packed.read_bytes())
        except (OSError, EOFError):
            raise UserError(f"{packed} is damaged (not a whole gzip file)") from None
        return _last_per_step(_json_lines(data, packed))
    return []


def train_tail(train: list[dict[str, Any]], final_step: int, steps: int = 100) -> float | None:
    """The mean logged training loss over a run's last ``steps`` steps (one minibatch is noisy); None if
    it logged none there. ``train``: :func:`read_metrics`' "train" records."""
    losses = [r["loss"] for r in train if r["step"] > final_step - steps and "loss" in r]
    return math.fsum(losses) / len(losses) if losses else None


def read_training_run(run_dir: Path, *, spectra: bool = True) -> dict[str, Any] | None:
    """A complete run's config, final.json, val curve and (optionally) spectral-monitor records; None if not complete."""
    final = run_dir / "final.json"
    if not final.is_file():
        return None
    result: dict[str, Any] = {
        "config": json.loads((run_dir / "config.json").read_text()),
        "final": json.loads(final.read_text()),
        **{f"{split}_curve": records for split, records in read_metrics(run_dir).items()},
    }
    records = read_spectra(run_dir) if spectra else []
    if records:
        result["spectra"] = records
    return result


def pack_spectra(out: Path) -> int:
    """Write ``spectra.jsonl.gz`` beside the ``spectra.jsonl`` of every complete run under ``OUT/runs``.

    Committed results keep the compressed copy (2.6× smaller; gzip with mtime 0, so the bytes are
    reproducible); :func:`read_training_run` reads either. Returns how many files it wrote.
    """
    written = 0
    for folder in sorted((out / "runs").glob("*")):
        plain, packed = folder / "spectra.jsonl", folder / "spectra.jsonl.gz"
        if (folder / "final.json").is_file() and plain.is_file() and not packed.is_file():
            tmp = packed.with_suffix(".gz.tmp")
            tmp.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=9, mtime=0))
            tmp.replace(packed)
            written += 1
    return written


def publish(out: Path, summary: dict[str, Any], text: str, plot: str | None, draw: Any) -> int:
    """Print an experiment's tables, write ``OUT/summary.json``, and with ``plot`` the figures ``draw(summary,
    folder)`` makes there; each file written is named on its own line."""
    from qkvlab.files import write_atomic

    print(text or "no complete runs yet")
    path = out / "summary.json"
    write_atomic(path, json.dumps(summary, indent=1))
    print(f"\nwrote {path}")
    if plot:
        for written in draw(summary, Path(plot)):
            print(f"wrote {written}")
    return 0


PRODUCTS = ("qk", "ov")


def head_measures(record: dict[str, Any]) -> dict[str, float]:
    """Means over every head (all layers) of one spectral-monitor record: ``{qk,ov}_{effective_rank, rank,
    nuclear_norm, spectral_norm, gap}``, and the smallest head's ``{qk,ov}_effective_rank_min``."""
    out: dict[str, float] = {}
    for product in PRODUCTS:
        heads = [h for h in record["heads"] if h["product"] == product]
        values = {
            "effective_rank": [h["effective_rank"] for h in heads],
            "rank": [h["rank"] for h in heads],
            "nuclear_norm": [h["nuclear_norm"] for h in heads],
            "spectral_norm": [h["singular_values"][0] if h["singular_values"] else 0.0 for h in heads],
            "gap": [h["gap"] for h in heads],
        }
        for name, vals in values.items():
            out[f"{product}_{name}"] = math.fsum(vals) / len(vals)
        out[f"{product}_effective_rank_min"] = min(values["effective_rank"])
    return out


def final_measures(result: dict[str, Any]) -> dict[str, float]:
    """A :func:`read_training_run` result with spectra reduced to its final weights' :func:`head_measures`,
    final validation loss (and accuracy where the task has one) and minutes of wall-clock."""
    final = result["final"]
    measures = {
        **head_measures(result["spectra"][-1]),
        "val_loss": final["eval"]["loss"],
        "wall_minutes": final["wall_seconds"] / 60,
    }
    if "accuracy" in final["eval"]:
        measures["val_accuracy"] = final["eval"]["accuracy"]
    return measures


def layer_min_erank(record: dict[str, Any]) -> dict[str, float]:
    """Product → the mean over layers of each layer's smallest-head effective rank: the quantity the rank
    guard holds (it acts per layer on ``erank_min``), where ``head_measures``' ``_min`` is the model's
    smallest head."""
    out = {}
    for product in PRODUCTS:
        smallest: dict[int, float] = {}
        for h in record["heads"]:
            if h["product"] == product:
                smallest[h["layer"]] = min(smallest.get(h["layer"], math.inf), h["effective_rank"])
        out[product] = math.fsum(smallest.values()) / len(smallest)
    return out


def erank_over_time(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Product → the mean effective rank over every head, at each spectral-monitor record."""
    return {
        p: [
            math.fsum(h["effective_rank"] for h in r["heads"] if h["product"] == p)
            / sum(h["product"] == p for h in r["heads"])
            for r in records
        ]
        for p in PRODUCTS
    }
