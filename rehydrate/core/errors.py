"""Errors a user can act on: each names the input that was wrong and how to fix it."""

from __future__ import annotations

import os
import socket

# An error quotes the input it names (a key, a value in a handler's exception): cut, so that a 10 MB event does
# not make a 10 MB message. A failure travels through Temporal, which refuses payloads over 2 MB; refused, the
# activity would be retried for ever instead of failing the replay.
MAX_MESSAGE = 2000


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text`, cut to about `limit` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


class RehydrateError(Exception):
    """Base of rehydrate's own errors."""


class UserError(RehydrateError):
    """An expected mistake: the CLI prints it as one line, without a traceback, and exits non-zero."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = shorten(message)
        self.fix = None if fix is None else shorten(fix)
        message, fix = self.message, self.fix
        super().__init__(f"{message} — {fix}" if fix else message)


class DatabaseUnreachable(UserError):
    """A database that did not answer: down, starting up, or out of reach on the network (not a login or a database
    name it refused). A command, or a replay's plan, stops on it with its one line; a tail waits it out."""


class SourceUnavailable(RehydrateError):
    """A source that does not answer for now (a broker restarting): retried, unlike a UserError."""


class ConcurrencyError(UserError):
    """An append found the stream at another version than the caller expected."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream_id!r} is at version {actual}, not the expected {expected}",
            fix="reload the stream and retry the command",
        )


class UnknownProjectionError(UserError):
    """A projection name this process does not know; the fix says which modules it loaded, and from where."""

    def __init__(self, name: str, known: list[str], origin: str = "") -> None:
        listed = ", ".join(sorted(known)) or "none"
        loaded = f" (this process loads {origin})" if origin else ""
        super().__init__(
            f"unknown projection {name!r} (registered: {listed})",
            fix=f"check the name, or add its module to REHYDRATE_PROJECTIONS or `projections` in rehydrate.toml or "
            f"[tool.rehydrate]{loaded}",
        )


class ProjectionError(UserError):
    """A projection could not apply an event: names the projection, position, stream and type."""

    def __init__(self, projection: str, position: int, stream_id: str, event_type: str, problem: str, fix: str) -> None:
        self.projection = projection
        self.position = position
        super().__init__(
            f"projection {projection!r} failed at event {position} (stream {stream_id!r}, type {event_type!r}): "
            f"{problem}",
            fix=fix,
        )


class WrongWorker(RehydrateError):
    """A task reached a worker that must not run it: it lacks the projection, or has other code for it than the
    generation was planned with. The run goes on with another worker; this is never a failure of the run itself."""

    def __init__(self, message: str) -> None:
        self.message = shorten(message)
        super().__init__(self.message)


def worker_identity() -> str:
    """This process as Temporal names workers by default: pid@host."""
    return f"{os.getpid()}@{socket.gethostname()}"
