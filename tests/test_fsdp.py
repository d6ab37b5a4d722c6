"""parallel=fsdp: FSDP2 on two CPU processes over gloo trains as one process does (losses, spectra, the
rank guard, Muon per head across shard boundaries, coupled L2), writes the checkpoints one process
writes, and a checkpoint resumes on another number of processes, either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_gpt_settings, train_losses

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(settings: dict[str, str], processes: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        if processes > 1
        else []
    )
    return subprocess.run(
        [
            sys.executable,
            *launcher,
            "-m",
            "qkvlab",
            "train",
            *[f"{k}={v}" for k, v in settings.items()],
            *extra,
        ],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
        timeout=300,
    )


def _resume(run: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        if processes > 1
        else []
    )
    return subprocess.run(
        [sys.executable, *launcher, "-m", "qkvlab", "train", "--resume", str(run), *extra],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
        timeout=300,
    )


def _spectra(run: Path) -> list[dict[str, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(x).items() if k not in ("step", "split")}
        for x in lines
        if '"spectra"' in x
    ]


# d_model 24 over 3 heads: W_Q's 24 rows split 12/12 between the ranks, so head 1 (rows 8–15) straddles
# the shard boundary, which per-head Muon must not notice.
MUON = {
    "optimizer": "muon",
    "muon_per_head": "q,k,v,o",
    "muon_ns_dtype": "float32",
    "model.d_model": "24",
    "model.n_head": "3",
    "rank_guard_qk": "0.5",
    "rank_guard_ov": "0.5",
    "rank_guard_max": "100",
    "lr": "0.02",
}
# with QK-clip at a τ below the initial logits, so sharded query and key rows are scaled from step 1, each
# head by its own γ; 3 heads over d_model 24 again, so head 1's rows straddle the two shards
ADAM_L2 = {
    "optimizer": "adam-l2",
    "weight_decay": "0.5",
    "qk_clip": "0.05",
    "model.d_model": "24",
    "model.n_head": "3",
}


@pytest.mark.parametrize("extra", [MUON, ADAM_L2], ids=["muon-per-head-guard", "adam-l2-qk-clip"])
def test_fsdp_on_two_processes_trains_as_one_process(corpus, tmp_path, extra) -> None:
    settings = tiny_gpt_settings(corpus, tmp_path / "x", **{"model.dropout": "0.0", **extra})
    one = _train({**settings, "out": str(tmp_path / "one")}, 1)
    assert one.returncode == 0, one.stderr
    two = _train({**settings, "out": str(tmp_path / "two"), "parallel": "fsdp"}, 2)
    assert two.returncode == 0, two.stderr[-3000:]

    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
    if "qk_clip" in extra:
        clipped = [
            [
                json.loads(x)["qk_clipped_heads"]
                for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
                if '"train"' in x
            ]
            for r in ("one", "two")
        ]
        assert clipped[1] == clipped[0] and sum(clipped[0]) > 0
    a, b = (
        _spectra(tmp_path / "one"),
        _spectra(tmp_path / "two"),
    )  # the monitor (and guard) on sharded weights
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-6)
    final = json.loads((tmp_path / "two" / "final.json").read_text())
    assert final["parallel"] == "fsdp" and final["world_size"] == 2
    assert final["eval"]["loss"] == pytest.approx(
        json.loads((tmp_path / "one" / "final.json").read_text())["eval"]["loss"], rel=1e-5
    )
    if "rank_guard_qk" in extra:  # the guard moved λ on both, alike
        lams = [
            [
                json.loads(x)["L1/qk_lambda"]
                for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
                if '"guard"' in x
            ]
            for r in ("one", "two")
        ]
        assert len(set(lams[0])) == 3 and lams[1] == pytest.approx(lams[0], rel=1e-4)

    # the checkpoint is the one process's, file for file and tensor for tensor (the tie saved once)
    for name in ("model.safetensors", "optimizer.safetensors"):
        mine = load_file(tmp_path / "one" / "checkpoint-00000012" / name)
        theirs = load_file(tmp_path / "two" / "checkpoint-00000012" / name)
        assert set(theirs) == set(mine)
        for key, value in mine.items():
            torch.testing.assert_close(theirs[key], value, rtol=1e-3, atol=1e-6, msg=key)
    state = [
        json.loads((tmp_path / r / "checkpoint-00000012" / "state.json").read_text()) for r in ("one", "two")
    ]
    groups = [x["optimizer"]["param_groups"] for x in state]  # the guard's λ: equal up to rounding
    for mine, theirs in zip(groups[0], groups[1], strict=True):
        assert theirs == {k: pytest.approx(v) if isinstance(v, float) else v for k, v in mine.items()}


def test_a_checkpoint_resumes_on_another_number_of_processes_either_way(corpus, tmp_path) -> None:
    settings = tiny_gpt_settings(corpus, tmp_path / "x", **{"model.dropout": "0.0", "checkpoint_every": "6"})
    whole = _train({**settings, "out": str(tmp_path / "whole")}, 1)
    assert whole.returncode == 0, whole.stderr
    expected = train_losses(tmp_path / "whole")

    # written sharded on two processes, resumed in one
    first = _train({**settings, "out": str(tmp_path / "a"), "parallel": "fsdp", "stop_at": "6"}, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "a" / "final.json").exists()
    again = _resume(tmp_path / "a", 1)
    assert again.returncode == 0, again.stderr
    assert train_losses(tmp_path / "a") == pytest.approx(expected, rel=1e-5)

    # written by one process, resumed sharded on two
    first = _train({**settings, "out": str(tmp_path / "b"), "stop_at": "6"}, 1)
    assert first.returncode == 0, first.stderr
    again = _resume(tmp_path / "b", 2, "parallel=fsdp")
    assert again.returncode == 0, again.stderr[-3000:]
    assert train_losses(tmp_path / "b") == pytest.approx(expected, rel=1e-5)
    final = json.loads((tmp_path / "b" / "final.json").read_text())
    assert final["parallel"] == "fsdp" and final["step"] == 12


def test_parallel_accepts_ddp_or_fsdp_in_one_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qkvlab", "train", "parallel=zero3", f"out={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "parallel" in result.stderr and "ddp or fsdp" in result.stderr


def test_a_checkpoint_rank_0_finds_damaged_is_skipped_on_every_rank(corpus, tmp_path) -> None:
    """Non-finite weights behind valid checksums: only rank 0 reads the tensors, so only it can tell; every
    rank must still move on to the same older checkpoint."""
    from qkvlab.train.checkpoint import _write_checksums

    settings = tiny_gpt_settings(corpus, tmp_path / "x", **{"model.dropout": "0.0"})  # checkpoints every 4
    whole = _train({**settings, "out": str(tmp_path / "whole")}, 1)
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "run"
    first = _train({**settings, "out": str(run), "parallel": "fsdp", "stop_at": "8"}, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    newest = run / "checkpoint-00000008"
    weights = load_file(newest / "model.safetensors")
    weights["blocks.0.attn.q_proj.weight"][0, 0] = float("nan")
    save_file(weights, newest / "model.safetensors")
    _write_checksums(newest)

    again = _resume(run, 2, "parallel=fsdp")
    assert again.returncode == 0, again.stderr[-3000:]
    reason = "skipping checkpoint-00000008: model.safetensors holds non-finite values in blocks.0.attn.q_proj.weight"
    assert reason in again.stderr
    assert train_losses(run) == pytest.approx(train_losses(tmp_path / "whole"), rel=1e-5)  # from step 4 on
