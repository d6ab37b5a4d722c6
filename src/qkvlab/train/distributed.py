"""One process, or DDP under torchrun or Slurm's srun: the ranks, the device each trains on, a mean over ranks.

Under ``srun`` with several tasks (``sbatch --nodes N --ntasks-per-node K`` and ``srun python -m qkvlab
train …``) and no launcher of its own, the ranks and the rendezvous come from Slurm's environment, as
torchrun would set them: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK =
SLURM_LOCALID, MASTER_ADDR = the step's first node, MASTER_PORT = 15000 + SLURM_JOB_ID mod 20000 (set
MASTER_PORT yourself where that port may be taken). Variables already set (torchrun's) win. The batch
script itself (no ``srun``, no step) stays one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qkvlab.config import TrainConfig
from qkvlab.errors import UserError
from qkvlab.train.launch import slurm_environment

__all__ = ["Dist", "init_distributed", "reduce_mean", "run_device", "slurm_environment"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    os.environ.update(slurm_environment())
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
