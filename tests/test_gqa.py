"""Grouped-query attention: the product weight decay bounds is the KV group's, not any one head's."""

from __future__ import annotations

import math

import torch

from qkvlab.attention import AttentionFactors, load_source
from qkvlab.inspection import InspectReport, inspect
from qkvlab.spectra import FactoredProduct, factor_gap
from qkvlab.theory import fit_decay_rate, lr_schedule, train_factors

from conftest import tiny_gqa_llama

H, G, D, DH = 4, 2, 32, 8


def _llama(seed: int = 0):  # type: ignore[no-untyped-def]
    return tiny_gqa_llama(seed, H, G, D, DH)


def test_group_spectra_are_those_of_the_groups_heads_side_by_side_formed_by_hand() -> None:
    model = _llama()
    attn = model.model.layers[1].self_attn
    w_q = attn.q_proj.weight.detach().double()
    w_k, w_v = attn.k_proj.weight.detach().double(), attn.v_proj.weight.detach().double()
    w_o = attn.o_proj.weight.detach().double()
    report = inspect(model)
    r = H // G
    for g in range(G):
        k, v = w_k[g * DH : (g + 1) * DH], w_v[g * DH : (g + 1) * DH]  # (dh, d): the group's rows
        heads = range(g * r, (g + 1) * r)
        qk = torch.cat([k.T @ w_q[h * DH : (h + 1) * DH] for h in heads], dim=1)  # d × r·d
        ov = torch.cat([w_o[:, h * DH : (h + 1) * DH] @ v for h in heads], dim=0)  # r·d × d
        l2 = {
            "qk": 0.5 * (k.square().sum() + sum(w_q[h * DH : (h + 1) * DH].square().sum() for h in heads)),
            "ov": 0.5 * (v.square().sum() + sum(w_o[:, h * DH : (h + 1) * DH].square().sum() for h in heads)),
        }
        for product, formed in (("qk", qk), ("ov", ov)):
            (record,) = [
                x for x in report.groups if x["layer"] == 1 and x["group"] == g and x["product"] == product
            ]
            s = torch.linalg.svdvals(formed)[:DH]
            assert torch.allclose(torch.tensor(record["singular_values"], dtype=torch.float64), s, rtol=1e-6)
            assert math.isclose(record["l2_half"], float(l2[product]), rel_tol=1e-6)
            assert math.isclose(record["gap"], float(l2[product] - s.sum()), rel_tol=1e-5, abs_tol=1e-9)
    # one head per group (MHA) has no groups; the JSON round trip keeps them
    assert InspectReport.from_dict(report.to_dict()).groups == report.groups
    factors = AttentionFactors(load_source(model))
    assert factors.layer(0).groups() is not None


def test_weight_decay_balances_the_group_product_while_each_heads_gap_stays_open() -> None:
    """Gradient descent with weight decay λ on a shared K and r query factors, on a loss of the group
    product alone: the group's gap goes to 0 and its imbalance KᵀK − Σ_h Q_hᵀQ_h decays at 2λ per unit
    time t = Σ η (the theorem on the group product), while the per-head products, whose factors are not
    what weight decay penalises, stay far from balance."""
    torch.manual_seed(0)
    r, d, dh, lam, steps, lr = 2, 6, 3, 0.2, 6000, 0.01
    target = torch.randn(1, d, r * d, dtype=torch.float64)
    left = 0.5 * torch.randn(1, d, dh, dtype=torch.float64)  # K: shared
    right = 0.05 * torch.randn(1, r * d, dh, dtype=torch.float64)  # [Q_1; …; Q_r]: unbalanced on purpose
    traj = train_factors(target, [lam], left, right, lrs=lr_schedule(steps, lr), record_every=50)
    l2 = float(traj.l2_half[-1, 0])
    assert float(traj.gap[-1, 0]) / l2 < 1e-8  # the group product is balanced: L2 = nuclear norm
    fit = fit_decay_rate(traj.t, traj.imbalance[:, 0], 1e-13 * traj.l2_half[:, 0])
    assert fit is not None and math.isclose(fit.rate, 2 * lam, rel_tol=0.05), fit
    k = traj.left[0]
    # each head's own pair (K, Q_h) is far from balance, K carrying the norm of every head of the group:
    # its gap is a few per cent of its ½(‖K‖² + ‖Q_h‖²), six orders above the group's
    for h in range(r):
        spectrum = FactoredProduct(k[None], traj.right[0, h * d : (h + 1) * d][None]).spectrum()
        gap = float(factor_gap(k[None], traj.right[0, h * d : (h + 1) * d][None])[0])
        assert math.isclose(gap, float(spectrum.gap[0]), rel_tol=1e-6)
        assert gap > 0.01 * float(spectrum.l2_half[0]), (h, gap / float(spectrum.l2_half[0]))


def _rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embeddings (LLaMA's): plane i is dims (i, i + dh/2), angle position·θ_i."""
    half = x.shape[-1] // 2
    theta = 10000.0 ** (-torch.arange(half, dtype=x.dtype) / half)
    angle = positions[:, None].to(x.dtype) * theta
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def test_rotary_planes_are_summed_by_hand_and_their_imbalance_decays_at_2_lambda() -> None:
    model = _llama(1)
    attn = model.model.layers[0].self_attn
    w_q, w_k = attn.q_proj.weight.detach().double(), attn.k_proj.weight.detach().double()
    report = inspect(model)
    r, half = H // G, DH // 2

    def plane(w: torch.Tensor, head: int, p: int) -> float:  # rotate-half: rows i and i + dh/2
        return float(w[[head * DH + p, head * DH + p + half]].square().sum())

    for rec in [x for x in report.rope_planes if x["layer"] == 0]:
        g, p = rec["group"], rec["plane"]
        query = sum(plane(w_q, h, p) for h in range(g * r, (g + 1) * r))
        key = plane(w_k, g, p)
        assert math.isclose(rec["query"], query, rel_tol=1e-9) and math.isclose(rec["key"], key, rel_tol=1e-9)
        assert math.isclose(rec["imbalance"], query - key, rel_tol=1e-9, abs_tol=1e-12)
    # bf16 weights: the planes come from the Gram route's R
    half_report = inspect(_llama(1).bfloat16())
    assert half_report.precision["method"] == "gram"
    w_q, w_k = (
        attn.q_proj.weight.detach().bfloat16().double(),
        attn.k_proj.weight.detach().bfloat16().double(),
    )
    for rec in [x for x in half_report.rope_planes if x["layer"] == 0]:
        g, p = rec["group"], rec["plane"]
        query = sum(plane(w_q, h, p) for h in range(g * r, (g + 1) * r))
        assert math.isclose(rec["query"], query, rel_tol=1e-9) and math.isclose(
            rec["key"], plane(w_k, g, p), rel_tol=1e-9
        )
    assert len(report.rope_planes) == 2 * G * half  # every layer, group and plane; no rotary, no planes:
    assert not inspect(torch.nn.MultiheadAttention(8, 2, bias=False)).rope_planes

    # gradient descent with weight decay on a loss of rotary scores: each plane's ‖W_Q^(p)‖² − ‖W_K^(p)‖²
    # decays as e^(−2λt), one dimension's alone does not (the law is the plane's)
    torch.manual_seed(0)
    d, dh, tokens, lam, lr, steps = 6, 4, 12, 0.5, 2e-3, 1000
    x, pos = torch.randn(tokens, d, dtype=torch.float64), torch.arange(tokens)
    teacher_q, teacher_k = torch.randn(dh, d, dtype=torch.float64), torch.randn(dh, d, dtype=torch.float64)
    target = _rope(x @ teacher_q.T, pos) @ _rope(x @ teacher_k.T, pos).T
    q = (1.0 * torch.randn(dh, d, dtype=torch.float64)).requires_grad_()
    k = (0.2 * torch.randn(dh, d, dtype=torch.float64)).requires_grad_()

    def planes() -> tuple[torch.Tensor, torch.Tensor]:
        qs, ks = q.detach().square().sum(1), k.detach().square().sum(1)
        return (qs[:2] + qs[2:]) - (ks[:2] + ks[2:]), qs - ks  # per plane, per dimension

    start_plane, start_dim = planes()
    for _ in range(steps):
        scores = _rope(x @ q.T, pos) @ _rope(x @ k.T, pos).T
        loss = 0.5 * (scores - target).square().sum() / tokens**2 + 0.5 * lam * (
            q.square().sum() + k.square().sum()
        )
        loss.backward()
        with torch.no_grad():
            q -= lr * q.grad
            k -= lr * k.grad
        q.grad, k.grad = None, None
    end_plane, end_dim = planes()
    expected = math.exp(-2 * lam * lr * steps)
    assert torch.allclose(end_plane / start_plane, torch.full_like(end_plane, expected), rtol=0.01)
    assert not torch.allclose(end_dim / start_dim, torch.full_like(end_dim, expected), rtol=0.1)


def test_the_report_shows_the_group_products_and_the_rotary_planes(tmp_path) -> None:
    from qkvlab.report.build import write_report

    report = inspect(_llama(2))
    path = tmp_path / "gqa.json"
    report.to_json(path)
    _, md = write_report([path], tmp_path / "r")
    text = md.read_text()
    assert "QK group gap/‖·‖_*" in text and "QK plane imbalance" in text
    group = [r for r in report.groups if r["layer"] == 1 and r["product"] == "ov"]
    expected = sum(r["gap"] for r in group) / sum(r["nuclear_norm"] for r in group)
    (row,) = [line for line in text.splitlines() if line.startswith("| 1 |") and "%" in line]
    assert f"{expected:.2%}" in row.split("|")[5]  # OV group gap/‖·‖_* of layer 1, as computed here


def test_tensorboard_summaries_carry_the_group_and_plane_figures_and_mha_adds_none() -> None:
    from qkvlab.inspection import group_summary, summary_metrics

    report = inspect(_llama(3))
    metrics = summary_metrics(report)
    rows = {row["layer"]: row for row in group_summary(report)}
    group = [r for r in report.groups if r["layer"] == 0 and r["product"] == "qk"]
    assert math.isclose(
        metrics["spectra/L0/qk_group_gap_rel"],
        sum(r["gap"] for r in group) / sum(r["nuclear_norm"] for r in group),
    )
    assert metrics["spectra/L1/qk_plane_imbalance"] == rows[1]["qk_plane_imbalance"] > 0
    mha = summary_metrics(inspect(torch.nn.MultiheadAttention(8, 2, bias=False)))
    assert not any("group" in key or "plane" in key for key in mha)


def test_the_terminal_prints_the_group_table_for_gqa_and_nothing_more_for_mha() -> None:
    from qkvlab.render.tables import inspect_text

    report = inspect(_llama(4))
    text = inspect_text(report)
    row = report.group_summary()[1]
    assert "QK group gap/‖·‖_*" in text and "QK plane imbalance" in text
    (line,) = [x for x in text.splitlines() if x.strip().startswith("1 ") and "%" in x]
    assert line.split()[1:] == [
        f"{row[k]:.2%}" for k in ("qk_group_gap_rel", "ov_group_gap_rel", "qk_plane_imbalance")
    ]
    assert "group gap" not in inspect_text(inspect(torch.nn.MultiheadAttention(8, 2, bias=False)))
