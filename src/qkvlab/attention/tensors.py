"""What every weight reader gives: named tensors, read on request, and a HF-style config."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TensorSource"]


class TensorSource:
    """Named tensors plus an HF-style config dict. Subclasses load lazily."""

    name: str
    config: dict[str, Any]
    #: Heads per attention block prefix, where the module itself knows (nn.MultiheadAttention).
    heads_hint: dict[str, int]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError
