"""Constants that qkvlab's numbers rest on, importable without torch (the command line's help uses them)."""

from __future__ import annotations

__all__ = ["DEFAULT_RTOL", "PRODUCT_NAMES", "TOY_UPDATE_RULES"]

#: Default relative threshold for ``rank``: count σᵢ > 1e-3·σ₁.
#: Why 1e-3: a direction 1000× weaker than the dominant one moves attention logits
#: (or the residual write) by < 0.1 % of it, so it is functionally negligible; yet the
#: threshold sits ~250× above the float32 noise floor of a product of float32 factors
#: (≈ √d_head·eps₃₂ ≈ 1e-6 relative for d_head ≤ 256), so the count reflects training,
#: not rounding. numpy's default (max(m, n)·eps₆₄) would report full rank for almost
#: every trained float32 matrix. ``effective_rank`` and ``stable_rank`` need no threshold.
DEFAULT_RTOL = 1e-3

#: How factored spectra get each factor's R (``qkvlab.spectra.spectrum_method``): ``qr`` (Householder,
#: float64), ``gram`` (float64 Gram matrix and Cholesky: about twice as fast, with a worst-case error
#: bound far below bf16/fp16/quantised storage's own rounding), or ``auto``: gram for such weights, qr
#: for float32/float64 ones.
SPECTRUM_METHODS = ("auto", "gram", "qr")

#: The two products every table and figure names: keys as in inspect's records, values as printed.
PRODUCT_NAMES = {"qk": "W_KᵀW_Q", "ov": "P·W_V"}

#: The update rules of paper 000's factored toy (``qkvlab.theory.train_factors``), by the label its
#: results carry. ``adam-l2`` and ``adamw`` are those optimisers of ``qkvlab.optimizers``; ``gd`` and
#: ``sgd-momentum`` are its ``sgd`` with momentum 0 and with momentum β.
TOY_UPDATE_RULES = {
    "gd": "gradient descent on F (coupled L2; torch SGD, no momentum)",
    "sgd-momentum": "heavy-ball SGD on F (coupled L2; torch SGD(momentum=β), no dampening, no Nesterov)",
    "adam-l2": "Adam on F: the penalty's gradient λp goes through Adam's normalisation (torch Adam + l2_penalty)",
    "adamw": "AdamW: Adam on L with decoupled decay p ← p(1 − ηλ) (torch AdamW(weight_decay=λ))",
}
