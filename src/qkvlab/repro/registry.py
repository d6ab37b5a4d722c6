"""The claims ``qkvlab repro`` knows: each registers an :class:`Experiment` here when imported."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["REGISTRY", "Experiment", "experiments", "register"]


@dataclass(frozen=True)
class Experiment:
    """A reproducible claim: ``qkvlab repro NAME`` adds its arguments, runs it and prints its summary.

    ``detect(folder)`` says whether a results folder is this experiment's, and ``report(folder,
    figures)`` returns its :class:`qkvlab.render.page.Section` list, figures written under ``figures``
    (both for ``qkvlab report``).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], int]
    detect: Callable[[Path], bool] = lambda folder: False
    report: Callable[[Path, Path], list[Any]] | None = None
    #: the command's long help (``help`` when None), printed as written
    description: str | None = None


REGISTRY: dict[str, Experiment] = {}

# Modules that register the built-in experiments when imported.
_BUILTIN = (
    "qkvlab.repro.paper001.claim",
    "qkvlab.repro.paper000.claim",
    "qkvlab.repro.optimizer_rank.claim",
    "qkvlab.repro.rank_guard.claim",
    "qkvlab.repro.logits.claim",
    "qkvlab.repro.theory.command",
)


def register(experiment: Experiment) -> Experiment:
    REGISTRY[experiment.name] = experiment
    return experiment


def experiments() -> dict[str, Experiment]:
    """Every registered experiment (importing the built-in ones first)."""
    for module in _BUILTIN:
        importlib.import_module(module)
    return dict(REGISTRY)
