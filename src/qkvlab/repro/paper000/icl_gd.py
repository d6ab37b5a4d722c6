"""A trained one-layer attention model on ``icl-regression`` against one step of gradient descent, in weight space.

Convention. Tokens are z = [x; y] ∈ ℝ^{d+1} (the query's y is 0), embedded as e = E z; the head reads
the query's output with h. Scores are q·k = e_kᵀ W_Kᵀ W_Q e_q, so in token space each head's
bilinear form is M = Eᵀ W_Kᵀ W_Q E and its value read-out is u = Eᵀ W_Vᵀ Pᵀ h (P: the head's
columns of the output projection). With linear attention over N tokens the prediction is

    ŷ = rᵀ z_q + Σᵢ Σ_{a,b,c} T[a, b, c] zᵢ[a] zᵢ[b] x_q[c],   T = (1/N) Σ_heads u ⊗ M[:, :d],   r = Eᵀ h.

One GD step from w = 0 with step η (von Oswald et al. 2023) is r = 0 and T = η e_y ⊗ [I_d; 0]. Only
the part of T symmetric in (a, b) acts on predictions, so T is compared after symmetrising. The
measures:

- ``cosine``: Frobenius cosine of the symmetrised T with GD's (1: the same function up to scale);
- ``step_ratio``: T's projection on GD's direction, as a multiple of the best expected step η*;
- ``direct``: ‖r_x‖², the expected squared size of the residual path's direct term rᵀz_q, which GD has not;
- ``qk_cosine``: per head, the cosine of sign(u_y)·M[:, :d] with [I_d; 0] (the query's y is 0, so
  M[:, d] acts on nothing; u ⊗ M is unchanged by flipping both signs);
- ``ov_cosine``: per head, |u_y| / ‖u‖ (GD reads only y from the context).

For softmax attention T is the first-order (small-score) part only: softmax(s/√d_head)ᵢ ≈
(1 + (sᵢ − s̄)/√d_head)/N, so its T carries the extra 1/√d_head (the −s̄ term centres the values,
which leaves the y read-out unchanged in expectation). The measures are computed for one-layer
models without norms or biases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["ALIGNMENT_FILE", "gd_alignment", "run_alignment", "write_alignments"]

ALIGNMENT_FILE = "gd_alignment.json"


def gd_alignment(model: torch.nn.Module, step: float, points: int) -> dict[str, Any] | None:
    """The measures above for a one-layer, norm-free, bias-free ICL model over ``points`` tokens; None otherwise.

    ``step``: the best expected GD step η* (:func:`qkvlab.data.icl.gd_step_size`).
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.kind != "icl" or cfg.n_layer != 1 or cfg.norm or cfg.bias:
        return None
    with torch.no_grad():
        embed = model.embed.weight.double()  # (d_model, d + 1)
        head = model.head.weight.double()[0]  # (d_model,)
        attn = model.blocks[0].attn
        d = embed.shape[1] - 1
        w_q, w_k, w_v = (p.weight.double() for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        w_o = attn.o_proj.weight.double()
        target_m = torch.cat([torch.eye(d, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64)])
        e_y = torch.zeros(d + 1, dtype=torch.float64)
        e_y[d] = 1.0
        total = torch.zeros(d + 1, d + 1, d, dtype=torch.float64)
        qk_cos, ov_cos = [], []
        for h in range(attn.n_head):
            rows = slice(h * attn.d_head, (h + 1) * attn.d_head)
            m = embed.T @ w_k[rows].T @ w_q[rows] @ embed
            u = embed.T @ w_v[rows].T @ w_o[:, rows].T @ head
            total += torch.einsum("a,bc->abc", u, m[:, :d])
            sign = -1.0 if u[d] < 0 else 1.0  # u ⊗ M = (−u) ⊗ (−M): compare M with the sign u_y gives it
            qk_cos.append(_cosine(sign * m[:, :d], target_m))
            ov_cos.append((u[d].abs() / u.norm()).item() if u.norm() > 0 else 0.0)
        total /= points
        if attn.kind == "softmax":
            # first order in the scores: softmax(s/√d_head)ᵢ ≈ (1 + (sᵢ − s̄)/√d_head)/N
            total /= attn.d_head**0.5
        gd = torch.einsum("a,bc->abc", e_y, target_m)
        sym, gd_sym = 0.5 * (total + total.transpose(0, 1)), 0.5 * (gd + gd.transpose(0, 1))
        projection = (sym * gd_sym).sum() / (gd_sym * gd_sym).sum()
        direct = (embed.T @ head)[:d].square().sum().item()
    return {
        "cosine": _cosine(sym, gd_sym),
        "step_ratio": projection.item() / step,
        "direct": direct,
        "qk_cosine": qk_cos,
        "ov_cosine": ov_cos,
    }


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = a.norm() * b.norm()
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def run_alignment(run_dir: Path) -> dict[str, Any] | None:
    """:func:`gd_alignment` of a complete run's final checkpoint (None: not an ICL run, or no checkpoint)."""
    from safetensors.torch import load_model

    from qkvlab.config import TrainConfig
    from qkvlab.data.icl import gd_step_size
    from qkvlab.models import build_model
    from qkvlab.train.checkpoint import latest_checkpoint

    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    if config.data != "icl-regression":
        return None
    final = json.loads((run_dir / "final.json").read_text())
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not checkpoint.name.endswith(f"{final['step']:08d}"):
        return None
    model = build_model(config.model)
    load_model(model, str(checkpoint / "model.safetensors"), strict=True, device="cpu")
    step = gd_step_size(config.icl_dim, config.icl_points, config.icl_noise)
    result = gd_alignment(model, step, config.icl_points)
    return None if result is None else {"step": final["step"], **result}


def write_alignments(out: Path) -> int:
    """Write ``gd_alignment.json`` into every complete ICL run under ``OUT/runs`` that lacks one; returns how many."""
    from qkvlab.files import write_atomic

    written = 0
    for folder in sorted((out / "runs").glob("*")):
        if (folder / "final.json").is_file() and not (folder / ALIGNMENT_FILE).is_file():
            result = run_alignment(folder)
            if result is not None:
                write_atomic(folder / ALIGNMENT_FILE, json.dumps(result, indent=1))
                written += 1
    return written
