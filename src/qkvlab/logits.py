"""Attention logits of qkvlab's own models, measured exactly: per head, the largest pre-softmax logit and
the mean attention entropy.

Convention. For head h of a layer, the logit of query i and key j is S_ij^h = q_iᵀk_j / √d_head (the
scaling softmax sees, after it and before any mask). ``max`` is S_max^h = max over the batch and over
*all* (i, j) pairs, the causal mask's future pairs included: the quantity QK-clip bounds (Kimi K2's
MuonClip) and the one σ₁(W_KᵀW_Q^h)·max‖x‖²/√d_head bounds. ``entropy`` is −Σ_j p_ij log p_ij of each
query's attention distribution (after the mask), in nats, averaged over the batch and the queries: ln t
for uniform attention over t keys, 0 for attention on one key.

Measuring needs the scores themselves, which a fused (flash) kernel never forms. While
:func:`measure_logits` is active, qkvlab's attention layers keep the fused kernel for the attention
itself and form S beside it without gradients, in float32 (under bf16 autocast too), a block of
queries × heads × batch at a time (``qkvlab.models.transformer.observe_logits``): the step's numbers are
the unmeasured step's, bit for bit, and the cost is one more q·kᵀ (and, for the entropy, one softmax) per
layer. With
``entropy=False`` only the max is taken. The engine measures both on each spectral-monitor step, and
the max only on the other steps it measures (every step with QK-clip, every ``logit_every``-th with
that key).

**QK-clip** (``qk_clip=τ`` in the engine; Kimi K2's MuonClip without its Muon): after each optimiser step,
every head whose S_max^h on that step's forward pass exceeded τ has its query and key rows (weights and
biases) scaled so that the same inputs' largest logit becomes τ: with γ_h = τ/S_max^h, by √γ_h each
(``qk_clip_roles=[q, k]``, the default), or by γ_h on one side (``[q]`` or ``[k]``). A layer whose key
projection is shared by several query heads (grouped-query attention) has its key rows left alone and
each head's query rows scaled by γ_h, as Kimi K2 does for its shared key. A head whose largest logit is
not finite is left alone (γ would be 0: its rows would be erased). Under DDP the max is over every rank's
slice, so every rank scales alike. The optimiser's state is left as it is, as in Kimi K2.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qkvlab.args import NONNEGATIVE, Key
from qkvlab.errors import UserError

__all__ = [
    "KEYS",
    "LayerLogits",
    "LogitCeiling",
    "LogitReading",
    "ceiling_scalars",
    "head_ceilings",
    "measure_logits",
    "qk_clip",
    "validate",
]

#: The logit section of a run's config (``qkvlab.config``).
KEYS: dict[str, Key] = {
    "qk_clip": (
        "QK-clip threshold τ: after each step, heads whose largest logit passed τ are scaled back to it; 0 = off",
        NONNEGATIVE,
    ),
    "qk_clip_roles": (
        "QK-clip: which factors take the scale, [q, k] (√γ each, Kimi K2's) | [q] | [k] (γ on one)",
        (lambda v: bool(v) and set(v) <= {"q", "k"} and len(set(v)) == len(v), "[q, k], [q] or [k]"),
    ),
    "logit_every": (
        "steps between logit measurements beside the monitor's (the largest logit, formed beside the fused kernel; the train "
        "lines log their largest as logit_max); 0 = on monitor steps only",
        (lambda v: isinstance(v, int) and v >= 0, "a whole number ≥ 0"),
    ),
}


def validate(config: Any) -> None:
    """QK-clip and logit_every need softmax attention, whose logits they measure."""
    if config.qk_clip and config.model.attention != "softmax":
        raise UserError(
            f"qk_clip needs softmax attention (its logits are clipped); model.attention={config.model.attention}"
        )
    if config.logit_every and config.model.attention != "softmax":
        raise UserError(
            f"logit_every needs softmax attention (its logits are measured); model.attention={config.model.attention}"
        )


@dataclass
class LayerLogits:
    """One attention layer's running statistics over the forward passes seen while armed."""

    max: torch.Tensor | None = None  # (heads,) largest logit
    entropy_sum: torch.Tensor | None = None  # (heads,) Σ of row entropies
    rows: int = 0  # query rows summed (batch × queries), the same for every head

    max_only: bool = False  # the scores go to observe_max alone: no softmax, no entropy

    def add(self, top: torch.Tensor, entropy_sum: torch.Tensor | None, rows: int) -> None:
        """One forward pass: each head's largest logit, and its entropy summed over ``rows`` query rows
        (None when only the max is measured); ``observe_logits`` forms them."""
        self.max = top if self.max is None else torch.maximum(self.max, top)
        if entropy_sum is not None:
            self.entropy_sum = entropy_sum if self.entropy_sum is None else self.entropy_sum + entropy_sum
            self.rows += rows


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
            if layer.entropy_sum is None:  # measured for the max only
                continue
            # in float64: a float32 row count is exact only up to 2²⁴ rows
            summed = layer.entropy_sum.double()
            counted = torch.cat([summed, summed.new_tensor([layer.rows])])
            dist.all_reduce(counted)
            layer.entropy_sum, layer.rows = counted[:-1].float(), int(counted[-1].item())

    def to_dict(self) -> dict[str, Any]:
        """``{"max": [[per head] per layer], "entropy": [[...]], "convention": ...}`` (JSON-able)."""
        return {
            "max": [layer.max.tolist() for layer in self.layers if layer.max is not None],
            "entropy": [
                (layer.entropy_sum / layer.rows).tolist()
                for layer in self.layers
                if layer.entropy_sum is not None
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
            if layer.entropy_sum is not None:
                out[f"L{index}/entropy_mean"] = float((layer.entropy_sum / layer.rows).mean())
        tops = [v for k, v in out.items() if k.endswith("/max")]
        if tops:
            out["max"] = max(tops)
        return out


@contextmanager
def measure_logits(model: nn.Module, entropy: bool = True) -> Iterator[LogitReading]:
    """Measure the logits of every forward pass of ``model`` (one of qkvlab's own, or a wrapper holding
    it) inside the block; see the module for the convention. Yields the reading, filled as passes run.
    ``entropy=False``: the largest logit only, without the softmax the entropy needs."""
    from qkvlab.models.transformer import Attention

    attention = [m for m in model.modules() if isinstance(m, Attention)]
    if not attention:
        raise UserError(
            f"measure_logits: {type(model).__name__} has none of qkvlab's attention layers, whose logits it "
            "reads; for any other model, qkvlab.Monitor's logit_ceiling bounds them from the weights"
        )
    layers = [m for m in attention if m.kind == "softmax"]  # linear attention has no softmax logits
    reading = LogitReading([LayerLogits(max_only=not entropy) for _ in layers], layers)
    for layer, stats in zip(layers, reading.layers, strict=True):
        layer.probe = stats
    try:
        yield reading
    finally:
        for layer in layers:
            layer.probe = None


@torch.no_grad()
def qk_clip(reading: LogitReading, tau: float, roles: tuple[str, ...] | list[str] = ("q", "k")) -> int:
    """Scale the query and key rows of every head of ``reading``'s layers whose largest logit passed ``tau``
    (see the module); returns how many heads were scaled. Call :meth:`LogitReading.reduce` first under
    ``torch.distributed``."""
    clipped = 0
    for layer, stats in zip(reading.modules, reading.layers, strict=True):
        if stats.max is None:
            continue
        over = torch.isfinite(stats.max) & (stats.max > tau)
        if not bool(over.any()):
            continue
        clipped += int(over.sum())
        gamma = torch.where(over, tau / stats.max.clamp_min(tau), torch.ones_like(stats.max))
        # a key projection with fewer rows than the query's is shared by several heads (GQA): queries only
        shared_key = layer.k_proj.weight.shape[0] != layer.q_proj.weight.shape[0]
        sides = {"q"} if shared_key else set(roles)
        share = gamma.sqrt() if len(sides) == 2 else gamma
        rows = share.repeat_interleave(layer.d_head)  # one factor per row of that head
        for role in sides:
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


# -- a ceiling for any model -------------------------------------------------------------------------------

#: Parameter names that put a norm between the projection and the score (Qwen 3, OLMo 2, Gemma 3, …).
_QK_NORM = re.compile(r"(^|\.)(q_norm|k_norm|query_norm|key_norm|q_layernorm|k_layernorm)\.")


def head_ceilings(
    query: torch.Tensor,
    key: torch.Tensor,
    query_bias: torch.Tensor | None,
    key_bias: torch.Tensor | None,
    norm: float,
    rotary: bool,
) -> torch.Tensor:
    """The largest |q_iᵀk_j|/√d_head any inputs of norm at most ``norm`` can give, per head.

    ``query`` (heads, d, d_head) holds each head's W_Q as columns (q = queryᵀx + b), ``key`` the same
    for W_K (one per head: a shared key repeated), biases (heads, d_head) or None. Without rotary
    embeddings, q_iᵀk_j = x_iᵀ Q Kᵀ x_j + x_iᵀ Q c + bᵀ Kᵀ x_j + bᵀc, so
    |q_iᵀk_j| ≤ σ₁(Q Kᵀ)·M² + (‖Q c‖ + ‖K b‖)·M + |bᵀc|, tight without biases (x_i, x_j the top singular
    pair). With them a rotation sits between q and k: |q_iᵀR k_j| ≤ ‖q_i‖‖k_j‖ ≤ (σ₁(Q)M + ‖b‖)(σ₁(K)M + ‖c‖).
    Float64 throughout."""
    q, k = query.double(), key.double()
    d_head = q.shape[-1]
    gram_q, gram_k = q.mT @ q, k.mT @ k  # (heads, d_head, d_head)
    b = torch.zeros(q.shape[0], d_head, dtype=torch.float64) if query_bias is None else query_bias.double()
    c = torch.zeros(k.shape[0], d_head, dtype=torch.float64) if key_bias is None else key_bias.double()
    if rotary:
        top_q = torch.linalg.eigvalsh(gram_q)[..., -1].clamp_min(0).sqrt()
        top_k = torch.linalg.eigvalsh(gram_k)[..., -1].clamp_min(0).sqrt()
        bound = (top_q * norm + b.norm(dim=-1)) * (top_k * norm + c.norm(dim=-1))
    else:
        # σ₁(Q Kᵀ)² = λ_max(QᵀQ KᵀK) = λ_max(S KᵀK S), S = (QᵀQ)^{1/2}
        values, vectors = torch.linalg.eigh(gram_q)
        root = vectors @ torch.diag_embed(values.clamp_min(0).sqrt()) @ vectors.mT
        top = torch.linalg.eigvalsh(root @ gram_k @ root)[..., -1].clamp_min(0).sqrt()
        cross = (q @ c.unsqueeze(-1)).norm(dim=(-2, -1)) + (k @ b.unsqueeze(-1)).norm(dim=(-2, -1))
        bound = top * norm**2 + cross * norm + (b * c).sum(-1).abs()
    return bound / math.sqrt(d_head)


class LogitCeiling:
    """A ceiling on every head's largest logit, for any model ``qkvlab.inspect`` reads: from each attention
    layer's weights and the largest norm of that layer's input over the forward passes since the last
    :meth:`read` (a forward pre-hook on its query projection; the attention kernel is untouched).

    S_max^h ≤ σ₁(W_KᵀW_Q^h)·max_i‖x_i‖²/√d_head without biases and rotary embeddings, with the bias terms
    of :func:`head_ceilings` where q and k have biases, and σ₁(W_Q^h)·σ₁(W_K^h) in place of
    σ₁(W_KᵀW_Q^h) under rotary embeddings. Families whose scores are not q·k/√d_head of the projections
    (q/k norms between the factors, relative position biases, another scale) get no ceiling, and the
    reason. Self-attention layers only. It covers the inputs of the process that holds it; under
    ``torch.distributed``, :meth:`reduce` on every rank makes it cover all of them (qkvlab's engine does).
    """

    def __init__(self, model: nn.Module) -> None:
        from qkvlab.attention.extract import AttentionFactors
        from qkvlab.attention.sources import LiveSource

        self.model = model
        factors = AttentionFactors(LiveSource(model))
        family = factors.family
        self.reason = family.no_ceiling or next(
            (
                f"{key}: a q/k norm between the factors bounds each logit by its gains, whatever W_Q and W_K"
                for key in factors.source.keys()  # noqa: SIM118 (a TensorSource, not a dict)
                if _QK_NORM.search(key)
            ),
            "",
        )
        # GPT-2's option, read from the model's HF config wherever it sits (a LightningModule, DDP or PEFT
        # wrapper holds it below)
        config = getattr(factors.source, "config", None) or {}
        if not self.reason and config.get("scale_attn_weights", True) is False:
            self.reason = "scale_attn_weights=False: the scores are q·k, not q·k/√d_head"
        if not self.reason and any(getattr(m, "kind", None) == "linear" for m in model.modules()):
            self.reason = (
                "linear attention: its scores are q·k/t with no softmax, not the logits bounded here"
            )
        self.rotary = bool(family.rope)
        self._norms: list[torch.Tensor | None] = [None] * len(factors.units)
        self._hooks = []
        if self.reason:
            return
        modules = dict(LiveSource(model).module.named_modules())
        for index, (layout, block, _) in enumerate(factors.units):
            if layout.attention != "self":
                continue
            weight = (layout.q or layout.qkv).format(block=block)
            name = weight.removesuffix(".weight") if weight.endswith(".weight") else block.rstrip(".")
            module = modules.get(name)
            if module is not None:
                self._hooks.append(module.register_forward_pre_hook(self._observer(index), with_kwargs=True))

    def _observer(self, index: int):
        def observe(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, torch.Tensor) or x.numel() == 0:
                return
            top = torch.linalg.vector_norm(x.detach(), dim=-1, dtype=torch.float32).amax()
            seen = self._norms[index]
            self._norms[index] = top if seen is None else torch.maximum(seen, top)

        return observe

    def reduce(self) -> None:
        """Under ``torch.distributed``: each layer's largest input norm becomes the largest over every rank
        (a collective: every rank calls it, each with its own :class:`LogitCeiling`)."""
        import torch.distributed as dist

        if self.reason or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        device = next(self.model.parameters()).device
        values = torch.tensor([-1.0 if n is None else float(n) for n in self._norms], device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        self._norms = [None if v < 0 else v for v in values.unbind()]

    def forget(self) -> None:
        """Start a new window of inputs (what :meth:`read` does after reading)."""
        self._norms = [None] * len(self._norms)

    def state(self) -> list[float | None]:
        """Each layer's largest input norm in the window so far (JSON-able), for a checkpoint: a resumed run
        bounds, at its first read, the inputs of the passes before the checkpoint too."""
        return [None if norm is None else float(norm) for norm in self._norms]

    def restore(self, norms: list[float | None] | None) -> None:
        """:meth:`state`'s output (None: an empty window, as a checkpoint from before it was kept)."""
        if not norms or len(norms) != len(self._norms):
            return
        # 0-dim CPU tensors: each mixes with its layer's norms on whatever device that layer sits
        self._norms = [None if v is None else torch.tensor(v, dtype=torch.float32) for v in norms]

    def read(self) -> dict[str, Any] | None:
        """Per layer, the inputs' largest norm and each head's ceiling, for the passes since the last read
        (then forgotten); None before any pass. Every rank of an FSDP-sharded model calls it alike."""
        if self.reason:
            return {"ceiling": None, "reason": self.reason}
        if all(norm is None for norm in self._norms):
            return None
        from qkvlab.attention.extract import AttentionFactors
        from qkvlab.attention.sources import LiveSource

        factors = AttentionFactors(LiveSource(self.model))
        norms, ceilings = [], []
        for index, norm in enumerate(self._norms):
            if norm is None:
                norms.append(None)
                ceilings.append(None)
                continue
            layer = factors.layer(index)
            query = layer.qk.right  # (heads, d, d_head)
            key = layer.qk.left if layer.qk.left_index is None else layer.qk.left[layer.qk.left_index]
            b_q, b_k = factors.biases(index)
            if b_k is not None and layer.qk.left_index is not None:
                b_k = b_k[layer.qk.left_index]
            value = float(norm)
            norms.append(value)
            ceilings.append(head_ceilings(query, key, b_q, b_k, value, self.rotary).tolist())
        self.forget()
        return {
            "input_norm_max": norms,
            "ceiling": ceilings,
            "form": "(σ₁(W_Q)·M + ‖b_q‖)(σ₁(W_K)·M + ‖b_k‖)/√d_head"
            if self.rotary
            else "σ₁(W_KᵀW_Q)·M² + (‖W_Qᵀb_k‖ + ‖W_Kᵀb_q‖)·M + |b_qᵀb_k|, over √d_head",
        }

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def ceiling_scalars(ceiling: dict[str, Any] | None) -> dict[str, float]:
    """``L0/ceiling`` (the largest head's ceiling per layer) and ``ceiling`` (over layers) of a
    :meth:`LogitCeiling.read`, for TensorBoard's ``logits/…`` tags; {} where there is none."""
    if not ceiling or ceiling.get("ceiling") is None:
        return {}
    out = {f"L{i}/ceiling": max(heads) for i, heads in enumerate(ceiling["ceiling"]) if heads}
    if out:
        out["ceiling"] = max(out.values())
    return out
