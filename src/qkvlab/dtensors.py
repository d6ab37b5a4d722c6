"""Tensors that FSDP2 shards (``torch.distributed.tensor.DTensor``) as the rest of qkvlab reads them: this
rank's shard, or the whole tensor (see qkvlab.train.fsdp)."""

from __future__ import annotations

from typing import Any

__all__ = ["full", "is_sharded", "local"]


def is_sharded(model: Any) -> bool:
    """Whether ``model`` holds FSDP2-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local(tensor: Any) -> Any:
    """This rank's shard of a DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: Any) -> Any:
    """The whole tensor behind a DTensor (a collective: every rank calls it); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
