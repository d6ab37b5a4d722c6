"""``optimizer=muon``: torch's Muon on the 2-D q/k/v/o/MLP matrices, AdamW on embeddings, head, norms and
biases (one optimiser, :class:`qkvlab.muon.MuonWithAdamW`; decoupled decay per role in both).
Per-head Muon is ``muon_per_head``: those roles are orthogonalised head by head."""

from __future__ import annotations

from typing import Any

from qkvlab.errors import UserError
from qkvlab.optimizers import OptimizerSpec, register


def build(config: Any, model: Any, groups: list[dict]) -> Any:
    """Tag each per-role group in place (the spectral monitor holds these very dicts) with its algorithm,
    and per-head orthogonalisation for the roles in ``muon_per_head``."""
    from qkvlab.muon import MuonWithAdamW, tag_groups

    heads = config.model.n_head
    try:
        tag_groups(groups, config.muon_per_head, dict.fromkeys("qkvo", heads))
    except ValueError as error:  # e.g. muon_per_head=q with q frozen by train_roles
        raise UserError(f"muon_per_head: {error}") from None
    return MuonWithAdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=1e-8,
        momentum=config.muon_momentum,
        adjust_lr_fn=config.muon_adjust_lr,
        ns_dtype=config.muon_ns_dtype,
    )


SPEC = register(
    OptimizerSpec(
        "muon",
        "Muon on 2-D matrices, AdamW on the rest",
        "decoupled",
        build,
        keys={
            "muon_momentum": (
                "muon: Nesterov momentum (torch's default 0.95)",
                (lambda v: 0 <= v < 1, "in [0, 1)"),
            ),
            "muon_adjust_lr": (
                "muon: torch's adjust_lr_fn, original | match_rms_adamw",
                (lambda v: v in ("original", "match_rms_adamw"), "original or match_rms_adamw"),
            ),
            "muon_per_head": (
                "muon: roles among q, k, v, o orthogonalised per head",
                (lambda v: set(v) <= {"q", "k", "v", "o"}, "a subset of q, k, v, o"),
            ),
            "muon_ns_dtype": (
                "muon: Newton–Schulz arithmetic, bfloat16 (torch's) | float32 (fast on CPUs)",
                (lambda v: v in ("bfloat16", "float32"), "bfloat16 or float32"),
            ),
        },
    )
)
