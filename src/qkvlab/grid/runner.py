"""One experiment layer: a grid of settings × seeds, run to completion across interruptions.

Every experiment (``qkvlab repro NAME``, ``qkvlab sweep``) is a list of :class:`Run` s, each a grid
point (a small mapping of the settings that distinguish it) and a seed, and a *worker*: a
module-level function ``worker(run_dir, point, seed, settings)`` that does one run and leaves its
result in ``run_dir``. :func:`run_grid` does the rest, the same way for every experiment:

- **Folder.** ``OUT/runs/NAME/`` per run, with ``run.json`` (the point and the seed, written before
  the run starts: results are later grouped by what each run stored, never by parsing names).
  ``OUT/settings.json`` holds the settings shared by every run.
- **Resume.** A run whose experiment says it is complete is skipped without starting anything; a
  partial one is handed to the worker again (a trainer resumes from its checkpoint; a run without
  checkpoints starts over).
- **Settings guard.** Running into a folder whose ``settings.json`` differs is refused, naming each
  difference, so one results folder never mixes runs made differently. Adding seeds or grid points
  is fine: they are not settings.
- **Workers.** ``jobs = 1`` runs in this process (a failing run is reported and the next one
  starts). ``jobs > 1`` runs each run in its own spawned process (nothing carries from one run to
  the next; a CUDA context is never forked), with its output in ``run_dir/LOG``, ``cpu_count // jobs``
  threads each, and the parent's death delivering SIGTERM to it (Linux).
- **Stopping.** Ctrl-C (or SIGTERM to the parent) starts nothing new: the running runs get SIGINT,
  are waited for (they keep their last checkpoint; after ``STOP_SECONDS`` SIGTERM, then SIGKILL), and
  the interruption propagates.
- **Log.** ``OUT/grid.json`` gets one entry per session, finished, interrupted or killed: what ran, how
  long; it is written as each run ends, so a session killed outright keeps the runs it finished.

:func:`mean_std` and :func:`paired` are the statistics every summary uses: mean ± sample standard
deviation over seeds, and seed-paired differences (the same seed gives the same initialisation and
batch order, so a paired difference removes that part of the spread).

The claims that run on it register in :mod:`qkvlab.repro.registry`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkvlab.errors import UserError
from qkvlab.files import open_append, refuse_links, write_atomic

STOP_SECONDS = 60.0
"""How long a stopped grid waits for its runs to finish their step and write a checkpoint before it
sends SIGTERM (and ``KILL_SECONDS`` later SIGKILL): a run stuck where Python cannot act on a signal
never holds the grid forever."""
KILL_SECONDS = 10.0

__all__ = [
    "Run",
    "guard_settings",
    "load_runs",
    "mean_std",
    "paired",
    "run_grid",
    "run_stage",
    "track_failures",
    "use_executor",
]

_EXECUTOR: dict[str, Any] = {"name": "local", "options": None}
_TRACKERS: list[list[Path]] = []


@contextmanager
def track_failures() -> Iterator[list[Path]]:
    """Within the block, the folder of every run that ``run_grid`` ends as failed is appended to the
    list it yields (a command whose grids are nested in its own code reads its exit status from it)."""
    failed: list[Path] = []
    _TRACKERS.append(failed)
    try:
        yield failed
    finally:
        _TRACKERS.remove(failed)


@contextmanager
def use_executor(name: str, options: Any = None) -> Iterator[None]:
    """Within the block, ``run_grid`` runs what is pending on ``"local"`` (this machine, ``jobs`` at a time)
    or ``"slurm"`` (one sbatch job array; ``options`` a :class:`qkvlab.grid.slurm.SlurmOptions`)."""
    if name not in ("local", "slurm"):
        raise ValueError(f"executor must be local or slurm, got {name!r}")
    before = dict(_EXECUTOR)
    _EXECUTOR.update(name=name, options=options)
    try:
        yield
    finally:
        _EXECUTOR.update(before)


Point = tuple[tuple[str, Any], ...]


def _frozen(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return tuple((k, _frozen(v)) for k, v in value.items())
    return value


def point_key(point: Mapping[str, Any]) -> Point:
    """A hashable form of a grid point (its items in order, lists as tuples)."""
    return tuple((k, _frozen(v)) for k, v in point.items())


@dataclass(frozen=True)
class Run:
    """One grid point × seed: ``name`` is its folder under ``OUT/runs``."""

    name: str
    point: Mapping[str, Any] = field(hash=False)
    seed: int = 0

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.name


# -- settings guard ----------------------------------------------------------------------------


def _anything_trained(out: Path) -> bool:
    """Whether any run under ``OUT/runs`` got past its start: a folder holding more than its point
    (run.json) and the locks (the trainer's .lock and the grid's cell lock)."""
    from qkvlab.train.lock import CELL_LOCK

    bookkeeping = {"run.json", ".lock", CELL_LOCK}
    runs = out / "runs"
    return runs.is_dir() and any(
        folder.is_dir() and any(f.name not in bookkeeping for f in folder.iterdir())
        for folder in runs.iterdir()
    )


def _changes(before: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The settings that differ, one level into nested mappings (an overrides dict names its keys)."""
    found = []
    for key in sorted({*before, *now}):
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _changes(a, b, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key} {a!r} -> {b!r}")
    return found


def guard_settings(out: Path, settings: Mapping[str, Any]) -> None:
    """Write ``OUT/settings.json``, or refuse if it already holds other settings that some run trained
    with. Settings that no run got past its start with (a command stopped by a mistake in them, say) are
    replaced, so that correcting the mistake does not need a new folder."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "settings.json"
    recorded = json.loads(json.dumps(dict(settings)))  # as JSON would give it back (tuples → lists)
    if path.is_file():
        changed = _changes(json.loads(path.read_text()), recorded)
        if not changed:
            return
        if _anything_trained(out):
            shown = ", ".join(changed[:6]) + (f", and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise UserError(
                f"{out} holds runs made with other settings ({shown}); "
                "resume with the same settings or use another --out"
            )
    write_atomic(path, json.dumps(recorded, indent=1, sort_keys=True))


# -- running -----------------------------------------------------------------------------------


Worker = Callable[[Path, dict[str, Any], int, dict[str, Any]], None]


@dataclass
class _Job:
    run: Run
    before: str  # status before this session: "partial" or "new"
    started: float
    process: Any = None


class _Stop(KeyboardInterrupt):
    """SIGTERM to the parent: stop like Ctrl-C. Not an Exception, so that a worker running in this process
    (``jobs=1``) cannot take it for its own failure and let the grid go on."""


def _child(
    worker: Worker, run_dir: Path, point: dict, seed: int, settings: dict, threads: int, log: str
) -> None:
    """Body of a spawned run process: threads, log file, parent-death signal, then the worker."""
    import sys

    os.setpgrp()  # the terminal's Ctrl-C reaches the grid only; it passes one SIGINT to each run
    try:  # Linux: if the grid's process dies (even by SIGKILL), this run gets SIGTERM
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    from qkvlab.train.lock import CELL_LOCK, RunLock

    try:
        held = RunLock(run_dir, CELL_LOCK)
    except UserError as exc:  # another grid command, or a Slurm task, is at work on this run
        print(f"not run: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    with held, open_append(run_dir / log, line_buffered=True) as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        sys.stdout = sys.stderr = fh
        import torch

        torch.set_num_threads(threads)
        try:
            worker(run_dir, point, seed, settings)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            raise SystemExit(130) from None
        except BaseException:
            traceback.print_exc()
            raise SystemExit(1) from None


def run_grid(
    out: Path,
    runs: Sequence[Run],
    worker: Worker,
    *,
    settings: Mapping[str, Any],
    status: Callable[[Path], str],
    worker_settings: Mapping[str, Any] | None = None,
    jobs: int = 1,
    log: str = "run.log",
    echo: Callable[[str], Any] = print,
    label: str = "grid",
    session: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run every run of ``runs`` that is not complete; return one status dict per run, in order.

    Args:
        settings: what every run shares; guarded in ``OUT/settings.json``.
        status: ``status(run_dir)`` → ``"complete"``, ``"partial"`` or ``"new"``.
        worker_settings: what the worker gets (default ``settings``), e.g. plus a device or paths
            that may change between sessions without changing results.
        session: extra fields for this session's entry in ``OUT/grid.json``.
    """
    if jobs < 1:
        raise UserError(f"--jobs must be ≥ 1, got {jobs}")
    runs = list(dict.fromkeys(runs))  # a repeated run would train one folder twice at once
    refuse_links(out)  # a grid folder may come from someone else: no link in it carries a write elsewhere
    guard_settings(out, settings)
    given = dict(worker_settings if worker_settings is not None else settings)
    if _EXECUTOR["name"] == "slurm":
        from qkvlab.grid import slurm

        submitted = slurm.submit(
            out,
            runs,
            worker,
            given,
            status,
            _EXECUTOR["options"] or slurm.SlurmOptions(),
            log=log,
            echo=echo,
            prepare=_prepare,
        )
        if any(r["status"] != "complete" for r in submitted):
            raise slurm.GridSubmitted(out, submitted)
        return submitted
    before = {run: status(run.folder(out)) for run in runs}
    counts = {s: sum(v == s for v in before.values()) for s in ("complete", "partial", "new")}
    echo(
        f"{label}: {len(runs)} runs in {out} ({counts['complete']} complete, {counts['partial']} to resume, "
        f"{counts['new']} new), {jobs} at a time"
    )
    results: dict[Run, dict[str, Any]] = {}
    started = time.perf_counter()
    key = f"{os.getpid()}-{time.time_ns()}"

    def show(run: Run, result: dict[str, Any]) -> None:
        results[run] = result
        if result["status"].startswith("failed"):
            for failed in _TRACKERS:
                failed.append(run.folder(out))
        seconds = f"  {result['seconds']:.0f} s" if "seconds" in result else ""
        echo(f"  {result['status']:<22} {run.name}{seconds}")
        if result["status"] != "skipped (complete)":  # each run that ends is in grid.json at once
            _log_session(out, key, runs, results, jobs, False, time.perf_counter() - started, session)

    for run in runs:
        if before[run] == "complete":
            show(run, {"name": run.name, "status": "skipped (complete)"})
    todo = [run for run in runs if before[run] != "complete"]
    finished = False
    previous = signal.getsignal(signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()  # signals can only be set there

    def on_term(signum, frame):  # type: ignore[no-untyped-def]
        raise _Stop

    try:
        if todo and main_thread:
            signal.signal(signal.SIGTERM, on_term)
        if jobs == 1:
            for run in todo:
                _run_here(out, run, before[run], worker, given, status, show)
        else:
            _run_spawned(out, todo, before, worker, given, status, jobs, log, show)
        finished = True
    except _Stop:
        raise KeyboardInterrupt from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        _log_session(out, key, runs, results, jobs, finished, time.perf_counter() - started, session)
    return [results[run] for run in runs]


def _prepare(out: Path, run: Run) -> Path:
    folder = run.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "run.json"
    if not record.is_file():
        write_atomic(record, json.dumps({"point": dict(run.point), "seed": run.seed}, indent=1))
    return folder


def _outcome(before: str, now: str, failure: str | None) -> str:
    if failure is None and now == "complete":
        return "resumed" if before == "partial" else "ran"
    return failure or "failed (no result)"


_NO_ROOM = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def _run_here(out, run, before, worker, settings, status, show) -> None:  # type: ignore[no-untyped-def]
    from qkvlab.train.lock import CELL_LOCK, RunLock

    folder = _prepare(out, run)
    started = time.perf_counter()
    failure = None
    try:
        held = RunLock(folder, CELL_LOCK)
    except UserError as exc:  # another grid command, or a Slurm task, is at work on this run
        show(run, {"name": run.name, "status": f"failed (not run: {exc})", "seconds": 0.0})
        return
    try:
        with held:
            worker(folder, dict(run.point), run.seed, dict(settings))
    except UserError:
        raise  # a mistake in the settings: every run would fail the same way
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            raise  # a full or read-only disk fails every later run too: stop here, one line, no traceback
        failure = f"failed ({type(exc).__name__}: {exc})"
        traceback.print_exc()
    except Exception as exc:  # one broken run is reported; the others go on
        failure = f"failed ({type(exc).__name__}: {exc})"
        traceback.print_exc()
    show(
        run,
        {
            "name": run.name,
            "status": _outcome(before, status(folder), failure),
            "seconds": time.perf_counter() - started,
        },
    )


def _run_spawned(out, todo, before, worker, settings, status, jobs, log, show) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    queue = list(reversed(todo))
    running: dict[Any, _Job] = {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                run = queue.pop()
                folder = _prepare(out, run)
                process = context.Process(
                    target=_child,
                    args=(worker, folder, dict(run.point), run.seed, dict(settings), threads, log),
                    name=f"qkvlab-run-{run.name}",
                )
                process.start()
                running[process.sentinel] = _Job(run, before[run], time.perf_counter(), process)
            for sentinel in wait(list(running)):
                job = running.pop(sentinel)
                job.process.join()
                code = job.process.exitcode
                failure = None if code == 0 else f"failed (exit {code}, see {log})"
                show(
                    job.run,
                    {
                        "name": job.run.name,
                        "status": _outcome(job.before, status(job.run.folder(out)), failure),
                        "seconds": time.perf_counter() - job.started,
                    },
                )
    except BaseException:  # Ctrl-C, SIGTERM or our own error: start nothing more, stop what runs
        for job in running.values():
            if job.process.is_alive():
                os.kill(job.process.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_SECONDS
        for job in running.values():
            job.process.join(max(0.0, deadline - time.monotonic()))
            for how in ("terminate", "kill"):  # a run that cannot finish its step: SIGTERM, then SIGKILL
                if not job.process.is_alive():
                    break
                print(
                    f"{job.run.name}: still running {STOP_SECONDS:g} s after the stop signal; {how}",
                    file=sys.stderr,
                    flush=True,
                )
                getattr(job.process, how)()
                job.process.join(KILL_SECONDS)
            show(job.run, {"name": job.run.name, "status": "interrupted", "seconds": 0.0})
        raise


def _log_session(out, key, runs, results, jobs, finished, seconds, session) -> None:  # type: ignore[no-untyped-def]
    """Write this session's entry of ``OUT/grid.json`` (``key`` tells it from the others): added on the
    first call, replaced on each later one, so a session killed outright still leaves the runs it
    finished. A lock on ``OUT/.grid.lock`` keeps two grid commands on one folder from losing an entry."""
    import fcntl

    from qkvlab.files import open_lock

    log = out / "grid.json"
    entry = {
        **dict(session or {}),
        "jobs": jobs,
        "finished": finished,
        "runs": [results[run] for run in runs if run in results],
        "wall_seconds": seconds,
        "session": key,
    }
    fd = open_lock(out / ".grid.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        history = json.loads(log.read_text())["sessions"] if log.is_file() else []
        mine = [i for i, old in enumerate(history) if old.get("session") == key]
        if mine:
            history[mine[0]] = entry
        else:
            history.append(entry)
        write_atomic(log, json.dumps({"sessions": history}, indent=1))
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# -- loading and statistics ----------------------------------------------------------------------


def load_runs(
    out: Path,
    read: Callable[[Path], Any],
    legacy: Callable[[Path], tuple[dict[str, Any], int] | None] | None = None,
) -> dict[Point, dict[int, Any]]:
    """point → seed → ``read(run_dir)``, for every run folder whose ``read`` gives a result (not None).

    The point and seed come from the run's own ``run.json``; ``legacy(run_dir)`` supplies them for
    folders written before ``run.json`` existed. Points come in folder-name order.
    """
    found: dict[Point, dict[int, Any]] = {}
    for folder in sorted(p for p in (out / "runs").glob("*") if p.is_dir()):
        record = folder / "run.json"
        if record.is_file():
            data = read_result(folder, "run.json")
            if not isinstance(data.get("point"), dict) or not isinstance(data.get("seed"), int):
                raise UserError(f"{record} is damaged (no point and seed in it)")
            point, seed = data["point"], data["seed"]
        elif legacy is not None and (described := legacy(folder)) is not None:
            point, seed = described
        else:
            continue
        result = read(folder)
        if result is not None:
            found.setdefault(point_key(point), {})[seed] = result
    return found


def read_result(folder: Path, name: str = "result.json") -> Any:
    """``folder/name`` as JSON, None if it is not there; a damaged one is a UserError naming it."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is damaged (not JSON); delete it to run that run again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged (a JSON {type(data).__name__}, not an object)")
    return data


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value) and count."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def paired(a: Mapping[int, float], b: Mapping[int, float], scale: float = 1.0) -> dict[str, Any] | None:
    """scale·(a − b) over the seeds both have: mean, std, n, the seeds, and how many have a − b > 0.

    None if they have no seed in common.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [scale * (a[s] - b[s]) for s in seeds]
    return {**mean_std(diffs), "wins": sum(d > 0 for d in diffs), "seeds": seeds}


def run_stage(
    out: Path,
    runs: Sequence[Run],
    worker: Worker,
    status: Callable[[Path], str],
    *,
    settings: Mapping[str, Any],
    jobs: int,
    echo: Callable[[str], Any],
    label: str,
    stage: str,
) -> list[dict[str, Any]]:
    """One stage of a staged study (a learning-rate pilot, then the main grid) whose runs are training
    runs: ``run_grid`` with their log in ``train.log`` and the stage named in the label and in
    ``OUT/grid.json``."""
    return run_grid(
        out,
        runs,
        worker,
        settings=settings,
        status=status,
        jobs=jobs,
        log="train.log",
        echo=echo,
        label=f"{label}, {stage}",
        session={"stage": stage},
    )
