"""Training runs as grid runs: the worker, status and reader that ``qkvlab sweep`` and the paper-000
experiments share with the experiment layer (:mod:`qkvlab.experiments.grid`).

The worker's settings are ``{"config": YAML path or None, "overrides": {key: value}}``; a grid
point is more overrides (``{"weight_decay": "0.1"}``). A run folder is a ``qkvlab train`` run
folder: ``final.json`` means complete, a checkpoint means it resumes from there.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

from qkvlab.train.checkpoint import latest_checkpoint

__all__ = ["pack_spectra", "read_training_run", "train_status", "train_worker"]

# What a run that died before its first checkpoint leaves behind; removed before it starts over.
_DEBRIS = ("metrics.jsonl", "spectra.jsonl", "tb", "config.json")


def train_status(run_dir: Path) -> str:
    if (run_dir / "final.json").is_file():
        return "complete"
    if run_dir.is_dir() and latest_checkpoint(run_dir) is not None:
        return "partial"
    return "new"


def train_worker(run_dir: Path, point: dict[str, Any], seed: int, settings: dict[str, Any]) -> None:
    """Train (or resume) one run of a grid into ``run_dir``."""
    from qkvlab.config import TrainConfig, load_config
    from qkvlab.train import train

    if train_status(run_dir) == "partial":
        config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
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


def read_training_run(run_dir: Path, *, spectra: bool = True) -> dict[str, Any] | None:
    """A complete run's config, final.json, val curve and (optionally) spectral-monitor records; None if not complete."""
    final = run_dir / "final.json"
    if not final.is_file():
        return None
    result: dict[str, Any] = {
        "config": json.loads((run_dir / "config.json").read_text()),
        "final": json.loads(final.read_text()),
    }
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    by_step = {r["step"]: r for r in records if r.get("split") == "val"}  # a resumed run may repeat a step
    result["val_curve"] = [by_step[s] for s in sorted(by_step)]
    path = run_dir / "spectra.jsonl"
    packed = run_dir / "spectra.jsonl.gz"
    if spectra and (path.is_file() or packed.is_file()):
        text = path.read_text() if path.is_file() else gzip.decompress(packed.read_bytes()).decode()
        by_step = {}
        for line in text.splitlines():
            record = json.loads(line)
            by_step[record["step"]] = record
        result["spectra"] = [by_step[s] for s in sorted(by_step)]
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
