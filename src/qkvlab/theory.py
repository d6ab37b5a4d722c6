"""Paper 000's theorem as code: weight decay on two factors is a nuclear-norm penalty on their product.

Pure tensor maths (float64, batched over a leading dimension), no I/O. ``qkvlab theory`` arranges
these calls into the paper's toy, its optimiser variants and matrix completion
(``qkvlab.repro.theory.claim``).

Our convention, stated once:

    factored:  F(A, B) = L(A Bᵀ) + (λ/2)(‖A‖_F² + ‖B‖_F²)
    nuclear:   G(W)    = L(W) + λ‖W‖_*
    L(W)       = ½‖P_Ω(W − M)‖_F²   (P_Ω keeps the observed entries; all of them without a mask)

Because min over A Bᵀ = W of ½(‖A‖² + ‖B‖²) is ‖W‖_* (Srebro et al. 2005), F(A, B) ≥ G(A Bᵀ), with
equality exactly when the factors are balanced (AᵀA = BᵀB), and min F = min G once the width r is
at least the rank of G's minimiser. With every entry observed and M = U diag(d) Vᵀ, G's minimiser is
singular value thresholding, SVT_λ(M) = U diag(max(dᵢ − λ, 0)) Vᵀ. torch's ``weight_decay=λ`` (SGD's
coupled decay and AdamW's p ← p(1 − ηλ)) is the gradient of (λ/2)‖p‖², i.e. our λ.

Other normalisations (the paper writes both λ(‖A‖² + ‖B‖²) and (λ/2)(…), and its toy's data loss
may lack the ½): for a loss c_d‖ABᵀ − M‖² + c_p(‖A‖² + ‖B‖²) the threshold is τ = c_p / c_d. So
½‖·‖² + λ(‖A‖² + ‖B‖²) thresholds at 2λ, ‖·‖² + λ(…) at λ, ‖·‖² + (λ/2)(…) at λ/2; ours at λ.

Dynamics (step η, time t = Σ_k η_k). Let I = AᵀA − BᵀB and g_A = ∇_A F, g_B = ∇_B F. For any L,

    I_{k+1} = (1 − 2ηλ) I_k + η² (g_Aᵀ g_A − g_Bᵀ g_B)           (gradient descent, exact)

so under gradient flow dI/dt = −2λ I: the imbalance decays at exactly 2λ. Under gradient descent
the gradients vanish at convergence and the asymptotic rate per unit t is −ln(1 − 2ηλ)/η. (The
weight-decay factor alone, (1 − ηλ)² per step, gives −ln((1 − ηλ)²)/η; the O(η²) gradient term
shifts it to the former.) The gap ½(‖A‖² + ‖B‖²) − ‖ABᵀ‖_* goes to 0 with I: a surviving direction
(dᵢ > λ) contributes a gap quadratic in its imbalance (rate 4λ); a thresholded one (dᵢ ≤ λ) decays
at 2(λ + dᵢ); a direction with no signal (dᵢ = 0) at 2λ. The predicted asymptotic gap rate is the
slowest of these (``predicted_gap_rate``). Heavy-ball momentum β follows gradient flow with time
step η/(1 − β), so in t = η·steps the rates become 2λ/(1 − β) while the step is small. Adam and
AdamW have no such law: ``qkvlab theory`` measures them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qkvlab.conventions import TOY_UPDATE_RULES as OPTIMIZERS
from qkvlab.spectra import FactoredProduct, factor_gap

__all__ = [
    "OPTIMIZERS",
    "DecayFit",
    "FactorTrajectory",
    "factored_objective",
    "fit_decay_rate",
    "lr_schedule",
    "nuclear_objective",
    "nuclear_prox_gradient",
    "predicted_gap_rate",
    "predicted_imbalance_rate",
    "random_orthogonal",
    "singular_value_threshold",
    "train_factors",
]

#: The update rules ``train_factors`` implements, each identical to the torch optimiser named
#: (tested against it step by step, with ``qkvlab.l2_penalty`` for the coupled ones).
_COUPLED = {"gd", "sgd-momentum", "adam-l2"}


# -- the nuclear-norm side ----------------------------------------------------------------------


def singular_value_threshold(matrix: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """SVT_τ(W) = U diag(max(σᵢ − τ, 0)) Vᵀ: the proximal operator of τ‖·‖_* (batched; τ per matrix)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    tau = torch.as_tensor(tau, dtype=s.dtype)
    shrunk = (s - tau.reshape(*tau.shape, *([1] * (s.ndim - tau.ndim)))).clamp_min(0.0)
    return (u * shrunk.unsqueeze(-2)) @ vh


def _residual(product: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    residual = product - target
    return residual if mask is None else residual * mask


def _per_matrix(lam: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=like.dtype)
    return lam.reshape(*lam.shape, 1, 1) if lam.ndim else lam


def nuclear_objective(
    matrix: torch.Tensor, target: torch.Tensor, lam: torch.Tensor | float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """G(W) = ½‖P_Ω(W − M)‖_F² + λ‖W‖_*, per matrix."""
    data = 0.5 * _residual(matrix, target, mask).square().sum((-1, -2))
    return data + torch.as_tensor(lam, dtype=matrix.dtype) * torch.linalg.svdvals(matrix).sum(-1)


def factored_objective(
    left: torch.Tensor,
    right: torch.Tensor,
    target: torch.Tensor,
    lam: torch.Tensor | float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """F(A, B) = ½‖P_Ω(A Bᵀ − M)‖_F² + (λ/2)(‖A‖_F² + ‖B‖_F²), per factor pair."""
    data = 0.5 * _residual(left @ right.mT, target, mask).square().sum((-1, -2))
    penalty = 0.5 * (left.square().sum((-1, -2)) + right.square().sum((-1, -2)))
    return data + torch.as_tensor(lam, dtype=left.dtype) * penalty


def nuclear_prox_gradient(
    target: torch.Tensor,
    lam: torch.Tensor | float,
    *,
    mask: torch.Tensor | None = None,
    lr: float = 1.0,
    tol: float = 1e-11,
    max_iter: int = 100_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise G by proximal gradient: W ← SVT_{ηλ}(W − η P_Ω(W − M)), from W = 0.

    The data loss is 1-smooth, so any η ∈ (0, 1] converges; η = 1 with a mask is soft-impute
    (Mazumder et al. 2010). A matrix stops once an iteration moves it by ≤ tol·‖W‖_F. Returns the
    minimisers (batched like ``target``) and the iterations each took.
    """
    if not 0 < lr <= 1:
        raise ValueError(f"lr must be in (0, 1] (the data loss is 1-smooth), got {lr}")
    batch = target.reshape(-1, *target.shape[-2:])
    n = batch.shape[0]
    lam_all = torch.as_tensor(lam, dtype=target.dtype).expand(target.shape[:-2]).reshape(n)
    mask_all = None if mask is None else mask.expand(target.shape).reshape(n, *target.shape[-2:])
    current = torch.zeros_like(batch)
    iterations = torch.full((n,), max_iter, dtype=torch.long)
    active = torch.arange(n)
    for iteration in range(1, max_iter + 1):
        w, m = current[active], batch[active]
        step = _residual(w, m, None if mask_all is None else mask_all[active])
        new = singular_value_threshold(w - lr * step, lr * lam_all[active])
        moved = torch.linalg.matrix_norm(new - w)
        current[active] = new
        done = moved <= tol * torch.linalg.matrix_norm(new).clamp_min(1e-300)
        iterations[active[done]] = iteration
        active = active[~done]
        if active.numel() == 0:
            break
    return current.reshape(target.shape), iterations.reshape(target.shape[:-2])


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random n × n orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


# -- the factored side: training A, B ------------------------------------------------------------


def lr_schedule(steps: int, lr: float, anneal_from: float | None = None, floor: float = 0.01) -> torch.Tensor:
    """Per-step learning rates: constant, or constant until ``anneal_from``·steps and then a cosine
    down to ``floor``·lr at the last step."""
    rates = torch.full((steps,), float(lr), dtype=torch.float64)
    if anneal_from is not None:
        start = int(anneal_from * steps)
        span = max(steps - 1 - start, 1)
        k = torch.arange(steps - start, dtype=torch.float64)
        rates[start:] = lr * (floor + (1 - floor) * 0.5 * (1 + torch.cos(math.pi * k / span)))
    return rates


@dataclass(frozen=True)
class FactorTrajectory:
    """What ``train_factors`` recorded, every ``record_every`` steps and at the end.

    Attributes (N = batch):
        step: (T,) step index of each record. t: (T,) Σ η_k before that step (the paper's time).
        lr: (T,) learning rate at each record.
        imbalance: (T, N) ‖AᵀA − BᵀB‖_F.
        gap: (T, N) ½(‖A‖² + ‖B‖²) − ‖ABᵀ‖_* (``factor_gap``: resolved down to ~1e-26 of l2_half).
        l2_half: (T, N) ½(‖A‖² + ‖B‖²). objective: (T, N) F(A, B).
        singular_values: (T, N, r) of A Bᵀ, descending.
        left, right: the final factors (N, m, r), (N, n, r).
    """

    step: torch.Tensor
    t: torch.Tensor
    lr: torch.Tensor
    imbalance: torch.Tensor
    gap: torch.Tensor
    l2_half: torch.Tensor
    objective: torch.Tensor
    singular_values: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    def tail_mean(self, values: torch.Tensor, fraction: float) -> torch.Tensor:
        """Mean over the records in the last ``fraction`` of the steps (at least the last record)."""
        first = self.step[-1] - fraction * self.step[-1]
        return values[self.step >= first].mean(0)


def train_factors(
    target: torch.Tensor,
    lam: torch.Tensor | Sequence[float] | float,
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    lrs: torch.Tensor,
    optimizer: str = "gd",
    mask: torch.Tensor | None = None,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    record_every: int = 10,
) -> FactorTrajectory:
    """Train factors A (N, m, r), B (N, n, r) on F(A, B) with one of ``OPTIMIZERS``.

    ``lrs`` holds one learning rate per step (``lr_schedule``); ``lam`` one λ per batch element.
    The update rules are torch's (SGD, Adam, AdamW, float64), written out batched so a whole λ grid
    trains at once; ``tests/test_theory.py`` checks them against the torch optimisers.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
    a, b = left.to(torch.float64).clone(), right.to(torch.float64).clone()
    lam_vec = torch.as_tensor(lam, dtype=torch.float64)
    lam_b = _per_matrix(lam_vec, a)
    coupled = optimizer in _COUPLED
    beta1, beta2 = betas
    state_a: list[torch.Tensor] = []
    state_b: list[torch.Tensor] = []
    records: dict[str, list[torch.Tensor]] = {k: [] for k in ("imb", "gap", "l2", "obj", "sv")}
    steps, times, rates = [], [], []
    elapsed = 0.0
    n_steps = len(lrs)

    def record(k: int) -> None:
        spectrum = FactoredProduct(a, b).spectrum()
        records["imb"].append(spectrum.imbalance)
        records["gap"].append(factor_gap(a, b))  # not spectrum.gap: it must resolve gaps far below 1e-16
        records["l2"].append(spectrum.l2_half)
        records["sv"].append(spectrum.singular_values)
        records["obj"].append(factored_objective(a, b, target, lam_vec, mask))
        steps.append(k)
        times.append(elapsed)
        rates.append(float(lrs[min(k, n_steps - 1)]))

    for k in range(n_steps):
        if k % record_every == 0:
            record(k)
        eta = float(lrs[k])
        residual = _residual(a @ b.mT, target, mask)
        grad_a, grad_b = residual @ b, residual.mT @ a
        if coupled:
            grad_a, grad_b = grad_a + lam_b * a, grad_b + lam_b * b
        if optimizer == "gd":
            a, b = a - eta * grad_a, b - eta * grad_b
        elif optimizer == "sgd-momentum":
            if k == 0:
                state_a, state_b = [grad_a.clone()], [grad_b.clone()]
            else:
                state_a[0] = momentum * state_a[0] + grad_a
                state_b[0] = momentum * state_b[0] + grad_b
            a, b = a - eta * state_a[0], b - eta * state_b[0]
        else:  # adam-l2, adamw
            if not coupled:
                a, b = a * (1 - eta * lam_b), b * (1 - eta * lam_b)
            if k == 0:
                state_a = [torch.zeros_like(a), torch.zeros_like(a)]
                state_b = [torch.zeros_like(b), torch.zeros_like(b)]
            correction1, correction2 = 1 - beta1 ** (k + 1), 1 - beta2 ** (k + 1)
            updated = []
            for param, grad, (m, v) in ((a, grad_a, state_a), (b, grad_b, state_b)):
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = v.sqrt() / math.sqrt(correction2) + eps
                updated.append(param - (eta / correction1) * m / denom)
            a, b = updated
        elapsed += eta
    record(n_steps)
    return FactorTrajectory(
        step=torch.tensor(steps),
        t=torch.tensor(times, dtype=torch.float64),
        lr=torch.tensor(rates, dtype=torch.float64),
        imbalance=torch.stack(records["imb"]),
        gap=torch.stack(records["gap"]),
        l2_half=torch.stack(records["l2"]),
        objective=torch.stack(records["obj"]),
        singular_values=torch.stack(records["sv"]),
        left=a,
        right=b,
    )


# -- rates: measured and predicted ----------------------------------------------------------------


@dataclass(frozen=True)
class DecayFit:
    """An exponential decay rate fitted to ln y = c − rate·t on a window of the curve.

    ``rate_first_half`` / ``rate_second_half`` are the same fit on each half of the window: if they
    differ, the window is not yet asymptotic (a faster mode still contributes).
    """

    rate: float
    t_start: float
    t_end: float
    points: int
    rate_first_half: float
    rate_second_half: float


def _slope(t: torch.Tensor, log_y: torch.Tensor) -> float:
    tc = t - t.mean()
    return float(-(tc * (log_y - log_y.mean())).sum() / tc.square().sum())


def fit_decay_rate(
    t: torch.Tensor,
    values: torch.Tensor,
    floor: torch.Tensor | float,
    *,
    keep_decades: float = 0.4,
    min_points: int = 6,
) -> DecayFit | None:
    """Fit the asymptotic exponential decay rate of a curve that falls towards 0.

    The window, chosen from the curve alone: drop everything from the first sample at or below
    ``floor`` on (a number, or one per sample: float64 rounding sits near 1e-16 of the
    quantities the curve is a difference of, e.g. ½(‖A‖² + ‖B‖²) at that time); from the curve's peak to its last point above the floor it falls by
    D decades; fit the last ``keep_decades``·D of them, i.e. the samples after the last time the
    curve was above y_end·10^(keep_decades·D). That is the part furthest into the asymptotic
    regime that rounding has not reached. Returns None when fewer than ``min_points`` samples
    remain or the curve never falls.
    """
    y = values.to(torch.float64)
    below = (y <= torch.as_tensor(floor, dtype=torch.float64)).nonzero().flatten()
    end = int(below[0]) if below.numel() else y.numel()
    if end < min_points:
        return None
    y, t = y[:end], t[:end].to(torch.float64)
    peak = int(torch.argmax(y))
    if y[-1] >= y[peak]:
        return None
    decades = math.log10(float(y[peak] / y[-1]))
    top = float(y[-1]) * 10 ** (keep_decades * decades)
    above = (y[peak:] > top).nonzero().flatten()
    start = peak + (int(above[-1]) + 1 if above.numel() else 0)
    start = min(start, end - min_points)
    t_w, log_w = t[start:], y[start:].log()
    half = t_w.numel() // 2
    return DecayFit(
        rate=_slope(t_w, log_w),
        t_start=float(t_w[0]),
        t_end=float(t_w[-1]),
        points=int(t_w.numel()),
        rate_first_half=_slope(t_w[: half + 1], log_w[: half + 1]),
        rate_second_half=_slope(t_w[half:], log_w[half:]),
    )


def predicted_imbalance_rate(lam: float, lr: float | None = None, momentum: float = 0.0) -> float | None:
    """Rate per unit t of ‖AᵀA − BᵀB‖: 2λ/(1 − β) under gradient flow (β = momentum).

    With ``lr`` (gradient descent, no momentum): the asymptotic discrete value −ln(1 − 2ηλ)/η.
    None at λ = 0, where the imbalance is conserved (up to O(η²) per step).
    """
    if lam <= 0:
        return None
    if lr is None:
        return 2 * lam / (1 - momentum)
    if momentum:
        raise ValueError("the discrete-step value is derived for gradient descent without momentum")
    return -math.log1p(-2 * lr * lam) / lr


def predicted_gap_rate(
    target_singular_values: Sequence[float], lam: float, lr: float | None = None
) -> float | None:
    """Asymptotic rate per unit t of the gap ½(‖A‖² + ‖B‖²) − ‖ABᵀ‖_* under gradient flow.

    The slowest of: 4λ if some dᵢ > λ (a surviving direction's gap is quadratic in its imbalance),
    and 2(λ + dᵢ) for every dᵢ ≤ λ (a thresholded direction; 2λ for one with no signal). With ``lr``,
    the discrete gradient-descent value: each per-step factor (1 − ηκ) in place of e^(−ηκ). Avoid λ
    equal to some dᵢ: convergence there is only algebraic. None at λ = 0.
    """
    if lam <= 0:
        return None
    # (per-step contraction κ of the amplitude, power of the amplitude in the gap)
    modes = [(2 * lam, 2)] if any(d > lam for d in target_singular_values) else []
    modes += [(lam + d, 2) for d in target_singular_values if d <= lam]
    if lr is None:
        return min(power * kappa for kappa, power in modes)
    return min(-power * math.log1p(-lr * kappa) / lr for kappa, power in modes)
