"""Paper 001's tuned study: the rate search, its edge extensions, the controls, and a tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qkvlab.errors import UserError
from qkvlab.repro.paper001 import tuned as study
from qkvlab.repro.paper001.tuned import SELECTION_SEED, Cell, plan, rate


def _finish(out: Path, cell: Cell, exponent: float, seed: int, final_val: float) -> None:
    """A finished run as the grid layer and the worker leave it (run.json + result.json)."""
    run = cell.run(exponent, seed)
    folder = run.folder(out)
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"point": dict(run.point), "seed": seed}))
    (folder / "result.json").write_text(json.dumps({"final_val": final_val}))


def _names(runs) -> set[str]:
    return {r.name for r in runs}


QV2 = Cell("lora", ("q", "v"), 2.0)
QV4 = Cell("lora", ("q", "v"), 4.0)
GRID = {"lora": (-7, -6, -5, -4)}


def test_an_interior_best_is_chosen_and_only_then_are_the_seeds_planned(tmp_path) -> None:
    runs, states = plan(tmp_path, [QV2], GRID)
    assert _names(runs) == {QV2.run(k, SELECTION_SEED).name for k in (-7, -6, -5, -4)}
    assert states[QV2]["chosen"] is None
    for k, score in zip((-7, -6, -5, -4), (0.6, 0.8, 0.7, 0.5), strict=True):
        _finish(tmp_path, QV2, k, SELECTION_SEED, score)
        runs, states = plan(tmp_path, [QV2], GRID)
        assert (states[QV2]["chosen"] is None) == (k != -4), "chosen before every rate had run"
    assert states[QV2] | {"scores": None} == {
        "exponents": [-7, -6, -5, -4],
        "scores": None,
        "pending": [],
        "extensions": 0,
        "chosen": -6,
        "at_edge": False,
    }
    assert {QV2.run(-6, s).name for s in (0, 1, 2)} <= _names(runs)
    reported = [r for r in runs if r.seed != SELECTION_SEED and r.point["lr_ratio"] == 2.0]
    assert {r.point["lr_exponent"] for r in reported} == {-6}
    # and λ = 1 at η_V of the only λ > 1 cell here: the equal-rate control
    control = {r.point["lr_exponent"] for r in runs if r.point["lr_ratio"] == 1.0}
    assert list(control) == [pytest.approx(-6 + 2 * math.log10(2.0))]


def test_a_best_rate_at_an_edge_extends_the_grid_at_most_twice(tmp_path) -> None:
    for k, score in zip((-7, -6, -5, -4), (0.5, 0.6, 0.7, 0.8), strict=True):  # rising: best at the top
        _finish(tmp_path, QV2, k, SELECTION_SEED, score)
    runs, states = plan(tmp_path, [QV2], GRID)
    assert states[QV2]["pending"] == [-3] and states[QV2]["extensions"] == 1 and states[QV2]["chosen"] is None
    assert QV2.run(-3, SELECTION_SEED).name in _names(runs)
    _finish(tmp_path, QV2, -3, SELECTION_SEED, 0.9)
    _, states = plan(tmp_path, [QV2], GRID)
    assert states[QV2]["pending"] == [-2] and states[QV2]["extensions"] == 2
    _finish(tmp_path, QV2, -2, SELECTION_SEED, 0.95)
    _, states = plan(tmp_path, [QV2], GRID)
    assert states[QV2]["chosen"] == -2 and states[QV2]["at_edge"] is True and states[QV2]["extensions"] == 2
    # the same search when the lower edge wins, and a tie goes to the smaller rate
    low = Cell("lora", ("v",), 1.0)
    for k in (-7, -6, -5, -4):
        _finish(tmp_path, low, k, SELECTION_SEED, 0.7)
    _, states = plan(tmp_path, [low], GRID)
    assert states[low]["pending"] == [-8]
    _finish(tmp_path, low, -8, SELECTION_SEED, 0.6)
    _, states = plan(tmp_path, [low], GRID)
    assert states[low]["chosen"] == -7 and states[low]["at_edge"] is False


def test_the_equal_rate_control_runs_lambda_1_at_the_best_cells_value_rate(tmp_path) -> None:
    for cell, best in ((QV2, 0.8), (QV4, 0.85)):
        for k, score in zip((-7, -6, -5, -4), (0.5, best, 0.6, 0.5), strict=True):
            _finish(tmp_path, cell, k, SELECTION_SEED, score)
    _, states = plan(tmp_path, [QV2], GRID)
    assert study.controls(states) and study.controls(states)[0]["from"] == QV2  # QV4 not in this plan
    runs, states = plan(tmp_path, [QV2, QV4], GRID)
    (control,) = study.controls(states)
    assert control["from"] == QV4 and control["cell"] == Cell("lora", ("q", "v"), 1.0)
    # η_V of QV λ=4 at η_QK = 1e-3 is 4e-3: the control trains Q and V both at 4e-3
    assert rate(control["exponent"]) == pytest.approx(4e-3, rel=1e-12)
    assert {control["cell"].run(control["exponent"], s).name for s in (0, 1, 2)} <= _names(runs)
    assert control["cell"].run(control["exponent"], 0).name == "lora_q-v_lam1_lr0.004_seed0"
    # one λ > 1 cell still searching: no control yet
    (tmp_path / "runs" / QV4.run(-4, SELECTION_SEED).name / "result.json").unlink()
    _, states = plan(tmp_path, [QV2, QV4], GRID)
    assert study.controls(states) == []


def test_the_design_is_the_one_in_the_docstring() -> None:
    assert len(study.CELLS) == 20 and len(set(study.CELLS)) == 20
    assert [rate(k) for k in study.RATE_EXPONENTS["full"]] == pytest.approx([10**-4.5, 1e-4, 10**-3.5, 1e-3])
    assert SELECTION_SEED not in study.REPORTED_SEEDS
    assert study.SETTINGS["epochs"] == 1.0 and study.SETTINGS["max_val_examples"] is None
    assert math.isclose(study.SETTINGS["eval_every"], 80)


def test_the_study_runs_to_the_end_on_a_tiny_model_and_resumes(tiny_bert, tiny_csv, tmp_path) -> None:
    cells = [Cell("lora", ("q", "v"), 1.0), Cell("lora", ("q", "v"), 2.0)]
    common = dict(
        model=str(tiny_bert),
        cell_list=cells,
        exponents={"lora": (-4, -3)},
        data=f"csv:{tiny_csv}",
        batch_size=16,
        eval_every=4,
        echo=lambda *_: None,
    )
    out = tmp_path / "study"
    study.run_study(out, **common, limit=1)  # one run (the cost measurement of a second model)
    (first,) = out.glob("runs/*/result.json")
    assert first.parent.name == cells[0].run(-4, SELECTION_SEED).name
    states = study.run_study(out, **common)
    assert all(s["chosen"] is not None and not s["pending"] for s in states.values())
    runs, _ = plan(out, cells, {"lora": (-4, -3)})
    results = {r.name: json.loads((r.folder(out) / "result.json").read_text()) for r in runs}
    # every planned run finished: the selection seed at each tried rate, seeds 0-2, the controls
    assert {n.rsplit("_seed", 1)[1] for n in results} == {"100", "0", "1", "2"}
    one = next(iter(results.values()))
    n_train = int(one["splits_used"].split("train (")[1].split(")")[0])
    assert one["curve"][-1]["step"] == n_train // 16  # one epoch, validated every 4 steps and at the end
    assert one["config"]["max_val_examples"] is None and one["config"]["epochs"] == 1.0
    for name, result in results.items():
        lam = float(name.split("_lam")[1].split("_")[0])
        lr = float(name.split("_lr")[1].split("_")[0])
        v_rates = {g["lr"] for g in result["groups"] if g["role"] == "v"}
        assert list(v_rates) == [pytest.approx(lam * lr, rel=1e-2)], name
    # the folder remembers its cells: its tables show this design, not the default 20 cells
    assert list(study.summarize(out)["rows"]) == cells
    with pytest.raises(UserError, match="other cells"):
        study.run_study(out, **{**common, "cell_list": cells[:1]})
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    study.run_study(out, **common)  # nothing new to run
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == mtimes
    with pytest.raises(Exception, match="batch_size 16 -> 8"):
        study.run_study(out, **{**common, "batch_size": 8, "exponents": {"lora": (-5,)}})


def test_the_second_models_grid_is_sized_from_the_first_models_lora_qv(tmp_path) -> None:
    """λ* is LoRA QV's best λ by the mean final validation accuracy of seeds 0-2 (never test)."""
    cells = [Cell("lora", ("q", "v"), lam) for lam in (1.0, 2.0, 4.0, 8.0)]
    grid = {"lora": (-7, -6, -5, -4)}

    def finish(cell: Cell, k: int, seed: int, val: float, test: float) -> None:
        run = cell.run(k, seed)
        folder = run.folder(tmp_path)
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"point": dict(run.point), "seed": seed}))
        result = {"final_val": val, "curve": [{"step": 80, "accuracy": val}], "test": {"accuracy": test}}
        (folder / "result.json").write_text(json.dumps(result))

    (tmp_path / "settings.json").write_text(json.dumps({"rate_exponents": {"lora": list(grid["lora"])}}))
    best_rate = {1.0: -5, 2.0: -6, 4.0: -6, 8.0: -6}
    for cell in cells:
        for k in grid["lora"]:
            finish(cell, k, SELECTION_SEED, 0.7 + 0.01 * (k == best_rate[cell.lr_ratio]), 0.5)
    with pytest.raises(Exception, match="LoRA QV is not finished"):
        study.second_model_design(tmp_path)
    for cell in cells:  # λ = 2 ends best on validation; λ = 8 would win on test, which must not matter
        for seed in (0, 1, 2):
            val = {1.0: 0.80, 2.0: 0.83, 4.0: 0.81, 8.0: 0.79}[cell.lr_ratio]
            finish(
                cell,
                best_rate[cell.lr_ratio],
                seed,
                val + 0.001 * seed,
                0.99 if cell.lr_ratio == 8.0 else 0.5,
            )
    design_cells, exponents, lam = study.second_model_design(tmp_path)
    assert lam == 2.0 and exponents == {"lora": (-7, -6, -5)}
    assert design_cells == [
        Cell("lora", t, x) for t in (("q", "v"), ("q", "k", "v")) for x in (1.0, 2.0, 4.0)
    ]
    # sized by one measured run: 6 cells × (3 rates + 3 seeds) + 2 controls × 3 seeds = 42 runs
    assert study.planned_runs(design_cells, 3) == 42
    cheap = study.SECOND_MODEL_HOURS / 42
    assert study.second_model_design(tmp_path, cost_hours=cheap)[0] == design_cells
    qv_only, again, _ = study.second_model_design(tmp_path, cost_hours=cheap * 1.01)
    assert qv_only == [Cell("lora", ("q", "v"), x) for x in (1.0, 2.0, 4.0)] and again == exponents


def test_the_best_lambda_is_chosen_on_validation_with_each_seeds_own_best_as_its_spread() -> None:
    def row(vals: list[float], k: int) -> dict:
        return {"runs": {s: {"final_val": v} for s, v in enumerate(vals)}, "search": {"chosen": k}}

    qv = {  # λ = 2 best on average; seed 1 alone prefers λ = 4; λ = 1 and 4 tie on average
        Cell("lora", ("q", "v"), 1.0): row([0.75, 0.75, 0.75], -6),  # binary fractions: exact means
        Cell("lora", ("q", "v"), 2.0): row([0.875, 0.8125, 0.875], -6),
        Cell("lora", ("q", "v"), 4.0): row([0.5, 1.0, 0.75], -7),
        Cell("lora", ("q", "k", "v"), 1.0): row([0.9, 0.9], -6),  # a seed short: no verdict
        Cell("lora", ("q", "k", "v"), 2.0): row([0.9, 0.9, 0.9], -6),
    }
    found = study.best_lambda({"rows": qv}, "lora", ("q", "v"))
    assert found is not None
    assert found["best"] == 2.0 and found["per_seed"] == {0: 2.0, 1: 4.0, 2: 2.0}
    assert found["means"][1.0] == found["means"][4.0] == 0.75
    assert found["exponents"] == {1.0: -6, 2.0: -6, 4.0: -7}
    assert study.best_lambda({"rows": qv}, "lora", ("q", "k", "v")) is None
    tie = {c: r for c, r in qv.items() if c.lr_ratio != 2.0 and c.targets == ("q", "v")}
    assert study.best_lambda({"rows": tie}, "lora", ("q", "v"))["best"] == 1.0  # ties: the smaller λ


def test_the_summary_tables_pair_seeds_at_each_cells_tuned_rate(tmp_path) -> None:
    from qkvlab.repro.paper001.render_tuned import study_markdown

    cells = [Cell("lora", ("q", "v"), 1.0), Cell("lora", ("q", "v"), 4.0)]
    grid = {"lora": (-7, -6, -5)}
    (tmp_path / "settings.json").write_text(json.dumps({"rate_exponents": {"lora": [-7, -6, -5]}}))

    def finish(cell: Cell, k: float, seed: int, val: float, curve: list[float]) -> None:
        run = cell.run(k, seed)
        folder = run.folder(tmp_path)
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"point": dict(run.point), "seed": seed}))
        result = {
            "final_val": val,
            "curve": [{"step": 80 * (i + 1), "accuracy": a} for i, a in enumerate(curve)],
            "test": {"accuracy": val - 0.01},
        }
        (folder / "result.json").write_text(json.dumps(result))

    for cell in cells:
        for k, score in zip((-7, -6, -5), (0.7, 0.8, 0.75), strict=True):
            finish(cell, k, SELECTION_SEED, score, [score])
    for seed in (0, 1, 2):
        finish(cells[0], -6, seed, 0.80, [0.5, 0.7, 0.80])  # λ = 1 converges later
        finish(cells[1], -6, seed, 0.80 + 0.01 * (seed + 1), [0.78, 0.80, 0.80 + 0.01 * (seed + 1)])
    summary = study.summarize(tmp_path, cells, grid)
    assert summary["thresholds"]["lora"] == pytest.approx(0.95 * 0.82)
    assert summary["rows"][cells[0]]["steps_to_threshold"] == {0: 240, 1: 240, 2: 240}
    assert summary["rows"][cells[1]]["steps_to_threshold"] == {0: 80, 1: 80, 2: 80}
    (pair,) = [c for c in study.comparisons(summary) if c["claim"] == "λ > 1 beats tuned λ = 1"]
    assert pair["test"]["mean"] == pytest.approx(2.0) and pair["test"]["wins"] == 3 and pair["test"]["n"] == 3
    text = study_markdown(tmp_path)
    assert "| lora QV λ=4 | 0.000316: 70.0, 0.001: 80.0, 0.00316: 75.0 | 0.001 | 0.004 | no |" in text
    assert "| λ > 1 beats tuned λ = 1 | lora QV λ=4 | lora QV λ=1 | +2.0 ± 1.0 (3/3)" in text


def test_curve_band_averages_seeds_at_the_steps_every_run_evaluated() -> None:
    from qkvlab.repro.paper001.render_tuned import curve_band

    runs = {
        0: {
            "curve": [
                {"step": 80, "accuracy": 0.5},
                {"step": 160, "accuracy": 0.7},
                {"step": 170, "accuracy": 0.9},
            ]
        },
        1: {"curve": [{"step": 80, "accuracy": 0.7}, {"step": 160, "accuracy": 0.8}]},
    }
    steps, mean, std = curve_band(runs)
    assert steps == [80, 160]  # 170 is one run's own final evaluation
    assert mean == pytest.approx([60.0, 75.0])
    assert std == pytest.approx([math.sqrt(200.0), math.sqrt(50.0)])


def test_the_study_figures_are_written_per_method(tmp_path, monkeypatch) -> None:
    from PIL import Image

    from qkvlab.repro.paper001.render_tuned import plot_study

    monkeypatch.setenv("QKVLAB_CHECK_FIGURES", "1")  # overlapping labels or empty axes fail the save
    (tmp_path / "settings.json").write_text(
        json.dumps({"model": "minilm", "rate_exponents": {"lora": [-7, -6, -5]}})
    )
    cells = [Cell("lora", ("q", "v"), 1.0), Cell("lora", ("q", "v"), 2.0)]
    for cell in cells:
        for k, score in zip((-7, -6, -5), (0.7, 0.8, 0.75), strict=True):
            run = cell.run(k, SELECTION_SEED)
            folder = run.folder(tmp_path)
            folder.mkdir(parents=True)
            (folder / "run.json").write_text(json.dumps({"point": dict(run.point), "seed": SELECTION_SEED}))
            curve = [{"step": 80, "accuracy": score - 0.1}, {"step": 160, "accuracy": score}]
            (folder / "result.json").write_text(json.dumps({"final_val": score, "curve": curve}))
        for seed in (0, 1, 2):
            run = cell.run(-6, seed)
            folder = run.folder(tmp_path)
            folder.mkdir(parents=True)
            (folder / "run.json").write_text(json.dumps({"point": dict(run.point), "seed": seed}))
            curve = [{"step": 80, "accuracy": 0.7 + 0.01 * seed}, {"step": 160, "accuracy": 0.8}]
            (folder / "result.json").write_text(
                json.dumps({"final_val": 0.8, "curve": curve, "test": {"accuracy": 0.79}})
            )
    paths = plot_study(tmp_path, tmp_path / "figures")
    assert [p.name for p in paths] == ["tuned_minilm_lora_rates.png", "tuned_minilm_lora_curves.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.size[0] > 400 and image.size[1] > 300
    from qkvlab.render.page import Figure
    from qkvlab.repro.paper001.claim import _report

    (section,) = _report(tmp_path, tmp_path / "report-figures")
    assert [b.path.name for b in section.blocks if isinstance(b, Figure)] == [p.name for p in paths]


@pytest.mark.parametrize(
    ("model", "start", "end"),
    [
        ("minilm", "## Paper 001: fine-tuning", "### Second model: mpnet"),
        ("mpnet", "### Second model: mpnet", "## Paper 001, the 150-step pilot"),
    ],
)
def test_reproduction_md_holds_the_tuned_studys_tables_as_the_summary_prints_them(model, start, end) -> None:
    """REPRODUCTION.md's paper-001 tables are `repro finetune --summary-only` on the committed results, byte
    for byte, each model's in its own part of the section: a results commit that changes a number fails
    here until the text is regenerated."""
    from qkvlab.repro.paper001.render_tuned import study_markdown

    root = Path(__file__).resolve().parents[1]
    printed = study_markdown(root / "results" / "finetune-tuned" / model)
    text = (root / "REPRODUCTION.md").read_text()
    section = text[text.index(start) : text.index(end)]
    tables = printed.split("\n\n")
    assert (
        len(tables) == 10
    )  # five captions, five tables: the search, the cells, the controls, the pairs, best λ
    for chunk in tables:
        assert chunk in section, chunk.splitlines()[0]


def test_the_second_model_measures_one_run_once_and_sizes_its_grid_from_it(tmp_path, monkeypatch) -> None:
    import types

    import torch

    from qkvlab.repro.paper001 import claim

    calls = []
    full = [Cell("lora", t, x) for t in (("q", "v"), ("q", "k", "v")) for x in (1.0, 2.0)]

    def design(first, cost_hours=None):  # type: ignore[no-untyped-def]
        calls.append(("design", cost_hours))
        cells = full if cost_hours is None or cost_hours < 1 else full[:2]
        return cells, {"lora": (-7, -6, -5)}, 1.0

    def run(out, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(("run", kwargs.get("limit"), len(kwargs["cell_list"])))
        return {}

    monkeypatch.setattr(study, "second_model_design", design)
    monkeypatch.setattr(study, "run_study", run)
    ticks = iter([100.0, 100.0 + 1800.0])  # the measured run takes half an hour
    monkeypatch.setattr("time.perf_counter", lambda: next(ticks))
    args = types.SimpleNamespace(reference=str(tmp_path / "minilm"), model="mpnet", device="cpu")
    chosen = claim._second_model(tmp_path, args)
    cost = json.loads((tmp_path / claim.COST_FILE).read_text())
    threads = torch.get_num_threads()
    assert cost["wall_seconds"] == 1800.0 and cost["core_hours"] == pytest.approx(0.5 * threads)
    assert calls[:2] == [("design", None), ("run", 1, 4)]  # the full grid's first run, alone
    assert chosen["cell_list"] == (full if 0.5 * threads < 1 else full[:2])
    calls.clear()
    claim._second_model(tmp_path, args)  # measured once: a second call only reads cost.json
    assert [c[0] for c in calls] == ["design"]
