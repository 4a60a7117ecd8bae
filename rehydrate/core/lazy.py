"""A package's names imported when first used (PEP 562): importing the package loads none of their modules."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, homes: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], object]:
    """The package's `__getattr__`: a name of `homes` is imported from its module there (`homes[name]`) on first
    use and kept in the package's `namespace`, so that the next use is a plain lookup."""

    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    return __getattr__
