"""Exact spectra of factored products A·Bᵀ, and the rank measures we report.

Everything here is pure tensor maths: no I/O, no model knowledge.

Convention. A product is stored by its factors, never formed:

    W = A Bᵀ,   A: (m, r),  B: (n, r),   r = d_head ≪ m, n = d_model.

In attention, per head h (see ``qkvlab.attention``):

    QK_h = W_K^hᵀ W_Q^h   → A = W_K^hᵀ, B = W_Q^hᵀ   (both d_model × d_head)
    OV_h = P^h W_V^h      → A = P^h,    B = W_V^hᵀ   (both d_model × d_head)

Singular values come from thin QR of each factor, A = Q_a R_a, B = Q_b R_b, so
A Bᵀ = Q_a (R_a R_bᵀ) Q_bᵀ and σ(A Bᵀ) = σ(R_a R_bᵀ), an r × r SVD, batched over heads.
Everything runs in float64. Where the factors are stored in bf16, fp16 or a quantised
format, R comes from the float64 Gram matrix AᵀA = RᵀR (shifted Cholesky), about twice
as fast as Householder QR and, with a stated worst-case bound, far more accurate than
the storage itself; float32/float64 factors keep Householder QR. ``ProductSpectrum.
error_bound`` states how far each head's σᵢ can be from the exact ones (docs/spectra.md,
"Precision"). With grouped-query attention several heads
share one K (or V) factor: each distinct factor is decomposed once and its R reused
through an index (``left_index`` / ``right_index``).

Weight decay λ on both factors is the gradient of (λ/2)(‖A‖_F² + ‖B‖_F²), and

    ‖A Bᵀ‖_* = min_{A Bᵀ = W} ½(‖A‖_F² + ‖B‖_F²)          (Srebro et al. 2005),

so ``l2_half`` ≥ ``nuclear_norm`` always, with equality iff the factors are balanced
(AᵀA = BᵀB up to the product's null space). ``gap`` = l2_half − nuclear_norm measures
how far the L2 penalty is from being the nuclear-norm penalty, and ``imbalance`` =
‖AᵀA − BᵀB‖_F is the quantity gradient flow drives to 0 at rate 2λ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkvlab.conventions import DEFAULT_RTOL, SPECTRUM_METHODS

__all__ = [
    "DEFAULT_RTOL",
    "SPECTRUM_METHODS",
    "FactoredProduct",
    "ProductSpectrum",
    "effective_rank",
    "factor_gap",
    "factored_svdvals",
    "nuclear_norm",
    "rank_at",
    "spectrum_method",
    "stable_rank",
]


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.ndim == 2 else x


_COARSE = (torch.bfloat16, torch.float16)
_UNIT = torch.finfo(torch.float64).eps / 2  # u = 2⁻⁵³


def spectrum_method(method: str, *factors: torch.Tensor) -> str:
    """``"gram"`` or ``"qr"``: what ``method`` (see SPECTRUM_METHODS) means for these factors.

    ``auto`` takes the Gram route where every factor is stored in bf16 or fp16 and has at least as many
    rows as columns, and Householder QR otherwise (float32/float64 weights, whose rounding is finer than
    the Gram route's bound, and factors wider than tall).
    """
    if method not in SPECTRUM_METHODS:
        raise ValueError(f"method must be one of {', '.join(SPECTRUM_METHODS)}; got {method!r}")
    if method == "auto":
        coarse = bool(factors) and all(f.dtype in _COARSE and f.shape[-2] >= f.shape[-1] for f in factors)
        return "gram" if coarse else "qr"
    return method


def _gamma(n: int | float) -> float:
    """γ_n = n·u/(1 − n·u), the standard constant of rounding-error analysis (Higham, §3.1)."""
    return n * _UNIT / (1 - n * _UNIT)


def qr_error_constant(rows: int) -> float:
    """κ(m) in the QR route's bound |σ̂ᵢ − σᵢ| ≤ κ(m)·u·‖A‖_F·‖B‖_F for factors of m rows (docs/spectra.md).

    Householder QR returns the exact R of A + ΔA with ‖ΔA‖_F ≤ c·u·‖A‖_F, and Weyl's inequality turns
    that into |σ̂ᵢ − σᵢ| ≤ (c_a + c_b)·u·‖A‖_F‖B‖_F. The worst-case c grows like m·r; measured on
    Gaussian, ill-conditioned (κ = 1e7), low-rank and outlier-row factors of 384–8192 rows (in float32,
    where it is visible), the realised σ error never passed 1.32·u·‖A‖_F‖B‖_F (8192 rows with outlier
    rows, where it grows with m). κ(m) = 4 + m/1024 keeps a margin of at least 4.5× over every case.
    """
    return 4.0 + rows / 1024


def _qr_r(factor: torch.Tensor) -> torch.Tensor:
    """R of the thin QR of each (rows, r) factor, float64, shape (..., min(rows, r), r)."""
    return torch.linalg.qr(factor.to(torch.float64), mode="r").R  # .to is free when already float64


def _householder_r(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_qr_r`` of each factor, and which factors hold NaN or ±inf (found on the same float64 copy)."""
    x = factor.to(torch.float64)
    return _qr_r(x), ~torch.isfinite(x.sum((-1, -2)))


def _gram_r(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """R with RᵀR = AᵀA + E from the float64 Gram matrix, for each (m, r) factor, m ≥ r.

    Returns (R (n, r, r), ‖A‖_F² (n,), e (n,), bad (n,)) where ‖E‖₂ ≤ e and ``bad`` marks factors holding
    NaN or ±inf. Ĝ = fl(AᵀA) is within γ_m‖A‖_F² of AᵀA; it is shifted by s = (m + r + 2)·u·‖A‖_F²
    (larger than that rounding and than what Cholesky needs, so a rank-deficient factor factors too), and
    Cholesky adds at most γ_{r+2}(‖A‖_F² + r·s). So e = s + γ_m‖A‖_F² + γ_{r+2}(‖A‖_F² + r·s), with a 1 %
    margin for the rounding of e itself. A factor Cholesky still refuses gets Householder QR instead.
    """
    # One pass converts to float64 and lays each head out contiguously, so the batched product below
    # runs as plain GEMMs whatever view the factor is (W_O's per-head column blocks are strided).
    x = torch.empty(factor.shape, dtype=torch.float64).copy_(factor)
    m, r = x.shape[-2], x.shape[-1]
    gram = x.transpose(-1, -2) @ x
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    # Every entry of A enters ‖A‖_F² = trace(AᵀA) squared, so the trace is finite exactly when A is (in
    # float64 the squares of float32/bf16 values cannot overflow): no separate pass over A.
    bad = ~torch.isfinite(trace)
    shift = (m + r + 2) * _UNIT * trace
    gram.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
    upper, info = torch.linalg.cholesky_ex(gram, upper=True)
    slack = 1.01 * (shift + _gamma(m) * trace + _gamma(r + 2) * (trace + r * shift))
    refused = (info > 0) & ~bad
    if refused.any():  # a zero factor (shift 0) or one Cholesky still finds indefinite
        upper[refused] = _qr_r(x[refused])
        slack[refused] = 2 * qr_error_constant(m) * _UNIT * trace[refused]
    return upper, trace, slack, bad


@dataclass(frozen=True)
class ProductSpectrum:
    """Per-head spectrum of a batch of products A_h B_hᵀ, plus factor-level quantities.

    Attributes (all float64, leading dimension = heads):
        singular_values: (heads, r), descending.
        l2_half: ½(‖A_h‖_F² + ‖B_h‖_F²), the weight-decay penalty per unit λ.
        imbalance: ‖A_hᵀA_h − B_hᵀB_h‖_F.
        left_gram, right_gram: ‖A_hᵀA_h‖_F and ‖B_hᵀB_h‖_F (for OV: ‖PᵀP‖ and ‖W_V W_Vᵀ‖, the two
            curves of paper 000's Fig. 2, which meet as the factors balance); None if not computed.
        error_bound: (heads,) a bound on max_i |σᵢ − σᵢ(exact)| from rounding in the computation
            (docs/spectra.md, "Precision"); None if not computed.
        method: ``"qr"`` (Householder QR) or ``"gram"`` (float64 Gram matrix and Cholesky).
        left_columns, right_columns: (n_left, r) and (n_right, r), each *distinct* factor's squared column
            norms (shared factors once, as stored), taken from R; None if not computed.
    """

    singular_values: torch.Tensor
    l2_half: torch.Tensor
    imbalance: torch.Tensor
    left_gram: torch.Tensor | None = None
    right_gram: torch.Tensor | None = None
    error_bound: torch.Tensor | None = None
    method: str = "qr"
    left_columns: torch.Tensor | None = None
    right_columns: torch.Tensor | None = None

    @property
    def nuclear_norm(self) -> torch.Tensor:
        return nuclear_norm(self.singular_values)

    @property
    def gap(self) -> torch.Tensor:
        """½(‖A‖² + ‖B‖²) − ‖A Bᵀ‖_* ≥ 0: how far L2 on the factors is from the nuclear norm."""
        return self.l2_half - self.nuclear_norm

    def rank(self, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
        return rank_at(self.singular_values, rtol)

    @property
    def effective_rank(self) -> torch.Tensor:
        return effective_rank(self.singular_values)

    @property
    def stable_rank(self) -> torch.Tensor:
        return stable_rank(self.singular_values)


@dataclass(frozen=True)
class FactoredProduct:
    """A batch of products W_h = A_{i(h)} B_{j(h)}ᵀ given by their factors.

    Args:
        left: (n_left, m, r) factors A (or (m, r) for one).
        right: (n_right, n, r) factors B.
        left_index: (heads,) which left factor each head uses; None = one per head.
        right_index: (heads,) which right factor each head uses; None = one per head.

    Shared factors (grouped-query attention) are decomposed once.
    """

    left: torch.Tensor
    right: torch.Tensor
    left_index: torch.Tensor | None = None
    right_index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        left, right = _as_batch(self.left), _as_batch(self.right)
        object.__setattr__(self, "left", left)
        object.__setattr__(self, "right", right)
        if left.ndim != 3 or right.ndim != 3:
            raise ValueError(
                f"factors must be (batch, rows, r); got {tuple(left.shape)}, {tuple(right.shape)}"
            )
        if left.shape[-1] != right.shape[-1]:
            raise ValueError(f"inner dimensions differ: A is {tuple(left.shape)}, B is {tuple(right.shape)}")
        if self.n_heads != self._resolve(self.right_index, right.shape[0]).numel():
            raise ValueError("left and right factors describe different numbers of heads")

    @staticmethod
    def _resolve(index: torch.Tensor | None, n: int) -> torch.Tensor:
        return torch.arange(n) if index is None else torch.as_tensor(index, dtype=torch.long)

    @property
    def n_heads(self) -> int:
        return self._resolve(self.left_index, self.left.shape[0]).numel()

    def per_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's own factor pair (heads, m, r), (heads, n, r) in float64: shared factors copied."""
        a = self.left.to(torch.float64)[self._resolve(self.left_index, self.left.shape[0])]
        b = self.right.to(torch.float64)[self._resolve(self.right_index, self.right.shape[0])]
        return a, b

    def full(self) -> torch.Tensor:
        """The formed products (heads, m, n) in float64. For tests and small matrices only."""
        a, b = self.per_head()
        return a @ b.transpose(-1, -2)

    def spectrum(self, method: str = "auto") -> ProductSpectrum:
        """Every head's spectrum, by Householder QR or the Gram route (``spectrum_method``)."""
        method = spectrum_method(method, self.left, self.right)
        r = self.left.shape[-1]
        li = self._resolve(self.left_index, self.left.shape[0])
        ri = self._resolve(self.right_index, self.right.shape[0])
        if method == "gram":
            ra, trace_a, slack_a, bad_left = _gram_r(self.left)
            rb, trace_b, slack_b, bad_right = _gram_r(self.right)
        else:
            # A diverged run reports NaN for its heads, not a crash. One sum per factor over the float64
            # copy the QR needs anyway finds any NaN or ±inf in it (a sum of float32/bf16 values cannot
            # overflow float64): 2 % of the QR's time, where isfinite over the stored factors cost a
            # quarter. (Checking R after the QR is not enough: LAPACK's Householder step can drop a NaN
            # that sits on the diagonal, e.g. a (7, 1) factor with NaN in its first entry gives a finite R.)
            # One factor's float64 copy at a time: the peak holds one, not both.
            (ra, bad_left), (rb, bad_right) = _householder_r(self.left), _householder_r(self.right)
        if bad_left.any() or bad_right.any():
            ra, rb = torch.nan_to_num(ra, 0.0, 0.0, 0.0), torch.nan_to_num(rb, 0.0, 0.0, 0.0)
        # each distinct factor's squared column norms: A's j-th column has R_a's norm (Q orthonormal)
        left_columns, right_columns = ra.square().sum(-2), rb.square().sum(-2)
        left_columns[bad_left], right_columns[bad_right] = float("nan"), float("nan")
        ra, rb = ra[li], rb[ri]  # (heads, ka, r), ka = min(m, r)
        core = ra @ rb.transpose(-1, -2)  # (heads, ka, kb): same nonzero σ as A Bᵀ
        sv = torch.linalg.svdvals(core)
        if sv.shape[-1] < r:  # only when d_head > d_model: pad the structural zeros
            sv = torch.nn.functional.pad(sv, (0, r - sv.shape[-1]))
        # AᵀA = R_aᵀR_a exactly (Q orthonormal), so both norms come from the small R's.
        gram_a = ra.transpose(-1, -2) @ ra
        gram_b = rb.transpose(-1, -2) @ rb
        imbalance = torch.linalg.matrix_norm(gram_a - gram_b)
        left_gram, right_gram = torch.linalg.matrix_norm(gram_a), torch.linalg.matrix_norm(gram_b)
        if method == "gram":
            # RᵀR = AᵀA + E with ‖E‖₂ ≤ e: Weyl on λ(G_b^½ G_a G_b^½) twice gives |σ̂ᵢ² − σᵢ²| ≤ ‖G_b‖e_a +
            # (‖G_a‖ + e_a)e_b (‖G‖₂ ≤ ‖A‖_F²), so |σ̂ᵢ − σᵢ| ≤ its square root; plus the float64 core.
            ta, tb, ea, eb = trace_a[li], trace_b[ri], slack_a[li], slack_b[ri]
            l2_half = 0.5 * (ta + tb)  # the exact traces of the unshifted Gram matrices
            error_bound = (tb * ea + (ta + ea) * eb).sqrt() + _gamma(10 * r) * (ta * tb).sqrt()
        else:
            # ‖R‖_F = ‖A‖_F up to the same rounding: the bound's own error is second order.
            l2_half = 0.5 * (ra.square().sum((-1, -2)) + rb.square().sum((-1, -2)))
            kappa = qr_error_constant(max(self.left.shape[-2], self.right.shape[-2]))
            error_bound = kappa * _UNIT * torch.linalg.matrix_norm(ra) * torch.linalg.matrix_norm(rb)
        bad = bad_left[li] | bad_right[ri]
        if bad.any():
            sv, l2_half, imbalance = sv.clone(), l2_half.clone(), imbalance.clone()
            left_gram, right_gram, error_bound = left_gram.clone(), right_gram.clone(), error_bound.clone()
            for value in (sv, l2_half, imbalance, left_gram, right_gram, error_bound):
                value[bad] = float("nan")
        return ProductSpectrum(
            sv, l2_half, imbalance, left_gram, right_gram, error_bound, method, left_columns, right_columns
        )

    def balanced(self) -> FactoredProduct:
        """The same products A_h B_hᵀ from balanced factors: A'ᵀA' = B'ᵀB', so gap = imbalance = 0.

        With thin QRs A = Q_a R_a, B = Q_b R_b and R_a R_bᵀ = U Σ Vᵀ,
        A' = Q_a U Σ^½ and B' = Q_b V Σ^½ (padded with zero columns to width r): then
        A'B'ᵀ = A Bᵀ and A'ᵀA' = B'ᵀB' = Σ, the minimiser of ½(‖A‖² + ‖B‖²) over every
        factorisation of the product (TransformerLens calls this ``make_even``). Float64,
        one factor pair per head.

        Raises ValueError for shared factors (``left_index``/``right_index`` naming one factor for
        several heads, as in grouped-query attention): balancing each head would need a different
        version of the shared factor, so no single balanced set exists.
        """
        for side, index in (("left", self.left_index), ("right", self.right_index)):
            if index is None:
                continue
            counts = torch.as_tensor(index, dtype=torch.long).bincount()
            if (counts > 1).any():
                shared = (counts > 1).nonzero().flatten().tolist()
                raise ValueError(
                    f"cannot balance shared factors: {side} factor(s) {shared} serve several heads "
                    f"({side}_index={torch.as_tensor(index).tolist()}); balance per head by expanding "
                    "the shared factor first (one copy per head)"
                )
        left, right = self.per_head()
        r = left.shape[-1]
        qa, ra = torch.linalg.qr(left)  # (heads, m, ka), (heads, ka, r)
        qb, rb = torch.linalg.qr(right)
        u, s, vh = torch.linalg.svd(ra @ rb.transpose(-1, -2), full_matrices=False)
        root = s.sqrt().unsqueeze(-2)
        new_left, new_right = (qa @ u) * root, (qb @ vh.transpose(-1, -2)) * root
        if new_left.shape[-1] < r:  # d_head > d_model: the extra inner directions carry nothing
            pad = r - new_left.shape[-1]
            new_left = torch.nn.functional.pad(new_left, (0, pad))
            new_right = torch.nn.functional.pad(new_right, (0, pad))
        return FactoredProduct(new_left, new_right)


def factor_gap(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """½(‖A‖_F² + ‖B‖_F²) − ‖A Bᵀ‖_* per factor pair (batched), as a sum of squares, in float64.

    ``ProductSpectrum.gap`` subtracts two numbers of size ½(‖A‖² + ‖B‖²), so it cannot resolve a
    gap below ~1e-16 of that. Here, with thin QRs and R_a R_bᵀ = U Σ Vᵀ (full U, V),

        gap = ½‖(UᵀR_a)_{≤k} − (VᵀR_b)_{≤k}‖² + ½‖(UᵀR_a)_{>k}‖² + ½‖(VᵀR_b)_{>k}‖²,  k = min rank,

    an exact identity whose terms are each small when the factors are nearly balanced. Rounding
    in U, V enters at second order, so the result keeps ~1e-3 relative accuracy down to a gap of
    ~1e-26·½(‖A‖² + ‖B‖²): what measuring the gap's exponential decay over many decades needs.
    """
    ra = _qr_r(_as_batch(left))
    rb = _qr_r(_as_batch(right))
    u, _, vh = torch.linalg.svd(ra @ rb.transpose(-1, -2), full_matrices=True)
    rotated_a, rotated_b = u.transpose(-1, -2) @ ra, vh @ rb
    k = min(rotated_a.shape[-2], rotated_b.shape[-2])
    paired = (rotated_a[..., :k, :] - rotated_b[..., :k, :]).square().sum((-1, -2))
    rest = rotated_a[..., k:, :].square().sum((-1, -2)) + rotated_b[..., k:, :].square().sum((-1, -2))
    return 0.5 * (paired + rest)


def factored_svdvals(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of A Bᵀ (batched), float64, descending, without forming A Bᵀ."""
    return FactoredProduct(left, right).spectrum().singular_values


def nuclear_norm(singular_values: torch.Tensor) -> torch.Tensor:
    """‖W‖_* = Σσᵢ."""
    return singular_values.sum(-1)


def rank_at(singular_values: torch.Tensor, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """#{σᵢ > rtol·σ₁}. A zero matrix has rank 0."""
    top = singular_values[..., :1]
    return ((singular_values > rtol * top) & (top > 0)).sum(-1)


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """Roy–Vetterli (2007) effective rank exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ/Σσ (σ, not σ²).

    Lies in [1, rank]; 0 for a zero matrix by convention.
    """
    total = singular_values.sum(-1, keepdim=True)
    p = singular_values / total.clamp_min(torch.finfo(singular_values.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def stable_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """Σσᵢ²/σ₁² = ‖W‖_F²/‖W‖₂²; 0 for a zero matrix."""
    top = singular_values[..., 0]
    ratio = singular_values.square().sum(-1) / top.square().clamp_min(torch.finfo(singular_values.dtype).tiny)
    return torch.where(top > 0, ratio, torch.zeros_like(ratio))
