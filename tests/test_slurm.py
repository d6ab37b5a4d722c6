"""Grids on Slurm (``--executor slurm``): the job script, the status listing, and a real one-node Slurm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qkvlab.cli import main
from qkvlab.grid.slurm import SlurmOptions, _script
from slurm_cluster import one_node_slurm

from conftest import train_losses

TINY = ["warmup_steps=4", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "eval_every=20"]


def test_the_job_script_asks_for_the_signal_the_requeue_and_execs_the_cell(tmp_path) -> None:
    options = SlurmOptions(partition="gpu", time="02:00:00", cpus=4, gpus=1, mem="16G", parallel=3)
    script = _script(tmp_path, 2, 5, options)
    lines = script.splitlines()
    for expected in (
        "#SBATCH --array=0-4%3",
        "#SBATCH --time=02:00:00",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --signal=B:USR1@90",
        "#SBATCH --requeue",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --mem=16G",
    ):
        assert expected in lines
    # exec: the cell is the batch shell, so the USR1 Slurm sends the shell before the limit reaches it
    assert lines[-1].startswith("exec ") and lines[-1].endswith(
        f"grid cell {tmp_path} 2 $SLURM_ARRAY_TASK_ID"
    )
    with pytest.raises(Exception, match="--slurm-parallel must be ≥ 1"):
        SlurmOptions(parallel=0)


def test_grid_status_reads_a_local_grid_and_refuses_other_folders(tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", "--grid", "lr=1e-3", "--seeds", "0", "--out", str(out), "max_steps=8", *TINY[1:]]
    assert main([*argv, "warmup_steps=2"]) == 0
    capsys.readouterr()
    assert main(["grid", "status", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.strip().splitlines()
    assert lines[0] == "| run | state | Slurm task | last log line |" and lines[-1] == "1 done"
    assert lines[2].startswith("| lr=1e-3,seed=0 | done |  | ")
    from qkvlab.train.lock import RunLock

    (out / "runs" / "lr=3e-3,seed=0").mkdir()  # a run that a process is writing right now
    lock = RunLock(out / "runs" / "lr=3e-3,seed=0")
    try:
        assert main(["grid", "status", str(out)]) == 0
        assert "| lr=3e-3,seed=0 | running |" in capsys.readouterr().out
    finally:
        lock.release()
    assert main(["grid", "status", str(out)]) == 0
    assert "| lr=3e-3,seed=0 | pending |" in capsys.readouterr().out
    assert main(["grid", "status", str(tmp_path)]) == 2
    assert "is not a grid folder" in capsys.readouterr().err


def test_slurm_without_slurm_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no squeue
    argv = ["sweep", "--grid", "lr=1e-3", "--out", str(tmp_path / "s"), "--executor", "slurm", "max_steps=8"]
    assert main([*argv, *TINY]) == 2
    assert "needs Slurm's `sbatch` on PATH" in capsys.readouterr().err
    from qkvlab.grid import runner

    assert runner._EXECUTOR["name"] == "local"  # the option held for that command only


def _wait(predicate, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_grid_on_a_real_slurm_survives_a_cancelled_task_and_matches_a_local_run(tmp_path) -> None:
    """2 × 2 grid as one array; one task is cancelled mid-run with scancel; the grid command run again
    resubmits it, it resumes from its checkpoint, and every run ends with the weights a local,
    single-threaded run of the same grid gets."""
    steps = ["max_steps=400", "checkpoint_every=20", *TINY]
    grid = ["--grid", "lr=1e-3,3e-3", "--seeds", "0,1"]
    with one_node_slurm(tmp_path / "slurm") as env:
        out = tmp_path / "on-slurm"
        command = [
            sys.executable,
            "-m",
            "qkvlab",
            "sweep",
            *grid,
            "--out",
            str(out),
            "--executor",
            "slurm",
            "--slurm-parallel",
            "2",
            *steps,
        ]
        first = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        assert (
            "submitted 4 runs as Slurm array" in first.stdout and "4 of 4 runs are on Slurm" in first.stdout
        )
        jobs = json.loads((out / "slurm" / "jobs.json").read_text())
        victim = "lr=1e-3,seed=0"
        task = jobs[victim]["task"]
        _wait(lambda: any((out / "runs" / victim).glob("checkpoint-*")), 300, "a checkpoint of the victim")
        subprocess.run(["scancel", task], env=env, check=True)
        # what Slurm sends before a time limit (--signal=B:USR1@90): the task checkpoints and requeues itself
        early = next(
            name for name, job in jobs.items() if job["task"].endswith("_1")
        )  # runs beside the victim
        _wait(lambda: any((out / "runs" / early).glob("checkpoint-*")), 300, "a checkpoint of the second run")
        signal_it = ["scancel", "--signal=USR1", "--batch", jobs[early]["task"]]
        early_log = out / "runs" / early / "train.log"

        def requeued() -> bool:  # scancel's exit code is not the answer: slurmctld may deliver the signal to
            if "requeued" in early_log.read_text():  # the batch step and still say "can not be altered now"
                return True
            subprocess.run(signal_it, env=env, capture_output=True)
            return False

        _wait(requeued, 120, "the second run to stop on USR1 and requeue itself")

        def others_done() -> bool:
            return all((out / "runs" / n / "final.json").is_file() for n in jobs if n != victim)

        _wait(others_done, 900, "the other three runs")
        _wait(
            lambda: (
                subprocess.run(
                    ["squeue", "--noheader"], env=env, capture_output=True, text=True
                ).stdout.strip()
                == ""
            ),
            120,
            "an empty queue",
        )
        assert not (out / "runs" / victim / "final.json").is_file()
        status = subprocess.run(
            [sys.executable, "-m", "qkvlab", "grid", "status", str(out)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"| {victim} | failed | {task} |" in status and "3 done, 1 failed" in status
        second = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        assert "submitted 1 runs as Slurm array" in second.stdout  # only the cancelled one
        _wait(lambda: (out / "runs" / victim / "final.json").is_file(), 900, "the resubmitted run")
        log = (out / "runs" / victim / "train.log").read_text()
        assert "resum" in log.lower()
        text = early_log.read_text()
        assert f"requeued {jobs[early]['task']}" in text and "SIGTERM: finishing this step" in text
        assert (out / "runs" / early / "final.json").is_file()  # it came back and finished by itself
        third = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        assert "wrote" in third.stdout and "submitted" not in third.stdout  # all done: the summary
    local = tmp_path / "local"
    subprocess.run(
        [sys.executable, "-m", "qkvlab", "sweep", *grid, "--out", str(local), *steps],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
        capture_output=True,
    )
    for run in sorted((out / "runs").iterdir()):
        mine = load_file(run / "checkpoint-00000400" / "model.safetensors")
        theirs = load_file(local / "runs" / run.name / "checkpoint-00000400" / "model.safetensors")
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), run.name


def test_ranks_and_rendezvous_come_from_an_srun_step_with_several_tasks() -> None:
    from qkvlab.train.launch import slurm_environment

    step = {
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "70123",
        "SLURM_STEP_NODELIST": "gpu7,gpu8",
        "SLURM_JOB_NODELIST": "gpu7,gpu8",
    }
    assert slurm_environment(step) == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu7",
        "MASTER_PORT": str(15000 + 70123 % 20000),
    }
    assert slurm_environment({**step, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    assert slurm_environment({**step, "RANK": "0", "WORLD_SIZE": "4"}) == {}  # torchrun's own variables win
    batch = {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "70123"}  # the batch script: no step
    assert slurm_environment(batch) == {}
    assert slurm_environment({**step, "SLURM_STEP_NUM_TASKS": "1"}) == {}


@pytest.mark.slow
def test_one_training_run_as_a_two_task_slurm_job_matches_one_process(tmp_path) -> None:
    """`srun` with two tasks: the ranks and the rendezvous come from Slurm's environment, and the losses
    are those of one process (as under torchrun, tests/test_train.py)."""
    from conftest import tiny_gpt_settings

    corpus = tmp_path / "text.txt"
    corpus.write_text(
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 40
    )
    settings = tiny_gpt_settings(corpus, tmp_path / "x", **{"model.dropout": 0.0})
    common = [f"{k}={v}" for k, v in settings.items() if k != "out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "qkvlab", "train", *common, f"out={tmp_path / 'one'}"],
        env=env,
        check=True,
        capture_output=True,
    )
    with one_node_slurm(tmp_path / "slurm") as slurm_env:
        train = " ".join([sys.executable, "-m", "qkvlab", "train", *common, f"out={tmp_path / 'two'}"])
        done = subprocess.run(
            [
                "sbatch",
                "--wait",
                "--ntasks=2",
                "--cpus-per-task=1",
                f"--output={tmp_path / 'job.out'}",
                f"--wrap=srun {train}",
            ],
            env={**slurm_env, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, (tmp_path / "job.out").read_text()[-3000:]

    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) == 12
    assert two == pytest.approx(one, rel=1e-5)
    final = json.loads((tmp_path / "two" / "final.json").read_text())
    assert final["world_size"] == 2  # one run of two ranks, not two runs of one


def test_a_second_task_of_a_run_that_is_at_work_stops_in_one_line(tmp_path, capsys) -> None:
    from qkvlab.grid.slurm import cell
    from qkvlab.train.lock import CELL_LOCK, RunLock

    plan = {
        "worker": "qkvlab.grid.training:train_worker",
        "settings": {},
        "log": "train.log",
        "runs": [{"name": "a", "point": {}, "seed": 0}],
        "options": {},
    }
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "array-0.json").write_text(json.dumps(plan))
    lock = RunLock(tmp_path / "runs" / "a", CELL_LOCK)
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        assert cell(tmp_path, 0, 0) == 2
    finally:
        lock.release()
    assert "is being written by process" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "a" / "train.log").exists()  # it did nothing
    # and it changed nothing about the process it ran in (threads, environment)
    assert torch.get_num_threads() == threads and os.environ.get("OMP_NUM_THREADS") == omp


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("time", "abc", "--slurm-time 'abc'; accepted:"),
        ("time", "1:2:3:4", "--slurm-time"),
        ("mem", "lots", "--slurm-mem"),
    ],
)
def test_slurm_options_in_the_wrong_form_are_refused_before_slurm_is_asked(option, value, says) -> None:
    from qkvlab.errors import UserError

    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        SlurmOptions(**{option: value})
    for limit in ("90", "01:30:00", "2-12", "2-12:00:00"):  # Slurm's own forms pass
        assert SlurmOptions(time=limit, mem="4000M").time == limit


def test_a_slurm_tools_multi_line_message_becomes_one_line() -> None:
    from qkvlab.grid.slurm import _one_line

    assert _one_line("squeue: error: x\n  squeue: error: y\n\n") == "squeue: error: x / squeue: error: y"
    assert _one_line("") == "no message"
