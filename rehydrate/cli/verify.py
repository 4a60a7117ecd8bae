"""`rehydrate verify`: rebuild a projection into a sandbox and compare it with the live read model, key by key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from rehydrate.cli import _common as c

if TYPE_CHECKING:
    from rehydrate.models import VerifyResult

app = typer.Typer()


@app.command("verify")
def verify(
    name: Annotated[str, typer.Argument(help="The projection.")],
    keep: Annotated[bool, typer.Option("--keep", help="Keep the rebuilt sandbox (verify_NAME) to inspect.")] = False,
    show: Annotated[int, typer.Option(min=0, help="Differing keys to show.")] = 5,
    as_json: c.Json = False,
) -> None:
    """Rebuild NAME into a sandbox at the live checkpoint and compare row hashes key by key; exit 1 on drift.

    Runs as the `Verify` workflow on the workers (as a schedule created with --verify-only does)."""
    from rehydrate.core.temporal import connect_client
    from rehydrate.starter import verify as run_verify

    settings = c.settings()
    registry = c.projections(settings)

    async def work() -> VerifyResult:
        client = await connect_client(settings)
        return await run_verify(
            client, settings, name, keep=keep, show=show, registry=registry if len(registry) else None
        )

    v = c.run(work)
    if as_json:
        c.print_json(v)
    elif v.differing == 0:
        c.out.print(
            f"[green]✓[/] {name}: generation {v.live_generation} equals a fresh rebuild at mark {v.mark} "
            f"({v.live_rows:,} rows)"
        )
    else:
        c.out.print(
            f"[red]✗[/] {name}: {v.differing:,} key(s) differ between generation {v.live_generation} "
            f"({v.live_rows:,} rows) and a rebuild at mark {v.mark} ({v.rebuilt_rows:,} rows)"
        )
        for drift in v.first:
            c.out.print(f"  {escape(drift.key)}: {drift.problem}")
    if v.stale and not as_json:
        c.out.print("  note: the live generation was built from other code (STALE): drift is expected")
    if v.differing:
        raise typer.Exit(1)
