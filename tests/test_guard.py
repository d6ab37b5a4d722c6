"""The rank guard: the controller's rule, its place in the optimiser's groups, the trainer and the HF Trainer."""

from __future__ import annotations

import gzip
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvlab.errors import UserError
from qkvlab.guard import RankGuard, broadcast_decay, guarded_groups

D_HEAD = 32


def _groups(lam: float = 0.1, layers: int = 2) -> list[dict]:
    groups = []
    for layer in range(layers):
        for role in ("q", "k", "v", "o"):
            name = f"blocks.{layer}.attn.{role}_proj.weight"
            groups.append(
                {"role": role, "layer": layer, "param_names": [name], "lr": 1e-3, "weight_decay": lam}
            )
    groups.append({"role": "mlp", "param_names": ["blocks.0.mlp.fc.weight"], "lr": 1e-3, "weight_decay": 0.1})
    return groups


def _record(erank: dict[tuple[int, str], list[float]]) -> dict:
    heads = [
        {"layer": layer, "head": h, "product": product, "effective_rank": value}
        for (layer, product), values in erank.items()
        for h, value in enumerate(values)
    ]
    return {"architecture": {"d_head": D_HEAD}, "heads": heads}


def _lambda(groups: list[dict], layer: int, role: str) -> float:
    return next(g["weight_decay"] for g in groups if g.get("layer") == layer and g["role"] == role)


def test_lambda_follows_the_smallest_head_per_layer_and_pair() -> None:
    guard = RankGuard(target_qk=0.5, target_ov=0.25, kappa=2.0)
    groups = _groups()
    record = _record(
        {
            (0, "qk"): [30.0, 24.0],  # room above 16: λ rises by e^(2·8/32)
            (0, "ov"): [3.0, 20.0],  # the smallest head is 5 under 8: λ falls by e^(2·(−5)/32)
            (1, "qk"): [16.0, 16.0],  # at the target: λ stays
            (1, "ov"): [8.5, 9.0],
        }
    )
    logged = guard.update(record, groups)
    assert _lambda(groups, 0, "q") == _lambda(groups, 0, "k") == pytest.approx(0.1 * math.exp(0.5))
    assert _lambda(groups, 0, "v") == _lambda(groups, 0, "o") == pytest.approx(0.1 * math.exp(-10 / 32))
    assert _lambda(groups, 1, "q") == pytest.approx(0.1)
    assert _lambda(groups, 1, "v") == pytest.approx(0.1 * math.exp(2 * 0.5 / 32))
    assert groups[-1]["weight_decay"] == 0.1  # the MLP is not guarded
    assert logged["L0/ov_erank_min"] == 3.0 and logged["L0/qk_lambda"] == pytest.approx(0.1 * math.exp(0.5))


def test_a_rank_drop_lowers_lambda_and_a_rise_raises_it_within_bounds() -> None:
    guard = RankGuard(target_qk=0.5, lambda_min=0.01, lambda_max=1.0)
    groups = _groups(0.1, layers=1)
    seen = []
    # the rank starts high, then falls under the target (decay too strong), then recovers
    for erank in (31, 31, 31, 31, 31, 12, 8, 4, 4, 4, 4, 4, 4, 20, 28, 28):
        guard.update(_record({(0, "qk"): [erank, erank + 1]}), groups)
        seen.append(_lambda(groups, 0, "q"))
    rising, falling, recovering = seen[:5], seen[5:13], seen[13:]
    assert all(b > a for a, b in itertools.pairwise(rising) if a < 1.0)
    assert seen[3] == seen[4] == 1.0  # held at λ_max
    assert all(b < a for a, b in itertools.pairwise(falling) if b > 0.01)
    assert seen[12] == 0.01  # held at λ_min
    assert recovering[0] > seen[12] and recovering[-1] > recovering[0]
    assert _lambda(groups, 0, "v") == 0.1  # (v, o) has no target: untouched


@settings(max_examples=300, deadline=None)
@given(
    lam=st.floats(1e-3, 10.0),
    erank=st.floats(0.0, D_HEAD),
    target=st.floats(0.01, 1.0),
    kappa=st.floats(0.01, 20.0),
)
def test_one_step_moves_toward_the_target_and_stays_in_bounds(lam, erank, target, kappa) -> None:
    guard = RankGuard(target_qk=target, kappa=kappa, lambda_min=1e-3, lambda_max=10.0)
    new = guard.step(lam, erank, target, D_HEAD)
    assert 1e-3 <= new <= 10.0
    gap = erank - target * D_HEAD
    if gap > 0:
        assert new >= lam or new == 10.0 or math.isclose(new, lam)
    elif gap < 0:
        assert new <= lam or new == 1e-3 or math.isclose(new, lam)
    assert new <= lam * math.exp(kappa) * (1 + 1e-12)  # at most e^κ per firing


def test_groups_must_be_split_by_layer_and_decoupled() -> None:
    shared = [{"role": "q", "param_names": ["blocks.0.attn.q_proj.weight"], "lr": 1e-3, "weight_decay": 0.1}]
    with pytest.raises(UserError, match='per_layer="q,k,v,o"'):
        guarded_groups(shared, {"qk": 0.5})
    coupled = [{**_groups()[0], "l2": 0.1, "weight_decay": 0.0}]
    with pytest.raises(UserError, match="decoupled"):
        guarded_groups(coupled, {"qk": 0.5})
    for bad in ({"target_qk": 0.0}, {"target_qk": 1.5}, {}, {"target_qk": 0.5, "kappa": 0}):
        with pytest.raises(UserError):
            RankGuard(**bad)
    with pytest.raises(UserError, match="λ_min"):
        RankGuard(target_ov=0.5, lambda_min=1.0, lambda_max=0.1)


def _broadcast_on_rank(rank: int, init: str, out: str) -> None:
    """One of two Gloo ranks: each starts from its own λ (rank 1's differ in the last bits), then
    broadcast_decay gives both rank 0's; the mlp group is not the guard's and keeps its own."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        groups = _groups()
        for i, group in enumerate(groups):
            group["base_weight_decay"] = group["weight_decay"] = 0.1 * (i + 1) + rank * 1e-15
        broadcast_decay(RankGuard(target_qk=0.5, target_ov=0.5), groups)
        Path(out, f"rank{rank}.json").write_text(json.dumps([g["weight_decay"] for g in groups]))
    finally:
        dist.destroy_process_group()


def test_broadcast_decay_gives_every_rank_rank_zeros_lambda(tmp_path) -> None:
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_broadcast_on_rank, args=(init, str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero[:-1] == one[:-1] == [0.1 * (i + 1) for i in range(8)]  # the eight q, k, v, o groups
    assert one[-1] != zero[-1]  # the mlp group is not guarded: untouched
    broadcast_decay(RankGuard(target_qk=0.5), groups := _groups(0.3))  # one process: a no-op
    assert [g["weight_decay"] for g in groups] == [g["weight_decay"] for g in _groups(0.3)]


def test_param_groups_split_attention_by_layer() -> None:
    from qkvlab.models import ModelConfig, build_model
    from qkvlab.optim import param_groups

    model = build_model(ModelConfig(vocab_size=20, seq_len=8, n_layer=3, n_head=2, d_model=16, d_mlp=32))
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, per_layer="q,k,v,o")
    q = [g for g in groups if g["role"] == "q"]
    assert [g["layer"] for g in q] == [0, 1, 2]
    assert all(n.startswith(f"blocks.{g['layer']}.") for g in q for n in g["param_names"])
    assert all("layer" not in g for g in groups if g["role"] not in ("q", "k", "v", "o"))
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())
    with pytest.raises(UserError, match="subset of q, k, v, o"):
        param_groups(model, lr=1e-3, weight_decay=0.1, per_layer="mlp")


# -- in qkvlab's trainer -------------------------------------------------------------------------

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60


def _config(tmp_path, name: str, **extra):
    from qkvlab.config import load_config

    corpus = tmp_path / "austen.txt"
    corpus.write_text(TEXT)
    return load_config(
        None,
        {
            "data": f"text:{corpus}",
            "seq_len": 16,
            "batch_size": 4,
            "max_steps": 12,
            "warmup_steps": 1,
            "lr": 0.01,
            "model.n_layer": 2,
            "model.n_head": 2,
            "model.d_model": 16,
            "eval_every": 0,
            "spectra_every": 3,
            "checkpoint_every": 6,
            "tensorboard": False,
            "progress": False,
            "weight_decay": 0.1,
            "rank_guard_qk": 0.6,
            "rank_guard_ov": 0.3,
            "rank_guard_kappa": 4.0,
            "out": str(tmp_path / name),
            **extra,
        },
    )


def _guard_lines(run_dir) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["split"] == "guard"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_guard_in_training_logs_every_lambda_and_resumes_bit_identically(tmp_path, optimizer) -> None:
    from safetensors.torch import load_file

    from qkvlab.config import saved_config
    from qkvlab.train import train

    straight = _config(tmp_path, "straight", optimizer=optimizer)
    train(straight)
    cut = _config(tmp_path, "cut", optimizer=optimizer, stop_at=6)
    train(cut)
    resumed = saved_config(tmp_path / "cut")
    resumed.stop_at = None
    train(resumed, resume=tmp_path / "cut")
    guard = _guard_lines(tmp_path / "straight")
    assert [x["step"] for x in guard] == [3, 6, 9, 12]
    assert set(guard[0]) >= {"L0/qk_lambda", "L1/qk_lambda", "L0/ov_lambda", "L1/ov_erank_min"}
    assert len({x["L0/qk_lambda"] for x in guard}) == 4  # it moved at every firing
    assert _guard_lines(tmp_path / "cut") == guard  # after the resume: the same λ, to the bit
    a = load_file(tmp_path / "straight" / "checkpoint-00000012" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint-00000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the λ the guard logged is the one the optimiser applies: from the checkpoint's groups
    state = json.loads((tmp_path / "straight" / "checkpoint-00000012" / "state.json").read_text())
    q1 = next(g for g in state["optimizer"]["param_groups"] if g["role"] == "q" and g.get("layer") == 1)
    assert q1["weight_decay"] == guard[-1]["L1/qk_lambda"]


def test_the_guard_refuses_what_it_cannot_do(tmp_path) -> None:
    from qkvlab.config import check_resume, saved_config
    from qkvlab.train import train

    for extra, message in (
        ({"optimizer": "adam"}, "optimizer=adamw or muon"),
        ({"spectra_every": 0}, "spectra_every > 0"),
        ({"rank_guard_qk": 2.0}, "fraction of d_head"),
    ):
        with pytest.raises(UserError, match=message):
            _config(tmp_path, "x", **extra)
    train(_config(tmp_path, "run", stop_at=6))
    changed = saved_config(tmp_path / "run")
    changed.spectra_every = 2  # the guard acts when the monitor fires: fixed for a guarded run
    with pytest.raises(UserError, match="spectra_every"):
        check_resume(saved_config(tmp_path / "run"), changed, tmp_path / "run")


# -- in the HF Trainer ---------------------------------------------------------------------------


class _Toy(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (n, 12), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_trainer(tmp_path, max_steps: int, per_layer: bool = True):
    import transformers as tf

    from qkvlab.hf import RankGuardCallback, create_optimizer

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
    )
    model = tf.LlamaForCausalLM(config)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=1e-2,
        weight_decay=0.1,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        logging_steps=2,
        save_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    optimizer = create_optimizer(model, args, per_layer="q,k,v,o" if per_layer else ())
    trainer = tf.Trainer(model=model, args=args, train_dataset=_Toy(), optimizers=(optimizer, None))
    callback = RankGuardCallback.install(trainer, target_qk=0.9, target_ov=0.5, kappa=4.0, every_n_steps=2)
    return trainer, optimizer, callback


def test_the_hf_callback_guards_each_layer_logs_and_resumes(tmp_path) -> None:
    trainer, optimizer, _ = _hf_trainer(tmp_path / "straight", 8)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "guard/L0/qk_lambda" in e]
    assert [e["step"] for e in logged] == [2, 4, 6, 8]
    assert {"guard/L1/ov_lambda", "guard/L1/qk_erank_min"} <= set(logged[0])
    final = {(g["role"], g.get("layer")): g["weight_decay"] for g in optimizer.param_groups}
    assert final[("q", 1)] == final[("k", 1)] == pytest.approx(logged[-1]["guard/L1/qk_lambda"])
    assert len({e["guard/L0/ov_lambda"] for e in logged}) == 4
    # resume from the step-4 checkpoint: the Trainer's optimizer state carries every λ
    again, optimizer2, _ = _hf_trainer(tmp_path / "straight", 8)
    again.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))
    resumed = {(g["role"], g.get("layer")): g["weight_decay"] for g in optimizer2.param_groups}
    assert resumed == pytest.approx(final)
    # an optimiser whose groups hold every layer together is refused, saying what to pass
    plain, _, _ = _hf_trainer(tmp_path / "plain", 2, per_layer=False)
    with pytest.raises(UserError, match="per_layer"):
        plain.train()


def test_spectra_and_guard_callbacks_share_one_measurement_per_firing(tmp_path, monkeypatch) -> None:
    import qkvlab.hf
    from qkvlab.hf import SpectraCallback

    calls = []
    measure = qkvlab.hf.inspect

    def counted(model, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(model)
        return measure(model, **kwargs)

    monkeypatch.setattr(qkvlab.hf, "inspect", counted)
    trainer, _, _ = _hf_trainer(tmp_path, 8)
    SpectraCallback.install(trainer, every_n_steps=2, per_layer=True)
    trainer.train()
    assert len(calls) == 4  # steps 2, 4, 6, 8: one measurement each, not one per callback
    logged = [e for e in trainer.state.log_history if "guard/L0/qk_lambda" in e]
    assert [e["step"] for e in logged] == [2, 4, 6, 8]
    for e in logged:  # both callbacks read the same report
        assert e["guard/L1/qk_erank_min"] == e["spectra/L1/qk_erank_min"]
    assert len({e["spectra/L0/qk_erank_min"] for e in logged}) == 4  # and fresh at every firing
    # a second training of the same model at the same step numbers measures afresh
    again, _, _ = _hf_trainer(tmp_path / "again", 2)
    again.train()
    assert len(calls) == 5


# -- repro rank-guard ------------------------------------------------------------------------------


def test_the_decay_integral_is_the_decay_the_optimiser_applied(tmp_path) -> None:
    """Σₜ η_t λ_t rebuilt from the logged λ trajectory equals the spectral monitor's per-step 2·η_t·λ_t (read
    from the live groups), summed: the guard's λ is applied from the step after each firing."""
    from qkvlab.config import load_config
    from qkvlab.grid.training import read_spectra
    from qkvlab.repro.rank_guard.claim import _read
    from qkvlab.train import train

    train(_config(tmp_path, "run", spectra_every=2, eval_every=12))
    result = _read(tmp_path / "run")
    records = read_spectra(tmp_path / "run")
    for pair in ("qk", "ov"):
        monitor = (
            sum(r["imbalance_decay_per_step"]["predicted_weight_decay_part"][pair] * 2 for r in records[1:])
            / 2
        )
        assert result["measures"][f"{pair}_eta_lambda"] == pytest.approx(monitor, rel=1e-9)
    assert load_config(None, {"rank_guard_qk": 0.5}).rank_guard().lambda_max == 10.0


def test_loss_at_rank_interpolates_between_the_bracketing_fixed_runs() -> None:
    from qkvlab.repro.rank_guard.claim import loss_at_rank

    points = [(8.0, 1.66), (2.0, 1.70), (4.0, 1.68)]  # (final rank, val loss), in any order
    assert loss_at_rank(points, 3.0) == pytest.approx(1.69)
    assert loss_at_rank(points, 6.0) == pytest.approx(1.67)
    assert loss_at_rank(points, 8.0) == pytest.approx(1.66)
    assert loss_at_rank(points, 1.9) is None and loss_at_rank(points, 8.1) is None  # never extrapolated
    assert loss_at_rank([(3.0, 1.5)], 3.0) is None  # one run brackets nothing


def test_repro_rank_guard_against_a_fixed_grid(tmp_path, capsys, monkeypatch) -> None:
    from qkvlab.cli import main

    corpus = tmp_path / "austen.txt"
    corpus.write_text(TEXT)
    changes = {
        "data": f"text:{corpus}",
        "seq_len": 16,
        "batch_size": 4,
        "max_steps": 9,
        "warmup_steps": 1,
        "lr": 0.01,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.d_model": 16,
        "model.d_head": 8,
        "model.d_mlp": 32,
        "eval_every": 9,
        "spectra_every": 3,
        "checkpoint_every": 9,
    }
    sets = [x for k, v in changes.items() for x in ("--set", f"{k}={v}")]
    fixed = tmp_path / "fixed"
    assert main(["repro", "wd-rank", "--out", str(fixed), "--lambdas", "0,3", "--seeds", "0,1", *sets]) == 0
    capsys.readouterr()
    out = tmp_path / "guard"
    args = ["repro", "rank-guard", "--out", str(out), "--reference", str(fixed), "--seeds", "0,1", *sets]
    assert main([*args, "--targets", "mild,strong", "--plot", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    fixed_loss = {c["attn"]: c["measures"]["val_loss"]["mean"] for c in summary["fixed"]}
    assert summary["best_fixed"] == min(fixed_loss, key=fixed_loss.get)
    assert [e["target"] for e in summary["targets"]] == ["mild", "strong"]
    mild, strong = summary["targets"]
    # the lower target lets the decay rise further, and its runs are compared seed by seed
    assert strong["measures"]["qk_eta_lambda"]["mean"] > mild["measures"]["qk_eta_lambda"]["mean"]
    assert mild["vs_best_fixed"]["val_loss"]["seeds"] == [0, 1]
    assert mild["lambda"]["steps"] == [3, 6, 9] and "L1/ov_lambda" in mild["lambda"]
    assert summary["runs"] == {
        "fixed_grid": 4,
        "fixed_grid_cells": 2,
        "guard_per_target": 2,
        "guard_all_targets": 4,
    }
    config = json.loads((out / "runs" / "target=mild,seed=0" / "config.json").read_text())
    assert (config["rank_guard_qk"], config["rank_guard_ov"], config["rank_guard_max"]) == (0.22, 0.4, 3.0)
    assert config["overrides"]["q"]["weight_decay"] == 0.1 and config["weight_decay"] == 0.1
    assert "| mild | 0.22, 0.4 (1.8, 3.2) | 2 |" in printed and "Runs: the fixed grid 4" in printed
    # "min" is what the guard holds: each layer's smallest head, averaged over layers, from the last record
    per_seed = []
    for seed in (0, 1):
        run = out / "runs" / f"target=mild,seed={seed}"
        opener = gzip.open if (run / "spectra.jsonl.gz").is_file() else open
        name = "spectra.jsonl.gz" if (run / "spectra.jsonl.gz").is_file() else "spectra.jsonl"
        with opener(run / name, "rt") as f:
            last = [json.loads(line) for line in f if line.strip()][-1]
        smallest = {}
        for h in last["heads"]:
            if h["product"] == "qk":
                smallest[h["layer"]] = min(smallest.get(h["layer"], 99.0), h["effective_rank"])
        assert len(smallest) == 2
        per_seed.append(sum(smallest.values()) / 2)
    assert mild["measures"]["qk_layer_min"]["mean"] == pytest.approx(sum(per_seed) / 2, rel=1e-12)
    assert mild["layer_min_over_time"]["qk"][-1] == pytest.approx(sum(per_seed) / 2, rel=1e-12)
    assert all(len(c["layer_min_over_time"]["qk"]) == 4 for c in summary["fixed"])  # steps 0, 3, 6, 9
    # post hoc: the guard against the fixed decays interpolated at its own final rank, seed by seed
    assert "Post hoc (not in the design fixed before the runs)" in printed
    from qkvlab.grid.training import read_training_run
    from qkvlab.repro.rank_guard.claim import _fixed_cells, _measures, loss_at_rank

    cells = _fixed_cells(fixed)
    compared = 0
    for e in summary["targets"]:
        for p in ("qk", "ov"):
            expected = {}
            for seed in (0, 1):
                guard = _measures(read_training_run(out / "runs" / f"target={e['target']},seed={seed}"))
                points = [(c["runs"][seed][f"{p}_layer_min"], c["runs"][seed]["val_loss"]) for c in cells]
                at = loss_at_rank(points, guard[f"{p}_layer_min"])
                if at is not None:
                    expected[seed] = guard["val_loss"] - at
            got = e["vs_fixed_at_rank"][p]
            if not expected:
                assert got is None
                continue
            compared += 1
            assert got["seeds"] == sorted(expected)
            assert got["mean"] == pytest.approx(sum(expected.values()) / len(expected), rel=1e-9)
    assert compared  # the tiny guard lands inside the fixed range for some target and product
    assert f"| {summary['targets'][0]['target']} | " in printed.split("Post hoc")[1]
    # one comparison table when the best fixed decay is no decay, two otherwise
    said_once = printed.count("Seed-paired differences") == 1
    assert said_once == (summary["best_fixed"] == 0)
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "guard_lambda.png",
        "guard_loss_vs_rank.png",
        "guard_rank_over_time.png",
    ]
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Rank guard (guard)" in md and "| mild | 0.22, 0.4 (1.8, 3.2) | 2 |" in md
    assert "Weight decay and attention rank" not in md  # not taken for a wd-rank folder
    assert main([*args, "--targets", "nope"]) == 2
    assert "accepted: a subset of mild, medium, strong" in capsys.readouterr().err
    assert main([*args, "--reference", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "holds no runs;" in err and "relative to" not in err  # an absolute path needs no hint
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--reference", "nowhere"]) == 2  # a relative one says where it was looked for
    assert (
        f"--reference nowhere holds no runs (it is relative to this folder, {tmp_path})"
        in capsys.readouterr().err
    )


def test_the_guards_lambdas_reach_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qkvlab.train import train

    train(_config(tmp_path, "run", tensorboard=True))
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"guard/L0/qk_lambda", "guard/L1/ov_lambda", "guard/L1/qk_erank_min"} <= tags
    logged = [x["L1/ov_lambda"] for x in _guard_lines(tmp_path / "run")]
    assert [e.value for e in events.Scalars("guard/L1/ov_lambda")] == pytest.approx(logged, rel=1e-6)
