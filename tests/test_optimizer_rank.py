"""``qkvlab repro optimizer-rank``: the decay budget, the learning-rate selection, the grid and its summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qkvlab.cli import main
from qkvlab.grid.training import read_spectra
from qkvlab.repro.optimizer_rank import claim as orank

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60


@pytest.fixture
def changes(tmp_path) -> dict[str, object]:
    corpus = tmp_path / "austen.txt"
    corpus.write_text(TEXT)
    return {
        "data": f"text:{corpus}",
        "seq_len": 16,
        "batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 2,
        "lr": 0.01,
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.d_model": 16,
        "model.d_head": 8,
        "model.d_mlp": 32,
        "eval_every": 3,
        "eval_batches": 2,
        "spectra_every": 1,
        "checkpoint_every": 3,
    }


def _sets(changes: dict[str, object]) -> list[str]:
    return [x for k, v in changes.items() for x in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("variant", ["adamw", "adamw-corrected", "muon-corrected"])
def test_the_budget_is_the_decay_the_optimiser_applies(changes, tmp_path, variant) -> None:
    """Σₜ η_t λ_t read back from the live optimiser (the monitor's per-step 2·η_t·λ_t) is the budget, with the
    decay constant or following the schedule."""
    settings = orank.shared_settings("gpt", changes)
    run = orank.make_run(variant, 1.5, 0.01, 0)
    orank.worker(run.folder(tmp_path), dict(run.point), 0, settings)
    records = read_spectra(run.folder(tmp_path))
    assert [r["step"] for r in records] == list(range(7))
    rates = [r["imbalance_decay_per_step"]["predicted_weight_decay_part"]["qk"] for r in records[1:]]
    assert math.fsum(rates) / 2 == pytest.approx(1.5, rel=1e-9)
    # warm-up (η_0 = η_max/2, η_1 = η_max): η_t λ_t doubles, or quadruples when λ_t follows η_t
    assert rates[1] / rates[0] == pytest.approx(4.0 if orank.VARIANTS[variant].corrected else 2.0)
    config = json.loads((run.folder(tmp_path) / "config.json").read_text())
    assert config["overrides"]["q"]["weight_decay"] == orank.decay_for(
        settings["overrides"], variant, 1.5, 0.01
    )
    assert config["overrides"]["embed"]["weight_decay"] == 0 and config["weight_decay"] == 0


def _fake_worker(best: dict[str, float]):
    """A worker that trains nothing: final loss (log lr − log best)², or a stop above 1.0."""

    def work(run_dir: Path, point: dict, seed: int, settings: dict) -> None:
        lr = point["lr"]
        if lr > 1.0:
            (run_dir / orank.STOPPED_FILE).write_text(json.dumps({"reason": "non-finite loss"}))
            return
        loss = (math.log(lr) - math.log(best[point["variant"]])) ** 2
        (run_dir / "final.json").write_text(json.dumps({"eval": {"loss": loss}}))
        (run_dir / orank.FACTORS_FILE).write_text("{}")

    return work


def test_selection_extends_past_an_edge_winner_at_most_twice(tmp_path, monkeypatch) -> None:
    settings = orank.shared_settings("gpt", {"lr": 0.1})
    # adamw is best at 4×, inside the grid once it grew to 8×; muon keeps wanting more, and 8× would
    # stop on a non-finite loss (a learning rate too high is a result: never chosen, never retried)
    monkeypatch.setattr(orank, "worker", _fake_worker({"adamw": 0.4, "muon": 100.0, "muon-head": 0.1}))
    selection = orank.select_lrs(
        tmp_path, settings, ("adamw", "adam-l2", "muon", "muon-head"), echo=lambda _: None
    )
    assert selection is not None and list(selection) == ["adamw", "muon", "muon-head"]
    assert selection["adamw"]["chosen"] == pytest.approx(0.4) and not selection["adamw"]["at_edge"]
    assert list(selection["adamw"]["losses"]) == ["0.05", "0.1", "0.2", "0.4", "0.8"]
    assert selection["muon"]["chosen"] == pytest.approx(0.8) and selection["muon"]["at_edge"]
    assert selection["muon"]["losses"]["0.8"] < selection["muon"]["losses"]["0.4"]
    assert selection["muon-head"]["chosen"] == pytest.approx(0.1) and not selection["muon-head"]["at_edge"]
    assert json.loads((tmp_path / "selection.json").read_text()) == selection
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 5 + 5 + 3 and all(name.endswith("seed=100") for name in runs)


def test_factor_norms_are_the_matrices_and_each_heads_slice(changes, tmp_path) -> None:
    from safetensors.torch import load_file

    settings = orank.shared_settings("gpt", changes)
    run = orank.make_run("muon-head", 1.0, 0.01, 0)
    orank.worker(run.folder(tmp_path), dict(run.point), 0, settings)
    norms = json.loads((run.folder(tmp_path) / orank.FACTORS_FILE).read_text())
    state = load_file(next(run.folder(tmp_path).glob("checkpoint-*")) / "model.safetensors")
    for role in ("q", "k", "v", "o"):
        w = state[f"blocks.0.attn.{role}_proj.weight"].double()
        pieces = [w[:, 8 * h : 8 * h + 8] if role == "o" else w[8 * h : 8 * h + 8] for h in range(2)]
        assert norms[role]["matrix"] == [pytest.approx(torch.linalg.matrix_norm(w, ord=2).item(), rel=1e-12)]
        expected = [torch.linalg.matrix_norm(p, ord=2).item() for p in pieces]
        assert norms[role]["heads"] == [pytest.approx(expected, rel=1e-12)]
        assert max(norms[role]["heads"][0]) <= norms[role]["matrix"][0] * (1 + 1e-12)


def test_repro_optimizer_rank_on_a_tiny_gpt(changes, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(orank, "MAX_EXTENSIONS", 0)
    out = tmp_path / "or"
    args = ["repro", "optimizer-rank", "--out", str(out), "--variants", "adamw,adam-l2,muon-head"]
    args += ["--budgets", "0,1", "--seeds", "0", *_sets(changes)]
    assert main([*args, "--plot", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    # 2 rules × 3 learning rates on seed 100; then budget 0 once per rule (Adam + L2 at budget 0 is AdamW)
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert sum(n.endswith("seed=100") for n in names) == 6
    assert sorted(n.split(",lr")[0] for n in names if n.endswith("seed=0")) == [
        "adam-l2,sum=1",
        "adamw,sum=0",
        "adamw,sum=1",
        "muon-head,sum=0",
        "muon-head,sum=1",
    ]
    selection = json.loads((out / "selection.json").read_text())
    for rule in ("adamw", "muon-head"):
        losses = selection[rule]["losses"]
        assert float(min(losses, key=losses.get)) == selection[rule]["chosen"]
    summary = json.loads((out / "summary.json").read_text())
    cells = {(c["variant"], c["budget"]): c for c in summary["cells"]}
    assert set(cells) == {(v, b) for v in ("adamw", "adam-l2", "muon-head") for b in (0.0, 1.0)}
    assert cells[("adam-l2", 0.0)]["measures"] == cells[("adamw", 0.0)]["measures"]
    assert all(c["seeds"] == [0] for c in cells.values())  # the selection seed is not reported
    # decay on the attention matrices lowers their nuclear norms under AdamW (seed 0 paired with itself)
    d = cells[("adamw", 1.0)]["vs_budget0"]
    assert d["qk_effective_rank"]["n"] == 1
    assert (
        cells[("adamw", 1.0)]["measures"]["qk_nuclear_norm"]["mean"]
        < cells[("adamw", 0.0)]["measures"]["qk_nuclear_norm"]["mean"]
    )
    # per-head Muon leaves each head's slices close to one another in spectral norm
    assert cells[("muon-head", 0.0)]["measures"]["q_head_spread"]["mean"] >= 1.0
    assert "| adam-l2 | 1 |" in printed and "| adam-l2 | 0 |" not in printed  # budget 0 shown once
    assert "Seed-paired differences from AdamW" in printed
    figures = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert figures == ["factor_norms.png", "rank_and_loss_vs_budget.png", "rank_over_time.png"]
    # `qkvlab report` finds the folder's experiment and draws its section
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Optimisers and attention rank (or, gpt)" in md and "| adam-l2 | 1 |" in md
    # resumable: nothing runs again; --summary-only prints the same tables
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "ran " not in again and again.count("skipped (complete)") == 11
    assert main([*args, "--summary-only"]) == 0
    assert (
        capsys.readouterr().out.split("\nwrote")[0]
        == printed[printed.index("Learning rate") :].split("\nwrote")[0]
    )
    # a later run of fewer variants keeps the other rules' learning rates, and the summary keeps their cells
    subset = [a if a != "adamw,adam-l2,muon-head" else "adamw" for a in args]
    assert main(subset) == 0
    capsys.readouterr()
    assert json.loads((out / "selection.json").read_text()) == selection
    assert main([*args, "--summary-only"]) == 0
    assert "| muon-head | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "0,100"], "seed 100 chooses the learning rates"),
        (["--setting", "recall", "--variants", "muon-head"], "accepted for --setting recall"),
        (["--variants", "sgd"], "accepted for --setting gpt"),
        (["--budgets", "-1"], "numbers ≥ 0"),
        (["--set", "seed=3"], "seeds go in --seeds"),
    ],
)
def test_mistakes_are_one_line(tmp_path, capsys, extra, message) -> None:
    assert main(["repro", "optimizer-rank", "--out", str(tmp_path / "or"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_product_that_ended_numerically_zero_is_marked_switched_off() -> None:
    from qkvlab.repro.optimizer_rank.render import SWITCHED_OFF, switched_off, tables

    def cell(variant: str, budget: float, qk_norm: float) -> dict:
        stat = lambda v: {"mean": v, "std": 0.0, "n": 1}  # noqa: E731
        measures = {
            "val_loss": stat(2.5),
            "wall_minutes": stat(1.0),
            **{
                f"{p}_{n}": stat(9.0)
                for p in ("qk", "ov")
                for n in ("effective_rank", "effective_rank_min", "rank")
            },
            "qk_nuclear_norm": stat(qk_norm),
            "ov_nuclear_norm": stat(1.0),
        }
        init = {"qk_effective_rank": stat(30.0), "ov_effective_rank": stat(30.0)}
        init |= {"qk_nuclear_norm": stat(1.0), "ov_nuclear_norm": stat(1.0)}
        return {
            "variant": variant, "rule": "adamw", "budget": budget, "lr": 1e-3, "lambda": 0.1, "seeds": [0],
            "stopped": [], "devices": ["cpu"], "measures": measures, "init": init, "vs_budget0": {"val_loss": None}, "vs_adamw": {"val_loss": None},
        }  # fmt: skip

    alive, dead = cell("adamw", 1.0, 0.5), cell("adam-l2", 1.0, SWITCHED_OFF * 0.5)
    delta = {"mean": 4.0, "std": 0.0, "n": 1, "wins": 1, "seeds": [0]}
    dead["vs_adamw"] = {"val_loss": delta, "qk_effective_rank": delta, "ov_effective_rank": delta}
    assert not switched_off(alive, "qk") and switched_off(dead, "qk") and not switched_off(dead, "ov")
    assert not switched_off({**dead, "init": None}, "qk")  # nothing to compare with: no mark
    text = tables({"selection": {"adamw": {"losses": {"0.001": 2.5}, "chosen": 0.001, "at_edge": False}},
                   "cells": [alive, dead]})  # fmt: skip
    rows: dict[str, str] = {}
    for line in text.splitlines():  # the first table with these rows is the ranks'
        if line.startswith("| adam"):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert rows["adam-l2"].count("†") == 3 and "†" not in rows["adamw"]  # QK's three rank columns only
    assert "path of attention is switched off" in text
    # In the paired differences a rank delta of a switched-off path is noise too: QK's is marked, OV's not.
    paired = text.split("what the update rule changes.")[1]
    (row,) = [line for line in paired.splitlines() if line.startswith("| adam-l2")]
    qk, ov = row.split("|")[4:6]
    assert qk.strip().endswith("†") and "†" not in ov
    # A selection whose losses are all ~0 (a solved task) still shows which lr won.
    solved = {"adamw": {"losses": {"0.001": 2e-8, "0.002": 3e-10}, "chosen": 0.002, "at_edge": True}}
    assert "| adamw | 0.001: 2.0e-08, 0.002: 3.0e-10 | 0.002 (at the grid's edge) |" in tables(
        {"selection": solved, "cells": [alive]}
    )


def test_the_figures_draw_a_switched_off_path_apart(tmp_path, monkeypatch) -> None:
    """Its final ranks hollow and off the line, its rank over time dotted: noise is not drawn as data."""
    import qkvlab.report.figures as figures
    from qkvlab.repro.optimizer_rank.render import SWITCHED_OFF, plot_optimizer_rank

    stat = lambda v: {"mean": v, "std": 0.0, "n": 1}  # noqa: E731
    init = {f"{p}_{n}": stat(1.0) for p in ("qk", "ov") for n in ("effective_rank", "nuclear_norm")}

    def cell(variant: str, budget: float, qk_norm: float) -> dict:
        measures = {f"{p}_effective_rank": stat(5.0) for p in ("qk", "ov")}
        measures |= {"val_loss": stat(1.0), "qk_nuclear_norm": stat(qk_norm), "ov_nuclear_norm": stat(1.0)}
        measures |= {f"{r}_matrix_norm": stat(1.0) for r in "qkvo"}
        trajectory = {"steps": [0, 10], "qk": [5.0, 5.0], "ov": [5.0, 5.0]}
        return {"variant": variant, "budget": budget, "seeds": [0], "measures": measures, "init": init,
                "trajectory": trajectory}  # fmt: skip

    cells = [cell("adamw", 0.0, 1.0), cell("adamw", 1.0, 1.0), cell("adam-l2", 1.0, SWITCHED_OFF / 2)]
    figs = {}
    monkeypatch.setattr(figures, "save", lambda fig, path: figs.setdefault(path.name, fig) and path)
    plot_optimizer_rank({"setting": "tiny", "cells": cells}, tmp_path)
    qk_panel, ov_panel = figs["rank_and_loss_vs_budget.png"].axes[:2]
    labels = lambda ax: ax.get_legend_handles_labels()[1]  # noqa: E731
    assert "adam-l2 † (switched off: noise)" in labels(qk_panel)
    assert not any("†" in label for label in labels(ov_panel))  # its OV path is alive
    qk_time = figs["rank_over_time.png"].axes[2]  # Σηλ = 1, W_KᵀW_Q
    styles = {line.get_label(): line.get_linestyle() for line in qk_time.get_lines()}
    assert styles == {"adamw": "-", "adam-l2 † (switched off)": ":"}
