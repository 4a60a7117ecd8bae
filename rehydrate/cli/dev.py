"""`rehydrate demo` and `rehydrate dev`: the whole stack on one machine, from PyPI alone, stopped when they end."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from rehydrate.cli import _common as c
from rehydrate.cli.replay import print_result, watch

if TYPE_CHECKING:
    from rehydrate.core.settings import Settings
    from rehydrate.devstack import Stack
    from rehydrate.engine.projections import Registry
    from rehydrate.models import ReplayResult

app = typer.Typer()

RELOAD_POLL_SECONDS = 0.5


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Events in the example history (loaded once, then reused).")] = 250_000,
    lanes: Annotated[
        int | None,
        typer.Option(
            help="Lanes per replay (default: REHYDRATE_LANES; unset: 8 by stream range, fewer on a small store, "
            "4 by hash)."
        ),
    ] = None,
    keep: Annotated[
        bool,
        typer.Option("--keep", help="Leave Temporal and Postgres running (stop them with `rehydrate dev --stop`)."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the replays' results as JSON (what it says on the way: stderr).")
    ] = False,
) -> None:
    """Bring up Temporal and Postgres, load an order history, replay the example projections, then stop them."""
    from rehydrate.core.settings import EXAMPLE_PROJECTIONS
    from rehydrate.engine.projections import Registry

    settings = c.settings()
    registry = Registry.from_modules(EXAMPLE_PROJECTIONS, "the examples (the demo replays them)")
    results = c.run(lambda: _demo(settings, registry, events, lanes, keep, as_json))
    if as_json:
        c.print_json(results)


async def _demo(
    settings: Settings, registry: Registry, events: int, lanes: int | None, keep: bool, as_json: bool
) -> list[ReplayResult]:
    from rehydrate.core.database import create_pool, ensure_schema
    from rehydrate.core.temporal import connect_client
    from rehydrate.devstack import dev_stack
    from rehydrate.engine.importer import import_events
    from rehydrate.examples.orders import generate
    from rehydrate.models import ReplayInput
    from rehydrate.sources.store import EventStore
    from rehydrate.starter import start_replay, wait_for_replay
    from rehydrate.worker import running_worker

    # The demo's worker runs in this process: its per-chunk log lines would break into the progress bars, which
    # say the same. Warnings and errors still show.
    logging.getLogger("rehydrate").setLevel(logging.WARNING)
    say = c.err.print if as_json else c.out.print
    results: list[ReplayResult] = []
    say("[bold]rehydrate demo[/]: starting Temporal (dev server) and Postgres …")
    async with AsyncExitStack() as stack:
        dev = await stack.enter_async_context(dev_stack(settings, keep=keep))
        pool = await create_pool(dev.database_url)
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            await ensure_schema(conn, settings.schema_name)
        store = EventStore(pool, settings.schema_name)
        existing = await store.head()
        if existing == 0:
            say(f"Loading an order history of {events:,} events …")
            report = await import_events(store, enumerate(generate(events), start=1), source="demo history")
            say(
                f"  imported {report.events:,} events in {report.streams:,} streams in {report.seconds:.1f} s "
                f"({report.events_per_second:,.0f} events/s)"
            )
        else:
            say(f"Reusing the {existing:,} events already in the store ({settings.data_dir}).")
        client = await connect_client(settings)
        worker = running_worker(settings, registry, client=client, database_url=dev.database_url)
        await stack.enter_async_context(worker)
        for projection in registry:
            handle = await start_replay(client, settings, ReplayInput(projection.name, lanes=lanes), attach=True)
            if as_json:
                results.append(await wait_for_replay(handle))
                continue
            # Its link would be dead once the demo has stopped its dev server, unless kept.
            print_result(settings, await watch(handle, projection.name), handle, link=keep)
    _demo_closing(settings, dev, keep, say)
    return results


def _demo_closing(settings: Settings, dev: Stack, keep: bool, say: Callable[..., None]) -> None:
    """What to do next, with no link that is dead once the demo has exited."""
    from rehydrate.core.settings import redact_url

    queries = "SELECT * FROM order_summary LIMIT 5;  SELECT * FROM customer_stats LIMIT 5;"
    if keep:
        say(
            f"\nTemporal and Postgres keep running (stop them with [bold]rehydrate dev --stop[/]):\n"
            f"  the runs in the Web UI: {dev.temporal.ui_url}/namespaces/{settings.temporal_namespace}/workflows\n"
            f"  the read models: [bold]rehydrate db psql[/], then {queries}\n"
            f"  Postgres: {redact_url(dev.database_url)}"
        )
        return
    say(
        "\nNext:\n"
        f"  [bold]rehydrate dev[/]       Temporal's Web UI ({dev.temporal.ui_url}) with these runs, Postgres and a "
        "worker, until Ctrl-C\n"
        f"  [bold]rehydrate db psql[/]   (with `rehydrate dev` running) the read models: {queries}\n"
        f"Everything the demo started has stopped; its events and Temporal history are kept in {settings.data_dir}/."
    )


@app.command()
def dev(
    worker: Annotated[bool, typer.Option("--worker/--no-worker", help="Also run a worker.")] = True,
    reload: Annotated[
        bool, typer.Option("--reload/--no-reload", help="Restart the worker when the projections' code changes.")
    ] = True,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave Temporal and Postgres running at the end (see --stop).")
    ] = False,
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop the Temporal and Postgres a kept `dev` or `demo` left running.")
    ] = False,
) -> None:
    """Run a Temporal dev server (Web UI included), Postgres and a worker on this machine until Ctrl-C or SIGTERM.

    The worker loads the project's projections (REHYDRATE_PROJECTIONS, rehydrate.toml or [tool.rehydrate] in
    pyproject.toml; the examples when nothing names any) and, with --reload, is restarted when their code changes."""
    from rehydrate.devstack import stop_stack

    settings = c.settings()
    c.log_as_configured(settings)
    if stop:
        stopped = stop_stack(settings)
        c.out.print("stopped " + " and ".join(stopped) if stopped else f"nothing of {settings.data_dir} was running")
        return
    registry = c.projections(settings)  # imported here too: a broken module is named before anything starts
    aggregates = c.aggregates(settings)
    c.run(lambda: _dev(settings, registry, aggregates.names(), worker=worker, reload=reload, keep=keep))


async def _dev(
    settings: Settings, registry: Registry, aggregates: list[str], *, worker: bool, reload: bool, keep: bool
) -> None:
    from rehydrate.core.settings import projections_origin, redact_url
    from rehydrate.devstack import dev_stack

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    async with dev_stack(settings, keep=keep) as stack:
        c.out.print(f"Temporal: {stack.temporal.address}   Web UI: {stack.temporal.ui_url}")
        c.out.print(f"Postgres: {redact_url(stack.database_url)}   psql: rehydrate db psql")
        origin = escape(projections_origin(settings))
        c.out.print(f"Projections: {', '.join(registry.names()) or 'none'} (from {origin})")
        if aggregates:
            c.out.print(f"Aggregates: {', '.join(aggregates)}")
        ending = "Temporal and Postgres keep running (`rehydrate dev --stop`)" if keep else "everything stops"
        c.out.print(f"Ctrl-C to stop: the worker ends, then {ending}.")
        if worker:
            await _run_worker(settings, stack, stopping, reload)
        else:
            await stopping.wait()


async def _run_worker(settings: Settings, stack: Stack, stopping: asyncio.Event, reload: bool) -> None:
    """A `rehydrate worker` process, started again whenever a watched file changes, until `stopping` is set."""
    env = {
        **os.environ,
        "REHYDRATE_DATABASE_URL": stack.database_url,
        "REHYDRATE_TEMPORAL_ADDRESS": settings.temporal_address,
    }
    watched = _watched_files(settings) if reload else []
    seen = _mtimes(watched)
    process = _spawn_worker(env)
    try:
        while not stopping.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), RELOAD_POLL_SECONDS)
            if stopping.is_set() or not watched:
                continue
            now = _mtimes(_watched_files(settings))
            if now != seen:
                changed = sorted(str(path) for path in set(now) | set(seen) if now.get(path) != seen.get(path))
                c.out.print(
                    f"changed: {', '.join(changed[:3])}{' …' if len(changed) > 3 else ''}; restarting the worker"
                )
                seen = now
                await _stop_worker(process)
                process = _spawn_worker(env)
    finally:
        await _stop_worker(process)


def _spawn_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rehydrate", "worker"], env=env, stdin=subprocess.DEVNULL)


async def _stop_worker(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM: the worker finishes its running activities or hands them back; SIGKILL after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


def _watched_files(settings: Settings) -> list[Path]:
    """The Python files of the project's projection and aggregate modules (their whole top-level package when it
    lies in the current directory), and the project's settings files."""
    here = Path.cwd().resolve()
    files = {here / "rehydrate.toml", here / "pyproject.toml", here / ".env"}
    for name in {*settings.projection_modules, *settings.aggregate_modules}:
        spec = importlib.util.find_spec(name.split(".")[0])
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin).resolve()
        package = origin.parent if origin.name == "__init__.py" else None
        if package is not None and package.is_relative_to(here):
            files.update(_python_files(package))
        else:
            module = importlib.util.find_spec(name)
            if module is not None and module.origin is not None:
                files.add(Path(module.origin).resolve())
    return sorted(files)


def _python_files(folder: Path) -> Iterator[Path]:
    for path in folder.rglob("*.py"):
        if "__pycache__" not in path.parts:
            yield path


def _mtimes(files: list[Path]) -> dict[Path, int]:
    found = {}
    for path in files:
        try:
            found[path] = path.stat().st_mtime_ns
        except OSError:
            continue  # not there (yet): its appearance counts as a change
    return found
