"""Muon with per-head orthogonalisation for attention matrices (issue 15).

``torch.optim.Muon`` orthogonalises each 2-D update as a whole: for W_Q (H·d_head × d) that mixes every
head's rows into one polar factor. ``HeadwiseMuon`` is the same algorithm (momentum buffer,
Nesterov, torch's own Newton–Schulz iteration with its coefficients, step count and bfloat16
arithmetic, its learning-rate adjustment, decoupled weight decay p ← p(1 − η·λ)), except that a
parameter group may say ``heads=H`` and ``head_axis``: the update is then orthogonalised per head,
on each head's d_head rows (``head_axis=0``: W_Q, W_K, W_V as nn.Linear stores them) or d_head
columns (``head_axis=1``: W_O). The learning-rate adjustment then uses the shape of the matrix that
was orthogonalised, the head's slice. Without ``heads`` (or with ``heads=1``) a group is updated
exactly as ``torch.optim.Muon`` updates it (tested to 1e-6).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _adjust_lr, _zeropower_via_newtonschulz

from qkvlab.optim import lora_part, role_set

__all__ = [
    "MUON_ROLES",
    "NS_DTYPES",
    "HeadwiseMuon",
    "MuonWithAdamW",
    "muon_update",
    "newton_schulz",
    "orthogonalize",
    "tag_groups",
]


NS_DTYPES = ("bfloat16", "float32")
"""The arithmetic of the Newton–Schulz iteration: torch's bfloat16, or float32 (see :func:`newton_schulz`)."""


def newton_schulz(
    update: Tensor,
    ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
    ns_steps: int = 5,
    eps: float = 1e-7,
    dtype: str = "bfloat16",
) -> Tensor:
    """The Newton–Schulz polar factor of a 2-D ``update``, or of each matrix of a 3-D stack of them.

    A 2-D ``update`` in bfloat16 goes through torch's own function. A stack, or ``dtype="float32"``,
    runs the same iteration here (coefficients, steps, normalisation by each matrix's Frobenius norm,
    transposing tall matrices, bfloat16 products where asked), batched: one ``baddbmm`` per product for
    every matrix of the stack instead of one launch per matrix. On this machine's CPU the stacked
    bfloat16 result is bitwise torch's applied to each matrix; elsewhere a batched GEMM may sum in
    another order (tested to bfloat16's rounding). A CPU without native bfloat16 runs bfloat16 products
    20–40× slower than float32 (measured on one: 43 ms against 1.6 ms for 128 × 128), so ``float32``
    is the fast choice there; on a GPU, or a CPU with AVX512-BF16, bfloat16 is."""
    if dtype not in NS_DTYPES:
        raise ValueError(f"ns_dtype {dtype!r}; accepted: {', '.join(NS_DTYPES)}")
    if update.dim() == 2 and dtype == "bfloat16":
        return _zeropower_via_newtonschulz(update, ns_coefficients, ns_steps, eps)
    if update.dim() not in (2, 3):
        raise ValueError(f"a matrix or a stack of matrices; got shape {tuple(update.shape)}")
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    a, b, c = ns_coefficients
    x = update.bfloat16() if dtype == "bfloat16" else update.float()
    tall = update.size(-2) > update.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    product = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = product(x, product(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def orthogonalize(
    update: Tensor,
    heads: int | None = None,
    head_axis: int = 0,
    ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
    ns_steps: int = 5,
    eps: float = 1e-7,
    dtype: str = "bfloat16",
) -> list[tuple[Tensor, torch.Size]]:
    """The Newton–Schulz polar factor of ``update`` as a whole (``heads`` None or 1) or of each head's
    slice along ``head_axis`` (all heads in one batched iteration); returns (orthogonalised, shape it
    was orthogonalised at) pieces in order."""
    if not heads or heads == 1:
        return [(newton_schulz(update, ns_coefficients, ns_steps, eps, dtype), update.shape)]
    if update.shape[head_axis] % heads:
        raise ValueError(f"{update.shape[head_axis]} rows/columns do not split into {heads} heads")
    pieces = update.chunk(heads, dim=head_axis)
    stacked = newton_schulz(torch.stack(pieces), ns_coefficients, ns_steps, eps, dtype)
    return [(ortho, piece.shape) for ortho, piece in zip(stacked.unbind(0), pieces, strict=True)]


def muon_update(p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One Muon step of ``p`` (torch's algorithm; per head when ``group["heads"]`` is set). A parameter
    sharded by FSDP2 has its update gathered whole, orthogonalised on every rank alike, and each rank
    applies its own rows (see qkvlab.train.fsdp)."""
    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
    buf = state["momentum_buffer"]
    buf.lerp_(p.grad, 1 - momentum)
    update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
    sharded = type(update) is not torch.Tensor  # a DTensor (FSDP2): orthogonalised whole, on every rank
    if sharded:
        update = update.full_tensor()
    pieces = orthogonalize(
        update,
        group["heads"],
        group["head_axis"],
        tuple(group["ns_coefficients"]),
        group["ns_steps"],
        group["muon_eps"],
        group["ns_dtype"],
    )
    p.mul_(1 - lr * wd)
    if sharded:  # the whole step, scaled piece by piece, then this rank's rows of it
        from torch.distributed.tensor import distribute_tensor

        step = torch.cat(
            [ortho.to(p.dtype) * _adjust_lr(lr, group["adjust_lr_fn"], shape) for ortho, shape in pieces],
            dim=group["head_axis"],
        )
        p.sub_(distribute_tensor(step, p.device_mesh, p.placements, src_data_rank=None))
        return
    slices = [p] if len(pieces) == 1 else p.chunk(len(pieces), dim=group["head_axis"])
    for target, (ortho, shape) in zip(slices, pieces, strict=True):
        target.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], shape))


#: Roles whose 2-D weights Muon updates; everything else (embeddings, head, norms, biases) gets AdamW.
MUON_ROLES = ("q", "k", "v", "o", "qkv", "mlp")


def tag_groups(
    groups: list[dict[str, Any]], per_head: Iterable[str] | str = (), heads: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Tag qkvlab parameter groups (``qkvlab.param_groups``) in place for :class:`MuonWithAdamW`.

    A group gets ``algorithm="muon"`` when its role is in :data:`MUON_ROLES` and every parameter is a
    2-D matrix that is not a LoRA factor; every other group gets ``"adamw"``. A Muon group whose role is
    in ``per_head`` (q, k, v, o) also gets ``heads`` (``heads[role]``: query heads for q and o, key/value
    heads for k and v under grouped-query attention) and ``head_axis``, for nn.Linear's (out, in)
    layout: each head's rows of W_Q, W_K, W_V (axis 0) and each head's columns of W_O (axis 1). A matrix
    whose head axis does not split into that many heads is refused (for example GPT-2's Conv1D, which
    stores (in, out)). Returns ``groups``.
    """
    per_head = role_set(per_head)
    if per_head - {"q", "k", "v", "o"}:
        raise ValueError(f"per-head Muon roles {sorted(per_head)}; accepted: a subset of q, k, v, o")
    for group in groups:
        matrices = all(p.ndim == 2 for p in group["params"])
        lora = any(lora_part(name) for name in group.get("param_names", ()))
        group["algorithm"] = "muon" if group["role"] in MUON_ROLES and matrices and not lora else "adamw"
        if group["algorithm"] != "muon" or group["role"] not in per_head:
            continue
        count, axis = (heads or {}).get(group["role"]), 1 if group["role"] == "o" else 0
        if not count:
            raise ValueError(f"per-head Muon for {group['role']} needs its head count")
        for name, p in zip(
            group.get("param_names", [""] * len(group["params"])), group["params"], strict=True
        ):
            if p.shape[axis] % count:
                raise ValueError(
                    f"per-head Muon: {name or group['role']} of shape {tuple(p.shape)} does not split into "
                    f"{count} heads along dim {axis} (nn.Linear's (out, in) layout is expected)"
                )
        group["heads"], group["head_axis"] = count, axis
    missing = per_head - {g["role"] for g in groups if g.get("heads")}
    if missing:
        present = sorted({g["role"] for g in groups if g["algorithm"] == "muon"})
        raise ValueError(
            f"per-head Muon for {', '.join(sorted(missing))}: no trainable 2-D matrix has that role "
            f"(Muon's roles here: {', '.join(present) or 'none'}; a fused qkv projection cannot be split per head)"
        )
    return groups


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the 2-D hidden matrices and AdamW for the rest, as Muon is meant to be used, in one
    optimiser: each group says ``algorithm`` "muon" or "adamw", so one learning-rate scheduler drives
    both, one state dict holds both, and a checkpoint resumes both. AdamW groups run torch's own
    functional AdamW (``betas``, ``eps``); Muon groups run :func:`muon_update` (``momentum``,
    ``nesterov``, ``adjust_lr_fn``, and ``heads``/``head_axis`` for per-head orthogonalisation). Every
    group's ``weight_decay`` is its own (torch's Muon would default to 0.1): decoupled, p ← p(1 − η·λ).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        adjust_lr_fn: str | None = None,
        *,
        weight_decay: float = 0.0,
        algorithm: str = "adamw",
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        ns_steps: int = 5,
        muon_eps: float = 1e-7,
        heads: int | None = None,
        head_axis: int = 0,
        ns_dtype: str = "bfloat16",
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"learning rate should be >= 0 but is: {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn {adjust_lr_fn!r}; accepted: original, match_rms_adamw")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "algorithm": algorithm,
            "betas": betas,
            "eps": eps,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "ns_steps": ns_steps,
            "muon_eps": muon_eps,
            "adjust_lr_fn": adjust_lr_fn,
            "heads": heads,
            "head_axis": head_axis,
            "ns_dtype": ns_dtype,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["algorithm"] not in ("muon", "adamw"):
                raise ValueError(f"algorithm {group['algorithm']!r}; accepted: muon, adamw")
            if group["ns_dtype"] not in NS_DTYPES:
                raise ValueError(f"ns_dtype {group['ns_dtype']!r}; accepted: {', '.join(NS_DTYPES)}")
            if group["algorithm"] == "muon" and any(p.ndim != 2 for p in group["params"]):
                shapes = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                raise ValueError(f"Muon updates 2-D matrices only; got parameters of shape {shapes}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        from torch.optim.adamw import adamw

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["algorithm"] == "muon":
                for p in params:
                    muon_update(p, self.state[p], group)
                continue
            states = [self.state[p] for p in params]
            for state, p in zip(states, params, strict=True):
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            beta1, beta2 = group["betas"]
            adamw(
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                [s["step"] for s in states],
                foreach=False,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
        return loss


class HeadwiseMuon(MuonWithAdamW):
    """``torch.optim.Muon`` (same defaults, weight decay 0.1 included), with per-head orthogonalisation
    for groups that set ``heads`` (see the module): :class:`MuonWithAdamW` with every group on Muon."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        heads: int | None = None,
        head_axis: int = 0,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            adjust_lr_fn=adjust_lr_fn,
            weight_decay=weight_decay,
            algorithm="muon",
            ns_coefficients=ns_coefficients,
            ns_steps=ns_steps,
            muon_eps=eps,
            heads=heads,
            head_axis=head_axis,
        )
