"""Non-finite steps and parameters, and the one line a run stops with."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qkvlab.train.distributed import Dist

__all__ = ["nonfinite_parameter", "nonfinite_step", "stopped_message"]


def nonfinite_step(loss: torch.Tensor, grad_norm: torch.Tensor, ddp: Dist) -> str | None:
    """What is not finite in this step ("loss", "gradient norm"), or None. Under DDP any rank's bad step
    is every rank's (the gradient norm is already all-reduced; the loss is not)."""
    flags = torch.stack([~torch.isfinite(loss.detach().float()), ~torch.isfinite(grad_norm.detach().float())])
    flags = flags.float()
    if ddp.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss_bad, norm_bad = (bool(x) for x in flags.tolist())
    if not (loss_bad or norm_bad):
        return None
    return " and ".join(
        part
        for part, is_bad in (("loss is not finite", loss_bad), ("gradient norm is not finite", norm_bad))
        if is_bad
    )


@torch.no_grad()
def nonfinite_parameter(model: nn.Module) -> str | None:
    """The first parameter holding a non-finite value, or None. Under FSDP each rank checks its shards and
    the ranks agree (one all-reduce), so every rank gives the same answer."""
    from qkvlab.dtensors import is_sharded, local

    named = list(model.named_parameters())
    if not is_sharded(model):
        return next((name for name, param in named if not bool(torch.isfinite(param).all())), None)
    flags = torch.stack([(~torch.isfinite(local(param))).any() for _, param in named]).float()
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return next((name for (name, _), bad in zip(named, flags.tolist(), strict=True) if bad), None)


def stopped_message(last: Path | None, where: str, allowed: int) -> str:
    """``last``: the newest checkpoint this run verified (resumed from, or written and read back)."""
    kept = (
        f"the last good checkpoint, {last.name}, is kept"
        if last is not None
        else "no checkpoint was written yet"
    )
    return (
        f"training stopped at {where} (max_bad_steps={allowed}); {kept}. Lower lr, raise grad clipping, "
        "use fp32, or allow skipped steps with max_bad_steps=N"
    )
