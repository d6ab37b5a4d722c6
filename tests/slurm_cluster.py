"""A real one-node Slurm for the tests: Debian's slurm-wlm and munge, started in a temporary folder.

``one_node_slurm(folder)`` installs ``slurm-wlm`` and ``munge`` with apt-get when they are missing (as
root, where apt-get exists), writes a one-node ``slurm.conf`` (this machine, ``proctrack/linuxproc``, no
cgroups, no accounting), starts ``munged`` on its own socket, ``slurmctld`` and ``slurmd`` on free ports,
waits until ``sinfo`` shows the node idle, yields the environment that points Slurm's commands at it
(``SLURM_CONF``), and stops all three afterwards. Where it cannot, the test is skipped saying why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "scontrol")


def _install() -> str | None:
    """None when Slurm and munge are here (installing them if need be), else why not."""
    if all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed, and installing it needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        return f"apt-get could not install slurm-wlm and munge: {done.stderr.strip()[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@contextlib.contextmanager
def one_node_slurm(folder: Path, cpus: int | None = None) -> Iterator[dict[str, str]]:
    why = _install()
    if why:
        pytest.skip(why)
    folder = folder.resolve()
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    socket_path = folder / "munge" / "munge.socket"
    cpus = cpus or os.cpu_count() or 1
    conf = folder / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=qkvlabtest",
                "SlurmctldHost=localhost",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={socket_path}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "KillWait=30",
                f"StateSaveLocation={folder / 'state'}",
                f"SlurmdSpoolDir={folder / 'spool'}",
                f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
                f"SlurmdPidFile={folder / 'slurmd.pid'}",
                f"SlurmctldLogFile={folder / 'slurmctld.log'}",
                f"SlurmdLogFile={folder / 'slurmd.log'}",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "MpiDefault=none",
                f"NodeName=localhost NodeHostname={socket.gethostname()} CPUs={cpus} RealMemory=4000 State=UNKNOWN",
                "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge_pid = folder / "munge" / "munged.pid"
    started = []
    try:
        subprocess.run(
            [
                _sbin("munged"),
                f"--socket={socket_path}",
                f"--pid-file={munge_pid}",
                f"--log-file={folder / 'munge' / 'munged.log'}",
                f"--seed-file={folder / 'munge' / 'seed'}",
                "--force",
            ],
            check=True,
            env=env,
        )
        started.append(munge_pid)
        subprocess.run([_sbin("slurmctld"), "-i"], check=True, env=env)
        started.append(folder / "slurmctld.pid")
        subprocess.run([_sbin("slurmd"), "-N", "localhost"], check=True, env=env)
        started.append(folder / "slurmd.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, env=env
            ).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the one-node Slurm did not come up: sinfo says {state!r}; see {folder}/slurm*.log")
        yield env
    finally:
        subprocess.run(["scancel", "--me"], capture_output=True, env=env)
        subprocess.run(["scontrol", "shutdown"], capture_output=True, env=env)  # slurmctld and slurmd
        for pid_file in reversed(started):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        time.sleep(1)
