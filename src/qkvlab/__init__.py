"""qkvlab: see and control what optimisation does to attention layers."""

from qkvlab.attention import ArchitectureInfo, families, load_source
from qkvlab.attention.split import fuse_split_qkv, fuse_state_dict, split_fused_qkv, split_state_dict
from qkvlab.errors import UserError
from qkvlab.inspect import InspectReport, inspect
from qkvlab.optim import PRESETS, ROLES, l2_penalty, param_groups, parse_preset, preset_settings, roles
from qkvlab.spectra import (
    DEFAULT_RTOL,
    FactoredProduct,
    ProductSpectrum,
    effective_rank,
    factor_gap,
    factored_svdvals,
    nuclear_norm,
    rank_at,
    stable_rank,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RTOL",
    "PRESETS",
    "ROLES",
    "ArchitectureInfo",
    "FactoredProduct",
    "InspectReport",
    "ProductSpectrum",
    "UserError",
    "__version__",
    "effective_rank",
    "factor_gap",
    "factored_svdvals",
    "families",
    "fuse_split_qkv",
    "fuse_state_dict",
    "inspect",
    "l2_penalty",
    "load_source",
    "nuclear_norm",
    "param_groups",
    "parse_preset",
    "preset_settings",
    "rank_at",
    "roles",
    "split_fused_qkv",
    "split_state_dict",
    "stable_rank",
]
