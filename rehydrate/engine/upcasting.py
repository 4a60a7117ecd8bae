"""Event versioning: upcasters turn a stored payload of schema version N into version N+1, chained on read.

Events are immutable, but their shape changes. Rather than migrate the events table, each change of an event
type's payload gets one small function from the old shape to the new one, and every reader (replays, the
tail, catch-up, aggregate rehydration) runs the stored payload through the chain before a handler sees it::

    events = Upcasters()

    @events.upcaster("OrderPlaced", from_version=1)
    def placed_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "currency": data.get("currency", "EUR")}

The current version of a type is the highest one its upcasters reach (v1→v2 and v2→v3 make it 3). A type
without upcasters is not versioned: its events reach handlers as stored, whatever their `schema_version`.
An event of a versioned type whose version has no path to the current one (a gap in the chain, or a version
newer than the code) is an error naming its type, version and position, never a handler fed the wrong shape.

Typed payloads are opt-in: register a pydantic model per type and version with `@events.model(...)` and call
`events.parse(event)` where a handler wants one. Nothing on the hot path validates unless asked to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from rehydrate.core.errors import UserError
from rehydrate.engine.user_modules import source_text
from rehydrate.sources.events import Event

Payload = dict[str, Any]
Upcast = Callable[[Payload], Payload]
M = TypeVar("M", bound=type[BaseModel])


class UpcastError(UserError):
    """An event could not be brought to its type's current version: names type, version and position."""

    def __init__(self, event: Event, problem: str, fix: str) -> None:
        self.event_type = event.type
        self.schema_version = event.schema_version
        self.position = event.global_position
        self.problem = problem
        super().__init__(
            f"event {event.global_position} (stream {event.stream_id!r}, type {event.type!r}, "
            f"schema version {event.schema_version}): {problem}",
            fix=fix,
        )


@dataclass(frozen=True, slots=True)
class Gap:
    """Why a (type, version) cannot be upcast: the current version, and the first missing step (if any)."""

    current: int
    missing_from: int | None  # None: the version is newer than the current one


class Upcasters:
    """The upcasters (and optional payload models) of a set of event types; pass it to projections and aggregates."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcast] = {}
        self._models: dict[tuple[str, int], type[BaseModel]] = {}
        # type -> current version, for versioned types only: the one lookup the hot path makes per event.
        self.current: dict[str, int] = {}

    def upcaster(self, event_type: str, *, from_version: int) -> Callable[[Upcast], Upcast]:
        """Register the decorated function as the step from `from_version` to `from_version + 1` of `event_type`."""
        if not isinstance(from_version, int) or from_version < 1:
            raise UserError(
                f"upcaster of {event_type!r}: from_version {from_version!r} is not a positive integer",
                fix="the first shape of an event type is version 1",
            )

        def register(step: Upcast) -> Upcast:
            if (event_type, from_version) in self._steps:
                raise UserError(
                    f"two upcasters of {event_type!r} from version {from_version}",
                    fix="keep one of them; each version has exactly one step to the next",
                )
            self._steps[event_type, from_version] = step
            self.current[event_type] = max(self.current.get(event_type, 1), from_version + 1)
            return step

        return register

    def model(self, event_type: str, *, version: int) -> Callable[[M], M]:
        """Register the decorated pydantic model as the payload of `event_type` at `version` (see `parse`)."""

        def register(model: M) -> M:
            self._models[event_type, version] = model
            return model

        return register

    def current_version(self, event_type: str) -> int:
        """The version new events of this type are written in: the highest the upcasters reach, or 1."""
        return self.current.get(event_type, 1)

    def gap(self, event_type: str, version: int) -> Gap | None:
        """None when events of this type and version can be brought to the current version; else why not."""
        current = self.current.get(event_type)
        if current is None or version == current:
            return None
        if version > current:
            return Gap(current, None)
        for step in range(version, current):
            if (event_type, step) not in self._steps:
                return Gap(current, step)
        return None

    def upcast(self, event: Event) -> Event:
        """The event at its type's current version (the same object when it already is, or is unversioned)."""
        current = self.current.get(event.type)
        if current is None or event.schema_version == current:
            return event
        gap = self.gap(event.type, event.schema_version)
        if gap is not None:
            raise _gap_error(event, gap)
        data = event.data
        for version in range(event.schema_version, current):
            step = self._steps[event.type, version]
            try:
                data = step(dict(data))  # a copy: a step that mutates its input cannot change another reader's
            except Exception as error:
                raise UpcastError(
                    event,
                    f"upcaster {getattr(step, '__name__', step)!r} (v{version}→v{version + 1}) raised "
                    f"{type(error).__name__}: {error}",
                    "fix the upcaster (or the event)",
                ) from error
            if not isinstance(data, dict):
                raise UpcastError(
                    event,
                    f"upcaster {getattr(step, '__name__', step)!r} returned {type(data).__name__}, not a dict",
                    "return the new payload as a dict",
                )
        return replace(event, data=data, schema_version=current)

    def parse(self, event: Event) -> BaseModel:
        """The event's payload as the pydantic model registered for its type and version; a clear error if it
        does not validate. Opt-in: call it in a handler that wants a typed payload."""
        model = self._models.get((event.type, event.schema_version))
        if model is None:
            raise UpcastError(
                event,
                "no payload model is registered for this type and version",
                f"register one with @upcasters.model({event.type!r}, version={event.schema_version})",
            )
        try:
            return model.model_validate(event.data)
        except ValidationError as error:
            raise UpcastError(
                event, f"the payload does not fit {model.__name__}: {error}", "fix the event or an upcaster"
            ) from None

    @property
    def fingerprint(self) -> str:
        """A hash of the upcasters' code: part of the fingerprint of whatever folds upcast events."""
        digest = hashlib.sha256()
        for (event_type, version), step in sorted(self._steps.items()):
            source = source_text(step)
            digest.update(f"{event_type}:{version}:{source}".encode())
        return digest.hexdigest()[:16]

    def __bool__(self) -> bool:
        return bool(self._steps)

    def __repr__(self) -> str:
        return f"Upcasters({', '.join(f'{t} v{v}' for t, v in sorted(self.current.items()))})"


def _gap_error(event: Event, gap: Gap) -> UpcastError:
    if gap.missing_from is None:
        return UpcastError(
            event,
            f"the version is newer than this code knows (current version {gap.current})",
            "deploy the code that wrote it, or add the upcasters it needs",
        )
    return UpcastError(
        event,
        f"no upcaster path to the current version {gap.current}: v{gap.missing_from}→v{gap.missing_from + 1} "
        "is missing",
        f"register @upcasters.upcaster({event.type!r}, from_version={gap.missing_from})",
    )


def combined_fingerprint(upcasters: Iterable[Upcasters | None]) -> str:
    return "".join(u.fingerprint for u in upcasters if u)
