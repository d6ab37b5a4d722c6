"""The rank guard: attention weight decay that adapts during training to hold attention rank.

Paper 000 shows that weight decay on the attention factors lowers the rank of W_KᵀW_Q and P·W_V, and
that low rank costs language models loss; its remedy is a fixed attention decay found by a sweep.
The guard does that job inside one run: it keeps each layer's attention decay as high as the rank
allows.

**The rule.** Every time the spectral monitor fires, for each layer ℓ separately and for the pairs
(q, k) (product W_KᵀW_Q) and (v, o) (product P·W_V) separately::

    λ ← clip(λ · exp(κ · (erank_min − target) / d_head), λ_min, λ_max)

where erank_min is the smallest effective rank (Roy–Vetterli, as ``qkvlab inspect``) over the
layer's heads, target = ``target_qk`` (or ``target_ov``) × d_head, and λ is the weight decay of
both factors of the pair in that layer. So λ rises while erank_min is above the target (ever
more slowly as it nears it) and falls once it drops below; each firing moves λ by at most a factor e^κ (erank and target lie
in [0, d_head]). A pair with no target keeps its decay.

**Defaults.** κ = 2 (a head at full rank against a target of d_head/2 raises λ by e ≈ 2.7× per
firing; one two ranks short of it, in d_head = 32, lowers it by 12%); λ_min = 10⁻³, λ_max = 10;
the starting λ is the configured attention decay, clipped into [λ_min, λ_max].

**Where λ lives.** In the optimiser's own parameter groups (split by layer: ``param_groups(...,
per_layer="q,k,v,o")``), as ``base_weight_decay``; ``weight_decay`` is that (times η_t/η_max where
corrected weight decay is on). A checkpoint of the optimiser's state therefore holds the guard's
state, and resuming restores it bit for bit. Decoupled decay only (AdamW, Muon): with coupled L2 the
decay passes through the optimiser's normalisation and λ means something else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qkvlab.args import POSITIVE, Key
from qkvlab.errors import UserError

__all__ = [
    "KEYS",
    "PAIRS",
    "RankGuard",
    "broadcast_decay",
    "corrected_weight_decay",
    "guarded_groups",
    "set_decay",
    "validate",
]

#: The two products and the factors whose decay shapes each.
PAIRS = {"qk": ("q", "k"), "ov": ("v", "o")}

_FRACTION = (lambda v: 0 <= v <= 1, "a fraction of d_head in [0, 1] (0: unguarded)")
#: The guard's section of a run's config (``qkvlab.config``): corrected decay and the rank guard.
KEYS: dict[str, Key] = {
    "corrected_weight_decay": (
        "roles whose decay follows the schedule, λ_t = λ·η_t/η_max (adamw, muon), or [all]",
        (
            lambda v: set(v) <= {"all", "q", "k", "v", "o", "qkv", "mlp", "embed", "norm", "head", "other"},
            "roles (q, k, v, o, qkv, mlp, embed, norm, head, other) or all",
        ),
    ),
    "rank_guard_qk": (
        "rank guard target effective rank of W_KᵀW_Q, a fraction of d_head; 0 = unguarded",
        _FRACTION,
    ),
    "rank_guard_ov": (
        "rank guard target effective rank of P·W_V, a fraction of d_head; 0 = unguarded",
        _FRACTION,
    ),
    "rank_guard_kappa": ("rank guard gain κ: each firing moves λ by at most e^κ", POSITIVE),
    "rank_guard_min": ("rank guard lower bound λ_min", POSITIVE),
    "rank_guard_max": ("rank guard upper bound λ_max", POSITIVE),
}


def validate(config: Any) -> None:
    """What the guard's keys need of the rest of a run's config: decoupled decay (an optimiser of
    ``qkvlab.optimizers`` whose ``decay`` is ``decoupled``), and for the rank guard a spectral monitor
    that fires."""
    from qkvlab import optimizers

    names = optimizers.registry()
    decoupled_names = " or ".join(name for name, spec in names.items() if spec.decoupled)

    def decoupled(name: str) -> bool:
        return optimizers.get(name).decoupled

    if config.corrected_weight_decay and not decoupled(config.optimizer):
        raise UserError(
            f"corrected_weight_decay needs decoupled decay; accepted with optimizer={decoupled_names}, "
            f"not {config.optimizer}"
        )
    if config.rank_guard() is not None:
        if not decoupled(config.optimizer):
            raise UserError(
                f"the rank guard sets decoupled weight decay; accepted with optimizer={decoupled_names}, "
                f"not {config.optimizer}"
            )
        if not config.spectra_every:
            raise UserError("the rank guard acts when the spectral monitor fires; set spectra_every > 0")


@dataclass(frozen=True)
class RankGuard:
    """The controller (see the module's docstring). ``target_qk``/``target_ov``: target effective rank as a
    fraction of d_head, in (0, 1], or None to leave that pair's decay alone."""

    target_qk: float | None = None
    target_ov: float | None = None
    kappa: float = 2.0
    lambda_min: float = 1e-3
    lambda_max: float = 10.0

    def __post_init__(self) -> None:
        for name in ("target_qk", "target_ov"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise UserError(f"rank guard {name}={value}; accepted: a fraction of d_head in (0, 1]")
        if self.target_qk is None and self.target_ov is None:
            raise UserError("the rank guard needs a target: target_qk, target_ov or both, in (0, 1]")
        if not self.kappa > 0:
            raise UserError(f"rank guard kappa={self.kappa}; accepted: a number > 0")
        if not 0 < self.lambda_min <= self.lambda_max < math.inf:
            raise UserError(
                f"rank guard bounds λ_min={self.lambda_min}, λ_max={self.lambda_max}; accepted: 0 < λ_min ≤ λ_max"
            )

    def targets(self) -> dict[str, float]:
        return {p: t for p, t in (("qk", self.target_qk), ("ov", self.target_ov)) if t is not None}

    def step(self, lam: float, erank_min: float, target: float, d_head: int) -> float:
        """One firing's update of one (layer, pair): λ · e^(κ(erank_min − target·d_head)/d_head), clipped."""
        factor = math.exp(self.kappa * (erank_min - target * d_head) / d_head)
        return min(self.lambda_max, max(self.lambda_min, lam * factor))

    def start(self, groups: Iterable[dict[str, Any]]) -> None:
        """Clip the configured decay of every guarded group into the bounds (before the first step)."""
        for pair_groups in guarded_groups(groups, self.targets()).values():
            for group in pair_groups:
                set_decay(group, min(self.lambda_max, max(self.lambda_min, _base(group))))

    def update(self, record: Mapping[str, Any], groups: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Apply one firing: ``record`` is an inspect record of the current weights (``heads``, and
        ``architecture`` with ``d_head``), ``groups`` the optimiser's parameter groups. Returns what to log:
        ``L{ℓ}/{pair}_lambda`` (after the update) and ``L{ℓ}/{pair}_erank_min`` per guarded layer and pair."""
        d_head = int(record["architecture"]["d_head"])
        erank: dict[tuple[int, str], float] = {}
        for head in record["heads"]:
            if head.get("attention", "self") != "self":
                continue
            key = (head["layer"], head["product"])
            value = head["effective_rank"]
            if value is None or not math.isfinite(value):
                continue  # a head with non-finite weights says nothing about the rank
            erank[key] = min(erank.get(key, math.inf), value)
        logged: dict[str, float] = {}
        for (layer, pair), pair_groups in guarded_groups(groups, self.targets()).items():
            if (layer, pair) not in erank:
                continue
            target = self.targets()[pair]
            for group in pair_groups:
                set_decay(group, self.step(_base(group), erank[(layer, pair)], target, d_head))
            logged[f"L{layer}/{pair}_lambda"] = _base(pair_groups[0])
            logged[f"L{layer}/{pair}_erank_min"] = erank[(layer, pair)]
        return logged


def _base(group: Mapping[str, Any]) -> float:
    return float(group.get("base_weight_decay", group["weight_decay"]))


def mark_corrected(groups: Iterable[dict[str, Any]], roles: Iterable[str]) -> None:
    """Corrected weight decay for the groups of ``roles`` (or every group with ``"all"``): each keeps its λ
    as ``base_weight_decay``, and :func:`schedule_weight_decay` forms λ · η_t/η_max from it each step."""
    roles = set(roles)
    for group in groups:
        group["corrected_weight_decay"] = "all" in roles or group["role"] in roles
        group["base_weight_decay"] = group["weight_decay"]


def schedule_weight_decay(groups: Iterable[dict[str, Any]]) -> None:
    """Corrected weight decay at this step: λ_t = λ · η_t / η_max for the groups that ask for it, where
    η_t / η_max is the schedule's factor (the LR scheduler's lr over the group's initial_lr, its peak)."""
    for group in groups:
        if group.get("corrected_weight_decay"):
            set_decay(group, group["base_weight_decay"])


def corrected_weight_decay(optimizer: Any, roles: Iterable[str] | str) -> Any:
    """Corrected weight decay for any loop: the groups of ``roles`` keep their λ as ``base_weight_decay`` and,
    before every ``optimizer.step()``, decay with λ · η_t/η_max (η_max the group's ``initial_lr``, which every
    torch and HF scheduler sets: the schedule's peak; without a scheduler η_t/η_max = 1), so a step decays by
    λ·η_t²/η_max, as ``qkvlab train corrected_weight_decay=``. A step pre-hook: nothing else to call, and a
    resumed run recomputes it from the restored lr. The optimiser must hold qkvlab's groups
    (:func:`qkvlab.param_groups`) with decoupled decay (AdamW, Muon). Returns ``optimizer``.

    ``roles``: ``"q,k,v,o"``, a set of roles, or ``"all"``."""
    from qkvlab.optim import role_set

    roles = role_set(roles)
    if not roles:
        return optimizer
    if not all("role" in g for g in optimizer.param_groups):
        raise UserError(
            "corrected_weight_decay needs qkvlab's parameter groups, which say each group's role; "
            "accepted: an optimiser built over qkvlab.param_groups(model, ...)"
        )
    known = {g["role"] for g in optimizer.param_groups}
    if roles - known - {"all"}:
        raise UserError(
            f"corrected_weight_decay={','.join(sorted(roles))}: no trainable group has role "
            f"{', '.join(sorted(roles - known - {'all'}))}; accepted: all, or roles of this model ({', '.join(sorted(known))})"
        )
    mark_corrected(optimizer.param_groups, roles)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # what a scheduler sets; without one η_t/η_max = 1
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: schedule_weight_decay(opt.param_groups))
    return optimizer


def set_decay(group: dict[str, Any], lam: float) -> None:
    """The group's decay is λ; with corrected decay, λ · η_t/η_max at the current step."""
    group["base_weight_decay"] = lam
    if group.get("corrected_weight_decay"):
        group["weight_decay"] = lam * group["lr"] / group["initial_lr"]
    else:
        group["weight_decay"] = lam


def guarded_groups(
    groups: Iterable[dict[str, Any]], targets: Mapping[str, float]
) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """(layer, pair) → the decayed groups of the pair's two factors in that layer.

    Groups must be split by layer (``param_groups(..., per_layer="q,k,v,o")``); a guarded role in one
    group for every layer is a UserError saying so.
    """
    found: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for group in groups:
        role = group.get("role")
        pair = next((p for p, roles in PAIRS.items() if role in roles and p in targets), None)
        if pair is None:
            continue
        if not any(str(n).endswith("weight") for n in group.get("param_names", ["weight"])):
            continue  # biases: not decayed, not guarded
        if "layer" not in group:
            raise UserError(
                f"the rank guard sets each layer's decay apart, but the {role} parameters of every layer share "
                'one group; build the groups with per_layer="q,k,v,o" (qkvlab.param_groups or create_optimizer)'
            )
        if "l2" in group:
            raise UserError("the rank guard needs decoupled weight decay (AdamW or Muon), not coupled L2")
        found.setdefault((group["layer"], pair), []).append(group)
    return found


def broadcast_decay(guard: RankGuard, groups: list[dict[str, Any]]) -> None:
    """Under torch.distributed, give every rank rank 0's λ for each guarded group, so that all ranks decay
    alike (DDP averages gradients, not weights: a λ differing in its last bit would let the replicas
    drift apart). A no-op in a single process. The collective's tensor lives where the backend needs it:
    on the parameters' CUDA device under NCCL, on the CPU otherwise."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    pairs = guarded_groups(groups, guard.targets())
    ordered = [g for key in sorted(pairs) for g in pairs[key]]
    device = ordered[0]["params"][0].device if ordered and dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([_base(g) for g in ordered], dtype=torch.float64, device=device)
    dist.broadcast(values, src=0)
    for group, value in zip(ordered, values.tolist(), strict=True):
        set_decay(group, value)
