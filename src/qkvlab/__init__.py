"""qkvlab: see and control what optimisation does to attention layers."""

from qkvlab.attention import ArchitectureInfo, families, load_source
from qkvlab.errors import UserError
from qkvlab.inspect import InspectReport, inspect
from qkvlab.spectra import (
    DEFAULT_RTOL,
    FactoredProduct,
    ProductSpectrum,
    effective_rank,
    factored_svdvals,
    nuclear_norm,
    rank_at,
    stable_rank,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RTOL",
    "ArchitectureInfo",
    "FactoredProduct",
    "InspectReport",
    "ProductSpectrum",
    "UserError",
    "__version__",
    "effective_rank",
    "factored_svdvals",
    "families",
    "inspect",
    "load_source",
    "nuclear_norm",
    "rank_at",
    "stable_rank",
]
