"""One process or DDP under torchrun: the ranks, the device each trains on, a mean over ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qkvlab.config import TrainConfig
from qkvlab.errors import UserError

__all__ = ["Dist", "init_distributed", "reduce_mean", "run_device"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def run_device(config: TrainConfig, ddp: Dist) -> torch.device:
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is available; accepted here: device=cpu or auto")
        torch.cuda.set_device(ddp.local_rank)
        return torch.device("cuda", ddp.local_rank)
    return torch.device("cpu")


def reduce_mean(value: torch.Tensor, ddp: Dist) -> float:
    if ddp.world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= ddp.world_size
    return value.item()
