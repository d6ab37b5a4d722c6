"""qkvlab: see and control what optimisation does to attention layers.

The names below load on first use (PEP 562), so ``import qkvlab`` and the command line's help,
version and argument errors do not pay for importing torch.
"""

from __future__ import annotations

from qkvlab._lazy import lazy_exports

__version__ = "0.1.0"

_WHERE = {
    "ArchitectureInfo": "qkvlab.attention",
    "families": "qkvlab.attention",
    "load_source": "qkvlab.attention",
    "fuse_split_qkv": "qkvlab.attention.split",
    "fuse_state_dict": "qkvlab.attention.split",
    "split_fused_qkv": "qkvlab.attention.split",
    "split_state_dict": "qkvlab.attention.split",
    "UserError": "qkvlab.errors",
    "RankGuard": "qkvlab.guard",
    "corrected_weight_decay": "qkvlab.guard",
    "Monitor": "qkvlab.monitor",
    "InspectReport": "qkvlab.inspection",
    "inspect": "qkvlab.inspection",
    "InspectSeries": "qkvlab.inspection",
    "record_spectra": "qkvlab.inspection",
    "PRESETS": "qkvlab.presets",
    "ROLES": "qkvlab.presets",
    "l2_penalty": "qkvlab.optim",
    "param_groups": "qkvlab.optim",
    "parse_preset": "qkvlab.presets",
    "preset_settings": "qkvlab.presets",
    "roles": "qkvlab.optim",
    "DEFAULT_RTOL": "qkvlab.conventions",
    "FactoredProduct": "qkvlab.spectra",
    "ProductSpectrum": "qkvlab.spectra",
    "effective_rank": "qkvlab.spectra",
    "factor_gap": "qkvlab.spectra",
    "factored_svdvals": "qkvlab.spectra",
    "nuclear_norm": "qkvlab.spectra",
    "rank_at": "qkvlab.spectra",
    "stable_rank": "qkvlab.spectra",
}

__all__ = sorted([*_WHERE, "__version__"])


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
