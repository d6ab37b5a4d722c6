"""Package attributes that load on first use (PEP 562), so importing a package costs nothing."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: name → the module that defines it."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:  # a submodule, e.g. qkvlab.attention.families
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError:
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module), name)
        vars(importlib.import_module(package))[name] = value  # once loaded, an ordinary attribute
        return value

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__
