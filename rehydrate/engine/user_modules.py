"""The user's code: the modules named in settings (REHYDRATE_PROJECTIONS, REHYDRATE_AGGREGATES), what they define,
and the source text that code fingerprints hash."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from rehydrate.core.errors import UserError


def module_definitions(
    module_names: Iterable[str], accepts: Callable[[Any], bool], *, what: str, setting: str
) -> list[Any]:
    """The module-level values of each named module that `accepts` takes, in module order.

    A module that fails to import, or defines no `what`, is a UserError naming it and the setting to correct.
    """
    found: list[Any] = []
    _project_importable()
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except Exception as error:
            raise UserError(
                f"{what.lower()} module {name!r} failed to import: {type(error).__name__}: {error}",
                fix=f"fix the module, or correct {setting}",
            ) from None
        values = [value for value in vars(module).values() if accepts(value)]
        if not values:
            raise UserError(
                f"{what.lower()} module {name!r} defines no {what}",
                fix=f"define one at module level, or remove the module from {setting}",
            )
        found += values
    return found


def _project_importable() -> None:
    """The current directory, the project's, is importable (as `python -m` makes it, and the console script does not):
    `projections = ["myapp.projections"]` works from where its rehydrate.toml or pyproject.toml is."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)


# Each function's source, read once: a worker checks its projection's fingerprint at every chunk, and reading the
# handlers' source (inspect tokenizes the module) took a few percent of a chunk's time. A function object's code never
# changes; an edited module, reloaded, makes new function objects.
_SOURCES: weakref.WeakKeyDictionary[Callable[..., Any], str] = weakref.WeakKeyDictionary()


def source_text(function: Callable[..., Any]) -> str:
    """A function's source, for fingerprints (so an edit shows even if it compiles to the same bytecode); its
    bytecode and constants when the source cannot be read (a REPL, a frozen app). Stable across processes."""
    try:
        return _SOURCES[function]
    except (KeyError, TypeError):  # TypeError: a callable that takes no weak reference (read each time)
        pass
    text = _read_source(function)
    with contextlib.suppress(TypeError):
        _SOURCES[function] = text
    return text


def _read_source(function: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        code = getattr(function, "__code__", None)
        if code is None:
            return str(getattr(function, "__qualname__", type(function).__qualname__))
        return f"{code.co_code.hex()}{code.co_consts!r}"
