"""The account domain with event versions: upcasters (Deposited/Withdrawn v1→v2→v3, Renamed v1→v2),
projections whose handlers read only the current shapes, an Account aggregate, and histories that mix versions.

A stored v1 Deposited is `{"amount": n}`, v2 `{"cents": n}`, v3 `{"money": {"cents": n}}`; a v1 Renamed is
`{"owner": o}`, v2 `{"name": o}`. Handlers read v3 and v2 only, so an event that skipped its upcasters fails.
"""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any, ClassVar

from pydantic import BaseModel
from sqlmodel import Field, SQLModel

from rehydrate import Aggregate, Event, EventStore, NewEvent, Projection, Repository, Row, Upcasters, applies
from rehydrate.engine.importer import import_events
from rehydrate.engine.snapshots import Snapshot
from tests.helpers import domain

account_events = Upcasters()


@account_events.upcaster("Deposited", from_version=1)
@account_events.upcaster("Withdrawn", from_version=1)
def amount_to_cents(data: dict[str, Any]) -> dict[str, Any]:
    data["cents"] = data.pop("amount")
    return data


@account_events.upcaster("Deposited", from_version=2)
@account_events.upcaster("Withdrawn", from_version=2)
def cents_to_money(data: dict[str, Any]) -> dict[str, Any]:
    data["money"] = {"cents": data.pop("cents")}
    return data


@account_events.upcaster("Renamed", from_version=1)
def owner_to_name(data: dict[str, Any]) -> dict[str, Any]:
    data["name"] = data.pop("owner")
    return data


@account_events.model("Deposited", version=3)
class DepositedV3(BaseModel):
    money: dict[str, int]
    group: str


class VersionedAccount(SQLModel, table=True):
    __tablename__ = "versioned_account"
    account_id: str = Field(primary_key=True)
    owner: str
    balance: int = 0
    history: str = ""


class VersionedGroup(SQLModel, table=True):
    __tablename__ = "versioned_group"
    group_id: str = Field(primary_key=True)
    amount: int = 0


versioned_accounts = Projection(
    "versioned_accounts", version=1, table=VersionedAccount, key="stream", upcasters=account_events
)
versioned_groups = Projection(
    "versioned_groups", version=1, table=VersionedGroup, key="group", upcasters=account_events
)


def signed(event: Event) -> int:
    cents = int(event.data["money"]["cents"])  # v3 only
    return cents if event.type == "Deposited" else -cents


@versioned_accounts.on("Opened")
def opened(row: Row | None, event: Event) -> Row:
    return {"owner": event.data["owner"], "balance": 0, "history": "o"}


@versioned_accounts.on("Deposited", "Withdrawn")
def moved(row: Row | None, event: Event) -> Row | None:
    if row is None:
        return None
    row["balance"] += signed(event)
    row["history"] = (row["history"] + event.type[0])[-40:]
    return row


@versioned_accounts.on("Renamed")
def renamed(row: Row | None, event: Event) -> Row | None:
    if row is None:
        return None
    row["owner"] = event.data["name"]  # v2 only
    return row


@versioned_accounts.on("Closed")
def closed(row: Row | None, event: Event) -> None:
    return None


@versioned_groups.on("Deposited", "Withdrawn")
def group_moved(row: Row | None, event: Event) -> Row:
    row = row or {"amount": 0}
    row["amount"] = row["amount"] * 3 % 1_000_003 + signed(event)  # order-sensitive
    return row


class Account(Aggregate):
    """The account aggregate over the same streams (acct-N)."""

    aggregate_type: ClassVar[str] = "account"
    stream_prefix: ClassVar[str] = "acct-"
    upcasters: ClassVar[Upcasters | None] = account_events

    owner: str | None = None
    open: bool = False
    balance: int = 0
    opened_times: int = 0
    history: str = ""
    last_change: datetime | None = None

    @applies("Opened")
    def _opened(self, event: Event) -> None:
        self.owner = event.data["owner"]
        self.open = True
        self.opened_times += 1
        self.last_change = event.recorded_at

    @applies("Deposited", "Withdrawn")
    def _moved(self, event: Event) -> None:
        self.balance += signed(event)
        self.history = (self.history + event.type[0])[-60:]
        self.last_change = event.recorded_at

    @applies("Renamed")
    def _renamed(self, event: Event) -> None:
        self.owner = event.data["name"]

    @applies("Closed")
    def _closed(self, event: Event) -> None:
        self.open = False

    def deposit(self, cents: int) -> None:
        if not self.open:
            raise ValueError("account is closed")
        self.record("Deposited", {"money": {"cents": cents}, "group": "g0"})


def downgrade(event: NewEvent, version: int) -> NewEvent:
    """The event as an older version of the code would have stored it."""
    data = dict(event.data)
    if event.type in ("Deposited", "Withdrawn"):
        amount = data.pop("amount")
        if version == 1:
            data["amount"] = amount
        elif version == 2:
            data["cents"] = amount
        else:
            data["money"] = {"cents": amount}
        return NewEvent(event.type, data, schema_version=version)
    if event.type == "Renamed":
        owner = data.pop("owner")
        version = min(version, 2)
        data["owner" if version == 1 else "name"] = owner
        return NewEvent(event.type, data, schema_version=version)
    return event


def mixed_history(seed: int, streams: int = 30, events: int = 500) -> list[tuple[str, NewEvent]]:
    """The domain's random history with each versioned event stored at a random version."""
    rng = random.Random(seed)
    return [
        (stream, downgrade(event, rng.choice([1, 2, 3])))
        for stream, event in domain.random_history(seed, streams, events)
    ]


async def load_history(store: EventStore, seed: int, streams: int, events: int) -> None:
    """A mixed-version account history through the importer, and one stream of another aggregate type."""
    history = mixed_history(seed, streams=streams, events=events)
    lines = ({"stream_id": s, "type": e.type, "data": e.data, "schema_version": e.schema_version} for s, e in history)
    await import_events(store, enumerate(lines, start=1), source="snapshot test history")
    # A stream of another aggregate type, which a rebuild of accounts must leave alone.
    await store.pool.execute(
        """INSERT INTO rehydrate.events (stream_id, stream_version, event_type, payload)
           VALUES ('order-1', 1, 'OrderPlaced', '{}')"""
    )


async def expected_snapshots(store: EventStore, aggregate: type[Account]) -> list[Snapshot]:
    """Each stream loaded from its events alone, as a snapshot."""
    cold = Repository(store, aggregate, use_snapshots=False)
    ids = [r[0] for r in await store.pool.fetch("SELECT DISTINCT stream_id FROM rehydrate.events ORDER BY 1")]
    return [(await cold.load(i)).to_snapshot() for i in ids if i.startswith(aggregate.stream_prefix)]
