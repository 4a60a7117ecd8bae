"""`rehydrate projections`: every projection, its active generation, whether it is stale, its tail and its lag."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from rehydrate.cli import _common as c
from rehydrate.core.errors import UserError

if TYPE_CHECKING:
    import asyncpg

    from rehydrate.engine.operations import ProjectionStatus

app = typer.Typer()


@app.command("projections")
def projections(as_json: c.Json = False) -> None:
    """List projections: version, active generation (STALE when other code made it), rows, tail, lag, last replay."""
    from rehydrate.engine.operations import projection_statuses
    from rehydrate.sources.pools import Sources
    from rehydrate.sources.store import EventStore

    settings = c.settings()
    registry = c.projections(settings)

    async def work(pool: asyncpg.Pool) -> list[dict[str, Any]]:
        async with Sources(EventStore(pool, settings.schema_name)) as sources, pool.acquire() as conn:
            statuses = await projection_statuses(conn, sources, registry, settings.read_model_schema)
        tails: dict[str, tuple[str, str | None]] = {}
        built = [s.name for s in statuses if s.last_replay is not None]
        if not built:  # no tail to ask Temporal about (nor its SDK to import)
            return [_row(status, ("NOT_STARTED", None)) for status in statuses]
        from rehydrate.core.temporal import connect_client
        from rehydrate.starter import tail_state

        try:
            client = await connect_client(settings)
            for name in built:
                tails[name] = await tail_state(client, name, settings.temporal_task_queue)
        except UserError:
            tails = {name: ("UNKNOWN (Temporal unreachable)", None) for name in built}
        return [_row(status, tails.get(status.name, ("NOT_STARTED", None))) for status in statuses]

    rows = c.with_pool(settings, work)
    if as_json:
        c.print_json(rows)
        return
    table = Table("projection", "version", "active", "rows", "tail", "lag", "last replay")
    for r in rows:
        last = r["last_replay"]
        table.add_row(
            r["name"]
            + ("" if r["registered"] else " (not registered)")
            + ("" if r["source"] == "rehydrate" else f" (source {r['source']})"),
            str(r["version"] or "-"),
            (f"g{r['active_generation']}" if r["active_generation"] else "-")
            + (" [yellow]STALE[/]" if r["stale"] else ""),
            "-" if r["rows"] is None else f"{r['rows']:,}" if r["rows_exact"] else f"≈{r['rows']:,}",
            _tail_text(r["tail"]),
            f"{r['tail']['lag_events']:,} ev, {r['tail']['lag_seconds']:.1f} s"
            if r["tail"]["lag_events"] is not None
            else "-",
            f"g{last['generation']} {last['state']} {c.when(last['ended_at'] or last['started_at'])}"
            if last
            else "never",
        )
    c.out.print(table)
    for r in rows:
        if r["stale"]:
            c.out.print(f"{r['name']} is STALE: {r['stale_reason']}; rebuild with `rehydrate replay start --stale`")
    if any(not r["rows_exact"] for r in rows if r["rows"] is not None):
        c.out.print("≈: too many rows to count quickly; the planner's estimate as of the table's last ANALYZE")
    for r in rows:
        if r["source_error"]:
            c.out.print(f"[red]{r['name']}[/]: lag unknown: {escape(r['source_error'])}", soft_wrap=True)
        if r["tail"]["error"]:
            c.out.print(f"[red]{r['name']}[/]: {escape(r['tail']['error'])}", soft_wrap=True)


def _row(status: ProjectionStatus, tail: tuple[str, str | None]) -> dict[str, Any]:
    return {
        "name": status.name,
        "registered": status.registered,
        "version": status.version,
        "active_generation": status.active_generation,
        "source": status.source,
        "stale": status.stale,
        "stale_reason": status.stale_reason,
        "source_error": status.source_error,
        "fingerprint": status.fingerprint,
        "rows": status.rows,
        "rows_exact": status.rows_exact,
        "checkpoint": status.checkpoint,
        "tail": {
            "enabled": status.tail_enabled,
            "workflow": tail[0],
            "error": status.tail_error or tail[1],
            "lag_events": status.lag_events,
            "lag_seconds": status.lag_seconds,
        },
        "last_replay": None if status.last_replay is None else dataclasses.asdict(status.last_replay),
    }


def _tail_text(tail: dict[str, Any]) -> str:
    if tail["error"]:
        return "FAILED"
    if tail["enabled"] is False:
        return "stopped"
    return c.state(str(tail["workflow"]))
