"""What every command shares: settings and the projections it knows, running its async work, and output (text and
tables for people, `--json` for scripts, full width when not a terminal).

The command modules import the rest of rehydrate (and with it SQLAlchemy, asyncpg, Temporal's SDK) inside the
commands that use it, not at the top: `rehydrate --help` and a command that needs little start in a fraction of
the time."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console

from rehydrate.core.errors import UnknownProjectionError
from rehydrate.core.logs import configure as configure_logs

if TYPE_CHECKING:
    import asyncpg

    from rehydrate.core.settings import Settings
    from rehydrate.engine.aggregates import AggregateRegistry
    from rehydrate.engine.projections import Registry

T = TypeVar("T")

# Not a terminal (a pipe, a file, a CI log): no wrapping at 80 columns, so lines, URLs and table cells stay whole.
_WIDTH = None if sys.stdout.isatty() else 10_000
out = Console(highlight=False, width=_WIDTH, soft_wrap=_WIDTH is not None)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 10_000)

Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def settings(**overrides: Any) -> Settings:
    """The settings, with the options given on the command line (None: not given) over the environment."""
    from rehydrate.core.settings import load_settings

    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def projections(settings: Settings) -> Registry:
    """The project's projections: the same in every process and shell (see Settings.projection_modules)."""
    from rehydrate.engine.projections import Registry

    return Registry.from_settings(settings)


def known_projection(settings: Settings, name: str) -> None:
    """Refuse a projection name that neither this project's registry nor the catalog (projections built before)
    knows, listing the known ones: a typo is an error, never an empty answer."""
    registry = projections(settings)
    if name in registry.names():
        return

    async def built(pool: asyncpg.Pool) -> list[str]:
        from rehydrate.engine.catalog import Catalog

        async with pool.acquire() as conn:
            return list(await Catalog(conn, settings.schema_name).projections())

    names = with_pool(settings, built)
    if name not in names:
        raise UnknownProjectionError(name, sorted({*registry.names(), *names}), registry.origin)


def aggregates(settings: Settings) -> AggregateRegistry:
    from rehydrate.engine.aggregates import AggregateRegistry

    return AggregateRegistry.from_settings(settings)


def log_as_configured(settings: Settings) -> None:
    if settings.log_format == "json":
        configure_logs(json=True)


def run(work: Callable[[], Awaitable[T]]) -> T:
    import asyncio

    async def main() -> T:
        return await work()

    return asyncio.run(main())


def with_pool(settings: Settings, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run `work` with a pool on the configured database (its rehydrate schema made on first use)."""
    from rehydrate.core.database import ready_pool, resolve_url

    async def main() -> T:
        async with ready_pool(resolve_url(settings), settings.schema_name) as pool:
            return await work(pool)

    return run(main)


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, default=_default, option=orjson.OPT_INDENT_2).decode() + "\n")


def state(status: str) -> str:
    """A Temporal status (RUNNING, CANCELED, TIMED_OUT) as text, spelled as rehydrate spells states (cancelled)."""
    return status.lower().replace("_", " ").replace("canceled", "cancelled")


def when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}"
