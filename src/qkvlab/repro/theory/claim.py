"""Paper 000's theorem measured: the runs behind ``qkvlab theory``.

Five parts, each a function returning JSON-ready data (``run_theory`` puts them together):

- ``toy``: gradient descent on 5×5 factors with target D = diag(0.2, 0.4, 0.6, 0.8, 1.0), and on a
  rotated target U·D·Vᵀ, over a λ grid and seeds, beside proximal gradient on the nuclear-norm
  problem (SVT) and the closed form max(dᵢ − λ, 0); measured decay rates of the imbalance and the
  gap against their predictions (``qkvlab.theory``).
- ``optimizers``: the same toy under heavy-ball SGD, Adam + coupled L2 and AdamW.
- ``completion``: low-rank matrix completion, factorised (width 20) against soft-impute.
- ``pretrained``: how balanced the attention factor pairs of a pretrained model are (Fig. 4).
- ``balanced``: ``FactoredProduct.balanced`` on the toy's trained factors (gap → 0 exactly).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from qkvlab.repro.theory.settings import (
    CURVE_POINTS,
    GAP_FLOOR,
    IMBALANCE_FLOOR,
    KIND,
    OPTIMIZERS,
    PARTS,
    SCHEMA_VERSION,
    TOY_TARGET,
    TheorySettings,
)
from qkvlab.spectra import FactoredProduct
from qkvlab.theory import (
    FactorTrajectory,
    fit_decay_rate,
    lr_schedule,
    nuclear_objective,
    nuclear_prox_gradient,
    predicted_gap_rate,
    predicted_imbalance_rate,
    random_orthogonal,
    train_factors,
)

if TYPE_CHECKING:
    from qkvlab.attention import TensorSource

__all__ = ["KIND", "PARTS", "SCHEMA_VERSION", "TOY_TARGET", "TheorySettings", "run_theory"]

# -- helpers ---------------------------------------------------------------------------------------


def _closed_form(lam: float) -> list[float]:
    return sorted((max(d - lam, 0.0) for d in TOY_TARGET), reverse=True)


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def _thin(values: torch.Tensor) -> list[Any]:
    """At most CURVE_POINTS evenly spaced records (first and last kept), as lists."""
    stride = max(1, math.ceil(values.shape[0] / CURVE_POINTS))
    index = list(range(0, values.shape[0], stride))
    if index[-1] != values.shape[0] - 1:
        index.append(values.shape[0] - 1)
    return values[index].tolist()


def _fits(traj: FactorTrajectory, column: int, before_step: int | None = None) -> tuple[Any, Any]:
    """Imbalance and gap fits of one batch element (records before ``before_step`` only, if given)."""
    keep = slice(None) if before_step is None else traj.step < before_step
    t, l2_half = traj.t[keep], traj.l2_half[keep, column]
    return (
        fit_decay_rate(t, traj.imbalance[keep, column], IMBALANCE_FLOOR * l2_half),
        fit_decay_rate(t, traj.gap[keep, column], GAP_FLOOR * l2_half),
    )


def _window(fit: Any) -> dict[str, float] | None:
    if fit is None:
        return None
    return {
        "t_start": fit.t_start,
        "t_end": fit.t_end,
        "points": fit.points,
        "rate_first_half": fit.rate_first_half,
        "rate_second_half": fit.rate_second_half,
    }


def _append_rates(out: dict[str, Any], imbalance_fits: list, gap_fits: list, lam: float) -> None:
    """Mean and std over seeds of the fitted imbalance and gap rates (null at λ = 0: nothing decays)."""
    for fits, key in ((imbalance_fits, "decay_rate_measured"), (gap_fits, "gap_decay_rate_measured")):
        mean, std = _mean_std([f.rate if f else None for f in fits]) if lam > 0 else (None, None)
        out[key].append(mean)
        out[f"{key}_std"].append(std)


def _toy_batch(
    settings: TheorySettings, rotated: bool, lambdas: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets, λ, A₀, B₀ for seeds × λ (seed-major); one init (and rotation) per seed, shared by every λ."""
    d = torch.diag(torch.tensor(TOY_TARGET, dtype=torch.float64))
    targets, lefts, rights = [], [], []
    for seed in settings.seeds:
        gen = torch.Generator().manual_seed(seed)
        left = settings.init_scale[0] * torch.randn(5, 5, generator=gen, dtype=torch.float64)
        right = settings.init_scale[1] * torch.randn(5, 5, generator=gen, dtype=torch.float64)
        target = random_orthogonal(5, gen) @ d @ random_orthogonal(5, gen).T if rotated else d
        for _ in lambdas:
            targets.append(target)
            lefts.append(left)
            rights.append(right)
    lam = torch.tensor([lam for _ in settings.seeds for lam in lambdas], dtype=torch.float64)
    return torch.stack(targets), lam, torch.stack(lefts), torch.stack(rights)


def _per_lambda(values: Sequence[Any], n_lambdas: int) -> list[list[Any]]:
    """Seed-major flat list → [λ][seed]."""
    n_seeds = len(values) // n_lambdas
    return [[values[s * n_lambdas + i] for s in range(n_seeds)] for i in range(n_lambdas)]


# -- the parts -------------------------------------------------------------------------------------


def run_toy(settings: TheorySettings, rotated: bool = False) -> dict[str, Any]:
    """Gradient descent on the 5×5 toy, SVT beside it, closed form, and the measured rates."""
    lambdas = list(settings.lambdas)
    n = len(lambdas)
    target, lam, left, right = _toy_batch(settings, rotated, lambdas)
    traj = train_factors(
        target,
        lam,
        left,
        right,
        lrs=lr_schedule(settings.steps, settings.lr),
        record_every=settings.record_every,
    )
    svt, svt_iterations = nuclear_prox_gradient(target, lam, lr=0.5, tol=1e-14)
    svt_sv = torch.linalg.svdvals(svt)
    final_sv = traj.singular_values[-1]
    fits = [_fits(traj, i) for i in range(len(lam))]
    imb_fits, gap_fits = _per_lambda([f[0] for f in fits], n), _per_lambda([f[1] for f in fits], n)
    drift = (traj.imbalance[-1] - traj.imbalance[0]) / traj.imbalance[0]
    relative_gap = traj.gap[-1] / traj.singular_values[-1].sum(-1).clamp_min(1e-300)
    balanced = FactoredProduct(traj.left, traj.right).balanced()
    eta = settings.lr
    out: dict[str, Any] = {
        "target": "U·diag(d)·Vᵀ, seeded random orthogonal U, V" if rotated else "diag(d)",
        "target_singular_values": list(TOY_TARGET),
        "optimizer": "gd",
        "lr": eta,
        "steps": settings.steps,
        "t_end": settings.steps * eta,
        "seeds": list(settings.seeds),
        "lambda": lambdas,
        "final_singular_values": [],
        "final_singular_values_std": [],
        "closed_form": [_closed_form(x) for x in lambdas],
        "svt_singular_values": [],
        "svt_iterations": [],
        "max_abs_error_vs_closed_form": [],
        "svt_max_abs_error_vs_closed_form": [],
        "decay_rate_measured": [],
        "decay_rate_measured_std": [],
        "decay_rate_predicted": [predicted_imbalance_rate(x) for x in lambdas],
        "decay_rate_predicted_discrete": [predicted_imbalance_rate(x, eta) for x in lambdas],
        "decay_rate_weight_decay_only": [
            -math.log((1 - eta * x) ** 2) / eta if x > 0 else None for x in lambdas
        ],
        "gap_decay_rate_measured": [],
        "gap_decay_rate_measured_std": [],
        "gap_decay_rate_predicted": [predicted_gap_rate(TOY_TARGET, x) for x in lambdas],
        "gap_decay_rate_predicted_discrete": [predicted_gap_rate(TOY_TARGET, x, eta) for x in lambdas],
        "fit_window": [],  # seed 0's, the one the figure draws
        "gap_fit_window": [],
        "fit_windows_per_seed": [],
        "gap_fit_windows_per_seed": [],
        "imbalance_relative_drift": [],
        "final_relative_gap": [],
        "balanced_max_product_error": float((balanced.full() - traj.left @ traj.right.mT).abs().max()),
        "balanced_max_gap": float(balanced.spectrum().gap.abs().max()),
        "curves": {  # seed 0, per λ; below the floors is float64 rounding
            "t": _thin(traj.t),
            "imbalance": [_thin(traj.imbalance[:, i]) for i in range(n)],
            "gap": [_thin(traj.gap[:, i]) for i in range(n)],
            "imbalance_floor": [_thin(IMBALANCE_FLOOR * traj.l2_half[:, i]) for i in range(n)],
            "gap_floor": [_thin(GAP_FLOOR * traj.l2_half[:, i]) for i in range(n)],
        },
    }
    for i, x in enumerate(lambdas):
        rows = [s * n + i for s in range(len(settings.seeds))]
        closed = torch.tensor(_closed_form(x), dtype=torch.float64)
        out["final_singular_values"].append(final_sv[rows].mean(0).tolist())
        out["final_singular_values_std"].append(
            final_sv[rows].std(0).tolist() if len(rows) > 1 else [0.0] * 5
        )
        out["svt_singular_values"].append(svt_sv[rows].mean(0).tolist())
        out["svt_iterations"].append(int(svt_iterations[rows].max()))
        out["max_abs_error_vs_closed_form"].append(float((final_sv[rows] - closed).abs().max()))
        out["svt_max_abs_error_vs_closed_form"].append(float((svt_sv[rows] - closed).abs().max()))
        _append_rates(out, imb_fits[i], gap_fits[i], x)
        out["imbalance_relative_drift"].append(None if x > 0 else _mean_std(drift[rows].tolist())[0])
        out["fit_window"].append(_window(imb_fits[i][0]) if x > 0 else None)
        out["gap_fit_window"].append(_window(gap_fits[i][0]) if x > 0 else None)
        out["fit_windows_per_seed"].append([_window(f) for f in imb_fits[i]] if x > 0 else None)
        out["gap_fit_windows_per_seed"].append([_window(f) for f in gap_fits[i]] if x > 0 else None)
        out["final_relative_gap"].append(_mean_std(relative_gap[rows].tolist())[0])
    return out


def run_optimizers(settings: TheorySettings) -> dict[str, Any]:
    """The diagonal toy under the optimisers people use; what survives of the theory."""
    lambdas = list(settings.lambdas)
    n = len(lambdas)
    target, lam, left, right = _toy_batch(settings, False, lambdas)
    results: dict[str, Any] = {}
    for name in settings.optimizers:
        adaptive = name in ("adam-l2", "adamw")
        if adaptive:
            lr, steps = settings.adam_lr, settings.adam_steps
            lrs = lr_schedule(steps, lr, settings.anneal_from, settings.anneal_floor)
            constant_until = int(settings.anneal_from * steps)
        else:
            lr, steps = settings.momentum_lr, settings.steps
            lrs, constant_until = lr_schedule(steps, lr), None
        traj = train_factors(
            target,
            lam,
            left,
            right,
            lrs=lrs,
            optimizer=name,
            momentum=settings.momentum,
            betas=settings.betas,
            eps=settings.eps,
            record_every=settings.record_every,
        )
        final_sv = (
            traj.tail_mean(traj.singular_values, settings.tail_fraction)
            if adaptive
            else traj.singular_values[-1]
        )
        final_gap = traj.tail_mean(traj.gap, settings.tail_fraction) if adaptive else traj.gap[-1]
        final_imb = traj.tail_mean(traj.imbalance, settings.tail_fraction) if adaptive else traj.imbalance[-1]
        relative_gap = final_gap / final_sv.sum(-1).clamp_min(1e-300)
        fits = [_fits(traj, i, constant_until) for i in range(len(lam))]
        imb_fits, gap_fits = _per_lambda([f[0] for f in fits], n), _per_lambda([f[1] for f in fits], n)
        entry: dict[str, Any] = {
            "description": OPTIMIZERS[name],
            "lr": lr,
            "steps": steps,
            "t_end": float(lrs.sum()),
            "schedule": (
                f"constant, then cosine from step {constant_until} to {settings.anneal_floor:g}·lr"
                if adaptive
                else "constant"
            ),
            "momentum": settings.momentum if name == "sgd-momentum" else None,
            "betas": list(settings.betas) if adaptive else None,
            "eps": settings.eps if adaptive else None,
            "final_values": (
                f"mean over the last {settings.tail_fraction:.0%} of steps" if adaptive else "last step"
            ),
            "rates_fitted_on": f"steps < {constant_until} (constant learning rate)"
            if adaptive
            else "every step",
            "target_singular_values": list(TOY_TARGET),
            "seeds": list(settings.seeds),
            "lambda": lambdas,
            "closed_form": [_closed_form(x) for x in lambdas],
            "final_singular_values": [],
            "max_abs_error_vs_closed_form": [],
            "max_abs_error_vs_closed_form_std": [],
            "decay_rate_measured": [],
            "decay_rate_measured_std": [],
            "decay_rate_predicted": [
                predicted_imbalance_rate(x, momentum=settings.momentum) if name == "sgd-momentum" else None
                for x in lambdas
            ],
            "decay_rate_weight_decay_only": [2 * x if name == "adamw" and x > 0 else None for x in lambdas],
            # heavy ball ≈ gradient flow with step η/(1 − β) only while 2ηλ ≪ (1 − β)²
            "small_step_parameter": [
                2 * lr * x / (1 - settings.momentum) ** 2 if name == "sgd-momentum" else None for x in lambdas
            ],
            "gap_decay_rate_measured": [],
            "gap_decay_rate_measured_std": [],
            "final_imbalance": [],
            "final_relative_gap": [],
            # λ·max|entry of A, B|: 1 where an ℓ∞ box ‖p‖_∞ ≤ 1/λ binds (AdamW's fixed points, Xie & Li 2024)
            "final_lambda_max_entry": [],
            "curves": {
                "t": _thin(traj.t),
                "imbalance": [_thin(traj.imbalance[:, i]) for i in range(n)],
                "gap": [_thin(traj.gap[:, i]) for i in range(n)],
            },
        }
        for i, x in enumerate(lambdas):
            rows = [s * n + i for s in range(len(settings.seeds))]
            closed = torch.tensor(_closed_form(x), dtype=torch.float64)
            errors = (final_sv[rows] - closed).abs().amax(-1).tolist()
            entry["final_singular_values"].append(final_sv[rows].mean(0).tolist())
            entry["max_abs_error_vs_closed_form"].append(_mean_std(errors)[0])
            entry["max_abs_error_vs_closed_form_std"].append(_mean_std(errors)[1])
            _append_rates(entry, imb_fits[i], gap_fits[i], x)
            entry["final_imbalance"].append(_mean_std(final_imb[rows].tolist())[0])
            largest = torch.maximum(
                traj.left[rows].abs().amax((-1, -2)), traj.right[rows].abs().amax((-1, -2))
            )
            entry["final_lambda_max_entry"].append(_mean_std((x * largest).tolist())[0])
            entry["final_relative_gap"].append(_mean_std(relative_gap[rows].tolist())[0])
        results[name] = entry
    return results


def run_completion(settings: TheorySettings) -> dict[str, Any]:
    """M = UVᵀ (rank 5), 30% observed: factorised GD (width 20) against soft-impute, over λ and seeds."""
    lambdas = list(settings.completion_lambdas)
    size, rank, width = settings.completion_size, settings.completion_rank, settings.completion_width
    targets, masks, lefts, rights = [], [], [], []
    for seed in settings.seeds:
        gen = torch.Generator().manual_seed(10_000 + seed)
        # entries of U, V ~ N(0, 1/√rank), so the entries of M have unit variance
        u = torch.randn(size, rank, generator=gen, dtype=torch.float64) * rank**-0.25
        v = torch.randn(size, rank, generator=gen, dtype=torch.float64) * rank**-0.25
        mask = (
            torch.rand(size, size, generator=gen, dtype=torch.float64) < settings.completion_observed
        ).double()
        a0 = settings.completion_init * torch.randn(size, width, generator=gen, dtype=torch.float64)
        b0 = settings.completion_init * torch.randn(size, width, generator=gen, dtype=torch.float64)
        for _ in lambdas:
            targets.append(u @ v.T)
            masks.append(mask)
            lefts.append(a0)
            rights.append(b0)
    target, mask = torch.stack(targets), torch.stack(masks)
    lam = torch.tensor([x for _ in settings.seeds for x in lambdas], dtype=torch.float64)
    traj = train_factors(
        target,
        lam,
        torch.stack(lefts),
        torch.stack(rights),
        lrs=lr_schedule(settings.completion_steps, settings.completion_lr),
        mask=mask,
        record_every=100,
    )
    nuclear, iterations = nuclear_prox_gradient(target, lam, mask=mask, tol=1e-10)
    factored = traj.left @ traj.right.mT
    g_nuclear = nuclear_objective(nuclear, target, lam, mask)
    f_factored = traj.objective[-1]
    g_of_factored = nuclear_objective(factored, target, lam, mask)
    unobserved = 1 - mask
    n_unobserved = unobserved.sum((-1, -2))

    def rmse(w: torch.Tensor) -> torch.Tensor:
        return ((unobserved * (w - target)).square().sum((-1, -2)) / n_unobserved).sqrt()

    sv_factored, sv_nuclear = torch.linalg.svdvals(factored), torch.linalg.svdvals(nuclear)
    rank_nuclear = (sv_nuclear > 1e-8 * sv_nuclear[:, :1]).sum(-1)
    columns = {
        "objective_factored": f_factored,
        "objective_nuclear": g_nuclear,
        "relative_objective_difference": (f_factored - g_nuclear) / g_nuclear,
        "relative_gap_of_factored": (f_factored - g_of_factored) / g_nuclear,
        "relative_distance": torch.linalg.matrix_norm(factored - nuclear) / torch.linalg.matrix_norm(nuclear),
        "test_rmse_factored": rmse(factored),
        "test_rmse_nuclear": rmse(nuclear),
        "rank_nuclear": rank_nuclear.double(),
    }
    n = len(lambdas)
    out: dict[str, Any] = {
        "size": size,
        "rank": rank,
        "width": width,
        "observed": settings.completion_observed,
        "steps": settings.completion_steps,
        "lr": settings.completion_lr,
        "seeds": list(settings.seeds),
        "lambda": lambdas,
        "soft_impute_iterations": [max(v) for v in _per_lambda(iterations.tolist(), n)],
        "test_rmse_zero_fill": _mean_std(rmse(torch.zeros_like(target)).tolist())[0],
        "singular_values_factored": [sv_factored[i, :width].tolist() for i in range(n)],  # seed 0
        "singular_values_nuclear": [sv_nuclear[i, :width].tolist() for i in range(n)],
    }
    for key, values in columns.items():
        per = _per_lambda(values.tolist(), n)
        out[key] = [_mean_std(v)[0] for v in per]
        out[f"{key}_std"] = [_mean_std(v)[1] for v in per]
        if key in ("relative_objective_difference", "relative_distance"):
            out[f"{key}_max"] = [max(abs(x) for x in v) for v in per]
    return out


def run_pretrained(
    source: str | os.PathLike[str] | torch.nn.Module | TensorSource, seed: int = 0
) -> dict[str, Any]:
    """Fig. 4: per layer, Σ_h ½(‖A‖² + ‖B‖²) against Σ_h ‖ABᵀ‖_* for QK and OV, with references.

    ``random_relative_gap`` is the same ratio for Gaussian factors with each head's norms: how
    balanced unrelated matrices of these shapes already are. ``norm_part`` is the share of the gap
    that unequal norms alone force, Σ_h ½(‖A‖_F − ‖B‖_F)² (the rest is misalignment). Under grouped-query
    attention ``{qk,ov}_group_relative_gap`` is the ratio for the KV groups' products, the ones weight decay
    bounds; with rotary embeddings ``qk_plane_relative_imbalance`` is the mean over planes and groups of
    |Σ_h‖Q^(p)‖² − ‖K^(p)‖²| / (Σ_h‖Q^(p)‖² + ‖K^(p)‖²), the balance that survives the rotation.
    """
    from qkvlab.attention import AttentionFactors, TensorSource, load_source

    tensors = source if isinstance(source, TensorSource) else load_source(source)
    factors = AttentionFactors(tensors)
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for layer in factors:
        row: dict[str, Any] = {"layer": layer.layer}
        for product, pair in (("qk", layer.qk), ("ov", layer.ov)):
            heads = pair.n_heads
            left, right = pair.per_head()
            spectrum = pair.spectrum()
            a_norm, b_norm = torch.linalg.matrix_norm(left), torch.linalg.matrix_norm(right)
            rand_left = torch.randn(left.shape, generator=gen, dtype=torch.float64)
            rand_right = torch.randn(right.shape, generator=gen, dtype=torch.float64)
            rand_left *= (a_norm / torch.linalg.matrix_norm(rand_left)).reshape(heads, 1, 1)
            rand_right *= (b_norm / torch.linalg.matrix_norm(rand_right)).reshape(heads, 1, 1)
            rand = FactoredProduct(rand_left, rand_right).spectrum()
            l2_half, nuclear = float(spectrum.l2_half.sum()), float(spectrum.nuclear_norm.sum())
            row[f"{product}_l2_half"] = l2_half
            row[f"{product}_nuclear_norm"] = nuclear
            row[f"{product}_relative_gap"] = (l2_half - nuclear) / nuclear
            row[f"{product}_norm_part"] = float((0.5 * (a_norm - b_norm).square()).sum()) / nuclear
            row[f"{product}_random_relative_gap"] = float(rand.gap.sum() / rand.nuclear_norm.sum())
        grouped = layer.groups()
        if grouped is not None:  # grouped-query attention: the products weight decay bounds (docs/spectra.md)
            for product, pair in zip(("qk", "ov"), grouped, strict=True):
                spectrum = pair.spectrum()
                l2_half, nuclear = float(spectrum.l2_half.sum()), float(spectrum.nuclear_norm.sum())
                row[f"{product}_group_relative_gap"] = (l2_half - nuclear) / nuclear
        planes = factors.rotary_planes(layer)
        if planes is not None:  # rotary: per plane, |Σ_h‖Q^(p)‖² − ‖K^(p)‖²| over Σ_h‖Q^(p)‖² + ‖K^(p)‖²
            query, key = planes
            row["qk_plane_relative_imbalance"] = float(((query - key).abs() / (query + key)).mean())
        layers.append(row)
    info = factors.info
    return {"source": tensors.name, "architecture": info.to_dict(), "seed": seed, "layers": layers}


def run_theory(
    settings: TheorySettings,
    progress: Callable[[str], None] | None = None,
    opened: Mapping[str, TensorSource] | None = None,
) -> dict[str, Any]:
    """Every requested part; the gradient-descent toy's keys sit at the top level (issue 9's schema).

    ``opened`` maps names in ``settings.models`` to sources the caller has already opened (the command
    opens them first to refuse a bad name before any part runs), so no model is read twice."""
    say = progress or (lambda _message: None)
    result: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": KIND, "settings": settings.to_dict()}
    result["convention"] = {
        "factored": "½‖P_Ω(ABᵀ − M)‖_F² + (λ/2)(‖A‖_F² + ‖B‖_F²)",
        "nuclear": "½‖P_Ω(W − M)‖_F² + λ‖W‖_*",
        "threshold": "σᵢ = max(dᵢ − λ, 0); a loss c_d‖ABᵀ − M‖² + c_p(‖A‖² + ‖B‖²) thresholds at c_p/c_d "
        "(the paper's λ(‖A‖² + ‖B‖²) with a ½ data loss: 2λ)",
        "time": "t = Σ_k η_k (η × steps at a constant learning rate); rates are per unit t",
    }
    if "toy" in settings.parts:
        say("toy: gradient descent on 5×5 factors, diagonal target")
        result.update(run_toy(settings))
        say("toy: rotated target")
        result["rotated"] = run_toy(settings, rotated=True)
    if "optimizers" in settings.parts and settings.optimizers:
        say(f"optimisers: {', '.join(settings.optimizers)}")
        result["optimizers"] = run_optimizers(settings)
    if "completion" in settings.parts:
        say("matrix completion: factorised GD against soft-impute")
        result["completion"] = run_completion(settings)
    if "pretrained" in settings.parts:
        result["pretrained"] = []
        for source in settings.models:
            say(f"pretrained balance: {source}")
            result["pretrained"].append(run_pretrained((opened or {}).get(source, source), settings.seeds[0]))
    return result
