"""The `rehydrate` command: one module per command group, each thin (parse, call the library, print).

Exit codes: 0 done; 1 an expected mistake (one `error:` line and its `fix:` on stderr), a failed run, or drift found
(`verify`, `events check`); 2 a usage error (an unknown command or option); 130 interrupted.
"""

from __future__ import annotations

import gc
from typing import Annotated

import typer
from rich.markup import escape

from rehydrate.cli import (
    db,
    dead_letters,
    dev,
    events,
    generations,
    projections,
    replay,
    sandbox,
    schedules,
    snapshots,
    sources,
    tail,
    verify,
    worker,
)
from rehydrate.cli._common import err, out
from rehydrate.core.errors import SourceUnavailable, UserError
from rehydrate.core.logs import configure as configure_logs
from rehydrate.core.temporal import quiet_exit
from rehydrate.core.tracing import flush

app = typer.Typer(
    help="rehydrate: durable, zero-downtime rebuilds of event-sourced read models, on Temporal and Postgres.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(given: bool) -> None:
    if given:
        from importlib.metadata import version

        out.print(f"rehydrate {version('rehydrate')}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """rehydrate: durable, zero-downtime rebuilds of event-sourced read models, on Temporal and Postgres."""


for commands in (dev.app, worker.app, projections.app, generations.app, verify.app, sandbox.legacy):
    app.add_typer(commands)
for name, group in (
    ("db", db.app),
    ("events", events.app),
    ("replay", replay.app),
    ("tail", tail.app),
    ("sandbox", sandbox.app),
    ("dead-letters", dead_letters.app),
    ("schedule", schedules.app),
    ("snapshots", snapshots.app),
    ("sources", sources.app),
):
    app.add_typer(group, name=name)


def _exit_code(args: list[str] | None) -> int:
    try:
        app(args=args, prog_name="rehydrate")  # standalone: usage errors print themselves and exit 2
        return 0
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except UserError as error:
        # escape: a message quotes user input (a stream id, a path) that may look like Rich markup.
        err.print(f"[red]error:[/] {escape(error.message)}", soft_wrap=True)
        if error.fix:
            err.print(f"  fix: {escape(error.fix)}", soft_wrap=True)
        return 1
    except SourceUnavailable as error:
        err.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        return 130


def tune_gc() -> None:
    """Collect garbage less often. A batch of 50,000 events is ~250,000 new tracked objects (records, events,
    payload dicts), all alive until the batch is folded: every young collection that runs meanwhile walks all of
    them, and the default thresholds (700 allocations) took 40% of a replay's read. With 50,000 a batch still
    met about five (10% of a worker's CPU). A chunk of 100,000 events (two batches, and its rows kept between
    them) still met about one collection of ~50 ms per worker and replay at 500,000; at 1,000,000, none.
    Objects made at start-up are frozen out of the collector's way."""
    gc.freeze()
    gc.set_threshold(1_000_000, 20, 10)


def main(args: list[str] | None = None) -> None:
    """The console entry point: runs a command, then exits without interpreter finalisers (sdk-python#300)."""
    tune_gc()
    configure_logs(json=False)
    code = _exit_code(args)
    flush()  # os._exit below runs no exit handler: export the spans still batched
    quiet_exit(code)
