"""Upcasters chain an old payload to its type's current version, or name what is missing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from rehydrate import Event
from rehydrate.core.errors import UserError
from rehydrate.engine.upcasting import UpcastError, Upcasters
from tests.helpers import versioned as vs


def event(type: str, version: int, data: dict[str, Any], position: int = 7) -> Event:
    return Event(position, "acct-1", 1, type, version, data, {}, datetime.now(UTC))


def test_upcasters_chain_to_the_highest_version_reached() -> None:
    assert vs.account_events.current_version("Deposited") == 3
    assert vs.account_events.current_version("Renamed") == 2
    assert vs.account_events.current_version("Opened") == 1  # not versioned
    up = vs.account_events.upcast(event("Deposited", 1, {"amount": 5, "group": "g1"}))
    assert (up.schema_version, up.data) == (3, {"money": {"cents": 5}, "group": "g1"})
    current = event("Deposited", 3, {"money": {"cents": 5}, "group": "g1"})
    assert vs.account_events.upcast(current) is current  # no copy on the hot path
    typed = vs.account_events.parse(up)
    assert isinstance(typed, vs.DepositedV3) and typed.money == {"cents": 5}
    with pytest.raises(UpcastError, match="does not fit DepositedV3"):
        vs.account_events.parse(event("Deposited", 3, {"money": "lots", "group": "g1"}))


def test_a_version_without_a_path_is_an_error_naming_type_version_and_position() -> None:
    gappy = Upcasters()
    gappy.upcaster("Shipped", from_version=1)(lambda data: data)
    gappy.upcaster("Shipped", from_version=3)(lambda data: data)
    assert gappy.current_version("Shipped") == 4
    with pytest.raises(UpcastError) as raised:
        gappy.upcast(event("Shipped", 2, {}, position=42))
    message = str(raised.value)
    assert "event 42" in message and "'Shipped'" in message and "schema version 2" in message
    assert "v2→v3 is missing" in message and "from_version=2" in message
    with pytest.raises(UpcastError, match="newer than this code knows"):
        gappy.upcast(event("Shipped", 9, {}))
    with pytest.raises(UserError, match="two upcasters"):
        gappy.upcaster("Shipped", from_version=1)(lambda data: data)
