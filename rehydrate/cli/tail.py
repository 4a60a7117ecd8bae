"""`rehydrate tail`: start and stop the live tail that keeps a projection's read model current."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from rehydrate.cli import _common as c

if TYPE_CHECKING:
    import asyncpg

app = typer.Typer(help="Start and stop the live tail that keeps a read model current.", no_args_is_help=True)


@app.command("start")
def start(
    name: Annotated[str, typer.Argument(help="The projection whose tail to start.")], as_json: c.Json = False
) -> None:
    """Start NAME's tail: new events are applied to its active read model as they commit."""
    _tail(name, start=True, as_json=as_json)


@app.command("stop")
def stop(
    name: Annotated[str, typer.Argument(help="The projection whose tail to stop.")], as_json: c.Json = False
) -> None:
    """Stop NAME's tail; workers do not start it again until `rehydrate tail start`."""
    _tail(name, start=False, as_json=as_json)


def _tail(name: str, *, start: bool, as_json: bool) -> None:
    from rehydrate.core.temporal import connect_client
    from rehydrate.starter import start_tail, stop_tail

    settings = c.settings()
    c.known_projection(settings, name)

    async def work(pool: asyncpg.Pool) -> str:
        client = await connect_client(settings)
        return await (start_tail if start else stop_tail)(client, pool, settings, name)

    workflow_id = c.with_pool(settings, work)
    state = "started" if start else "stopped"
    if as_json:
        c.print_json({"projection": name, "tail": state, "workflow_id": workflow_id})
    else:
        c.out.print(f"tail of {name} {state}: {settings.workflow_url(workflow_id)}")
