"""Attention logits of qkvlab's own models, measured exactly: per head, the largest pre-softmax logit and
the mean attention entropy.

Convention. For head h of a layer, the logit of query i and key j is S_ij^h = q_iᵀk_j / √d_head (the
scaling softmax sees, after it and before any mask). ``max`` is S_max^h = max over the batch and over
*all* (i, j) pairs, the causal mask's future pairs included: the quantity QK-clip bounds (Kimi K2's
MuonClip) and the one σ₁(W_KᵀW_Q^h)·max‖x‖²/√d_head bounds. ``entropy`` is −Σ_j p_ij log p_ij of each
query's attention distribution (after the mask), in nats, averaged over the batch and the queries: ln t
for uniform attention over t keys, 0 for attention on one key.

Measuring needs the scores themselves, which a fused (flash) kernel never forms: while
:func:`measure_logits` is active, qkvlab's attention layers compute softmax(S) explicitly (the same
function, up to float rounding; dropout on the probabilities as the fused kernel applies it), and
otherwise keep the fused path. The engine arms it for the forward pass of each spectral-monitor step,
and of every step when QK-clip is on.

**QK-clip** (``qk_clip=τ`` in the engine; Kimi K2's MuonClip without its Muon): after each optimiser step,
every head whose S_max^h on that step's forward pass exceeded τ has its query and key rows (weights and
biases) scaled so that the same inputs' largest logit becomes τ: with γ_h = τ/S_max^h, by √γ_h each
(``qk_clip_roles=[q, k]``, the default), or by γ_h on one side (``[q]`` or ``[k]``). Under DDP the max is
over every rank's slice, so every rank scales alike. The optimiser's state is left as it is, as in Kimi K2.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qkvlab.args import NONNEGATIVE, Key
from qkvlab.errors import UserError

__all__ = ["KEYS", "LayerLogits", "LogitReading", "measure_logits", "qk_clip", "validate"]

#: The logit section of a run's config (``qkvlab.config``).
KEYS: dict[str, Key] = {
    "qk_clip": (
        "QK-clip threshold τ: after each step, heads whose largest logit passed τ are scaled back to it; 0 = off",
        NONNEGATIVE,
    ),
    "qk_clip_roles": (
        "QK-clip: which factors take the scale, [q, k] (√γ each, Kimi K2's) | [q] | [k] (γ on one)",
        (lambda v: bool(v) and set(v) <= {"q", "k"}, "[q, k], [q] or [k]"),
    ),
}


def validate(config: Any) -> None:
    """QK-clip needs softmax attention, whose logits it measures."""
    if config.qk_clip and config.model.attention != "softmax":
        raise UserError(
            f"qk_clip needs softmax attention (its logits are clipped); model.attention={config.model.attention}"
        )


@dataclass
class LayerLogits:
    """One attention layer's running statistics over the forward passes seen while armed."""

    max: torch.Tensor | None = None  # (heads,) largest logit
    entropy_sum: torch.Tensor | None = None  # (heads,) Σ of row entropies
    rows: int = 0  # query rows summed (batch × queries), the same for every head

    @torch.no_grad()
    def observe(self, scores: torch.Tensor, probs: torch.Tensor) -> None:
        """``scores``: (batch, heads, queries, keys) scaled logits before the mask; ``probs``: softmax after it."""
        top = scores.detach().float().amax(dim=(0, 2, 3))
        entropy = -torch.special.xlogy(probs.detach().float(), probs.detach().float()).sum(-1).sum(dim=(0, 2))
        self.max = top if self.max is None else torch.maximum(self.max, top)
        self.entropy_sum = entropy if self.entropy_sum is None else self.entropy_sum + entropy
        self.rows += scores.shape[0] * scores.shape[2]


@dataclass
class LogitReading:
    """What :func:`measure_logits` collected: one :class:`LayerLogits` per attention layer, in order."""

    layers: list[LayerLogits] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list, repr=False)  # the attention layers, in order
    reduced: bool = False

    @property
    def measured(self) -> bool:
        return any(layer.max is not None for layer in self.layers)

    def reduce(self) -> None:
        """Under ``torch.distributed``: each rank saw its own slice of the batch; afterwards every rank holds
        the max over all ranks and the entropy averaged over all their rows."""
        import torch.distributed as dist

        if self.reduced or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        self.reduced = True
        for layer in self.layers:
            if layer.max is None:
                continue
            dist.all_reduce(layer.max, op=dist.ReduceOp.MAX)
            counted = torch.cat([layer.entropy_sum, layer.entropy_sum.new_tensor([layer.rows])])
            dist.all_reduce(counted)
            layer.entropy_sum, layer.rows = counted[:-1], int(counted[-1].item())

    def to_dict(self) -> dict[str, Any]:
        """``{"max": [[per head] per layer], "entropy": [[...]], "convention": ...}`` (JSON-able)."""
        return {
            "max": [layer.max.tolist() for layer in self.layers if layer.max is not None],
            "entropy": [
                (layer.entropy_sum / layer.rows).tolist() for layer in self.layers if layer.max is not None
            ],
            "convention": "max: largest q·k/√d_head over the batch and all query-key pairs, before the mask; "
            "entropy: mean over queries of the attention distribution's entropy, nats",
        }

    def scalars(self) -> dict[str, float]:
        """Per layer, the largest logit of any head and the mean entropy over heads (``L0/max``,
        ``L0/entropy_mean``), and ``max`` over every layer: TensorBoard's ``logits/…`` tags."""
        out: dict[str, float] = {}
        for index, layer in enumerate(self.layers):
            if layer.max is None:
                continue
            out[f"L{index}/max"] = float(layer.max.max())
            out[f"L{index}/entropy_mean"] = float((layer.entropy_sum / layer.rows).mean())
        tops = [v for k, v in out.items() if k.endswith("/max")]
        if tops:
            out["max"] = max(tops)
        return out


@contextmanager
def measure_logits(model: nn.Module) -> Iterator[LogitReading]:
    """Measure the logits of every forward pass of ``model`` (one of qkvlab's own, or a wrapper holding
    it) inside the block; see the module for the convention. Yields the reading, filled as passes run."""
    from qkvlab.models.transformer import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention) and m.kind == "softmax"]
    reading = LogitReading([LayerLogits() for _ in layers], layers)
    for layer, stats in zip(layers, reading.layers, strict=True):
        layer.probe = stats
    try:
        yield reading
    finally:
        for layer in layers:
            layer.probe = None


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout: float, probe: LayerLogits
) -> torch.Tensor:
    """softmax(q kᵀ/√d_head [+ causal mask]) v with the scores formed, observed by ``probe``; what
    ``F.scaled_dot_product_attention`` computes."""
    t, s = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    masked = scores
    if causal:
        future = torch.ones(t, s, dtype=torch.bool, device=q.device).triu(1)
        masked = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(masked.float(), dim=-1).to(q.dtype)
    probe.observe(scores, probs)
    if dropout:
        probs = torch.nn.functional.dropout(probs, dropout)
    return probs @ v


@torch.no_grad()
def qk_clip(reading: LogitReading, tau: float, roles: tuple[str, ...] | list[str] = ("q", "k")) -> int:
    """Scale the query and key rows of every head of ``reading``'s layers whose largest logit passed ``tau``
    (see the module); returns how many heads were scaled. Call :meth:`LogitReading.reduce` first under
    ``torch.distributed``."""
    clipped = 0
    for layer, stats in zip(reading.modules, reading.layers, strict=True):
        if stats.max is None:
            continue
        over = stats.max > tau
        if not bool(over.any()):
            continue
        clipped += int(over.sum())
        gamma = torch.where(over, tau / stats.max.clamp_min(tau), torch.ones_like(stats.max))
        share = gamma.sqrt() if len(set(roles)) == 2 else gamma
        rows = share.repeat_interleave(layer.d_head)  # one factor per row of that head
        for role in set(roles):
            proj = layer.q_proj if role == "q" else layer.k_proj
            for param in (proj.weight, proj.bias):
                if param is not None:
                    _scale_rows(param, rows)
    return clipped


def _scale_rows(param: torch.Tensor, rows: torch.Tensor) -> None:
    """param[i, …] *= rows[i], for a plain or an FSDP2-sharded (row-sharded DTensor) parameter."""
    scale = rows.to(param.dtype).view(-1, *([1] * (param.ndim - 1))).expand(param.shape)
    if type(param.data) is not torch.Tensor:  # a DTensor: the same rows of the scale as of the parameter
        from torch.distributed.tensor import distribute_tensor

        scale = distribute_tensor(scale.contiguous(), param.device_mesh, param.placements, src_data_rank=None)
    param.mul_(scale)
