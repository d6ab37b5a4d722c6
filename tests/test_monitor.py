"""qkvlab.Monitor from a plain PyTorch loop: the series it writes, its prediction, its sinks, its resume,
the rank guard and corrected weight decay without any framework."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import transformers as tf

import qkvlab
from qkvlab.inspection import InspectSeries

from conftest import tiny_bert_classifier


def _bert(seed: int = 0) -> tf.PreTrainedModel:
    return tiny_bert_classifier(seed)


def _batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(1, 64, (8, 12), generator=gen)
    return {"input_ids": ids, "labels": (ids[:, 0] % 2).long()}


def _setup(seed: int = 0, **groups) -> tuple:
    model = _bert(seed)
    optimizer = torch.optim.AdamW(qkvlab.param_groups(model, lr=1e-2, weight_decay=0.1, **groups))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 20)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, monitor, steps: range, lrs: list | None = None) -> None:
    for step in steps:
        model(**_batch(step)).loss.backward()
        if lrs is not None:
            lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(step)
        scheduler.step()


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_plain_loop_writes_the_versioned_series_with_the_schedule_averaged_prediction(tmp_path) -> None:
    model, optimizer, scheduler = _setup()
    monitor = qkvlab.Monitor(model, every=5, out=tmp_path, optimizer=optimizer)
    monitor.record(0)
    lrs: list[float] = []
    _train(model, optimizer, scheduler, monitor, range(1, 11), lrs)

    records = _lines(tmp_path / "spectra.jsonl")
    assert [r["step"] for r in records] == [0, 5, 10]
    assert all(r["series_version"] == 1 and r["kind"] == "inspect" for r in records)
    # 2·η_t·λ averaged over the steps of each interval, η_t the lr each optimizer.step() used
    for record, interval in zip(records[1:], (lrs[:5], lrs[5:]), strict=True):
        expected = statistics.fmean(2 * lr * 0.1 for lr in interval)
        predicted = record["imbalance_decay_per_step"]["predicted_weight_decay_part"]
        assert predicted["qk"] == pytest.approx(expected) and predicted["ov"] == pytest.approx(expected)
        assert record["gap_decay_per_step"]["predicted_range"]["qk"] == pytest.approx(
            [expected, 2 * expected]
        )
    # measured: −Δ ln(imbalance)/Δsteps, median over the heads, recomputed here from the two records
    before, now = records[1], records[2]
    for product in ("qk", "ov"):
        old = {(h["layer"], h["head"]): h["imbalance"] for h in before["heads"] if h["product"] == product}
        rates = [
            -math.log(h["imbalance"] / old[(h["layer"], h["head"])]) / 5
            for h in now["heads"]
            if h["product"] == product
        ]
        assert now["imbalance_decay_per_step"]["measured"][product] == pytest.approx(statistics.median(rates))
    assert records[0]["imbalance_decay_per_step"]["measured"] == {"qk": None, "ov": None}
    # the spectra are those of the weights at that step
    assert records[-1]["heads"][0]["singular_values"] == pytest.approx(
        qkvlab.inspect(model).heads[0]["singular_values"]
    )
    series = InspectSeries.from_jsonl(tmp_path / "spectra.jsonl")
    assert series.steps == [0, 5, 10]


def test_any_optimizer_is_read_by_parameter_identity_and_fused_qkv_counts_for_q_k_v(tmp_path) -> None:
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.02)
    monitor = qkvlab.Monitor(model, every=2, out=tmp_path / "series.jsonl", optimizer=optimizer)
    for step in (1, 2):
        ids = torch.randint(0, 64, (4, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(step)
    (record,) = _lines(tmp_path / "series.jsonl")
    assert record["imbalance_decay_per_step"]["predicted_weight_decay_part"] == pytest.approx(
        {"qk": 2 * 3e-3 * 0.02, "ov": 2 * 3e-3 * 0.02}
    )


def test_a_frozen_factor_gets_no_prediction() -> None:
    model = _bert()
    optimizer = torch.optim.AdamW(qkvlab.param_groups(model, lr=1e-3, weight_decay=0.1, train="q,v,o,head"))
    monitor = qkvlab.Monitor(model, every=1, optimizer=optimizer)
    record = monitor.record(1)
    predicted = record["imbalance_decay_per_step"]["predicted_weight_decay_part"]
    assert predicted["qk"] is None and predicted["ov"] is not None


def test_sinks_get_every_layer_and_the_rates(tmp_path) -> None:
    class Writer:
        def __init__(self) -> None:
            self.scalars: list[tuple[str, float, int]] = []

        def add_scalar(self, tag, value, step) -> None:
            self.scalars.append((tag, value, step))

    logged: list[tuple[dict, int]] = []
    writer = Writer()
    model, optimizer, scheduler = _setup()
    monitor = qkvlab.Monitor(
        model, every=3, optimizer=optimizer, writer=writer, log=lambda m, step: logged.append((m, step))
    )
    _train(model, optimizer, scheduler, monitor, range(1, 7))
    assert [step for _, step in logged] == [3, 6]
    tags = {tag for tag, _, step in writer.scalars if step == 6}
    assert tags == set(logged[1][0])
    assert {"spectra/L0/qk_erank_mean", "spectra/L1/ov_gap_mean", "spectra/qk_erank_mean"} <= tags
    assert {"spectra/qk_imbalance_decay_predicted", "spectra/ov_imbalance_decay_measured"} <= tags
    assert "spectra/ov_imbalance_decay_measured" not in logged[0][0]  # nothing to measure against yet
    assert not (tmp_path / "spectra.jsonl").exists()  # out=None writes no file


def test_state_dict_resumes_exactly_as_an_uninterrupted_loop(tmp_path) -> None:
    model, optimizer, scheduler = _setup()
    whole = qkvlab.Monitor(model, every=4, out=tmp_path / "whole", optimizer=optimizer)
    _train(model, optimizer, scheduler, whole, range(1, 11))

    model, optimizer, scheduler = _setup()
    first = qkvlab.Monitor(model, every=4, out=tmp_path / "first", optimizer=optimizer)
    _train(model, optimizer, scheduler, first, range(1, 7))  # stops mid-interval (steps 5, 6 accumulated)
    saved = json.loads(json.dumps(first.state_dict()))  # it is plain JSON
    states = (model.state_dict(), optimizer.state_dict(), scheduler.state_dict())

    model, optimizer, scheduler = _setup(seed=1)
    model.load_state_dict(states[0])
    optimizer.load_state_dict(states[1])
    scheduler.load_state_dict(states[2])
    # a new file: the previous firing's values come from the state alone
    resumed = qkvlab.Monitor(model, every=4, out=tmp_path / "resumed", optimizer=optimizer)
    resumed.load_state_dict(saved)
    _train(model, optimizer, scheduler, resumed, range(7, 11))

    (expected,) = [r for r in _lines(tmp_path / "whole" / "spectra.jsonl") if r["step"] == 8]
    (got,) = _lines(tmp_path / "resumed" / "spectra.jsonl")
    for block in ("imbalance_decay_per_step", "gap_decay_per_step"):
        assert got[block] == expected[block]  # bit for bit: the same sums in the same order
    assert got["imbalance_decay_per_step"]["measured"]["qk"] is not None


def test_rank_guard_from_a_plain_loop(tmp_path) -> None:
    model, optimizer, scheduler = _setup(per_layer="q,k,v,o")
    guard = qkvlab.Monitor(
        model, every=2, optimizer=optimizer, guard=qkvlab.RankGuard(target_qk=0.9, kappa=2.0)
    )
    start = {
        g["layer"]: g["weight_decay"]
        for g in optimizer.param_groups
        if g["role"] == "q" and g["weight_decay"]
    }
    _train(model, optimizer, scheduler, guard, range(1, 3))
    record = guard.record(
        2
    )  # the measurement the guard acted on is the current weights' (no step in between)
    for layer, lam in start.items():
        erank = min(
            h["effective_rank"] for h in record["heads"] if h["layer"] == layer and h["product"] == "qk"
        )
        once = lam * math.exp(2.0 * (erank - 0.9 * 8) / 8)
        # two firings at the same weights: the rule applied twice
        expected = once * math.exp(2.0 * (erank - 0.9 * 8) / 8)
        for group in optimizer.param_groups:
            if group.get("layer") == layer and group["role"] in ("q", "k") and group["weight_decay"]:
                assert group["weight_decay"] == pytest.approx(expected)
        assert record["guard"][f"L{layer}/qk_lambda"] == pytest.approx(expected)
    # the ov pair has no target: its decay stays
    assert {g["weight_decay"] for g in optimizer.param_groups if g["role"] in ("v", "o")} <= {0.1, 0.0}


def test_rank_guard_refusals_are_one_line() -> None:
    model, optimizer, _ = _setup()
    with pytest.raises(qkvlab.UserError, match="optimizer="):
        qkvlab.Monitor(model, guard=qkvlab.RankGuard(target_qk=0.5))
    with pytest.raises(qkvlab.UserError, match="per_layer"):
        qkvlab.Monitor(model, optimizer=optimizer, guard=qkvlab.RankGuard(target_qk=0.5))
    with pytest.raises(qkvlab.UserError, match="every"):
        qkvlab.Monitor(model, every=0)


def test_corrected_weight_decay_from_a_plain_loop() -> None:
    model, optimizer, scheduler = _setup()
    qkvlab.corrected_weight_decay(optimizer, "q,k")
    for step in range(1, 6):
        model(**_batch(step)).loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            base = group.get("base_weight_decay", group["weight_decay"])
            if group["role"] in ("q", "k") and base:
                assert group["weight_decay"] == pytest.approx(0.1 * group["lr"] / 1e-2)
            elif group["role"] == "v" and base:
                assert group["weight_decay"] == 0.1
        optimizer.zero_grad()
        scheduler.step()
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(qkvlab.UserError, match="param_groups"):
        qkvlab.corrected_weight_decay(plain, "q")


def test_a_newer_series_version_is_refused_in_one_line(tmp_path) -> None:
    model = _bert()
    qkvlab.record_spectra(model, tmp_path / "spectra.jsonl", 1)
    line = json.loads((tmp_path / "spectra.jsonl").read_text())
    assert line["series_version"] == 1
    (tmp_path / "spectra.jsonl").write_text(json.dumps({**line, "series_version": 99}) + "\n")
    with pytest.raises(qkvlab.UserError, match=r"series_version 99.*upgrade"):
        InspectSeries.from_jsonl(tmp_path / "spectra.jsonl")


def test_report_overlays_several_monitor_folders_with_rank_at_rtol(tmp_path) -> None:
    from qkvlab.cli import main

    for name, lr in (("slow", 1e-3), ("fast", 3e-2)):
        model = _bert()
        optimizer = torch.optim.AdamW(qkvlab.param_groups(model, lr=lr, weight_decay=0.1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        monitor = qkvlab.Monitor(model, every=2, out=tmp_path / name, optimizer=optimizer)
        monitor.record(0)
        _train(model, optimizer, scheduler, monitor, range(1, 5))
    assert main(["report", str(tmp_path / "slow"), str(tmp_path / "fast"), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.md").read_text()
    assert "## 2 runs overlaid" in page
    assert "## Over 3 checkpoints: slow" in page and "## Over 3 checkpoints: fast" in page
    assert "rank at rtol" in page
    figures = {p.name for p in (tmp_path / "r" / "figures").iterdir()}
    assert any(name.endswith("_overlay.png") for name in figures), figures
