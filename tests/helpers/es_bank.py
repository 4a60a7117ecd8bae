"""A py-eventsourcing application, written with the real library and its PostgreSQL recorder, and a rehydrate
projection that reads its events table (`bank_events`) through the `eventsourcing_table` preset."""

from __future__ import annotations

import random
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from sqlmodel import Field, SQLModel

from rehydrate import Event, Projection
from rehydrate.engine.aggregates import Aggregate as AggregateState
from rehydrate.engine.aggregates import applies
from rehydrate.engine.projections import Row
from rehydrate.sources.declaration import Source
from rehydrate.sources.presets import eventsourcing_table


class Account(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0
        self.changes = 0

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount
        self.changes += 1

    @event("Withdrawn")
    def withdraw(self, amount: int) -> None:
        self.balance -= amount
        self.changes += 1

    @event("Renamed")
    def rename(self, owner: str) -> None:
        self.owner = owner


class Bank(Application[UUID]):
    """Its events table is `bank_events` (py-eventsourcing names it after the application)."""


class BankAccount(SQLModel, table=True):
    __tablename__ = "bank_account"
    account_id: str = Field(primary_key=True)
    owner: str
    balance: int = 0
    changes: int = 0


def bank(database_url: str, *, compress: bool = False) -> Bank:
    """The application on the test's database (the library's own environment variables, as its users set them)."""
    parts = urlsplit(database_url)
    query = parse_qs(parts.query)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.path.lstrip("/"),
        "POSTGRES_HOST": query.get("host", [parts.hostname or "127.0.0.1"])[0],
        "POSTGRES_PORT": str(parts.port or query.get("port", ["5432"])[0]),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
    }
    if compress:
        env["COMPRESSOR_TOPIC"] = "eventsourcing.compressor:ZlibCompressor"
    return Bank(env=env)


def write_history(app: Bank, seed: int, accounts: int, events: int) -> list[UUID]:
    """Accounts opened, then money moved and owners renamed at random, saved one command at a time. The accounts
    stay in memory between commands, as saved: reading each one back from the store before every command wrote the
    same events, a few times slower."""
    rng = random.Random(seed)
    opened: list[Account] = []
    for _ in range(events):
        if len(opened) < accounts and (not opened or rng.random() < 0.2):
            account = Account(owner=f"o{rng.randrange(100)}")
            opened.append(account)
        else:
            account = rng.choice(opened)
            roll = rng.random()
            if roll < 0.45:
                account.deposit(rng.randrange(1, 500))
            elif roll < 0.85:
                account.withdraw(rng.randrange(1, 500))
            else:
                account.rename(f"o{rng.randrange(100)}")
        app.save(account)
    return [account.id for account in opened]


def expected(app: Bank, ids: list[UUID]) -> dict[str, dict[str, Any]]:
    """The rows the projection must hold: each account as the library itself folds it."""
    rows = {}
    for account_id in ids:
        account: Account = app.repository.get(account_id)
        rows[str(account_id)] = {
            "account_id": str(account_id),
            "owner": account.owner,
            "balance": account.balance,
            "changes": account.changes,
        }
    return rows


def source(app: Bank, url: str | None = None) -> Source:
    """The application's events table (in the database `url`, when not the read models')."""
    return Source("bank", eventsourcing_table(app.mapper, table="bank_events"), url)


def projection(app: Bank, url: str | None = None) -> Projection:
    accounts = Projection("bank_accounts", version=1, table=BankAccount, key="stream", source=source(app, url))

    @accounts.on("Account.Opened")
    def opened(row: Row | None, e: Event) -> Row:
        return {"owner": e.data["owner"], "balance": 0, "changes": 0}

    @accounts.on("Account.Deposited", "Account.Withdrawn")
    def moved(row: Row | None, e: Event) -> Row | None:
        if row is None:
            return None
        row["balance"] += e.data["amount"] if e.type == "Account.Deposited" else -e.data["amount"]
        row["changes"] += 1
        return row

    @accounts.on("Account.Renamed")
    def renamed(row: Row | None, e: Event) -> Row | None:
        if row is not None:
            row["owner"] = e.data["owner"]
        return row

    return accounts


def aggregate(app: Bank, url: str | None = None) -> type[AggregateState]:
    """The accounts as rehydrate aggregates over the application's table: loaded and snapshotted, never saved."""

    class BankAccountState(AggregateState):
        aggregate_type: ClassVar[str] = "bank_account"
        stream_prefix: ClassVar[str] = ""  # py-eventsourcing's streams are uuids: every stream of the table
        event_source: ClassVar[Source | None] = source(app, url)

        owner: str = ""
        balance: int = 0
        changes: int = 0

        @applies("Account.Opened")
        def opened(self, e: Event) -> None:
            self.owner = e.data["owner"]

        @applies("Account.Deposited", "Account.Withdrawn")
        def moved(self, e: Event) -> None:
            self.balance += e.data["amount"] if e.type == "Account.Deposited" else -e.data["amount"]
            self.changes += 1

        @applies("Account.Renamed")
        def renamed(self, e: Event) -> None:
            self.owner = e.data["owner"]

    return BankAccountState
