"""One process, or DDP under torchrun or Slurm's srun: the ranks, the device each trains on, a mean over ranks.

Under ``srun`` with several tasks (``sbatch --nodes N --ntasks-per-node K`` and ``srun python -m qkvlab
train …``) and no launcher of its own, ``train`` first sets the ranks and the rendezvous from Slurm's
environment (``qkvlab.train.launch.slurm_environment``), as torchrun would set them: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK =
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

__all__ = ["Dist", "end_distributed", "init_distributed", "reduce_mean", "run_device"]

_created = False  # whether init_distributed started the process group (then end_distributed ends it)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """The ranks torchrun's variables describe (``qkvlab.train.launch`` sets them under ``srun``); the
    process group is started here unless the caller started one."""
    global _created
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        _created = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def end_distributed() -> None:
    """End the process group :func:`init_distributed` started, every rank at once (a barrier first): a rank
    that exits while another still talks to it over gloo can abort the other ("terminate called without
    an active exception"), seen with FSDP's collectives. Called when a run returns or stops at the same
    step on every rank; a group the caller started is theirs to end."""
    global _created
    if _created and dist.is_initialized():
        import gc

        gc.collect()  # the run's sharded parameters and their mesh go while the group still exists
        dist.barrier()
        dist.destroy_process_group()
    _created = False


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
