"""Torch-free: the ranks and rendezvous of an ``srun`` step, as torchrun's variables (see qkvlab.train.distributed)."""

from __future__ import annotations

import os
import subprocess

__all__ = ["slurm_environment"]


def slurm_environment(env: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    """torch.distributed's variables from an ``srun`` step's, where that step has several tasks and no
    launcher set them; {} otherwise (see the module docstring)."""
    if "RANK" in env or "WORLD_SIZE" in env or int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) <= 1:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    first = nodes.split(",")[0]
    if "[" in nodes:  # node[01-04],gpu7: Slurm's own tool expands it
        shown = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
        first = shown.stdout.split()[0] if shown.returncode == 0 and shown.stdout.split() else first
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR", first),
        "MASTER_PORT": env.get("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)),
    }
