"""``qkvlab repro logits``: the pilot's rules (learning rate, τ), the spike count, and the whole grid on a
tiny setting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qkvlab.cli import main
from qkvlab.repro.logits import claim

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60


def test_the_pilot_picks_the_largest_rate_within_tolerance_and_tau_from_adamws_peak() -> None:
    losses = {1e-3: 2.00, 2e-3: 1.95, 4e-3: 1.965, 8e-3: math.inf}
    assert claim.choose_lr(losses) == 4e-3  # 1.965 ≤ 1.95 + 0.02 nats; 8e-3 stopped
    assert claim.choose_lr({**losses, 4e-3: 1.975}) == 2e-3  # 0.025 nats worse: too far
    assert claim.choose_lr({1e-3: 2.0, 2e-3: 2.2}) == 1e-3
    with pytest.raises(ValueError):
        claim.choose_lr({1e-3: math.inf})
    assert claim.tau_from(23.46) == 12.0 and claim.tau_from(7.77) == 3.9


def test_a_ladder_grows_only_while_its_rate_could_become_the_common_one() -> None:
    top = {"adamw": 8e-3, "muon": 8e-3}
    assert claim.ladders_to_grow({"adamw": 8e-3, "muon": 8e-3}, top) == ["adamw", "muon"]  # both at the edge
    assert claim.ladders_to_grow({"adamw": 4e-3, "muon": 8e-3}, top) == []  # AdamW's 4e-3 is the common rate
    assert claim.ladders_to_grow({"adamw": 8e-3, "muon": 2e-3}, top) == []
    # Muon settled at 16e-3 after one growth: AdamW at its edge of 8e-3 could still be the common rate
    assert claim.ladders_to_grow({"adamw": 8e-3, "muon": 16e-3}, {"adamw": 8e-3, "muon": 32e-3}) == ["adamw"]
    assert claim.ladders_to_grow({"adamw": 2e-3, "muon": 2e-3}, top) == []


def test_top_heads_are_the_heads_with_the_largest_logit_at_any_firing() -> None:
    per_head = [  # [firing][layer][head]
        [[1.0, 9.0], [2.0, 3.0]],
        [[4.0, 1.0], [8.5, 3.5]],
        [[2.0, 2.0], [7.0, 9.5]],
    ]
    assert claim.top_heads(per_head, 3) == [[1, 1, 9.5], [0, 1, 9.0], [1, 0, 8.5]]
    assert claim.top_heads([], 3) == []


def test_a_spike_is_a_loss_above_the_factor_times_the_median_of_the_window_before_it() -> None:
    calm = [2.0] * 15
    assert claim.loss_spikes(calm) == 0
    assert claim.loss_spikes([*calm, 2.7, 2.0]) == 1  # 2.7 > 1.3·2.0
    assert claim.loss_spikes([*calm, 2.5]) == 0
    assert claim.loss_spikes([9.0] * 5 + calm, skip=12) == 0  # the warm-up's losses are not counted
    assert claim.loss_jump([*calm, 2.5, 2.0]) == pytest.approx(1.25)  # the largest ratio, spike or not
    assert claim.loss_jump([9.0] * 5 + calm, skip=15) == pytest.approx(1.0)


def _tiny_sets(tmp_path: Path) -> list[str]:
    """--set pairs for a study of 8-step runs of a one-layer GPT on a small text."""
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
    return [x for k, v in changes.items() for x in ("--set", f"{k}={v}")]


def test_the_grid_runs_pilot_then_decay_by_clip_and_clipping_binds_where_the_rule_says(
    tmp_path, monkeypatch
) -> None:
    # 8 steps are too few for logits to grow 1.5×: the floor is lowered so that the grid runs
    monkeypatch.setattr(claim, "GROWTH_INFORMATIVE", 0.0)
    out = tmp_path / "logits"
    sets = _tiny_sets(tmp_path)
    assert main(["repro", "logits", "--out", str(out), "--seeds", "0", "--budgets", "0,1", *sets]) == 0

    pilot = json.loads((out / "pilot.json").read_text())
    for o in claim.OPTIMIZERS:
        losses = {float(lr): (math.inf if r is None else r["val_loss"]) for lr, r in pilot[o]["runs"].items()}
        assert pilot[o]["usable"] == claim.choose_lr(losses)
        assert set(losses) >= set(claim.LR_LADDER)
    assert pilot["lr"] == min(pilot[o]["usable"] for o in claim.OPTIMIZERS)  # one rate for both
    peak = pilot["adamw"]["runs"][f"{pilot['lr']:g}"]["logit_peak"]
    assert pilot["tau"] == claim.tau_from(peak)
    muon_peak = pilot["muon"]["runs"][f"{pilot['lr']:g}"]["logit_peak"]
    assert pilot["muon_peak_over_tau"] == pytest.approx(muon_peak / pilot["tau"])
    assert pilot["informative"] == (pilot["adamw_growth"] is not None and pilot["adamw_growth"] >= 0.0)

    summary = json.loads((out / "summary.json").read_text())
    cells = {(c["optimizer"], c["budget"], bool(c["clip"])): c for c in summary["cells"]}
    assert set(cells) == {(o, b, k) for o in claim.OPTIMIZERS for b in (0.0, 1.0) for k in (False, True)}
    assert {c["lr"] for c in summary["cells"]} == {pilot["lr"]}
    plain, clipped = cells[("adamw", 0.0, False)], cells[("adamw", 0.0, True)]
    assert plain["measures"]["clipped_heads"]["mean"] == 0
    assert clipped["measures"]["clipped_heads"]["mean"] > 0  # τ is half the pilot's peak: it binds

    def run_dir(optimizer: str, budget: float, clip: float) -> Path:
        point = {"variant": optimizer, "budget": budget, "lr": pilot["lr"], "qk_clip": clip}
        return out / "runs" / claim.run_name(point, 0)

    config = json.loads((run_dir("muon", 1.0, pilot["tau"]) / "config.json").read_text())
    assert config["optimizer"] == "muon" and config["qk_clip"] == pilot["tau"] and config["logit_every"] == 1
    assert config["muon_ns_dtype"] == "float32"  # the design's, for cost on CPUs without native bfloat16
    decays = {role: config["overrides"][role]["weight_decay"] for role in ("q", "k", "v", "o", "embed")}
    assert decays["q"] == decays["k"] > 0 and decays["v"] == decays["o"] == decays["embed"] == 0
    # every step of an unclipped run is measured as a clipped run's is: the peak is the largest logged
    lines = (run_dir("adamw", 0.0, 0.0) / "metrics.jsonl").read_text().splitlines()
    logged = [x["logit_max"] for x in map(json.loads, lines) if x["split"] == "train"]
    assert len(logged) == 8 and plain["measures"]["logit_peak"]["mean"] == pytest.approx(max(logged))
    assert plain["over_tau"]["mean"] == sum(v > pilot["tau"] for v in logged)

    # the readings, each from the cells it names
    found = summary["readings"]
    decay = [r for r in found if r["question"] == "decay against QK-clip"]
    assert {(r["optimizer"], r["budget"]) for r in decay} == {(o, 1.0) for o in claim.OPTIMIZERS}
    (adamw,) = [r for r in decay if r["optimizer"] == "adamw"]
    expected = (
        cells[("adamw", 1.0, False)]["measures"]["logit_peak"]["mean"]
        - clipped["measures"]["logit_peak"]["mean"]
    )
    assert adamw["peak"]["mean"] == pytest.approx(expected)
    assert {r["question"] for r in found} == {
        "decay against QK-clip",
        "QK-clip changes QK rank",
        "needs clipping",
        "Muon against AdamW",
    }

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
    assert cell["per_head"]["steps"] == [2, 4, 6, 8] and cell["trajectory"]["steps"] == [8]


def test_the_readings_follow_the_rules_fixed_before_any_run() -> None:
    def runs(peaks: list[float], ranks: list[float], loss: float) -> dict[int, dict]:
        return {
            s: {"measures": {"logit_peak": peaks[s], "qk_effective_rank": ranks[s], "val_loss": loss}}
            for s in range(3)
        }

    grid = {  # (optimiser, Σηλ, clipped) → seed → run
        ("adamw", 0.0, False): runs([20, 21, 22], [20.0, 20.0, 20.0], 1.5),
        ("adamw", 0.0, True): runs([11, 11, 11], [19.8, 19.85, 19.9], 1.6),
        ("adamw", 1.0, False): runs([9, 10, 10.5], [15.0] * 3, 1.55),
        ("adamw", 1.0, True): runs([9, 10, 10.5], [14.95] * 3, 1.55),
        ("muon", 0.0, False): runs([30, 30, 30], [28.0] * 3, 1.4),
        ("muon", 0.0, True): runs([11, 11, 11], [28.0] * 3, 1.45),
        ("muon", 1.0, False): runs([12, 9, 14], [27.0] * 3, 1.42),
        ("muon", 1.0, True): runs([11, 9, 11], [27.0] * 3, 1.43),
    }
    tau = 10.0
    cells = [
        {
            "optimizer": o,
            "budget": b,
            "clip": tau if c else 0.0,
            "seeds": [0, 1, 2],
            "stopped": [],
            "seeds_over_tau": sum(r["measures"]["logit_peak"] > tau for r in found.values()),
        }
        for (o, b, c), found in grid.items()
    ]
    found = claim.readings(cells, tau, lambda o, b, c: grid.get((o, b, c), {}))
    decay = {r["optimizer"]: r for r in found if r["question"] == "decay against QK-clip"}
    assert decay["adamw"]["peak"]["mean"] == pytest.approx(-(2 + 1 + 0.5) / 3)  # 9−11, 10−11, 10.5−11
    assert decay["adamw"]["reading"] == "as low as QK-clip or lower"
    assert decay["muon"]["reading"] == "mixed"  # 12 > 11, 9 = 9, 14 > 11
    rank = {
        (r["optimizer"], r["budget"]): r["reading"]
        for r in found
        if r["question"] == "QK-clip changes QK rank"
    }
    assert rank[("adamw", 0.0)] == "lower on every seed"  # −0.2, −0.15, −0.1: every seed, mean ≥ 0.1
    assert rank[("adamw", 1.0)] == "within seed noise"  # −0.05 on every seed: below the floor
    needs = {r["budget"]: r for r in found if r["question"] == "needs clipping"}
    assert needs[0.0]["needs"] == {"adamw": True, "muon": True} and needs[0.0]["reading"] == "both need it"
    assert needs[1.0]["needs"] == {"adamw": False, "muon": True}  # 1 of 3 seeds over τ against 2 of 3
    assert needs[1.0]["reading"] == "Muon needs clipping where AdamW does not"
    # a run that stopped on a non-finite value counts as passing τ: 1 over + 1 stopped of 3 is a majority
    (adamw,) = [c for c in cells if (c["optimizer"], c["budget"], c["clip"]) == ("adamw", 1.0, 0.0)]
    adamw.update(seeds=[0, 1], stopped=[2], seeds_over_tau=1)
    found = claim.readings(cells, tau, lambda o, b, c: grid.get((o, b, c), {}))
    assert [
        r["needs"]["adamw"] for r in found if r["question"] == "needs clipping" and r["budget"] == 1.0
    ] == [True]

    # a grid still running gives no verdict: seed 2 of Muon at Σηλ = 1 without the clip has not ended
    cells[6].update(seeds=[0, 1], seeds_over_tau=1)
    del grid[("muon", 1.0, False)][2]
    found = claim.readings(cells, tau, lambda o, b, c: grid.get((o, b, c), {}))
    waiting = {
        (r["question"], r.get("optimizer"), r["budget"]): r["reading"] for r in found if "reading" in r
    }
    assert waiting[("decay against QK-clip", "muon", 1.0)] == "pending (2 of 3 seeds)"
    assert waiting[("QK-clip changes QK rank", "muon", 1.0)] == "pending (2 of 3 seeds)"
    assert waiting[("needs clipping", None, 1.0)] == "pending (2 of 3 seeds)"
    assert waiting[("decay against QK-clip", "adamw", 1.0)] == "as low as QK-clip or lower"  # all ended


def test_a_stopped_run_is_never_dropped_from_a_seed_paired_reading() -> None:
    """A run that stopped on a non-finite value has no final measures; the readings must not pair the
    other seeds as if it had not run (issue 34's design: stopped runs are counted, never dropped)."""

    def finished(peak: float, rank: float = 20.0) -> dict:
        return {"measures": {"logit_peak": peak, "qk_effective_rank": rank, "val_loss": 1.5}}

    stopped = {"stopped": "loss is nan at step 900", "logit_max": [40.0]}
    tau = 10.0
    grid = {
        ("adamw", 0.0, False): {0: finished(20), 1: finished(21), 2: finished(22)},
        ("adamw", 0.0, True): {0: finished(11), 1: finished(11), 2: finished(11)},
        ("adamw", 1.0, False): {0: finished(9), 1: finished(10), 2: stopped},  # lower on 2, stopped on 1
        ("adamw", 1.0, True): {0: finished(11, 19), 1: finished(11, 19), 2: finished(11, 19)},
        ("muon", 0.0, False): {0: finished(30), 1: finished(30), 2: finished(30)},
        ("muon", 0.0, True): {0: stopped, 1: finished(11), 2: finished(11)},
        ("muon", 1.0, False): {0: finished(9), 1: finished(9), 2: finished(9)},
        ("muon", 1.0, True): {0: finished(9), 1: finished(9), 2: finished(9)},
    }
    cells = [
        {
            "optimizer": o,
            "budget": b,
            "clip": tau if c else 0.0,
            "seeds": sorted(s for s, r in runs.items() if "stopped" not in r),
            "stopped": sorted(s for s, r in runs.items() if "stopped" in r),
            "seeds_over_tau": sum(
                r["measures"]["logit_peak"] > tau for r in runs.values() if "measures" in r
            ),
        }
        for (o, b, c), runs in grid.items()
    ]
    found = claim.readings(cells, tau, lambda o, b, c: grid.get((o, b, c), {}))
    decay = {r["optimizer"]: r["reading"] for r in found if r["question"] == "decay against QK-clip"}
    # AdamW: two finished seeds lower than the clip, but seed 2 diverged without it: not "as low"
    assert decay["adamw"] == "mixed"
    # Muon: the decay run finished under τ on every seed, while the clipped seed 0 diverged: as low
    assert decay["muon"] == "as low as QK-clip or lower"
    rank = {
        (r["optimizer"], r["budget"]): r["reading"]
        for r in found
        if r["question"] == "QK-clip changes QK rank"
    }
    assert rank[("adamw", 1.0)] == "no verdict (seed 2 stopped)"  # not a verdict from seeds 0 and 1
    assert rank[("muon", 0.0)] == "no verdict (seed 0 stopped)"
    assert rank[("muon", 1.0)] == "within seed noise"
    versus = [r for r in found if r["question"] == "Muon against AdamW" and r["budget"] == 0.0 and r["clip"]]
    assert versus[0]["stopped"] == {"muon": [0], "adamw": []} and versus[0]["logit_peak"]["n"] == 2
    # and when every seed of the decay run diverged, it is higher than the clip on every seed
    grid[("adamw", 1.0, False)] = {s: stopped for s in range(3)}
    cells[2].update(seeds=[], stopped=[0, 1, 2], seeds_over_tau=0)
    found = claim.readings(cells, tau, lambda o, b, c: grid.get((o, b, c), {}))
    decay = {r["optimizer"]: r["reading"] for r in found if r["question"] == "decay against QK-clip"}
    assert decay["adamw"] == "higher than QK-clip on every seed"


def test_without_logit_growth_in_the_pilot_the_grid_is_not_run(tmp_path, monkeypatch) -> None:
    record = {o: {"usable": 4e-3, "at_edge": False, "runs": {}} for o in claim.OPTIMIZERS} | {
        "lr": 4e-3,
        "tau": 6.1,
        "muon_peak_over_tau": 1.4,
        "adamw_growth": 1.2,
        "informative": False,
    }
    stages: list[str] = []
    monkeypatch.setattr(claim, "pilot", lambda *a, **k: record)
    monkeypatch.setattr(claim, "_grid", lambda out, runs, settings, jobs, echo, stage: stages.append(stage))
    said: list[str] = []
    assert claim.run_experiment(tmp_path, [0, 1, 2], echo=said.append) is True
    assert stages == [] and "1.20×" in said[-1] and "not run" in said[-1]
    monkeypatch.setattr(claim, "pilot", lambda *a, **k: record | {"adamw_growth": 2.0, "informative": True})
    assert claim.run_experiment(tmp_path, [0], budgets=[0.0], echo=said.append) is True
    assert stages == ["main"]


@pytest.mark.parametrize(
    "change",
    [
        "qk_clip=5",
        "lr=1e-2",
        "optimizer=muon",
        "weight_decay=0.1",
        "muon_adjust_lr=none",
        "log_every=10",
        "logit_every=0",
        "spectra_every=0",
        "seed=3",
    ],
)
def test_a_set_that_the_design_fixes_is_refused_in_one_line(tmp_path, capsys, change) -> None:
    assert main(["repro", "logits", "--out", str(tmp_path / "x"), "--set", change]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        change.partition("=")[0] in err
        and len(err.splitlines()) == 1
        and not (tmp_path / "x" / "runs").exists()
    )


def _pilot_record(informative: bool) -> dict:
    def run(peak: float, growth: float) -> dict:
        return {"val_loss": 1.6, "logit_peak": peak, "logit_growth": growth}

    ladder = {"0.001": run(70.0, 6.3), "0.002": run(103.1, 4.6), "0.004": run(52.0, 1.4), "0.008": None}
    return {
        "adamw": {"usable": 4e-3, "at_edge": False, "runs": ladder},
        "muon": {
            "usable": 4e-3,
            "at_edge": False,
            "runs": {"0.002": run(80.0, 2.0), "0.004": run(40.0, 1.1)},
        },
        "lr": 4e-3,
        "tau": 26.0,
        "muon_peak_over_tau": 40.0 / 26.0,
        "adamw_growth": 1.4,
        "informative": informative,
    }


def test_a_post_hoc_rate_runs_the_grid_there_with_tau_by_the_same_rule_and_says_so(
    tmp_path, monkeypatch
) -> None:
    from qkvlab.errors import UserError

    record = _pilot_record(informative=False)
    monkeypatch.setattr(claim, "pilot", lambda *a, **k: record)
    grids: list[tuple[str, list]] = []
    monkeypatch.setattr(
        claim, "_grid", lambda out, runs, settings, jobs, echo, stage: grids.append((stage, runs))
    )
    said: list[str] = []
    assert claim.run_experiment(tmp_path, [0, 1, 2], echo=said.append, rate=2e-3) is True
    ((stage, runs),) = grids
    assert stage == "post hoc" and "post hoc" in said[-1] and "4.60×" in said[-1]
    chosen = json.loads((tmp_path / claim.POSTHOC_FILE).read_text())
    assert chosen["lr"] == 2e-3 and chosen["tau"] == claim.tau_from(103.1) == 52.0
    assert chosen["muon_peak_over_tau"] == pytest.approx(80.0 / 52.0) and chosen["design_lr"] == 4e-3
    assert len(runs) == 2 * 3 * 2 * 3  # the design's grid, whole
    assert {r.point["lr"] for r in runs} == {2e-3} and {r.point["qk_clip"] for r in runs} == {0.0, 52.0}
    # the same rate again resumes; another rate, a rate with no AdamW run to take τ from, or a stopped one
    # is refused in one line, as is a post-hoc rate where the design found growth
    assert claim.run_experiment(tmp_path, [0], echo=said.append, rate=2e-3) is True
    for rate, why in [(1e-3, "already holds the post-hoc grid at 0.002"), (3e-3, "has no run there")]:
        with pytest.raises(UserError, match=why):
            claim.run_experiment(tmp_path, [0], echo=said.append, rate=rate)
    with pytest.raises(
        UserError, match=r"stopped on a non-finite value; accepted: one of 0\.001, 0\.002, 0\.004"
    ):
        claim.run_experiment(tmp_path / "other", [0], echo=said.append, rate=8e-3)
    monkeypatch.setattr(claim, "pilot", lambda *a, **k: _pilot_record(informative=True))
    with pytest.raises(UserError, match="runs the design's grid"):
        claim.run_experiment(tmp_path / "grows", [0], echo=said.append, rate=2e-3)
    assert len(grids) == 2
    for bad in ("-1", "nan", "fast"):
        assert main(["repro", "logits", "--out", str(tmp_path / "x"), "--rate", bad]) == 2


def test_rate_growing_is_the_largest_ladder_rate_whose_adamw_logits_grow_by_the_designs_floor(
    tmp_path,
) -> None:
    from qkvlab.errors import UserError

    record = _pilot_record(informative=False)  # growth 6.3×, 4.6×, 1.4× at 1, 2, 4e-3; 8e-3 stopped
    assert claim.growing_rate(record) == 2e-3
    chosen = claim.posthoc(tmp_path, record, "growing")
    assert chosen["lr"] == 2e-3 and chosen["tau"] == 52.0 and "grow at least 1.5×" in chosen["rule"]
    assert claim.posthoc(tmp_path, record, "growing") == chosen  # resumes
    assert "grow at least 1.5×" in claim.tables(
        claim.aggregate(tmp_path) | {"pilot": record, "posthoc": chosen}
    )
    flat = record | {
        "adamw": record["adamw"]
        | {"runs": {"0.001": {"val_loss": 1.6, "logit_peak": 9.0, "logit_growth": 1.2}}}
    }
    assert claim.growing_rate(flat) is None
    with pytest.raises(UserError, match="no rate of AdamW's pilot ladder has logits that grow"):
        claim.posthoc(tmp_path / "flat", flat, "growing")


def test_a_post_hoc_summary_reads_the_grid_at_its_rate_and_labels_every_table(tmp_path) -> None:
    record = _pilot_record(informative=False)
    (tmp_path / "pilot.json").write_text(json.dumps(record))
    (tmp_path / "settings.json").write_text(json.dumps(claim.shared_settings()))
    summary = claim.aggregate(tmp_path)
    assert summary["posthoc"] is None and claim.grid_rate(summary) == (26.0, 4e-3)
    text = claim.tables(summary)
    assert "Post hoc" not in text and "not run: that is the finding" in text
    claim.posthoc(tmp_path, record, 2e-3)
    summary = claim.aggregate(tmp_path)
    assert claim.grid_rate(summary) == (52.0, 2e-3)
    assert "**Post hoc.** Every table below is of the grid at lr 0.002" in claim.tables(summary)
    assert "the design's rule chose 0.004 and ran no grid" in claim.tables(summary)


def test_a_summary_with_plots_before_the_pilot_has_finished_says_so_and_draws_nothing(
    tmp_path, capsys
) -> None:
    (tmp_path / "settings.json").write_text(json.dumps(claim.shared_settings()))
    assert claim.finish(tmp_path, str(tmp_path / "plots")) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and ".png" not in out and not (tmp_path / "plots").exists()


def test_a_post_hoc_grid_runs_at_its_rate_end_to_end(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(claim, "GROWTH_INFORMATIVE", math.inf)  # the design's rule finds no growth
    out = tmp_path / "logits"
    sets = _tiny_sets(tmp_path)
    assert main(["repro", "logits", "--out", str(out), "--seeds", "0", "--budgets", "0", *sets]) == 0
    pilot = json.loads((out / "pilot.json").read_text())
    assert not pilot["informative"] and not (out / "runs" / "adamw,sum=0,lr=0.001,noclip,seed=0").exists()
    rate = next(float(lr) for lr, r in pilot["adamw"]["runs"].items() if r and float(lr) != pilot["lr"])
    args = ["repro", "logits", "--out", str(out), "--seeds", "0", "--budgets", "0", "--rate", f"{rate:g}"]
    assert main([*args, *sets]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tau = claim.tau_from(pilot["adamw"]["runs"][f"{rate:g}"]["logit_peak"])
    assert summary["posthoc"]["lr"] == rate and summary["posthoc"]["tau"] == tau
    assert {(c["optimizer"], c["lr"], c["clip"]) for c in summary["cells"]} == {
        (o, rate, clip) for o in claim.OPTIMIZERS for clip in (0.0, tau)
    }
    assert all(c["seeds"] == [0] for c in summary["cells"])
