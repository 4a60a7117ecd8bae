"""Release B of the domain's `accounts`: the same name, table and key as `slow_domain.accounts` (release A), with one
handler changed (a deposit counts twice), for the tests of workers of two releases on one task queue. Its fingerprint
differs from release A's, and so do its rows: a generation built by both would match neither oracle."""

from __future__ import annotations

from rehydrate import Event
from rehydrate.engine.projections import Projection, Row
from tests.helpers import domain, slow_domain


def moved_twice(row: Row | None, event: Event) -> Row | None:
    if row is None:
        return None
    sign = 2 if event.type == "Deposited" else -1
    row["balance"] += sign * event.data["amount"]
    row["changes"] += 1
    row["history"] = (row["history"] + event.type[0])[-40:]
    return row


accounts = Projection("accounts", version=1, table=domain.Account, key="stream")
for event_type, handler in domain.accounts.handlers.items():
    accounts.on(event_type)(slow_domain.slow(moved_twice if event_type in ("Deposited", "Withdrawn") else handler))
group_totals = slow_domain.group_totals
