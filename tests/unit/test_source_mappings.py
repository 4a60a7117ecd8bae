"""Event-source mappings as code and settings declare them: what each order reads, and bad input refused by name."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rehydrate.core.errors import UserError
from rehydrate.sources.declaration import sources_from_settings
from rehydrate.sources.events import KeySpec
from rehydrate.sources.mapping import EventTable
from rehydrate.sources.presets import json_bytes, outbox_table
from rehydrate.sources.reading import EventSource

TABLE = EventTable(table="public.events", position="id", recorded_at="created", order="gap_free")


def test_a_transaction_column_is_read_only_when_the_order_is_by_transaction() -> None:
    assert "tx_id" not in TABLE.columns() and TABLE.roles()["transaction"] is None
    assert "tx_id" not in replace(TABLE, order="settle").columns()
    assert "tx_id" in replace(TABLE, order="transaction").columns()


def test_settings_map_no_column_with_an_empty_string() -> None:
    declared = {"table": "public.outbox", "position": "id", "stream_version": "", "recorded_at": "at"}
    declared["transaction"] = ""
    found = sources_from_settings({"outbox": {**declared, "order": "settle"}})["outbox"].table
    assert (found.stream_version, found.transaction, found.order) == (None, None, "settle")
    with pytest.raises(UserError, match="order='transaction' needs a transaction column"):
        sources_from_settings({"outbox": declared})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"payload_format": "xml"}, "payload_format 'xml' is not one of jsonb, json, text, bytea"),
        ({"metadata": "meta", "metadata_format": "yaml"}, "metadata_format 'yaml' is not one of"),
        ({"metadata": "meta", "metadata_format": "bytea"}, "metadata in bytea cannot be read"),
        ({"notify_channel": "Events; DROP"}, "notify_channel 'Events; DROP' is not a plain identifier"),
        ({"order": "settle", "recorded_at": None}, "order='settle' needs a recorded_at column"),
    ],
)
def test_a_mapping_that_cannot_be_read_is_refused_naming_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        replace(TABLE, **change)


def test_an_outbox_without_a_recorded_at_column_is_told_how_to_be_exact() -> None:
    with pytest.raises(UserError, match="needs a recorded_at column") as raised:
        outbox_table("public.outbox", position="seq")
    assert "rehydrate sources prepare" in raised.value.fix
    assert outbox_table("public.outbox", position="seq", order="transaction").transaction == "rehydrate_tx"


def test_the_notify_channel_prepare_makes_is_the_one_tails_listen_on() -> None:
    assert TABLE.channel == "public_events"
    assert replace(TABLE, notify_channel="team_events").channel == "team_events"


@pytest.mark.parametrize(
    "change", [{"payload_format": "text"}, {"payload_format": "bytea", "decode": json_bytes}, {"decode": json_bytes}]
)
def test_a_projection_keyed_by_a_payload_field_needs_a_json_payload_read_as_is(change: dict[str, object]) -> None:
    """Lanes are cut in SQL by the key: only a JSON column without a decoder holds the field handlers will see."""
    source = EventSource(None, replace(TABLE, **change), "team")  # type: ignore[arg-type]  # never connects
    with pytest.raises(UserError, match="cannot be keyed by the payload field 'account'"):
        source._key_sql(KeySpec(field="account"), 4)
    jsonb = EventSource(None, TABLE, "team")  # type: ignore[arg-type]
    assert "->>" in jsonb._key_sql(KeySpec(field="account"), 4)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"table": "public.events", "pos\nition": "id"}, "source 'legacy' in settings has unknown key(s) 'pos\\n"),
        ({"table": 5}, "source 'legacy' in settings: 'table' = 5 is not text"),
        ({"kind": "kafka", "topic": ["a"]}, "source 'legacy' in settings: 'topic' = ['a'] is not text"),
        ({"table": ""}, "source 'legacy' in settings: events table '' is not a plain identifier"),
    ],
    ids=["key-with-a-newline", "table-not-text", "topic-not-text", "table-empty"],
)
def test_settings_that_cannot_be_a_source_are_one_line_naming_it(declared: dict[str, object], message: str) -> None:
    with pytest.raises(UserError) as refused:
        sources_from_settings({"legacy": declared})
    assert refused.value.message.startswith(message), refused.value.message
    assert "\n" not in str(refused.value)
