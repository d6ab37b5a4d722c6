"""``parallel=fsdp``: the engine's model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under torchrun or ``srun`` with several processes, ``parallel=fsdp`` shards every transformer block, then
the rest of the model (embeddings, final norm, head, kept together so a tied head stays tied), over one
mesh of all the processes: each rank holds 1/N of every parameter, of its gradient and of the optimiser's
state, and a block's weights are all-gathered only while it computes. The per-role optimiser groups are
built on the sharded parameters (FSDP2 keeps the module tree and parameter names), so every role's
learning rate and weight decay are what they are in one process.

What stays as in one process, and how:

- **Checkpoints** are the same files as any run's (``qkvlab.train.checkpoint``: safetensors, JSON,
  checksums). Every rank takes part in gathering full state dicts with torch's
  ``get_model_state_dict`` / ``get_optimizer_state_dict`` (``StateDictOptions(full_state_dict=True,
  cpu_offload=True)``: rank 0 receives them in CPU memory, one parameter at a time); rank 0 writes them
  with the optimiser's state keyed by parameter index, as an unsharded run keys it. A resume reads them on
  rank 0 alone and hands them out with ``broadcast_from_rank0=True``, so a checkpoint written on N
  processes resumes on M, with or without FSDP, and an unsharded run's checkpoint resumes under FSDP.
  ``torch.distributed.checkpoint``'s own file format is not used: it pickles its metadata, and nothing
  qkvlab loads is ever unpickled.
- **Muon** orthogonalises whole matrices (or each head's rows or columns, ``muon_per_head``): each Muon
  update is all-gathered once per step (one collective per matrix, the size of the forward's own
  gather), orthogonalised on every rank, and each rank keeps its own rows. So per-head Muon works
  whatever the shard boundaries, at the cost of every rank doing the Newton–Schulz iterations of every
  matrix.
- **Coupled L2** (``optimizer=adam-l2``): each rank adds λ/2‖θ_local‖² of its own shard to its loss, whose
  gradient λθ_local lands on that shard outside FSDP's averaging: together λθ, as in one process.
- **The spectral monitor, validation and the final summary** need whole weights, so every rank runs them
  (a layer's factors are gathered whole while it is measured, then freed: one layer at a time); rank 0
  writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qkvlab.dtensors import full, is_sharded, local
from qkvlab.errors import UserError

__all__ = [
    "PARALLEL",
    "full",
    "gathered_state",
    "is_sharded",
    "load_sharded_checkpoint",
    "local",
    "shard",
]

#: ``parallel=``: how several processes share one model.
PARALLEL = ("ddp", "fsdp")


def shard(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """``fully_shard`` each qkvlab transformer block, then the root (in place); returns ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from qkvlab.models.transformer import Block

    mesh = init_device_mesh(device.type, (world_size,))
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class _StateView:
    """What ``save_checkpoint`` asks of a model or an optimiser (``state_dict()``), for gathered state."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _ties(model: nn.Module) -> dict[str, str]:
    """{name: the first name of the same parameter} for every parameter reached under a second name."""
    first: dict[int, str] = {}
    ties = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            ties[name] = first[id(param)]
        else:
            first[id(param)] = name
    return ties


def _full_options(**extra: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def gathered_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[_StateView, _StateView] | tuple[None, None]:
    """Full model and optimiser state dicts, in the layout an unsharded run saves, on rank 0 (None, None
    on the others). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _full_options(cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None, None
    for name, kept in _ties(model).items():  # one tensor under both names, as save_model expects of a tie
        weights[name] = weights[kept]
    groups = optimizer.state_dict()["param_groups"]  # hyperparameters, parameters as indices
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    state = {index: by_name["state"][name] for index, name in enumerate(names) if name in by_name["state"]}
    return _StateView(weights), _StateView({"state": state, "param_groups": groups})


def load_sharded_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """``qkvlab.train.checkpoint.load_checkpoint`` for a sharded model: every rank checks the files' names,
    shapes and dtypes; rank 0 reads the tensors, checks that they are finite, and hands them out
    (``broadcast_from_rank0``). A checkpoint refused on rank 0 is refused on every rank (UserError), so
    every rank goes on to the same older one."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from qkvlab.train.checkpoint import checked_state, finish_restore

    state = checked_state(path, model)
    main = dist.get_rank() == 0
    weights: dict[str, torch.Tensor] = {}
    by_name: dict[str, Any] = {}
    problem = None
    if main:
        try:
            weights = load_file(str(path / "model.safetensors"))
            tensors = load_file(str(path / "optimizer.safetensors"))
            problem = _nonfinite(weights, tensors) or _missing(weights, model)
            if problem is None:
                by_name = _by_name(model, optimizer, tensors, state["optimizer"])
        except (OSError, ValueError, RuntimeError, KeyError, IndexError) as exc:
            problem = f"{exc.__class__.__name__}: {exc}"
        except Exception as exc:  # safetensors' own error types for a damaged header
            if not exc.__class__.__module__.startswith("safetensors"):
                raise
            problem = str(exc)
    refused = torch.tensor([problem is not None], dtype=torch.int32)
    dist.broadcast(refused, src=0)
    if refused.item():
        raise UserError(f"cannot resume from {path}: {problem or 'refused on rank 0 (see its line)'}")
    options = _full_options(broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    return finish_restore(
        path, state, scheduler, lambda: set_optimizer_state_dict(model, optimizer, by_name, options=options)
    )


def _nonfinite(weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> str | None:
    for where, found in (("model.safetensors", weights), ("optimizer.safetensors", tensors)):
        for name, value in found.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"{where} holds non-finite values in {name}"
    return None


def _missing(weights: dict[str, torch.Tensor], model: nn.Module) -> str | None:
    """Fill each tie's second name from its first (safetensors saves a tie once); what is still missing or
    unexpected, in a few words."""
    for name, kept in _ties(model).items():
        if name not in weights and kept in weights:
            weights[name] = weights[kept]
        elif kept not in weights and name in weights:
            weights[kept] = weights[name]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        return f"the checkpoint does not match the model (missing {missing}, unexpected {unexpected})"
    return None


def _by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    """The optimiser state of a checkpoint (keyed "{index}.{name}", as an unsharded run writes it: index i
    is the i-th parameter of the optimiser's groups in order) keyed by parameter name, as
    ``set_optimizer_state_dict`` reads it."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [dict(group) for group in meta["param_groups"]]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError("the checkpoint's optimiser groups hold other parameters than this run's")
    for group in groups:
        group["params"] = [order[index] for index in group["params"]]
        if "betas" in group:  # JSON turned tuples into lists
            group["betas"] = tuple(group["betas"])
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(order[int(index)], {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(order[int(index)], {}).update(entry)
    return {"state": state, "param_groups": groups}
