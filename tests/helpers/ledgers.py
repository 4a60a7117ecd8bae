"""Projections for bad-input tests: a ledger whose handler misbehaves on request, a strict one, and one keyed by a
payload field; with a good history for them."""

from __future__ import annotations

from typing import Any

from sqlmodel import Field, SQLModel

from rehydrate import Event, NewEvent, Projection, Registry, Row
from tests.helpers import domain


class Ledger(SQLModel, table=True):
    __tablename__ = "bad_input_ledger"
    ledger_id: str = Field(primary_key=True)
    owner: str  # required: no default, not nullable
    total: int = 0


class StrictLedger(SQLModel, table=True):
    __tablename__ = "bad_input_strict_ledger"
    ledger_id: str = Field(primary_key=True)
    owner: str
    total: int = 0


class Bucket(SQLModel, table=True):
    __tablename__ = "bad_input_bucket"
    bucket: str = Field(primary_key=True)
    events: int = 0


ledger = Projection("ledger", version=1, table=Ledger)


strict_ledger = Projection("strict_ledger", version=1, table=StrictLedger, strict=True, ignore=["Noted"])


buckets = Projection("buckets", version=1, table=Bucket, key="bucket")


@ledger.on("Opened")
@strict_ledger.on("Opened")
def opened(row: Row | None, event: Event) -> Row:
    return {"owner": event.data["owner"], "total": 0}


@ledger.on("Added")
@strict_ledger.on("Added")
def added(row: Row | None, event: Event) -> Any:
    """Adds the amount, unless the event asks the handler to misbehave."""
    assert row is not None
    misbehave = event.data.get("misbehave")
    if misbehave == "raise":
        raise ValueError("amount must be positive")
    if misbehave == "list":
        return [row]
    if misbehave == "int":
        return 7
    if misbehave == "unknown_column":
        return {**row, "colour": "red"}
    if misbehave == "required_empty":
        return {**row, "owner": None}
    if misbehave == "column_type":
        return {**row, "total": "a lot"}
    if misbehave == "move_key":
        return {**row, "ledger_id": "elsewhere"}
    row["total"] += event.data["amount"]
    return row


@buckets.on("Added")
def counted(row: Row | None, event: Event) -> Row:
    return {"events": (row or {}).get("events", 0) + 1}


REGISTRY = Registry([ledger, strict_ledger, buckets, *domain.registry()])


def good_history() -> list[tuple[str, NewEvent]]:
    history = []
    for n in range(4):
        stream = f"ledger-{n}"
        history.append((stream, NewEvent("Opened", {"owner": f"o{n}", "bucket": f"b{n % 2}"})))
        history += [(stream, NewEvent("Added", {"amount": a, "bucket": f"b{n % 2}"})) for a in (1, 2, 3)]
        history.append((stream, NewEvent("Noted", {"note": "ignored on purpose", "bucket": f"b{n % 2}"})))
    return history
