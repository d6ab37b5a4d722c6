"""``icl-regression``: in-context linear regression, as in von Oswald et al. (2023).

Each sequence is a fresh task w ~ N(0, I_d / d). Its points are x_i ~ N(0, I_d) and
y_i = w·x_i + noise·ε_i (ε_i ~ N(0, 1)), for i = 1..N. The tokens are [x_i, y_i] (dimension
d + 1), except that the query (the last point) shows y = 0. The model must predict y_N from
the other N − 1 points. No task ever repeats, so the data are infinite and every run is online.
"""

from __future__ import annotations

import torch

from qkvlab.data.base import ICL_TRAIN, SyntheticDataset
from qkvlab.errors import UserError

__all__ = ["EVAL_SEED_OFFSET", "EVAL_SEQUENCES", "ICLDataset", "gd_prediction", "gd_step_size"]

EVAL_SEQUENCES = 2048
EVAL_SEED_OFFSET = 1_000_003  # the fixed validation set is drawn with seed + this


def gd_step_size(dim: int, points: int, noise: float) -> float:
    """The step η that minimises the expected error of one GD step from w = 0 (:func:`gd_prediction`).

    One step on L(w) = ½ Σᵢ (wᵀxᵢ − yᵢ)² over the n = N − 1 context points predicts
    ŷ = η Σᵢ yᵢ xᵢᵀx_q. With w ~ N(0, I/d), x ~ N(0, I) and noise σ: E[ŷ y] = η n and
    E[ŷ²] = η² (n (n + d + 1) + σ² n d) (a Wishart second moment), so
    η* = 1 / (n + d + 1 + σ² d) and the expected error is 1 + σ² − n η*. At d = 8, N = 32, σ = 0:
    η* n = 31/40 and the error is 9/40 = 0.225 (von Oswald et al. 2023's one-step baseline).
    """
    return 1.0 / (points - 1 + dim + 1 + noise**2 * dim)


def gd_prediction(inputs: torch.Tensor, step: float) -> torch.Tensor:
    """One GD step's prediction for each sequence of ``inputs`` (B, N, d + 1): step · Σᵢ<N yᵢ xᵢᵀx_q."""
    x, y = inputs[:, :-1, :-1], inputs[:, :-1, -1]
    return step * torch.einsum("bn,bnd,bd->b", y, x, inputs[:, -1, :-1])


class ICLDataset(SyntheticDataset):
    """Batches are ``inputs`` (B, N, d + 1) float32 and ``targets`` (B,) float32 (the query's true y)."""

    kind = "icl"
    train_purpose = ICL_TRAIN
    eval_sequences = EVAL_SEQUENCES

    def __init__(self, *, dim: int, points: int, noise: float, seed: int) -> None:
        if dim < 1:
            raise UserError(f"icl_dim={dim}; accepted: an integer >= 1")
        if points < 2:
            raise UserError(f"icl_points={points}; accepted: an integer >= 2 (context points and a query)")
        if not noise >= 0:
            raise UserError(f"icl_noise={noise}; accepted: a number >= 0")
        self.dim, self.points, self.noise, self.seed = dim, points, float(noise), seed
        self.info = {"dim": dim, "points": points, "noise": float(noise)}
        self.gd_step = gd_step_size(dim, points, self.noise)

    def sequences(self, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``count`` fresh tasks and their sequences, drawn from ``generator``."""
        w = torch.randn(count, self.dim, generator=generator) / self.dim**0.5
        x = torch.randn(count, self.points, self.dim, generator=generator)
        eps = torch.randn(count, self.points, generator=generator)
        y = torch.einsum("bnd,bd->bn", x, w) + self.noise * eps
        inputs = torch.cat([x, y.unsqueeze(-1)], dim=-1)
        inputs[:, -1, -1] = 0.0  # the query hides its y
        return {"inputs": inputs, "targets": y[:, -1].clone()}

    def eval_generator(self) -> torch.Generator:
        """The same 2,048 sequences every time: a generator seeded with seed + 1,000,003."""
        return torch.Generator().manual_seed(self.seed + EVAL_SEED_OFFSET)
