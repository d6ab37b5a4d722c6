"""Paper 000's theorem measured (`qkvlab theory`): the toy, SVT, the rates, balancing, completion, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qkvlab.cli import main
from qkvlab.optim import l2_penalty
from qkvlab.repro.theory.claim import TOY_TARGET, TheorySettings, run_completion, run_pretrained, run_toy
from qkvlab.spectra import FactoredProduct, factor_gap
from qkvlab.theory import (
    fit_decay_rate,
    lr_schedule,
    nuclear_prox_gradient,
    predicted_gap_rate,
    random_orthogonal,
    singular_value_threshold,
    train_factors,
)

from conftest import tiny_hf_model

SHORT = TheorySettings(lambdas=(0.0, 0.3, 0.5, 0.7, 1.2), seeds=(0,), steps=3000, lr=0.02, parts=("toy",))


@pytest.fixture(scope="module")
def short_toy() -> dict:
    return run_toy(SHORT)


def test_gradient_descent_reaches_the_thresholded_singular_values(short_toy) -> None:
    for lam, values in zip(short_toy["lambda"], short_toy["final_singular_values"], strict=True):
        expected = sorted((max(d - lam, 0.0) for d in TOY_TARGET), reverse=True)
        assert max(abs(a - b) for a, b in zip(values, expected, strict=True)) < 0.03, lam


def test_imbalance_decays_at_two_lambda_and_gap_at_the_rule(short_toy) -> None:
    for i, lam in enumerate(short_toy["lambda"]):
        if lam == 0:
            continue
        assert short_toy["decay_rate_measured"][i] == pytest.approx(2 * lam, rel=0.05)
        # the rule from MISSION.md, written out here independently of qkvlab.theory
        slowest = [4 * lam] if any(d > lam for d in TOY_TARGET) else []
        slowest += [2 * (lam + d) for d in TOY_TARGET if d <= lam]
        assert short_toy["gap_decay_rate_measured"][i] == pytest.approx(min(slowest), rel=0.15)


def test_imbalance_is_conserved_without_weight_decay(short_toy) -> None:
    # at λ = 0, I_{k+1} = I_k + η²(g_Aᵀg_A − g_Bᵀg_B): only an O(η²)-per-step drift
    assert abs(short_toy["imbalance_relative_drift"][0]) < 0.02
    assert short_toy["decay_rate_measured"][0] is None


def test_gap_rule_matches_the_values_in_the_brief() -> None:
    # MISSION.md: in the Fig. 1 toy at λ = 0.3, 0.5, 0.7, 0.9, 1.5 the gap rate is 1.0, 1.4, 1.8, 2.2, 3.4
    for lam, rate in zip((0.3, 0.5, 0.7, 0.9, 1.5), (1.0, 1.4, 1.8, 2.2, 3.4), strict=True):
        assert predicted_gap_rate(TOY_TARGET, lam) == pytest.approx(rate)
    assert predicted_gap_rate(TOY_TARGET, 0.1) == pytest.approx(0.4)  # every direction survives: 4λ
    assert predicted_gap_rate((1.0, 0.0), 0.5) == pytest.approx(1.0)  # a direction with no signal: 2λ
    assert predicted_gap_rate(TOY_TARGET, 0.0) is None


@pytest.mark.parametrize("rotated", [False, True])
def test_svt_matches_the_closed_form(rotated: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    d = torch.diag(torch.tensor(TOY_TARGET, dtype=torch.float64))
    target = random_orthogonal(5, gen) @ d @ random_orthogonal(5, gen).T if rotated else d
    lambdas = torch.tensor([0.0, 0.1, 0.35, 0.9, 1.3], dtype=torch.float64)
    batch = target.expand(len(lambdas), 5, 5)
    solution, iterations = nuclear_prox_gradient(batch, lambdas, lr=0.5, tol=1e-14)
    for lam, w in zip(lambdas.tolist(), solution, strict=True):
        expected = torch.tensor(
            sorted((max(x - lam, 0.0) for x in TOY_TARGET), reverse=True), dtype=torch.float64
        )
        assert torch.allclose(torch.linalg.svdvals(w), expected, atol=1e-6)
    assert (iterations[:4] > 1).all()  # a real iteration (at λ = 1.3 > every dᵢ, W = 0 is already optimal)
    direct = singular_value_threshold(batch, lambdas)
    assert torch.allclose(direct, solution, atol=1e-10)


def test_balanced_keeps_the_product_and_zeroes_imbalance_and_gap() -> None:
    gen = torch.Generator().manual_seed(0)
    for m, n, r in ((16, 12, 6), (3, 4, 6)):  # the second: d_head > d_model, zero-padded
        left = 3 * torch.randn(4, m, r, generator=gen, dtype=torch.float64)
        right = 0.1 * torch.randn(4, n, r, generator=gen, dtype=torch.float64)
        product = FactoredProduct(left, right)
        balanced = product.balanced()
        assert balanced.left.shape == left.shape and balanced.right.shape == right.shape
        assert (balanced.full() - product.full()).abs().max() < 1e-10
        spectrum = balanced.spectrum()
        assert (spectrum.imbalance < 1e-10 * spectrum.l2_half).all()
        assert (factor_gap(balanced.left, balanced.right) < 1e-20 * spectrum.l2_half).all()
        assert (product.spectrum().gap > 1).all()  # they were far from balanced


def test_balanced_refuses_shared_factors() -> None:
    left, right = torch.randn(4, 8, 2), torch.randn(2, 8, 2)
    with pytest.raises(ValueError, match=r"right factor\(s\) \[0, 1\] serve several heads"):
        FactoredProduct(left, right, right_index=torch.tensor([0, 0, 1, 1])).balanced()
    # a permutation is not sharing
    FactoredProduct(left, right.repeat(2, 1, 1), right_index=torch.tensor([3, 2, 1, 0])).balanced()


def test_factor_gap_equals_the_difference_and_resolves_tiny_gaps() -> None:
    import mpmath

    gen = torch.Generator().manual_seed(1)
    left, right = (
        torch.randn(5, 16, 5, generator=gen, dtype=torch.float64),
        torch.randn(5, 12, 5, generator=gen, dtype=torch.float64),
    )
    assert torch.allclose(factor_gap(left, right), FactoredProduct(left, right).spectrum().gap, atol=1e-12)
    # nearly balanced: the naive difference is rounding noise, factor_gap matches 50-digit arithmetic
    balanced = FactoredProduct(
        torch.randn(1, 5, 5, generator=gen, dtype=torch.float64),
        torch.randn(1, 5, 5, generator=gen, dtype=torch.float64),
    ).balanced()
    a = balanced.left[0] + 1e-10 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
    b = balanced.right[0]
    mpmath.mp.dps = 50
    am, bm = mpmath.matrix(a.tolist()), mpmath.matrix(b.tolist())
    exact = (sum(x**2 for x in am) + sum(x**2 for x in bm)) / 2 - sum(
        mpmath.svd_r(am * bm.T, compute_uv=False)
    )
    assert float(factor_gap(a, b)[0]) == pytest.approx(float(exact), rel=1e-4)
    naive = float(FactoredProduct(a, b).spectrum().gap[0])
    assert abs(naive - float(exact)) > 0.5 * float(exact)  # lost in rounding: why factor_gap exists


@pytest.mark.parametrize("optimizer", ["gd", "sgd-momentum", "adam-l2", "adamw"])
def test_update_rules_match_torch_optimisers(optimizer: str) -> None:
    gen = torch.Generator().manual_seed(0)
    lambdas = [0.0, 0.3, 1.1]
    target = torch.diag(torch.tensor(TOY_TARGET, dtype=torch.float64))
    left = 0.3 * torch.randn(len(lambdas), 5, 5, generator=gen, dtype=torch.float64)
    right = 0.05 * torch.randn(len(lambdas), 5, 5, generator=gen, dtype=torch.float64)
    steps, lr = 40, (0.003 if optimizer == "sgd-momentum" else 0.02)
    ours = train_factors(
        target, lambdas, left, right, lrs=lr_schedule(steps, lr), optimizer=optimizer, record_every=steps
    )

    groups = [
        {"params": [left[i].clone().requires_grad_(), right[i].clone().requires_grad_()], "weight_decay": lam}
        for i, lam in enumerate(lambdas)
    ]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    else:  # coupled: the optimiser decays nothing, qkvlab.l2_penalty carries (λ/2)‖θ‖²
        plain = [{**g, "weight_decay": 0.0} for g in groups]
        opt = {
            "gd": lambda: torch.optim.SGD(plain, lr=lr),
            "sgd-momentum": lambda: torch.optim.SGD(plain, lr=lr, momentum=0.9),
            "adam-l2": lambda: torch.optim.Adam(plain, lr=lr, betas=(0.9, 0.95), eps=1e-8),
        }[optimizer]()
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(0.5 * (g["params"][0] @ g["params"][1].T - target).square().sum() for g in groups)
        if optimizer != "adamw":
            loss = loss + l2_penalty(groups)
        loss.backward()
        opt.step()
    for i, group in enumerate(groups):
        assert torch.allclose(ours.left[i], group["params"][0].detach(), rtol=1e-10, atol=1e-12)
        assert torch.allclose(ours.right[i], group["params"][1].detach(), rtol=1e-10, atol=1e-12)
    assert ours.t[-1] == pytest.approx(steps * lr)


def test_fit_window_finds_the_slowest_mode_above_the_floor() -> None:
    t = torch.linspace(0, 40, 801, dtype=torch.float64)
    curve = 5 * torch.exp(-3 * t) + 1e-3 * torch.exp(-t)  # fast transient, then the slow mode
    curve = torch.where(curve > 1e-14, curve, torch.full_like(curve, 1e-15))  # a noise floor
    fit = fit_decay_rate(t, curve, 1e-13)
    assert fit.rate == pytest.approx(1.0, rel=1e-3)
    assert fit.t_start > 5 and fit.t_end < 28  # after the transient, before the floor
    assert fit_decay_rate(t, torch.ones_like(t), 1e-13) is None  # nothing decays


def test_lr_schedule_anneals_to_one_percent() -> None:
    rates = lr_schedule(1000, 0.01, anneal_from=0.7)
    assert rates[0] == rates[699] == 0.01
    assert rates[-1] == pytest.approx(1e-4)
    assert (rates[700:].diff() <= 0).all()


def test_completion_factored_and_nuclear_objectives_agree() -> None:
    settings = TheorySettings(
        seeds=(0, 1),
        completion_lambdas=(0.5, 1.0),
        completion_size=30,
        completion_rank=2,
        completion_width=6,
        completion_observed=0.5,
        completion_steps=4000,
        completion_lr=0.05,
    )
    result = run_completion(settings)
    assert max(abs(x) for x in result["relative_objective_difference_max"]) < 1e-4
    assert max(result["relative_distance_max"]) < 1e-2
    assert result["rank_nuclear"] == [2.0, 2.0]
    # both solutions predict the unobserved entries far better than filling them with 0
    assert max(result["test_rmse_nuclear"]) < 0.5 * result["test_rmse_zero_fill"]
    assert result["test_rmse_factored"] == pytest.approx(result["test_rmse_nuclear"], rel=1e-2)


def test_pretrained_balance_sees_balanced_heads_as_zero_gap(tmp_path) -> None:
    model = tiny_hf_model("bert")
    before = run_pretrained(model)
    assert all(0 < row["qk_relative_gap"] < 1 and 0 < row["ov_relative_gap"] < 1 for row in before["layers"])
    # Rebalance every QK head of layer 0 by hand: W_Q^h, W_K^h with the same W_K^hᵀW_Q^h, balanced.
    attention = model.encoder.layer[0].attention.self
    heads, d_head = attention.num_attention_heads, attention.attention_head_size
    with torch.no_grad():
        wq = attention.query.weight.view(heads, d_head, -1).double()
        wk = attention.key.weight.view(heads, d_head, -1).double()
        balanced = FactoredProduct(wk.transpose(1, 2), wq.transpose(1, 2)).balanced()
        attention.key.weight.copy_(balanced.left.transpose(1, 2).reshape(heads * d_head, -1))
        attention.query.weight.copy_(balanced.right.transpose(1, 2).reshape(heads * d_head, -1))
    after = run_pretrained(model)
    assert after["layers"][0]["qk_relative_gap"] < 1e-6
    assert after["layers"][0]["qk_nuclear_norm"] == pytest.approx(
        before["layers"][0]["qk_nuclear_norm"], rel=1e-6
    )
    assert after["layers"][1] == before["layers"][1]  # other layers untouched


def test_cli_writes_json_with_the_issue_keys(tmp_path, capsys) -> None:
    out = tmp_path / "theory.json"
    rc = main(
        [
            "theory",
            "--lambdas",
            "0,0.5",
            "--steps",
            "1500",
            "--lr",
            "0.02",
            "--seeds",
            "0",
            "--parts",
            "toy",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "plots"),
        ]
    )
    assert rc == 0
    from PIL import Image

    for name in ("theory_singular_values.png", "theory_decay.png", "theory_rates.png"):
        with Image.open(tmp_path / "plots" / name) as image:
            assert min(image.size) > 300, name
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1 and data["kind"] == "theory"
    for key in (
        "lambda",
        "final_singular_values",
        "closed_form",
        "svt_singular_values",
        "decay_rate_measured",
        "decay_rate_predicted",
        "gap_decay_rate_measured",
        "gap_decay_rate_predicted",
    ):
        assert len(data[key]) == 2, key
    assert data["decay_rate_measured"][0] is None and data["decay_rate_predicted"][1] == 1.0
    assert "rotated" in data and "optimizers" not in data
    assert data["command"].startswith("qkvlab theory --lambdas 0,0.5 --steps 1500 --lr 0.02")
    printed = capsys.readouterr().out
    assert "Fig. 1 toy" in printed and f"wrote {out}" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lambdas", "0,-0.1"], "lambdas [0.0, -0.1]; accepted: one or more numbers ≥ 0"),
        (["--steps", "0"], "expected a positive integer, got 0"),
        (["--optimizers", "lion"], "unknown optimizer lion; accepted: sgd-momentum, adam-l2, adamw"),
        (["--parts", "toy,fig9"], "unknown part fig9"),
        (["--lr", "0.5"], "lr 0.5 is too large"),
        (["--seeds", "a"], "--seeds 'a'; accepted: comma-separated integers"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv, message, capsys) -> None:
    try:
        code = main(["theory", *argv])
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_toy_time_is_eta_times_steps(short_toy) -> None:
    assert short_toy["t_end"] == pytest.approx(SHORT.steps * SHORT.lr)
    assert math.isclose(short_toy["decay_rate_predicted_discrete"][2], -math.log(1 - 2 * 0.02 * 0.5) / 0.02)


def test_cli_pretrained_reads_each_model_once(tiny_bert, tmp_path, monkeypatch, capsys) -> None:
    """The command opens every --model before any part runs, to refuse a bad name early; the part reuses that
    opened source rather than reading the weights a second time."""
    import qkvlab.attention as attention

    opened: list[str] = []
    real = attention.load_source

    def counting(source):
        opened.append(str(source))
        return real(source)

    monkeypatch.setattr(attention, "load_source", counting)
    out = tmp_path / "theory.json"
    assert (
        main(["theory", "--parts", "pretrained", "--model", str(tiny_bert), "--json", str(out), "--quiet"])
        == 0
    )
    assert opened == [str(tiny_bert)]
    rows = json.loads(out.read_text())["pretrained"][0]["layers"]
    assert len(rows) == 2 and all(row["qk_relative_gap"] > 0 for row in rows)
