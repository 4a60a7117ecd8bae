"""Validation and quoting of every SQL identifier rehydrate builds statements with."""

from __future__ import annotations

import hashlib
import re

from rehydrate.core.errors import UserError
from rehydrate.core.limits import MAX_IDENTIFIER

_IDENTIFIER = re.compile(rf"^[a-z_][a-z0-9_]{{0,{MAX_IDENTIFIER - 1}}}$")


def check_identifier(name: str, what: str) -> str:
    """Return `name` if it is a plain lower-case Postgres identifier, else raise a UserError naming it."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise UserError(
            f"{what} {name!r} is not a plain identifier",
            fix="use lower-case letters, digits and underscores, starting with a letter, "
            f"at most {MAX_IDENTIFIER} characters",
        )
    return name


def quote(name: str) -> str:
    """Quote an already-checked identifier (defence in depth: checked names never need escaping)."""
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    return f"{quote(schema)}.{quote(name)}"


def derived_name(base: str, suffix: str) -> str:
    """`base + suffix`, shortened with a hash so the result stays within Postgres's 63 bytes."""
    name = base + suffix
    if len(name) <= MAX_IDENTIFIER:
        return name
    digest = hashlib.sha1(base.encode()).hexdigest()[:8]
    return f"{base[: MAX_IDENTIFIER - len(suffix) - 9]}_{digest}{suffix}"
