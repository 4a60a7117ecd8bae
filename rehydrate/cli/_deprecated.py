"""Old spellings of commands, kept working for one release with a notice on stderr saying what to type instead."""

from __future__ import annotations

from typing import Any

from typer.core import TyperGroup

from rehydrate.cli._common import err


def notice(old: str, new: str) -> None:
    err.print(
        f"[yellow]note:[/] `rehydrate {old}` is deprecated and goes away in the next release; use `rehydrate {new}`"
    )


class DefaultToList(TyperGroup):
    """A group whose `list` is also what runs when the first argument is not one of its commands: `dead-letters NAME`
    (the old spelling) runs `dead-letters list NAME`, with a notice."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:  # typer's own (vendored) click types
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            notice(f"{ctx.info_name} {args[0]}", f"{ctx.info_name} list {args[0]}")
            args = ["list", *args]
        return super().resolve_command(ctx, args)
