"""``qkvlab repro logits``: the pilot's rules (learning rate, τ), the spike count, and the whole grid on a
tiny setting."""

from __future__ import annotations

import json
import math

import pytest

from qkvlab.cli import main
from qkvlab.repro.logits import claim

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60


def test_the_pilot_picks_the_largest_rate_within_tolerance_and_tau_from_adamws_peak() -> None:
    losses = {1e-3: 2.00, 2e-3: 1.95, 4e-3: 2.04, 8e-3: math.inf}
    assert claim.choose_lr(losses) == 4e-3  # 2.04 ≤ 1.95·1.05; 8e-3 stopped
    assert claim.choose_lr({1e-3: 2.0, 2e-3: 2.2}) == 1e-3
    with pytest.raises(ValueError):
        claim.choose_lr({1e-3: math.inf})
    assert claim.tau_from(23.46) == 12.0 and claim.tau_from(7.77) == 3.9


def test_a_spike_is_a_loss_above_the_factor_times_the_median_of_the_window_before_it() -> None:
    calm = [2.0] * 15
    assert claim.loss_spikes(calm) == 0
    assert claim.loss_spikes([*calm, 2.7, 2.0]) == 1  # 2.7 > 1.3·2.0
    assert claim.loss_spikes([*calm, 2.5]) == 0
    assert claim.loss_spikes([9.0] * 5 + calm, skip=12) == 0  # the warm-up's losses are not counted


def test_the_grid_runs_pilot_then_decay_by_clip_and_clipping_binds_where_the_rule_says(tmp_path) -> None:
    corpus = tmp_path / "austen.txt"
    corpus.write_text(TEXT)
    changes = {
        "data": f"text:{corpus}",
        "seq_len": 16,
        "batch_size": 4,
        "max_steps": 8,
        "warmup_steps": 2,
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.d_model": 16,
        "model.d_head": 8,
        "model.d_mlp": 32,
        "eval_every": 4,
        "eval_batches": 2,
        "spectra_every": 2,
        "checkpoint_every": 4,
        "log_every": 1,
    }
    out = tmp_path / "logits"
    sets = [x for k, v in changes.items() for x in ("--set", f"{k}={v}")]
    assert main(["repro", "logits", "--out", str(out), "--seeds", "0", "--budgets", "0,1", *sets]) == 0

    pilot = json.loads((out / "pilot.json").read_text())
    for o in claim.OPTIMIZERS:
        losses = {float(lr): (math.inf if r is None else r["val_loss"]) for lr, r in pilot[o]["runs"].items()}
        assert pilot[o]["chosen"] == claim.choose_lr(losses)
        assert set(losses) >= set(claim.LR_LADDER)
    peak = pilot["adamw"]["runs"][f"{pilot['adamw']['chosen']:g}"]["logit_peak"]
    assert pilot["tau"] == claim.tau_from(peak)

    summary = json.loads((out / "summary.json").read_text())
    cells = {(c["optimizer"], c["budget"], bool(c["clip"])): c for c in summary["cells"]}
    assert set(cells) == {(o, b, k) for o in claim.OPTIMIZERS for b in (0.0, 1.0) for k in (False, True)}
    plain, clipped = cells[("adamw", 0.0, False)], cells[("adamw", 0.0, True)]
    assert plain["measures"]["clipped_heads"]["mean"] == 0
    assert clipped["measures"]["clipped_heads"]["mean"] > 0  # τ is half the pilot's peak: it binds
    config = json.loads(
        (
            out
            / "runs"
            / claim.run_name(
                {"variant": "muon", "budget": 1.0, "lr": pilot["muon"]["chosen"], "qk_clip": pilot["tau"]}, 0
            )
            / "config.json"
        ).read_text()
    )
    assert config["optimizer"] == "muon" and config["qk_clip"] == pilot["tau"]
    assert config["overrides"]["q"]["weight_decay"] > 0 and config["overrides"]["embed"]["weight_decay"] == 0

    # the tables and both figures from the folder alone
    plots = tmp_path / "plots"
    assert main(["repro", "logits", "--out", str(out), "--summary-only", "--plot", str(plots)]) == 0
    assert sorted(p.name for p in plots.iterdir()) == [
        "largest_logit_over_training.png",
        "logits_per_head.png",
    ]
    cell = cells[("adamw", 1.0, True)]
    assert (
        len(cell["per_head"]["max"][0]) == 1 and len(cell["per_head"]["max"][0][0]) == 2
    )  # 1 layer, 2 heads
    assert cell["trajectory"]["steps"] == [2, 4, 6, 8]
