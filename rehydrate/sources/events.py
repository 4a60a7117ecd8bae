"""What an event is, wherever it is read from: the stored event handlers see, an event to append, how a projection's
key is read from an event, and a point-in-time cut-off of a history."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from rehydrate.core.errors import UserError

ANY_VERSION: int | None = None
NO_STREAM = 0


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. `data` is the JSON payload; `schema_version` says which shape it has."""

    type: str
    data: dict[str, Any]
    schema_version: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)
    recorded_at: datetime | None = None


@dataclass(slots=True)
class Event:
    """A stored event, as handlers see it. Treat it as read-only.

    Not a frozen dataclass on purpose: a replay builds one per event, and a frozen one costs five times as
    much to build (each field goes through `object.__setattr__`), a fifth of the whole read.
    """

    global_position: int
    stream_id: str
    stream_version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime


class UndecodablePayload(dict[str, Any]):
    """The data of an event whose payload the source's decoder could not read: empty, with the reason. The fold
    treats it as the handler's failure (parked where the projection parks), never as a crash of the read."""

    def __init__(self, problem: str, part: str = "value") -> None:
        super().__init__()
        self.problem = problem
        self.part = part  # what could not be read: "value", or (of a log's message) "key", "type" or "version"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """How a projection's key is read from an event: the stream id, or one field of the payload."""

    field: str | None = None  # None: the stream id


HeldBack = dict[str, int]  # stream id -> lowest version at or above the mark


def is_held(held: HeldBack, stream_id: str, stream_version: int) -> bool:
    """Whether an event below a mark waits for a later mark: an earlier version of its stream is at or above it."""
    lowest = held.get(stream_id)
    return lowest is not None and stream_version > lowest


@dataclass(frozen=True, slots=True)
class Cutoff:
    """A point-in-time build's bound on the history: events at or before `position`, and/or recorded at or
    before `as_of`. Both are read from the history as it stands now (see the docs, "Point in time")."""

    position: int | None = None
    as_of: datetime | None = None

    @classmethod
    def of(cls, to_position: int | None, as_of: str | datetime | None) -> Cutoff | None:
        """A cut-off from a replay's input (None: the whole history below the mark). A naive `as_of` is UTC."""
        if to_position is None and as_of is None:
            return None
        return cls(to_position, parse_as_of(as_of) if isinstance(as_of, str) else as_of)


def parse_as_of(text: str) -> datetime:
    """An --as-of value: an ISO 8601 timestamp, UTC when it carries no offset."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(
            f"--as-of {text!r} is not an ISO 8601 timestamp", fix="write it like 2024-05-01T12:00:00+00:00"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def replace_data(event: Event, data: dict[str, Any]) -> Event:
    return dataclasses.replace(event, data=data)


def check_new_event(event: NewEvent, *, where: str) -> None:
    """Refuse an event Postgres could not store, or that no reader could take, naming it and `where` it is."""
    if not isinstance(event.type, str) or not event.type or "\x00" in event.type:
        raise UserError(f"event type {event.type!r} in {where} is not valid", fix="use a non-empty string")
    if not isinstance(event.data, dict):
        raise UserError(
            f"event {event.type!r} in {where}: data must be a JSON object, not {type(event.data).__name__}",
            fix="wrap the value in an object",
        )
    if not isinstance(event.schema_version, int) or event.schema_version < 1:
        raise UserError(
            f"event {event.type!r} in {where}: schema_version {event.schema_version!r} is not a positive integer",
            fix="use 1 for the first shape of an event type",
        )
    if not isinstance(event.metadata, dict):
        raise UserError(
            f"event {event.type!r} in {where}: metadata must be a JSON object, not {type(event.metadata).__name__}",
            fix="wrap the value in an object",
        )
    if has_nul(event.data) or has_nul(event.metadata):
        raise UserError(
            f"event {event.type!r} in {where}: data or metadata contains a NUL character, "
            "which Postgres cannot store in JSON",
            fix="remove it, or encode the value (e.g. base64)",
        )


def has_nul(value: Any) -> bool:
    """Whether a JSON value holds a NUL character anywhere (Postgres stores none in text or jsonb)."""
    # Fast path: JSON writes NUL as the escape \u0000, so a value whose JSON lacks that text holds none. (The
    # text also appears for a backslash followed by "u0000"; the walk below then decides.)
    try:
        if b"\\u0000" not in orjson.dumps(value):
            return False
    except (TypeError, orjson.JSONEncodeError):
        pass  # not JSON-serialisable: the walk below still answers, and the write names the real problem
    return _walk_for_nul(value)


def _walk_for_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_walk_for_nul(k) or _walk_for_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_walk_for_nul(v) for v in value)
    return False
