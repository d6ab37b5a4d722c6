"""The experiment layer (grid runner, guard, Ctrl-C, statistics) and the associative-recall task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qkvlab.cli import main
from qkvlab.data import load_dataset
from qkvlab.errors import UserError
from qkvlab.grid.runner import mean_std, paired
from qkvlab.repro.registry import experiments

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "austen.txt"
    path.write_text(TEXT)
    return path


def _tiny(corpus: Path, **extra) -> list[str]:
    settings = {
        "data": f"text:{corpus}",
        "seq_len": 16,
        "batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 1,
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.d_model": 16,
        "eval_every": 0,
        "spectra_every": 0,
        "checkpoint_every": 3,
        "tensorboard": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def test_statistics() -> None:
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5), "n": 2}
    assert mean_std([5.0])["std"] == 0.0
    diff = paired({0: 3.0, 1: 5.0, 2: 9.0}, {0: 1.0, 1: 6.0, 7: 0.0}, scale=10)
    assert diff["seeds"] == [0, 1] and diff["mean"] == pytest.approx(5.0) and diff["wins"] == 1
    assert paired({0: 1.0}, {1: 1.0}) is None
    # tables print a spread only where there is one
    from qkvlab.render.tables import pm

    assert pm(mean_std([1.0, 3.0]), digits=2) == "2.00 ± 1.41"
    assert pm(mean_std([0.25]), digits=2, scale=100) == "25.00"
    assert pm(None) == "—"


def test_registry_names_every_repro_claim() -> None:
    known = experiments()
    assert {"finetune", "wd-rank", "decouple"} <= set(known)
    assert all(e.help for e in known.values())


def test_sweep_guard_refuses_other_settings_and_resumes_with_more_seeds(corpus, tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    base = ["sweep", *_tiny(corpus), "--grid", "weight_decay=0,0.5", "--out", str(out)]
    assert main(base) == 0
    assert main([*base, "--seeds", "0,1"]) == 0  # more seeds: the same settings
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == [f"weight_decay={w},seed={s}" for w in ("0", "0.5") for s in (0, 1)]
    assert json.loads((out / "runs" / "weight_decay=0.5,seed=1" / "run.json").read_text()) == {
        "point": {"weight_decay": "0.5"},
        "seed": 1,
    }
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["kind"] == "sweep" and [p["seeds"] for p in summary["points"]] == [[0, 1], [0, 1]]
    capsys.readouterr()
    assert main(["sweep", *_tiny(corpus, lr="0.01"), "--grid", "weight_decay=0,0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds runs made with other settings" in err and "lr" in err and len(err.strip().splitlines()) == 1


def test_settings_no_run_trained_with_are_replaced_and_others_refused_by_key(tmp_path) -> None:
    """A command stopped by a mistake in its settings (a model too large, say) leaves settings.json and
    run folders holding only run.json and locks: the corrected command may use the folder. Once a run has
    trained, other settings are refused, naming the nested keys that differ, not the whole dict."""
    from qkvlab.grid.runner import guard_settings

    out = tmp_path / "grid"
    wrong = {"overrides": {"lr": 1e-3, "model.n_head": "5000000", "max_steps": 10}, "config": None}
    right = {"overrides": {"lr": 1e-3, "model.n_head": 4, "max_steps": 10}, "config": None}
    guard_settings(out, wrong)
    run = out / "runs" / "lr=1e-3,seed=0"
    run.mkdir(parents=True)
    for name in ("run.json", ".lock", ".cell.lock"):
        (run / name).write_text("{}")
    guard_settings(out, right)  # nothing trained with the wrong ones: replaced
    assert json.loads((out / "settings.json").read_text()) == right
    (run / "config.json").write_text("{}")  # now a run has started with the right ones
    with pytest.raises(
        UserError, match=r"other settings \(overrides.model.n_head 4 -> '5000000'\); resume"
    ) as e:
        guard_settings(out, wrong)
    assert "max_steps" not in str(e.value)
    assert json.loads((out / "settings.json").read_text()) == right
    guard_settings(out, right)  # the same settings: accepted


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_starts_nothing_more_and_keeps_checkpoints(corpus, tmp_path, signum) -> None:
    """SIGINT (or a scheduler's SIGTERM) to a sweep of 4 runs at 2 jobs: the 2 running stop
    (checkpoints kept), the queued 2 never start."""
    out = tmp_path / "sweep"
    args = _tiny(corpus, max_steps=100000, checkpoint_every=5, log_every=5)
    cmd = [sys.executable, "-m", "qkvlab", "sweep", *args, "--grid", "weight_decay=0,0.1,0.2,0.3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(
        [*cmd, "--jobs", "2", "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # a suite started in the background by a non-interactive shell (`make test &`) inherits SIGINT
        # ignored, and so would the grid: give it the terminal's default, as a user's shell does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # both runs have a checkpoint
        if len(list(out.glob("runs/*/latest"))) == 2:
            break
        time.sleep(0.5)
    else:
        parent.kill()
        pytest.fail("the two first runs never wrote a checkpoint")
    parent.send_signal(signum)
    try:  # the grid itself gives its runs 60 s, then SIGTERM and SIGKILL 10 s apart
        output = parent.communicate(timeout=120)[0].decode()
    except subprocess.TimeoutExpired:
        parent.kill()
        logs = {p.parent.name: p.read_text()[-1500:] for p in out.glob("runs/*/train.log")}
        said = parent.communicate()[0].decode()
        pytest.fail(
            f"the grid did not stop within 120 s of {signum!r}; it said {said!r}; its runs' logs: {logs}"
        )
    assert parent.returncode == 130, output
    started = sorted(p.parent.name for p in out.glob("runs/*/run.json"))
    assert started == ["weight_decay=0,seed=0", "weight_decay=0.1,seed=0"], output
    assert output.count("interrupted") >= 2
    session = json.loads((out / "grid.json").read_text())["sessions"][-1]
    assert session["finished"] is False and {r["status"] for r in session["runs"]} == {"interrupted"}
    sizes = [p.stat().st_size for p in sorted(out.glob("runs/*/metrics.jsonl"))]
    time.sleep(2)
    assert [p.stat().st_size for p in sorted(out.glob("runs/*/metrics.jsonl"))] == sizes  # nothing trains on
    # resuming continues the interrupted runs from their checkpoints
    for run in started:
        assert (out / "runs" / run / "latest").is_file()


def _terminated_worker(run_dir: Path, point: dict, seed: int, settings: dict) -> None:
    """The first run gets SIGTERM while it works (outside any handler of its own); the others just finish."""
    if point["i"] == 0:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
    (run_dir / "done").write_text("done")


def test_sigterm_to_a_grid_running_in_process_stops_it_instead_of_failing_one_run(tmp_path) -> None:
    from qkvlab.grid import runner as grid

    runs = [grid.Run(f"i={i},seed=0", {"i": i}, 0) for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid(
            tmp_path / "g",
            runs,
            _terminated_worker,
            settings={},
            status=lambda folder: "complete" if (folder / "done").is_file() else "new",
            jobs=1,
            echo=lambda line: None,
        )
    assert not (tmp_path / "g" / "runs" / "i=1,seed=0").exists()  # nothing more started
    assert not (tmp_path / "g" / "runs" / "i=0,seed=0" / "done").exists()
    session = json.loads((tmp_path / "g" / "grid.json").read_text())["sessions"][-1]
    assert session["finished"] is False


def test_a_grid_killed_outright_keeps_the_runs_it_finished_in_its_log(tmp_path) -> None:
    script = tmp_path / "grid.py"
    script.write_text(
        """
import os, signal, sys
from pathlib import Path
from qkvlab.grid import runner as grid

def worker(run_dir, point, seed, settings):
    if point["i"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no handler: the whole grid dies here
    (run_dir / "done").write_text("done")

runs = [grid.Run(f"i={i},seed=0", {"i": i}, 0) for i in range(3)]
grid.run_grid(Path(sys.argv[1]), runs, worker, settings={}, jobs=1, echo=print,
              status=lambda folder: "complete" if (folder / "done").is_file() else "new")
"""
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "g")], env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL
    (session,) = json.loads((tmp_path / "g" / "grid.json").read_text())["sessions"]
    assert session["finished"] is False
    assert [(r["name"], r["status"]) for r in session["runs"]] == [("i=0,seed=0", "ran")]
    # the next session adds its own entry and leaves the killed one's as it was
    (tmp_path / "g" / "runs" / "i=1,seed=0" / "done").write_text("done")
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "g")], env=env, check=True, capture_output=True
    )
    first, second = json.loads((tmp_path / "g" / "grid.json").read_text())["sessions"]
    assert first == session and second["finished"] is True
    assert [(r["name"], r["status"]) for r in second["runs"]] == [
        ("i=0,seed=0", "skipped (complete)"),
        ("i=1,seed=0", "skipped (complete)"),
        ("i=2,seed=0", "ran"),
    ]


def _stubborn_worker(run_dir: Path, point: dict, seed: int, settings: dict) -> None:
    """A run that ignores SIGINT and SIGTERM (as one stuck in native code would); the other run waits
    until it is so, then finishes."""
    if point["kind"] == "stuck":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (run_dir / "pid").write_text(str(os.getpid()))
        time.sleep(600)
    else:
        while not (run_dir.parent / "kind=stuck,seed=0" / "pid").is_file():
            time.sleep(0.05)


def test_a_stopped_grid_terminates_then_kills_a_run_that_will_not_stop(tmp_path, monkeypatch, capfd) -> None:
    from qkvlab.grid import runner as grid

    monkeypatch.setattr(grid, "STOP_SECONDS", 0.5)
    monkeypatch.setattr(grid, "KILL_SECONDS", 0.5)
    runs = [
        grid.Run("kind=stuck,seed=0", {"kind": "stuck"}, 0),
        grid.Run("kind=quick,seed=0", {"kind": "quick"}, 0),
    ]

    def echo(line: str) -> None:  # the grid's own failure while a run is going: when the quick run is shown
        if "kind=quick" in line:
            raise RuntimeError("the grid failed")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="the grid failed"):
        grid.run_grid(
            tmp_path / "g",
            runs,
            _stubborn_worker,
            settings={},
            status=lambda folder: "complete" if (folder / "done").is_file() else "new",
            jobs=2,
            echo=echo,
        )
    assert time.monotonic() - started < 60  # not the 600 s the stuck run would sleep
    err = capfd.readouterr().err
    assert "kind=stuck,seed=0: still running 0.5 s after the stop signal; terminate" in err
    assert "; kill" in err  # SIGTERM was ignored too
    pid = int((tmp_path / "g" / "runs" / "kind=stuck,seed=0" / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped


def test_assoc_recall_task() -> None:
    data = load_dataset("assoc-recall", seed=3)
    assert data.kind == "lm" and data.info["vocab_size"] == 128 and data.info["seq_len"] == 33
    assert data.info["chance_accuracy"] == 1 / 64
    batch = data.train_batch(5, 256)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (256, 33) and ids.dtype == torch.int64
    assert (labels[:, :-1] == -100).all() and (labels[:, -1] >= 64).all()
    keys, values = ids[:, 0:32:2], ids[:, 1:32:2]
    assert (keys < 64).all() and (values >= 64).all()
    assert all(len(set(row.tolist())) == 16 for row in keys)  # distinct keys: the answer is unique
    # the answer is the value that follows the query key in the context
    where = (keys == ids[:, -1:]).float().argmax(-1)
    assert torch.equal(values[torch.arange(256), where], labels[:, -1])
    # a pure function of (seed, step); no sequence repeats across steps; ranks split the global batch
    assert torch.equal(data.train_batch(5, 256)["input_ids"], ids)
    seen = {tuple(r) for step in range(20) for r in data.train_batch(step, 256)["input_ids"].tolist()}
    assert len(seen) == 20 * 256
    halves = [data.train_batch(5, 128, rank=r, world_size=2)["input_ids"] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), ids)
    first = next(data.eval_batches(64))["input_ids"]
    assert torch.equal(first, next(data.eval_batches(64))["input_ids"])
    assert not any(tuple(r) in seen for r in first.tolist())


def test_assoc_recall_with_several_queries() -> None:
    data = load_dataset("assoc-recall", seed=1, recall_keys=20, recall_pairs=6, recall_queries=4)
    assert data.info["seq_len"] == 2 * 6 + 2 * 4 - 1
    ids, labels = (data.train_batch(2, 128)[k] for k in ("input_ids", "labels"))
    keys, values = ids[:, 0:12:2], ids[:, 1:12:2]
    asked = ids[:, 12::2]  # q₁ … q₄
    assert asked.shape == (128, 4) and all(len(set(r.tolist())) == 4 for r in asked)  # distinct queries
    supervised = labels != -100
    assert supervised.sum(1).tolist() == [4] * 128 and supervised[:, 12::2].all()
    for i in range(4):
        where = (keys == asked[:, i : i + 1]).float().argmax(-1)
        answer = values[torch.arange(128), where]
        assert (keys == asked[:, i : i + 1]).any(1).all()  # every query is a key of its context
        assert torch.equal(labels[:, 12 + 2 * i], answer)
        if i < 3:  # every answer but the last is also shown after its query
            assert torch.equal(ids[:, 13 + 2 * i], answer)
    with pytest.raises(UserError, match="recall_queries=7"):
        load_dataset("assoc-recall", recall_pairs=6, recall_queries=7)


def test_assoc_recall_mixed_pair_counts_pad_on_the_left_and_validate_on_the_full_task() -> None:
    data = load_dataset(
        "assoc-recall",
        seed=2,
        recall_keys=12,
        recall_values=9,
        recall_pairs=5,
        recall_queries=3,
        recall_min_pairs=1,
    )
    pad = 12 + 9
    assert data.info["vocab_size"] == pad + 1 and data.info["seq_len"] == 2 * 5 + 2 * 3 - 1
    ids, labels = (data.train_batch(0, 512)[k] for k in ("input_ids", "labels"))
    counts = set()
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        n_pad = sum(t == pad for t in row)
        assert row[:n_pad] == [pad] * n_pad and pad not in row[n_pad:]  # padding only on the left
        body, body_labels = row[n_pad:], lab[n_pad:]
        queries = len([x for x in body_labels if x != -100])
        p = (len(body) + 1 - 2 * queries) // 2
        counts.add(p)
        assert queries == min(3, p) and len(body) == 2 * p + 2 * queries - 1
        table = dict(zip(body[0 : 2 * p : 2], body[1 : 2 * p : 2], strict=True))
        assert len(table) == p and all(k < 12 <= v < pad for k, v in table.items())
        for i in range(queries):
            assert body_labels[2 * p + 2 * i] == table[body[2 * p + 2 * i]]  # answer = the key's value
        assert all(x == -100 for j, x in enumerate(body_labels) if j < 2 * p or (j - 2 * p) % 2)
    assert counts == {1, 2, 3, 4, 5}  # every pair count occurs
    full = next(data.eval_batches(2048))
    assert (full["input_ids"] != pad).all() and ((full["labels"] != -100).sum(1) == 3).all()
    # without recall_min_pairs nothing changes: same stream, no padding token
    same = load_dataset(
        "assoc-recall", seed=2, recall_keys=12, recall_values=9, recall_pairs=5, recall_queries=3
    )
    assert same.info["vocab_size"] == 21 and torch.equal(
        next(same.eval_batches(2048))["input_ids"], full["input_ids"]
    )
    with pytest.raises(UserError, match="recall_min_pairs=6"):
        load_dataset("assoc-recall", recall_pairs=5, recall_min_pairs=6)


def test_training_on_assoc_recall_reports_answer_accuracy(tmp_path) -> None:
    args = [
        "data=assoc-recall",
        "recall_pairs=4",
        "model.n_layer=1",
        "model.d_model=16",
        "batch_size=8",
        "max_steps=4",
        "warmup_steps=1",
        "eval_every=4",
        "eval_batches=2",
        "spectra_every=0",
        "tensorboard=false",
        "progress=false",
        f"out={tmp_path / 'r'}",
    ]
    assert main(["train", *args]) == 0
    final = json.loads((tmp_path / "r" / "final.json").read_text())
    assert 0.0 <= final["eval"]["accuracy"] <= 1.0 and final["eval"]["loss"] > 0
    assert main(["train", *args[:-1], "recall_pairs=65", f"out={tmp_path / 'bad'}"]) == 2


def test_repro_wd_rank_and_decouple_on_a_tiny_gpt(corpus, tmp_path, capsys) -> None:
    from qkvlab.repro.paper000.claim import gpt_settings, schedule_sum

    changes = {
        "data": f"text:{corpus}",
        "seq_len": 16,
        "batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 1,
        "lr": 0.05,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.d_model": 16,
        "model.d_head": 8,
        "model.d_mlp": 32,
        "eval_every": 3,
        "spectra_every": 3,
        "checkpoint_every": 3,
    }
    sets = [x for k, v in changes.items() for x in ("--set", f"{k}={v}")]
    out = tmp_path / "gpt"
    wd_rank = ["repro", "wd-rank", "--out", str(out), "--lambdas", "0,1", *sets]
    assert main([*wd_rank, "--seeds", "0,1", "--jobs", "2", "--plot", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    cells = {(c["attn_weight_decay"], c["rest_weight_decay"]): c for c in summary["cells"]}
    assert set(cells) == {(0.0, 0.1), (1.0, 0.1)} and cells[(1.0, 0.1)]["seeds"] == [0, 1]
    eta = schedule_sum(gpt_settings(changes)["overrides"])
    assert cells[(1.0, 0.1)]["eta_lambda_attn"] == pytest.approx(eta) and f"| 1 | {eta:.3g} |" in printed
    assert "| init |" in printed and "Seed-paired differences from λ_attn = 0" in printed
    # how early: Δ erank against λ_attn = 0 at the monitor's steps, ending at the run's end, where it is 100%
    early = cells[(1.0, 0.1)]["early"]
    assert early["steps"] == [3, 6] and "early" not in cells[(0.0, 0.1)]  # the reference has no Δ
    final_delta = cells[(1.0, 0.1)]["vs_attn_0"]["qk_effective_rank"]["mean"]
    assert early["qk"][-1]["mean"] == pytest.approx(final_delta)
    assert early["eta_share"][-1] == pytest.approx(1.0) and 0 < early["eta_share"][0] < 1
    assert early["eta_share"][0] == pytest.approx(schedule_sum(gpt_settings(changes)["overrides"], 3) / eta)
    assert "How early" in printed and "step 6 (Σηₜ 100%)" in printed
    config = json.loads((out / "runs" / "attn=1,rest=0.1,seed=0" / "config.json").read_text())
    assert config["weight_decay"] == 0.1 and config["model"]["bias"] is False
    assert {r: config["overrides"][r]["weight_decay"] for r in ("q", "k", "v", "o", "embed")} == {
        "q": 1.0,
        "k": 1.0,
        "v": 1.0,
        "o": 1.0,
        "embed": 0.1,
    }
    # weight decay on the attention factors shrinks the products' nuclear norms, seed by seed
    for product in ("qk", "ov"):
        diff = cells[(1.0, 0.1)]["vs_attn_0"]
        assert diff is not None
        norms = {lam: cells[(lam, 0.1)]["final"][f"{product}_nuclear_norm"]["mean"] for lam in (0.0, 1.0)}
        assert norms[1.0] < norms[0.0]
    figures = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert figures == [
        "balance_over_time_rest0.1.png",
        "gram_norms_over_time_rest0.1.png",
        "rank_over_time_rest0.1.png",
        "rank_per_head_rest0.1.png",
        "rank_vs_lambda_rest0.1.png",
        "val_loss_vs_lambda_rest0.1.png",
    ]
    # --summary-only reprints the same tables from the results alone
    assert main([*wd_rank, "--seeds", "0,1", "--summary-only"]) == 0
    again = capsys.readouterr().out
    assert again.split("\nwrote")[0] == printed[printed.index("Model-wide") :].split("\nwrote")[0]
    # what gets committed is spectra.jsonl.gz: the tables come back the same from it alone
    for plain in out.glob("runs/*/spectra.jsonl"):
        assert plain.with_suffix(".jsonl.gz").is_file()
        plain.unlink()
    assert main([*wd_rank, "--seeds", "0,1", "--summary-only"]) == 0
    assert capsys.readouterr().out.split("\nwrote")[0] == again.split("\nwrote")[0]
    # decouple shares the folder: the (0, 0.1) cell is not trained again
    decouple = ["repro", "decouple", "--out", str(out), "--attn-lambdas", "0", "--rest-lambdas", "0.1", *sets]
    assert main([*decouple, "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    assert "skipped (complete)     attn=0,rest=0.1,seed=0" in printed and "(reference)" in printed
    assert "ran                    attn=0.1,rest=0.1,seed=0" in printed
    # one seed: differences print without a spread (a "± 0" would claim a precision there is none of)
    row = next(line for line in printed.splitlines() if line.startswith("| 0.1 | 0 |"))
    assert "(0/1 > 0)" in row or "(1/1 > 0)" in row
    assert "±" not in row.split("|")[8]
    # the train-loss column: the logged losses of the last 100 steps (here all of them), mean over seeds
    summary = json.loads((out / "summary.json").read_text())
    (cell,) = [c for c in summary["cells"] if (c["attn_weight_decay"], c["rest_weight_decay"]) == (0.0, 0.1)]
    tails = []
    for seed in cell["seeds"]:
        lines = (out / "runs" / f"attn=0,rest=0.1,seed={seed}" / "metrics.jsonl").read_text().splitlines()
        losses = [r["loss"] for r in map(json.loads, lines) if r.get("split") == "train"]
        tails.append(sum(losses) / len(losses))
    assert cell["train_tail"]["mean"] == pytest.approx(sum(tails) / len(tails))
    # other settings in the same folder are refused, naming the difference
    assert main([*decouple[:-2], "--set", "checkpoint_every=2", "--seeds", "0"]) == 2
    assert "holds runs made with other settings" in capsys.readouterr().err
    assert main([*decouple, "--set", "model.bias=true", "--seeds", "0"]) == 2
    assert "model.bias=false" in capsys.readouterr().err


def test_repro_wd_rank_gpt_online_is_one_pass_and_refuses_more(corpus, tmp_path, capsys) -> None:
    from qkvlab.data import load_dataset
    from qkvlab.repro.paper000.claim import GPT_ONLINE_ATTN, GPT_ONLINE_BASE, schedule_sum

    # the shipped setting: exactly one pass over the training text, and its λ grid reaches Σηλ 3.3
    shakespeare_steps = GPT_ONLINE_BASE["max_steps"]
    assert GPT_ONLINE_BASE["online"] is True and shakespeare_steps == 1102
    assert max(GPT_ONLINE_ATTN) * schedule_sum(GPT_ONLINE_BASE) == pytest.approx(3.3, rel=0.01)
    data = load_dataset(f"text:{corpus}", seq_len=16)
    one_pass = data.max_online_steps(4)
    changes = {
        "data": f"text:{corpus}",
        "seq_len": 16,
        "batch_size": 4,
        "warmup_steps": 1,
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.d_model": 16,
        "model.d_head": 8,
        "model.d_mlp": 32,
        "eval_every": 2,
        "spectra_every": 2,
        "checkpoint_every": 2,
    }
    out = tmp_path / "online"
    base = [
        "repro",
        "wd-rank",
        "--setting",
        "gpt-online",
        "--out",
        str(out),
        "--lambdas",
        "0,1",
        "--seeds",
        "0",
    ]
    too_long = [x for k, v in {**changes, "max_steps": one_pass + 1}.items() for x in ("--set", f"{k}={v}")]
    assert main([*base, *too_long]) == 2
    err = capsys.readouterr().err
    assert f"max_steps <= {one_pass}" in err and len(err.strip().splitlines()) == 1
    assert not (out / "runs").exists()  # refused before any run started
    steps = min(one_pass, 6)
    sets = [x for k, v in {**changes, "max_steps": steps}.items() for x in ("--set", f"{k}={v}")]
    assert main([*base, *sets]) == 0
    config = json.loads((out / "runs" / "attn=1,rest=0.1,seed=0" / "config.json").read_text())
    assert config["online"] is True and config["max_steps"] == steps
    assert "| 1 |" in capsys.readouterr().out


def test_repro_wd_rank_on_tiny_associative_recall(tmp_path, capsys) -> None:
    changes = {
        "recall_pairs": 4,
        "recall_queries": 2,
        "batch_size": 8,
        "max_steps": 4,
        "warmup_steps": 1,
        "lr": 0.05,
        "model.n_head": 2,
        "model.d_model": 16,
        "model.d_head": 8,
        "model.d_mlp": 32,
        "eval_every": 2,
        "eval_batches": 2,
        "spectra_every": 2,
        "checkpoint_every": 2,
    }
    sets = [x for k, v in changes.items() for x in ("--set", f"{k}={v}")]
    out = tmp_path / "recall"
    args = [
        "repro",
        "wd-rank",
        "--setting",
        "recall",
        "--out",
        str(out),
        "--lambdas",
        "0,0.5",
        "--seeds",
        "0",
    ]
    assert main([*args, *sets, "--plot", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert "val accuracy (%)" in printed and "| 0.5 |" in printed
    config = json.loads((out / "runs" / "attn=0.5,rest=0.1,seed=0" / "config.json").read_text())
    assert config["data"] == "assoc-recall" and config["online"] is True and config["model"]["n_layer"] == 2
    assert (tmp_path / "plots" / "gram_norms_over_time_rest0.1.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    accuracy = summary["cells"][0]["val"]["accuracy"]["mean"]
    assert 0.0 <= accuracy <= 1.0
    # Fig. 2 in numbers: each factor pair's relative imbalance and Gram-norm mismatch, at init and at the end
    balance = summary["cells"][1]["balance"]
    assert balance["seeds"] == [0] and "Factor balance" in printed
    for key in ("qk_init", "qk_end", "ov_init", "ov_end"):
        mismatch = balance[key.replace("_", "_norm_")]["mean"]
        assert 0.0 <= mismatch <= 2.0  # |a − b| / ((a + b) / 2) lies in [0, 2]
        assert balance[key]["mean"] >= mismatch  # ‖X − Y‖ ≥ |‖X‖ − ‖Y‖|, and the mean keeps it
    assert balance["ov_norm_init"]["mean"] > 0.5  # GPT-2 init: P is 1/√(2·n_layer) smaller than W_V
    # two independent Gaussian factors at init are far from balanced even where their norms match
    assert balance["qk_init"]["mean"] > 5 * balance["qk_norm_init"]["mean"]
    # end/init of ‖AᵀA − BᵀB‖_F, recomputed from the run's own spectral records, head by head
    from qkvlab.grid.training import read_spectra

    records = read_spectra(out / "runs" / "attn=0.5,rest=0.1,seed=0")
    for product in ("qk", "ov"):
        layers = sorted({h["layer"] for h in records[0]["heads"]})

        def layer_mean(record, layer, product=product):
            values = [
                h["imbalance"] for h in record["heads"] if h["product"] == product and h["layer"] == layer
            ]
            return sum(values) / len(values)

        ratios = [layer_mean(records[-1], layer) / layer_mean(records[0], layer) for layer in layers]
        assert balance[f"{product}_ratio"]["mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-9)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_repro_wd_rank_on_tiny_in_context_regression(tmp_path, capsys, attention) -> None:
    from qkvlab.repro.paper000.claim import ICL_ATTN, ICL_BASE, schedule_sum

    assert max(ICL_ATTN) * schedule_sum(ICL_BASE) == pytest.approx(3.3, rel=0.01)  # the shipped grid
    changes = {"icl_dim": 3, "icl_points": 8, "batch_size": 16, "max_steps": 4, "warmup_steps": 1}
    changes |= {"eval_every": 2, "eval_batches": 2, "spectra_every": 2, "checkpoint_every": 2}
    sets = [x for k, v in changes.items() for x in ("--set", f"{k}={v}")]
    out = tmp_path / attention
    args = ["repro", "wd-rank", "--setting", f"icl-{attention}", "--out", str(out), "--lambdas", "0,0.5"]
    assert main([*args, "--seeds", "0", *sets, "--plot", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert "against one step of gradient descent" in printed and "| 0.5 |" in printed
    config = json.loads((out / "runs" / "attn=0.5,rest=0.1,seed=0" / "config.json").read_text())
    assert config["data"] == "icl-regression" and config["online"] is True
    assert config["model"]["attention"] == attention and config["model"]["init_std"] == 0.2
    summary = json.loads((out / "summary.json").read_text())
    val = summary["cells"][0]["val"]
    # the GD baseline of d = 3, N = 8 is (d + 1)/(n + d + 1) = 4/11 in expectation (2 batches of 16 here)
    assert 0.1 < val["gd_mse"]["mean"] < 0.8 and val["gd_distance"]["mean"] > 0
    # the weight-space comparison is written beside each run (it is committed; checkpoints are not)
    alignment = json.loads((out / "runs" / "attn=0,rest=0.1,seed=0" / "gd_alignment.json").read_text())
    assert alignment["step"] == 4 and -1 <= alignment["cosine"] <= 1 and len(alignment["qk_cosine"]) == 1
    assert "cos T" in printed and summary["cells"][0]["gd_alignment"]["cosine"]["n"] == 1
    assert (tmp_path / "plots" / "val_loss_vs_lambda_rest0.1.png").stat().st_size > 10_000


def test_repro_wd_rank_on_a_tiny_vit_on_mnist(tmp_path, capsys) -> None:
    changes = {"model.n_layer": 1, "model.n_head": 2, "model.d_model": 16, "model.d_head": 8}
    changes |= {"model.d_mlp": 32, "model.patch_size": 7, "batch_size": 8, "max_steps": 4, "warmup_steps": 1}
    changes |= {"eval_every": 2, "eval_batches": 2, "spectra_every": 2, "checkpoint_every": 2}
    sets = [x for k, v in changes.items() for x in ("--set", f"{k}={v}")]
    out = tmp_path / "vit"
    args = ["repro", "wd-rank", "--setting", "vit", "--out", str(out), "--lambdas", "0,1", "--seeds", "0"]
    assert main([*args, *sets]) == 0
    printed = capsys.readouterr().out
    from qkvlab.repro.paper000.claim import VIT_BASE, gpt_settings, schedule_sum

    eta = schedule_sum(gpt_settings(changes, "vit")["overrides"])
    assert "val accuracy (%)" in printed and f"| 1 | {eta:.3g} |" in printed  # Σηλ beside λ
    assert schedule_sum(VIT_BASE) == pytest.approx(1.096, abs=1e-3)  # the shipped grid: Σηλ up to 3.3
    config = json.loads((out / "runs" / "attn=1,rest=0.1,seed=0" / "config.json").read_text())
    assert (
        config["data"] == "mnist5k" and config["model"]["kind"] == "vit" and config["model"]["bias"] is False
    )
    assert config["overrides"]["q"]["weight_decay"] == 1.0 and config["weight_decay"] == 0.1


def test_a_mistyped_claim_or_command_names_the_closest_one(capsys) -> None:
    from qkvlab.cli import main

    for argv, closest in (
        (["repro", "wd-rnak"], "wd-rank"),
        (["inspct"], "inspect"),
        (["repro", "theroy"], "theory"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and f"did you mean {closest}?" in err[0]
    with pytest.raises(SystemExit):
        main(["repro", "xyzzy"])
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess


def test_decouple_control_runs_the_design_fixed_in_code(tmp_path, monkeypatch, capsys) -> None:
    import qkvlab.repro.paper000.claim as paper000
    from qkvlab.cli import main

    planned = []

    class Planned(Exception):
        pass

    def grid(out, cells, seeds, **kwargs):  # type: ignore[no-untyped-def]
        planned.append((sorted(cells), list(seeds), kwargs.get("changes")))
        raise Planned

    monkeypatch.setattr(paper000, "run_gpt_grid", grid)
    for lr in ("", "--set lr=4e-3"):
        with pytest.raises(Planned):
            main(["repro", "decouple", "--control", "--out", str(tmp_path / f"c{len(planned)}"), *lr.split()])
    design = sorted({(a, r) for r in (0.0, 0.3) for a in (0.0, 0.1, 0.3, 1.0)})
    assert [p[0] for p in planned] == [design, design] and planned[0][1] == [0, 1, 2]
    assert "lr" not in planned[0][2] and planned[1][2]["lr"] == 4e-3  # one spelling per folder
    with pytest.raises(Planned):
        main(["repro", "decouple", "--control", "--set", "lr=0.004", "--out", str(tmp_path / "z")])
    assert planned[2][2]["lr"] == 4e-3
    capsys.readouterr()
    for extra, message in (
        (["--set", "lr=2e-3"], "--control runs at lr 0.001 or 0.004"),
        (["--attn-lambdas", "0"], "--control fixes λ_attn"),
        (["--set", "max_steps=10"], "--set accepts only lr and device, not max_steps"),
        (["--seeds", "0"], "--control runs seeds 0,1,2"),
    ):
        assert main(["repro", "decouple", "--control", *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


def _losses(cells: dict[tuple[float, float], list[float]]) -> dict[tuple, dict[int, dict]]:
    """load_numbers' shape, validation loss only: (λ_attn, λ_rest) → three seeds' losses."""
    from qkvlab.grid.runner import point_key
    from qkvlab.repro.paper000.claim import gpt_point

    return {
        point_key(gpt_point(a, r)): {s: {"val": {"loss": v}} for s, v in enumerate(losses)}
        for (a, r), losses in cells.items()
    }


def test_decouple_contrasts_read_each_comparison_by_the_rule_fixed_in_code() -> None:
    from qkvlab.repro.paper000.claim import DECOUPLE_CONTROL_DELTA, decouple_contrasts

    numbers = _losses(
        {
            (0.3, 0.3): [1.70, 1.71, 1.72],
            (0.0, 0.3): [1.68, 1.69, 1.70],  # C1: −0.02 on every seed → lower
            (0.3, 0.0): [1.683, 1.693, 1.703],  # C2: −0.017 → lower; swap: −0.003 on every seed, inside δ
            (0.0, 0.0): [1.67, 1.68, 1.69],  # the best cell
        }
    )
    found = {c["contrast"].split(":")[0] + f" {c['lambda']:g}": c for c in decouple_contrasts(numbers)}
    assert (
        found["C1 0.3"]["val_loss"]["mean"] == pytest.approx(-0.02) and found["C1 0.3"]["reading"] == "lower"
    )
    assert (
        found["C2 0.3"]["val_loss"]["mean"] == pytest.approx(-0.017) and found["C2 0.3"]["reading"] == "lower"
    )
    assert found["swap 0.3"]["val_loss"]["mean"] == pytest.approx(-0.003)
    assert found["swap 0.3"]["reading"] == "within noise" and DECOUPLE_CONTROL_DELTA > 0.003
    assert found["C3 0.3"]["a"] == [0.0, 0.0] and found["C3 0.3"]["reading"] == "lower"
    best = [c for c in found.values() if c["contrast"].endswith("best cell")]
    assert len(best) == 1 and best[0]["b"] == [0.0, 0.3]  # the best cell other than no decay at all
    from qkvlab.repro.paper000.render import decouple_table

    text = decouple_table({"cells": [], "contrasts": decouple_contrasts(numbers)})
    assert (
        "| C1: remove attention decay | 0.3 | (0, 0.3) | (0.3, 0.3) | -0.0200 ± 0.0000 (0/3 > 0) | lower |"
        in text
    )
    # higher: every seed above by more than δ on average; seeds that disagree are within noise
    numbers = _losses(
        {
            (0.3, 0.3): [1.70] * 3,
            (0.0, 0.3): [1.71, 1.72, 1.71],
            (0.3, 0.0): [1.69, 1.72, 1.69],
            (0.0, 0.0): [1.8] * 3,
        }
    )
    found = {
        c["contrast"].split(":")[0]: c for c in decouple_contrasts(numbers) if "best" not in c["contrast"]
    }
    assert found["C1"]["reading"] == "higher" and found["C3"]["reading"] == "higher"
    assert found["C2"]["val_loss"]["wins"] == 1 and found["C2"]["reading"] == "within noise"
    # a folder still running reads nothing yet, however clear its first seed
    partial = _losses({(0.3, 0.3): [1.70], (0.0, 0.3): [1.60], (0.3, 0.0): [1.69], (0.0, 0.0): [1.5]})
    assert {c["reading"] for c in decouple_contrasts(partial)} == {"pending (1 of 3 seeds)"}
    # Table 1 alone (no λ_rest = 0) has no control to read
    assert decouple_contrasts(_losses({(0.1, 0.1): [1.7] * 3, (0.0, 0.1): [1.69] * 3})) == []


def test_decouple_figure_draws_every_cell_and_contrast_and_skips_a_single_rest(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from qkvlab.grid.runner import mean_std
    from qkvlab.repro.paper000.claim import decouple_contrasts
    from qkvlab.repro.paper000.render import plot_decouple

    losses = {
        (0.0, 0.0): [1.54, 1.541, 1.539],
        (0.3, 0.0): [1.55, 1.549, 1.551],
        (1.0, 0.0): [1.57, 1.572, 1.571],
        (0.0, 0.3): [1.536, 1.537, 1.538],
        (0.3, 0.3): [1.540, 1.541, 1.539],
        (1.0, 0.3): [1.569, 1.57, 1.571],
    }
    cells = [
        {
            "attn_weight_decay": a,
            "rest_weight_decay": r,
            "eta_sum": 4.38,
            "seeds": [0, 1, 2],
            "val": {"loss": mean_std(v)},
        }
        for (a, r), v in losses.items()
    ]
    runs_of = {key: [{"val": {"loss": x}} for x in v] for key, v in losses.items()}
    summary = {"cells": cells, "contrasts": decouple_contrasts(_losses(losses))}
    assert len(summary["contrasts"]) == 5  # C1, C2, swap, C3 at λ = 0.3 and C3 against the best cell
    (path,) = plot_decouple(summary, runs_of, tmp_path / "plots")  # QKVLAB_CHECK_FIGURES: no overlaps
    assert path.name == "decouple_val_loss.png"
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert width > 1000 and height > 400 and (pixels < 128).mean() > 0.01  # drawn, not blank
    # without the control, one panel; with one λ_rest, no figure (that is wd-rank's)
    (alone,) = plot_decouple({"cells": cells}, runs_of, tmp_path / "alone")
    with Image.open(alone) as image:
        assert image.size[0] < width
    one = [c for c in cells if c["rest_weight_decay"] == 0.3]
    assert plot_decouple({"cells": one}, runs_of, tmp_path / "one") == []


def _lock_probe_worker(run_dir: Path, point: dict, seed: int, settings: dict) -> None:
    """Writes whether this run's cell lock could be taken again while the worker runs (it must not)."""
    from qkvlab.errors import UserError
    from qkvlab.train.lock import CELL_LOCK, RunLock

    try:
        RunLock(run_dir, CELL_LOCK).release()
        (run_dir / "done").write_text("free")
    except UserError:
        (run_dir / "done").write_text("held")


@pytest.mark.parametrize("jobs", [1, 2])
def test_every_local_run_holds_its_cell_lock_and_a_held_run_is_not_run_twice(tmp_path, jobs) -> None:
    from qkvlab.grid import runner as grid
    from qkvlab.train.lock import CELL_LOCK, RunLock

    runs = [grid.Run(f"i={i},seed=0", {"i": i}, 0) for i in range(3)]
    busy = RunLock(tmp_path / "g" / "runs" / "i=2,seed=0", CELL_LOCK)  # another grid (or a Slurm task) on it
    results = grid.run_grid(
        tmp_path / "g",
        runs,
        _lock_probe_worker,
        settings={},
        status=lambda folder: "complete" if (folder / "done").is_file() else "new",
        jobs=jobs,
        echo=lambda line: None,
    )
    busy.release()
    assert [(tmp_path / "g" / "runs" / f"i={i},seed=0" / "done").read_text() for i in (0, 1)] == ["held"] * 2
    assert not (tmp_path / "g" / "runs" / "i=2,seed=0" / "done").exists()  # not run beside its holder
    assert [r["status"].startswith("failed") for r in results] == [False, False, True]


def _broken_worker(run_dir: Path, point: dict, seed: int, settings: dict) -> None:
    raise RuntimeError("a bug in the worker")


def test_a_repro_command_whose_runs_fail_prints_its_summary_then_exits_1(
    tmp_path, monkeypatch, capsys
) -> None:
    from qkvlab.repro.logits import claim

    monkeypatch.setattr(claim, "worker", _broken_worker)
    out = tmp_path / "logits"
    assert main(["repro", "logits", "--out", str(out), "--jobs", "1"]) == 1
    printed = capsys.readouterr()
    assert f"wrote {out / 'summary.json'}" in printed.out  # the summary of what there is comes first
    assert "RuntimeError: a bug in the worker" in printed.err  # our bug keeps its traceback
    assert f"qkvlab repro logits: {2 * len(claim.LR_LADDER)} run(s) failed" in printed.err
    assert "run the same command again" in printed.err
    # the failures belong to the call that ran them: a later call that runs nothing exits 0
    assert main(["repro", "logits", "--out", str(out), "--summary-only"]) == 0
    assert "failed" not in capsys.readouterr().err
