"""The factored spectra and rank measures, checked against formed products and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvlab.spectra import (
    FactoredProduct,
    effective_rank,
    factored_svdvals,
    nuclear_norm,
    rank_at,
    stable_rank,
)


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q


@pytest.mark.parametrize(("m", "n", "r", "heads"), [(64, 64, 8, 4), (96, 40, 16, 3), (33, 70, 5, 1)])
def test_factored_svdvals_equal_svdvals_of_formed_product(m: int, n: int, r: int, heads: int) -> None:
    gen = torch.Generator().manual_seed(m + n + r)
    a = torch.randn(heads, m, r, generator=gen, dtype=torch.float64)
    b = torch.randn(heads, n, r, generator=gen, dtype=torch.float64)
    ours = factored_svdvals(a, b)
    naive = torch.linalg.svdvals(a @ b.transpose(-1, -2))[:, :r]
    assert ours.shape == (heads, r)
    torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-12)
    assert torch.all(ours[:, :-1] >= ours[:, 1:]), "descending"


def test_ill_conditioned_factors_recover_exact_spectrum() -> None:
    # A Bᵀ = U diag(s) Vᵀ with s spanning 12 orders of magnitude; factors unbalanced on purpose.
    gen = torch.Generator().manual_seed(0)
    r, d = 16, 200
    s = torch.logspace(0, -12, r, dtype=torch.float64)
    u, v = _orthonormal(d, r, gen), _orthonormal(d, r, gen)
    mix = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64)).Q
    a = u @ torch.diag(s * 1e3) @ mix  # scale 1e3 on A, 1e-3 on B: badly imbalanced
    b = v @ mix * 1e-3
    ours = factored_svdvals(a, b)[0]
    torch.testing.assert_close(ours, s, rtol=0, atol=1e-13)
    naive = torch.linalg.svdvals(a @ b.T)[:r]
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-13)


def test_float32_factors_are_computed_in_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, 128, 32, generator=gen)
    b = torch.randn(5, 128, 32, generator=gen)
    ours = factored_svdvals(a, b)
    assert ours.dtype == torch.float64
    naive = torch.linalg.svdvals(a.double() @ b.double().transpose(-1, -2))[:, :32]
    torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-10)


def test_rank_deficient_product_has_structural_zeros() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    a[:, 5:] = 0.0  # true rank 5
    b = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    sv = factored_svdvals(a, b)[0]
    assert rank_at(sv, 1e-10).item() == 5
    assert torch.all(sv[5:] < 1e-12 * sv[0])


def test_d_head_larger_than_d_model_is_padded_with_zeros() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    sv = factored_svdvals(a, b)
    assert sv.shape == (2, 6)
    torch.testing.assert_close(sv[:, :4], torch.linalg.svdvals(a @ b.transpose(-1, -2)))
    assert torch.all(sv[:, 4:] == 0)


def test_shared_factors_via_index_match_explicit_expansion() -> None:
    # Grouped-query attention: 8 query heads, 2 KV groups; head h uses group h // 4.
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(2, 48, 6, generator=gen, dtype=torch.float64)
    q = torch.randn(8, 48, 6, generator=gen, dtype=torch.float64)
    group = torch.arange(8) // 4
    shared = FactoredProduct(k, q, left_index=group).spectrum()
    expanded = FactoredProduct(k[group], q).spectrum()
    torch.testing.assert_close(shared.singular_values, expanded.singular_values)
    torch.testing.assert_close(shared.l2_half, expanded.l2_half)
    torch.testing.assert_close(shared.imbalance, expanded.imbalance)


def test_l2_half_and_imbalance_match_their_definitions() -> None:
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 30, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 20, 4, generator=gen, dtype=torch.float64) * 2
    spec = FactoredProduct(a, b).spectrum()
    l2_half = 0.5 * (a.square().sum((1, 2)) + b.square().sum((1, 2)))
    imbalance = torch.linalg.matrix_norm(a.transpose(1, 2) @ a - b.transpose(1, 2) @ b)
    torch.testing.assert_close(spec.l2_half, l2_half)
    torch.testing.assert_close(spec.imbalance, imbalance)
    nuclear = torch.linalg.matrix_norm(a @ b.transpose(1, 2), ord="nuc")
    torch.testing.assert_close(spec.nuclear_norm, nuclear)
    # Variational form: ½(‖A‖² + ‖B‖²) ≥ ‖A Bᵀ‖_*, strictly for generic unbalanced factors.
    assert torch.all(spec.gap > 1e-6)


def test_balanced_factors_have_zero_gap_and_zero_imbalance() -> None:
    gen = torch.Generator().manual_seed(6)
    u, v = _orthonormal(40, 5, gen), _orthonormal(30, 5, gen)
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64)).Q
    a, b = u @ torch.diag(s.sqrt()) @ rot, v @ torch.diag(s.sqrt()) @ rot  # AᵀA = BᵀB
    spec = FactoredProduct(a, b).spectrum()
    assert spec.gap.abs().item() < 1e-12
    assert spec.imbalance.item() < 1e-12
    torch.testing.assert_close(spec.nuclear_norm, s.sum().reshape(1))


def test_scalar_gap_is_half_squared_difference() -> None:
    # Scalars (MISSION.md): gap = ½(|a| − |b|)², imbalance = |a² − b²|.
    a, b = torch.tensor([[[3.0]]], dtype=torch.float64), torch.tensor([[[-0.5]]], dtype=torch.float64)
    spec = FactoredProduct(a, b).spectrum()
    assert spec.gap.item() == pytest.approx(0.5 * (3.0 - 0.5) ** 2)
    assert spec.imbalance.item() == pytest.approx(9.0 - 0.25)


def test_rank_measures_on_known_spectra() -> None:
    flat = torch.ones(1, 8, dtype=torch.float64)
    assert effective_rank(flat).item() == pytest.approx(8.0)
    assert stable_rank(flat).item() == pytest.approx(8.0)
    assert rank_at(flat).item() == 8

    single = torch.tensor([[2.0, 0, 0, 0]], dtype=torch.float64)
    assert effective_rank(single).item() == pytest.approx(1.0)
    assert stable_rank(single).item() == pytest.approx(1.0)
    assert rank_at(single).item() == 1

    sv = torch.tensor([[4.0, 2.0, 1.0, 1e-4]], dtype=torch.float64)
    p = sv / sv.sum()
    assert effective_rank(sv).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert stable_rank(sv).item() == pytest.approx((16 + 4 + 1 + 1e-8) / 16)
    assert nuclear_norm(sv).item() == pytest.approx(7.0001)
    assert rank_at(sv, 1e-3).item() == 3
    assert rank_at(sv, 1e-5).item() == 4
    assert rank_at(sv, 0.3).item() == 2  # strict: 1.0 is not > 0.3·4 = 1.2; 2.0 is


def test_zero_product_has_zero_ranks() -> None:
    spec = FactoredProduct(torch.zeros(2, 10, 3), torch.randn(2, 10, 3)).spectrum()
    assert torch.all(spec.singular_values == 0)
    assert torch.all(spec.rank() == 0)
    assert torch.all(spec.effective_rank == 0)
    assert torch.all(spec.stable_rank == 0)


def test_mismatched_factors_are_rejected() -> None:
    with pytest.raises(ValueError, match="inner dimensions"):
        FactoredProduct(torch.zeros(2, 10, 3), torch.zeros(2, 10, 4))
    with pytest.raises(ValueError, match="numbers of heads"):
        FactoredProduct(torch.zeros(2, 10, 3), torch.zeros(3, 10, 3))


def test_non_finite_heads_are_reported_not_fatal() -> None:
    a = torch.randn(3, 20, 4, dtype=torch.float64)
    a[1, 0, 0] = float("nan")
    spec = FactoredProduct(a, torch.randn(3, 20, 4, dtype=torch.float64)).spectrum()
    assert torch.isnan(spec.singular_values[1]).all() and torch.isnan(spec.l2_half[1])
    assert torch.isfinite(spec.singular_values[[0, 2]]).all()
    from qkvlab.inspection import spectrum_records

    records = spectrum_records(0, "qk", spec, 1e-3)
    assert records[1]["singular_values"] is None and records[1]["effective_rank"] is None
    assert records[0]["rank"] == 4
    # where LAPACK's QR drops a NaN on the diagonal: a one-column factor with NaN in its first entry
    one_column = torch.randn(1, 7, 1, dtype=torch.float64)
    one_column[0, 0, 0] = float("nan")
    assert torch.isfinite(torch.linalg.qr(one_column, mode="r").R).all()  # why R is not what is checked
    other = torch.randn(1, 5, 1, dtype=torch.float64)
    assert torch.isnan(FactoredProduct(one_column, other).spectrum().singular_values).all()


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 40),
    r=st.integers(1, 12),
    side=st.sampled_from(["left", "right"]),
    value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    where=st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_one_non_finite_value_anywhere_flags_its_head_and_only_it(rows, r, side, value, where, dtype) -> None:
    """The check runs on the small R factors after the QR, not on the factors: this is why it holds."""
    gen = torch.Generator().manual_seed(rows * 100 + r)
    a = torch.randn(3, rows, r, generator=gen).to(dtype)
    b = torch.randn(3, 7, r, generator=gen).to(dtype)
    clean = FactoredProduct(a, b).spectrum()
    broken = a if side == "left" else b
    broken[1, int(where[0] * broken.shape[1]), int(where[1] * r)] = value
    spec = FactoredProduct(a, b).spectrum()
    assert torch.isnan(spec.singular_values[1]).all() and torch.isnan(spec.imbalance[1])
    for head in (0, 2):
        assert torch.equal(spec.singular_values[head], clean.singular_values[head])
        assert torch.equal(spec.l2_half[head], clean.l2_half[head])


def test_left_and_right_gram_norms_are_the_two_sides_of_the_imbalance() -> None:
    from qkvlab.spectra import FactoredProduct

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 12, 4, generator=gen), torch.randn(3, 10, 4, generator=gen) * 2
    spectrum = FactoredProduct(a, b).spectrum()
    a64, b64 = a.double(), b.double()
    left = torch.linalg.matrix_norm(a64.transpose(-1, -2) @ a64)
    right = torch.linalg.matrix_norm(b64.transpose(-1, -2) @ b64)
    assert torch.allclose(spectrum.left_gram, left, rtol=1e-12) and torch.allclose(
        spectrum.right_gram, right, rtol=1e-12
    )
    assert (spectrum.right_gram > spectrum.left_gram).all()


def _factors(kind: str, heads: int, rows: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """Factors of the shapes and pathologies real checkpoints have."""
    if kind == "gaussian":
        return torch.randn(heads, rows, r, generator=gen)
    if kind == "ill-conditioned":  # singular values from 1 down to 1e-7
        q_left = torch.linalg.qr(torch.randn(heads, rows, r, generator=gen, dtype=torch.float64)).Q
        q_right = torch.linalg.qr(torch.randn(heads, r, r, generator=gen, dtype=torch.float64)).Q
        return ((q_left * torch.logspace(0, -7, r, dtype=torch.float64)) @ q_right.mT).float()
    if kind == "low-rank":
        return torch.randn(heads, rows, r // 4, generator=gen) @ torch.randn(heads, r // 4, r, generator=gen)
    x = torch.randn(heads, rows, r, generator=gen)  # "outlier rows": a few rows 1000× the rest
    x[:, :3] *= 1e3
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["gaussian", "ill-conditioned", "low-rank", "outlier rows"])
@pytest.mark.parametrize(("rows", "r"), [(384, 32), (1024, 64)])
def test_half_factors_take_the_gram_route_within_its_stated_bound_of_householder(
    dtype, kind, rows, r
) -> None:
    gen = torch.Generator().manual_seed(rows + r)
    left = _factors(kind, 3, rows, r, gen).to(dtype)
    right = _factors("gaussian" if kind == "outlier rows" else kind, 3, rows, r, gen).to(dtype)
    if dtype == torch.float16:  # keep the outlier rows inside fp16's range
        left, right = left / left.abs().amax(), right / right.abs().amax()
    fast = FactoredProduct(left, right).spectrum()
    exact = FactoredProduct(left, right).spectrum("qr")
    assert fast.method == "gram" and exact.method == "qr"
    error = (fast.singular_values - exact.singular_values).abs().amax(-1)
    top = exact.singular_values[:, 0]
    # the stated bound holds with room for the reference's own rounding, and the target on every head
    assert (error <= fast.error_bound + exact.error_bound).all(), (error, fast.error_bound)
    assert (error <= 1e-5 * top).all()
    # a worst-case bound far below what bf16/fp16 storage itself may move σ by (the same kind of worst
    # case: entries rounded by up to u_storage = eps/2, 2⁻⁸ for bf16 or 2⁻¹¹ for fp16, move σ by up to
    # (2u + u²)·‖A‖_F‖B‖_F; u·‖A‖_F‖B‖_F is used here, half of that)
    storage = torch.finfo(dtype).eps / 2 * left.double().norm(dim=(1, 2)) * right.double().norm(dim=(1, 2))
    assert (fast.error_bound < 0.01 * storage).all()
    torch.testing.assert_close(fast.l2_half, exact.l2_half, rtol=1e-12, atol=0)
    assert (
        (fast.gap - exact.gap).abs() <= r * (fast.error_bound + exact.error_bound) + 1e-12 * exact.l2_half
    ).all()
    torch.testing.assert_close(
        fast.left_columns, exact.left_columns, rtol=1e-9, atol=1e-12 * float(exact.l2_half.max())
    )


def test_the_method_follows_the_stored_dtype_unless_forced() -> None:
    from qkvlab.spectra import spectrum_method

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 40, 8, generator=gen), torch.randn(2, 30, 8, generator=gen)
    assert FactoredProduct(a, b).spectrum().method == "qr"
    assert FactoredProduct(a.bfloat16(), b.bfloat16()).spectrum().method == "gram"
    assert FactoredProduct(a.half(), b.bfloat16()).spectrum().method == "gram"
    assert FactoredProduct(a.bfloat16(), b).spectrum().method == "qr"  # one float32 side
    assert FactoredProduct(a, b).spectrum("gram").method == "gram"
    assert FactoredProduct(a.bfloat16(), b.bfloat16()).spectrum("qr").method == "qr"
    # wider than tall (d_head > d_model): QR's structural zeros, not Cholesky's shift
    wide = FactoredProduct(torch.randn(2, 4, 8).bfloat16(), torch.randn(2, 6, 8).bfloat16()).spectrum()
    assert wide.method == "qr" and (wide.singular_values[:, 4:] == 0).all()
    assert spectrum_method("auto") == "qr"  # no factors: nothing says the storage is coarse
    with pytest.raises(ValueError, match="auto, gram, qr"):
        spectrum_method("float16", a)


def test_the_gram_route_flags_non_finite_heads_and_handles_any_scale_and_zero_factors() -> None:
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(3, 50, 4, generator=gen).bfloat16()
    for scale in (3e37, 1e-30):  # near bf16's largest value; squares far below float32's smallest normal
        a = (torch.randn(3, 64, 4, generator=gen) * scale).bfloat16()
        fast, exact = FactoredProduct(a, b).spectrum(), FactoredProduct(a, b).spectrum("qr")
        assert fast.method == "gram" and torch.isfinite(fast.singular_values).all()
        assert (
            (fast.singular_values - exact.singular_values)
            .abs()
            .le(fast.error_bound[:, None] + exact.error_bound[:, None])
            .all()
        )
    a = torch.randn(3, 64, 4, generator=gen).bfloat16()
    a[0] = 0  # a dead head: Cholesky refuses a zero Gram matrix, QR takes it
    a[1, 5, 2] = float("nan")
    spectrum = FactoredProduct(a, b).spectrum()
    assert (spectrum.singular_values[0] == 0).all() and spectrum.effective_rank[0] == 0
    assert torch.isnan(spectrum.singular_values[1]).all() and torch.isnan(spectrum.error_bound[1])
    assert torch.isfinite(spectrum.singular_values[2]).all()
