"""Exact spectra of factored products A·Bᵀ, and the rank measures we report.

Everything here is pure tensor maths: no I/O, no model knowledge.

Convention. A product is stored by its factors, never formed:

    W = A Bᵀ,   A: (m, r),  B: (n, r),   r = d_head ≪ m, n = d_model.

In attention, per head h (see ``qkvlab.attention``):

    QK_h = W_K^hᵀ W_Q^h   → A = W_K^hᵀ, B = W_Q^hᵀ   (both d_model × d_head)
    OV_h = P^h W_V^h      → A = P^h,    B = W_V^hᵀ   (both d_model × d_head)

Singular values come from thin QR of each factor, A = Q_a R_a, B = Q_b R_b, so
A Bᵀ = Q_a (R_a R_bᵀ) Q_bᵀ and σ(A Bᵀ) = σ(R_a R_bᵀ), an r × r SVD. All of it runs
in float64 and is batched over heads. With grouped-query attention several heads
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

from qkvlab.conventions import DEFAULT_RTOL

__all__ = [
    "DEFAULT_RTOL",
    "FactoredProduct",
    "ProductSpectrum",
    "effective_rank",
    "factor_gap",
    "factored_svdvals",
    "nuclear_norm",
    "rank_at",
    "stable_rank",
]


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.ndim == 2 else x


def _qr_r(factor: torch.Tensor) -> torch.Tensor:
    """R of the thin QR of each (rows, r) factor, float64, shape (..., min(rows, r), r)."""
    return torch.linalg.qr(factor.to(torch.float64), mode="r").R  # .to is free when already float64


@dataclass(frozen=True)
class ProductSpectrum:
    """Per-head spectrum of a batch of products A_h B_hᵀ, plus factor-level quantities.

    Attributes (all float64, leading dimension = heads):
        singular_values: (heads, r), descending.
        l2_half: ½(‖A_h‖_F² + ‖B_h‖_F²), the weight-decay penalty per unit λ.
        imbalance: ‖A_hᵀA_h − B_hᵀB_h‖_F.
        left_gram, right_gram: ‖A_hᵀA_h‖_F and ‖B_hᵀB_h‖_F (for OV: ‖PᵀP‖ and ‖W_V W_Vᵀ‖, the two
            curves of paper 000's Fig. 2, which meet as the factors balance); None if not computed.
    """

    singular_values: torch.Tensor
    l2_half: torch.Tensor
    imbalance: torch.Tensor
    left_gram: torch.Tensor | None = None
    right_gram: torch.Tensor | None = None

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

    def spectrum(self) -> ProductSpectrum:
        r = self.left.shape[-1]
        li = self._resolve(self.left_index, self.left.shape[0])
        ri = self._resolve(self.right_index, self.right.shape[0])
        # A diverged run reports NaN for its heads, not a crash. One sum per factor over the float64 copy
        # the QR needs anyway finds any NaN or ±inf in it (a sum of float32/bf16 values cannot overflow
        # float64): 2 % of the QR's time, where isfinite over the stored factors cost a quarter.
        # (Checking R after the QR is not enough: LAPACK's Householder step can drop a NaN that sits
        # on the diagonal, e.g. a (7, 1) factor with NaN in its first entry gives a finite R.)
        left, right = self.left.to(torch.float64), self.right.to(torch.float64)
        bad_left = ~torch.isfinite(left.sum((-1, -2)))
        bad_right = ~torch.isfinite(right.sum((-1, -2)))
        ra, rb = _qr_r(left), _qr_r(right)
        if bad_left.any() or bad_right.any():
            ra, rb = torch.nan_to_num(ra, 0.0, 0.0, 0.0), torch.nan_to_num(rb, 0.0, 0.0, 0.0)
        ra, rb = ra[li], rb[ri]  # (heads, ka, r), ka = min(m, r)
        core = ra @ rb.transpose(-1, -2)  # (heads, ka, kb): same nonzero σ as A Bᵀ
        sv = torch.linalg.svdvals(core)
        if sv.shape[-1] < r:  # only when d_head > d_model: pad the structural zeros
            sv = torch.nn.functional.pad(sv, (0, r - sv.shape[-1]))
        # AᵀA = R_aᵀR_a exactly (Q orthonormal), so both norms come from the small R's.
        gram_a = ra.transpose(-1, -2) @ ra
        gram_b = rb.transpose(-1, -2) @ rb
        l2_half = 0.5 * (ra.square().sum((-1, -2)) + rb.square().sum((-1, -2)))
        imbalance = torch.linalg.matrix_norm(gram_a - gram_b)
        left_gram, right_gram = torch.linalg.matrix_norm(gram_a), torch.linalg.matrix_norm(gram_b)
        bad = bad_left[li] | bad_right[ri]
        if bad.any():
            sv, l2_half, imbalance = sv.clone(), l2_half.clone(), imbalance.clone()
            left_gram, right_gram = left_gram.clone(), right_gram.clone()
            for value in (sv, l2_half, imbalance, left_gram, right_gram):
                value[bad] = float("nan")
        return ProductSpectrum(sv, l2_half, imbalance, left_gram, right_gram)

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
