"""Grids on Slurm: the pending runs of a grid as one ``sbatch`` job array of ``qkvlab grid cell`` processes.

``run_grid(..., executor="slurm")`` (``--executor slurm`` on ``qkvlab repro …`` and ``qkvlab sweep``)
hands the runs that are neither complete nor already queued or running to Slurm and returns; the grid
folder stays the source of truth, exactly as for local runs:

- **One array per submission.** ``OUT/slurm/array-K.json`` lists the array's runs (name, point, seed),
  the worker (``module:function``) and the worker's settings; ``OUT/slurm/array-K.sbatch`` is the job
  script, readable and rerunnable by hand. Task ``i`` of the array runs ``qkvlab grid cell OUT K i``,
  which calls the worker on run ``i`` in that process, its output appended to the run's own log.
- **Time limits and preemption.** The script asks for ``--signal=B:USR1@S`` (S seconds before the
  limit) and ``--requeue``, and ``exec`` s the cell, so the cell is the batch shell and gets the signal.
  USR1 is turned into the trainer's graceful stop (finish the step, write a checkpoint); the cell then
  requeues its own array task with ``scontrol requeue``, and the requeued task resumes from that
  checkpoint, bit-identically. SIGTERM (``scancel``, or preemption, which Slurm requeues by itself when
  the cluster says so) also stops gracefully, but the cell does not requeue itself: a re-run of the grid
  command resubmits it.
- **State.** ``OUT/slurm/jobs.json`` maps each run to its latest array task (``ARRAY_TASK``). A run is
  *queued* or *running* when ``squeue`` lists that task so, *done* or *partial* from its folder, and
  *failed* otherwise (a task that ended without finishing). ``sacct`` is not used: it needs
  ``slurmdbd``, which a one-node cluster lacks. A re-run skips done runs and queued or running tasks,
  and resubmits the rest.
- **Never twice at once.** Besides the check against ``squeue``, every task holds ``RUN/.cell.lock``
  while it works (whatever the worker), so a second task of the same run stops at once. Across nodes that needs a shared filesystem
  whose ``flock`` works (NFSv4, Lustre, GPFS with locking enabled); docs/distributed.md says more.

Why ``sbatch`` arrays and not submitit: the grid already keeps the ledger, resumes runs and guards
settings, so what is needed from Slurm is an array of processes that get a signal before their limit
and can be requeued, which ``--array``, ``--signal`` and ``--requeue`` give directly. submitit would add
pickled callables and result futures the grid does not use, and would hide the command that runs; here
each task is a ``qkvlab`` command a user can read in the script and rerun by hand.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qkvlab.errors import UserError
from qkvlab.files import open_append, write_atomic
from qkvlab.train.lock import CELL_LOCK

__all__ = ["GridSubmitted", "SlurmOptions", "add_executor_arguments", "cell", "grid_status", "submit"]

FOLDER = "slurm"
JOBS = "jobs.json"
LIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
}
REQUEUE_EXIT = 75  # EX_TEMPFAIL: the cell stopped on USR1 and asked Slurm to requeue it


@dataclass(frozen=True)
class SlurmOptions:
    """What each array task asks Slurm for (``sbatch`` options of the same names)."""

    partition: str | None = None
    time: str = "01:00:00"
    cpus: int = 1
    gpus: int = 0
    mem: str | None = None
    parallel: int | None = None  # at most this many tasks of the array at once (--array=…%P)
    signal_seconds: int = 90  # USR1 this long before the time limit

    def __post_init__(self) -> None:
        if self.cpus < 1 or self.gpus < 0 or self.signal_seconds < 1:
            raise UserError("--slurm-cpus must be ≥ 1, --slurm-gpus ≥ 0 and the signal lead ≥ 1 s")
        if self.parallel is not None and self.parallel < 1:
            raise UserError(f"--slurm-parallel must be ≥ 1, got {self.parallel}")
        if not re.fullmatch(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}", self.time):
            raise UserError(
                f"--slurm-time {self.time!r}; accepted: Slurm's time formats, e.g. 90, 01:30:00 or 2-12:00:00"
            )
        if self.mem is not None and not re.fullmatch(r"\d+[KMGTkmgt]?", self.mem):
            raise UserError(f"--slurm-mem {self.mem!r}; accepted: a size in Slurm's form, e.g. 16G or 4000M")


class GridSubmitted(Exception):
    """The grid's remaining runs are on Slurm: the command that asked for them ends here, successfully, and
    its summary comes when it is run again after they finish."""

    def __init__(self, out: Path, results: list[dict[str, Any]]) -> None:
        waiting = sum(not r["status"].startswith("complete") for r in results)
        super().__init__(
            f"{waiting} of {len(results)} runs are on Slurm; follow them with `qkvlab grid status {out}`, and run "
            "this command again once they are done for the summary (it resubmits any that failed)"
        )


def add_executor_arguments(parser: Any) -> None:
    """--executor and the --slurm-* options of every grid command (``qkvlab repro …``, ``qkvlab sweep``)."""
    parser.add_argument(
        "--executor",
        choices=["local", "slurm"],
        default="local",
        help="local (default): runs here, --jobs at a time; slurm: the pending runs as one sbatch job array",
    )
    group = parser.add_argument_group("Slurm (with --executor slurm; docs/distributed.md)")
    group.add_argument("--slurm-partition", help="sbatch --partition")
    group.add_argument("--slurm-time", default="01:00:00", help="each run's time limit (default %(default)s)")
    group.add_argument("--slurm-cpus", type=int, default=1, help="CPUs per run (default 1)")
    group.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per run (default 0)")
    group.add_argument("--slurm-mem", help="memory per run, e.g. 16G")
    group.add_argument("--slurm-parallel", type=int, help="at most this many runs at once")


def options_from(args: Any) -> SlurmOptions:
    return SlurmOptions(
        partition=args.slurm_partition,
        time=args.slurm_time,
        cpus=args.slurm_cpus,
        gpus=args.slurm_gpus,
        mem=args.slurm_mem,
        parallel=args.slurm_parallel,
    )


def _one_line(text: str) -> str:
    """A tool's (possibly multi-line) message as one line, for a UserError."""
    return " / ".join(line.strip() for line in text.strip().splitlines() if line.strip()) or "no message"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"--executor slurm needs Slurm's `{name}` on PATH, and it is not there")
    return path


def _queue() -> dict[str, str]:
    """Every array task and job ``squeue`` lists, as ``{"ARRAY_TASK" or "JOB": state}``."""
    out = subprocess.run(
        [_tool("squeue"), "--noheader", "--array", "--format=%i|%T"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise UserError(f"squeue failed: {_one_line(out.stderr or out.stdout)}")
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job:
            states[job] = state
    return states


def _read_jobs(out: Path) -> dict[str, dict[str, Any]]:
    path = out / FOLDER / JOBS
    return json.loads(path.read_text()) if path.is_file() else {}


def _script(out: Path, index: int, count: int, options: SlurmOptions) -> str:
    logs = out / FOLDER / "logs"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=qkvlab-{out.name}"[:200],
        f"#SBATCH --array=0-{count - 1}" + (f"%{options.parallel}" if options.parallel else ""),
        f"#SBATCH --time={options.time}",
        f"#SBATCH --cpus-per-task={options.cpus}",
        f"#SBATCH --signal=B:USR1@{options.signal_seconds}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={logs}/%A_%a.out",
    ]
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    if options.gpus:
        lines.append(f"#SBATCH --gpus-per-task={options.gpus}")
    if options.mem:
        lines.append(f"#SBATCH --mem={options.mem}")
    command = [sys.executable, "-m", "qkvlab", "grid", "cell", str(out), str(index), "$SLURM_ARRAY_TASK_ID"]
    lines += [
        "",
        "# the cell replaces this shell, so Slurm's USR1 before the time limit reaches it",
        "exec " + " ".join(c if c.startswith("$") else shlex.quote(c) for c in command),
        "",
    ]
    return "\n".join(lines)


def submit(
    out: Path,
    runs: Sequence[Any],
    worker: Callable[..., Any],
    settings: dict[str, Any],
    status: Callable[[Path], str],
    options: SlurmOptions,
    *,
    log: str = "run.log",
    echo: Callable[[str], Any] = print,
    prepare: Callable[[Path, Any], Path],
) -> list[dict[str, Any]]:
    """Submit every run that is neither complete nor queued or running; return one status dict per run."""
    module, name = worker.__module__, worker.__qualname__
    if "<" in name or module == "__main__":
        raise ValueError(f"a Slurm cell imports its worker: {module}.{name} is not a module-level function")
    sbatch = _tool("sbatch")
    jobs = _read_jobs(out)
    queue = _queue()
    results: list[dict[str, Any]] = []
    todo = []
    for run in runs:
        task = jobs.get(run.name, {}).get("task")
        state = queue.get(task or "", "")
        if status(run.folder(out)) == "complete":
            results.append({"name": run.name, "status": "complete"})
        elif state in LIVE:
            results.append({"name": run.name, "status": f"{state.lower()} ({task})"})
        else:
            todo.append(run)
    if todo:
        folder = out / FOLDER
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        index = len(list(folder.glob("array-*.json")))
        for run in todo:
            prepare(out, run)
        plan = {
            "worker": f"{module}:{name}",
            "settings": settings,
            "log": log,
            "runs": [{"name": r.name, "point": dict(r.point), "seed": r.seed} for r in todo],
            "options": asdict(options),
        }
        write_atomic(folder / f"array-{index}.json", json.dumps(plan, indent=1))
        script = folder / f"array-{index}.sbatch"
        write_atomic(script, _script(out.resolve(), index, len(todo), options))
        done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"sbatch refused {script}: {_one_line(done.stderr or done.stdout)}")
        array = done.stdout.strip().split(";")[0]
        for i, run in enumerate(todo):
            jobs[run.name] = {"task": f"{array}_{i}", "array": index}
            results.append({"name": run.name, "status": f"submitted ({array}_{i})"})
        write_atomic(folder / JOBS, json.dumps(jobs, indent=1))
        echo(f"submitted {len(todo)} runs as Slurm array {array} ({script})")
    order = {run.name: i for i, run in enumerate(runs)}
    return sorted(results, key=lambda r: order[r["name"]])


def cell(out: Path, array: int, index: int) -> int:
    """Body of one array task: run the worker on run ``index`` of array ``array``; the exit code."""
    plan = json.loads((out / FOLDER / f"array-{array}.json").read_text())
    record = plan["runs"][index]
    module, _, name = plan["worker"].partition(":")
    worker = getattr(importlib.import_module(module), name)
    run_dir = out / "runs" / record["name"]
    from qkvlab.train.lock import RunLock

    try:  # first, before this process changes anything about itself
        held = RunLock(run_dir, CELL_LOCK)
    except UserError as exc:  # another task of this run is at work (a resubmission raced a requeue)
        print(f"qkvlab grid cell: {exc}", file=sys.stderr)
        return 2
    threads = os.environ.get("SLURM_CPUS_PER_TASK", "1")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
    asked: list[int] = []

    def before_limit(signum: int, frame: Any) -> None:  # USR1: stop like SIGTERM, then requeue
        asked.append(signum)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR1, before_limit)
    import torch

    torch.set_num_threads(int(threads))
    with held, open_append(run_dir / plan["log"], line_buffered=True) as fh:
        print(f"slurm task {os.environ.get('SLURM_ARRAY_JOB_ID')}_{index} on {os.uname().nodename}", file=fh)
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            worker(run_dir, record["point"], record["seed"], plan["settings"])
            return 0
        except BaseException as exc:
            if asked:
                task = f"{os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
                subprocess.run([_tool("scontrol"), "requeue", task], check=False)
                print(f"stopped before the time limit; requeued {task}", flush=True)
                return REQUEUE_EXIT
            import traceback

            traceback.print_exception(exc)
            return 130 if isinstance(exc, KeyboardInterrupt) else 1


def grid_status(out: Path) -> list[dict[str, Any]]:
    """Each run of the grid folder: pending, queued, running, done or failed, with its task and last log line.
    A run is done when it left its experiment's final record: ``final.json`` (training) or ``result.json``
    (fine-tuning)."""
    jobs = _read_jobs(out)
    queue = _queue() if jobs and shutil.which("squeue") else {}
    rows = []
    for name in sorted(p.name for p in (out / "runs").glob("*/")):
        task = jobs.get(name, {}).get("task")
        state = queue.get(task or "", "")
        run_dir = out / "runs" / name
        if (run_dir / "final.json").is_file() or (run_dir / "result.json").is_file():
            label = "done"
        elif state in {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD"}:
            label = "queued"
        elif state in LIVE or _locked(run_dir):
            label = "running"
        elif task is None:
            label = "pending"
        else:
            label = "failed"
        rows.append({"name": name, "state": label, "task": task, "last": _last_line(run_dir)})
    return rows


def _locked(run_dir: Path) -> bool:
    """Whether a process holds the run folder's lock or a Slurm task's (``qkvlab.train.lock.RunLock``) now."""
    import fcntl

    for name in (".lock", CELL_LOCK):
        try:
            fd = os.open(run_dir / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def _last_line(run_dir: Path) -> str:
    """The last non-empty line of the run's most recently written log."""
    logs = sorted(run_dir.glob("*.log"), key=lambda p: p.stat().st_mtime) if run_dir.is_dir() else []
    for path in reversed(logs):
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
        if lines:
            return lines[-1].strip()[:160]
    return ""
