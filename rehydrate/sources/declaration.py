"""A named event source: an events table or view (see `mapping`) and the database that holds it; a Kafka topic and
the brokers that hold it; or a Kinesis data stream and the region (or endpoint) that holds it.

Declared in code, beside the projections that read it (`Projection(..., source=legacy)`), or in settings
(`[sources.legacy]` in rehydrate.toml, referred to by name). Workflow inputs never carry a source, only the projection's
name: every worker finds the source, and its connection, in its own code and settings.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from rehydrate.core.errors import UserError
from rehydrate.core.identifiers import check_identifier
from rehydrate.models.names import OWN_SOURCE
from rehydrate.sources.mapping import EventTable, KafkaTopic, KinesisStream


@dataclass(frozen=True)
class Source:
    """An events table or view to read projections from. `url`: the database that holds it, when not the read
    models' own; the variable REHYDRATE_SOURCE_<NAME>_URL overrides it (so a password need not be in code)."""

    name: str
    table: EventTable
    url: str | None = None

    def __post_init__(self) -> None:
        check_identifier(self.name, "source name")
        if self.name == OWN_SOURCE:
            raise UserError(f"source name {OWN_SOURCE!r} is rehydrate's own store", fix="name the source otherwise")

    @property
    def database_url(self) -> str | None:
        """Where the source's events are: REHYDRATE_SOURCE_<NAME>_URL, else `url` (None: the read models' database)."""
        return os.environ.get(f"REHYDRATE_SOURCE_{self.name.upper()}_URL") or self.url

    def identity(self) -> str:
        """What of the source decides the rows a projection builds from it (for the projection's fingerprint): the
        mapping, not where it is."""
        table = self.table
        return (
            f"{self.name}:{table.table}:{table.position}:{table.stream_id}:{table.stream_version}:{table.event_type}:"
            f"{table.schema_version}:{table.payload}:{table.payload_format}:{table.order}"
        )


@dataclass(frozen=True)
class KafkaSource:
    """A Kafka topic to read projections from. `bootstrap_servers`: "host:port[,host:port]"; the variable
    REHYDRATE_SOURCE_<NAME>_BOOTSTRAP_SERVERS overrides it."""

    name: str
    topic: KafkaTopic
    bootstrap_servers: str | None = None

    def __post_init__(self) -> None:
        check_identifier(self.name, "source name")
        if self.name == OWN_SOURCE:
            raise UserError(f"source name {OWN_SOURCE!r} is rehydrate's own store", fix="name the source otherwise")

    @property
    def servers(self) -> str:
        """The brokers to bootstrap from: REHYDRATE_SOURCE_<NAME>_BOOTSTRAP_SERVERS, else `bootstrap_servers`."""
        variable = f"REHYDRATE_SOURCE_{self.name.upper()}_BOOTSTRAP_SERVERS"
        servers = os.environ.get(variable) or self.bootstrap_servers
        if not servers:
            raise UserError(f"Kafka source {self.name!r} names no brokers", fix=f"set bootstrap_servers, or {variable}")
        return servers

    def identity(self) -> str:
        """What of the source decides the rows (for the projection's fingerprint): the topic and how it is read."""
        t = self.topic
        return f"{self.name}:kafka:{t.topic}:{t.type_header}:{t.type_field}:{t.version_header}"


@dataclass(frozen=True)
class KinesisSource:
    """A Kinesis data stream to read projections from. `region`: its AWS region; `endpoint_url`: another endpoint than
    the region's (a VPC endpoint, an emulator). The variables REHYDRATE_SOURCE_<NAME>_REGION and
    REHYDRATE_SOURCE_<NAME>_ENDPOINT_URL override them; credentials come from the AWS SDK's usual chain (environment,
    shared files, an instance or task role), never from rehydrate's settings."""

    name: str
    stream: KinesisStream
    region: str | None = None
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        check_identifier(self.name, "source name")
        if self.name == OWN_SOURCE:
            raise UserError(f"source name {OWN_SOURCE!r} is rehydrate's own store", fix="name the source otherwise")

    @property
    def region_name(self) -> str | None:
        """REHYDRATE_SOURCE_<NAME>_REGION, else `region` (None: the AWS SDK's own, e.g. AWS_DEFAULT_REGION)."""
        return os.environ.get(f"REHYDRATE_SOURCE_{self.name.upper()}_REGION") or self.region

    @property
    def endpoint(self) -> str | None:
        """REHYDRATE_SOURCE_<NAME>_ENDPOINT_URL, else `endpoint_url` (None: the region's endpoint)."""
        return os.environ.get(f"REHYDRATE_SOURCE_{self.name.upper()}_ENDPOINT_URL") or self.endpoint_url

    def identity(self) -> str:
        """What of the source decides the rows (for the projection's fingerprint): the stream and how it is read."""
        s = self.stream
        return f"{self.name}:kinesis:{s.stream}:{s.type_field}:{s.version_field}"


LogSourceDeclaration = KafkaSource | KinesisSource
AnySource = Source | KafkaSource | KinesisSource

_TABLE_FIELDS = {f.name for f in fields(EventTable)} - {"decode"}
_KAFKA_FIELDS = {f.name for f in fields(KafkaTopic)} - {"decode"}
_KINESIS_FIELDS = {f.name for f in fields(KinesisStream)} - {"decode"}
_OPTIONAL_COLUMNS = ("stream_version", "schema_version", "metadata", "recorded_at", "transaction", "notify_channel")


def sources_from_settings(declared: dict[str, dict[str, Any]]) -> dict[str, AnySource]:
    """The sources of `[sources.NAME]` tables in settings (`kind = "kafka"` for a topic, `kind = "kinesis"` for a
    stream); a misspelt key is refused, naming it."""
    found: dict[str, AnySource] = {}
    for name, table in declared.items():
        if not isinstance(table, dict):
            raise UserError(f"source {name!r} in settings is not a table", fix=f"write it as [sources.{name}]")
        values = dict(table)
        kind = values.pop("kind", "table")
        _check_text(name, {"kind": kind})
        if kind == "kafka":
            found[name] = _kafka_from_settings(name, values)
            continue
        if kind == "kinesis":
            found[name] = _kinesis_from_settings(name, values)
            continue
        if kind != "table":
            raise UserError(
                f"source {name!r} in settings: kind {kind!r} is not table, kafka or kinesis", fix="use one of them"
            )
        url = values.pop("url", None)
        unknown = sorted(set(values) - _TABLE_FIELDS)
        if unknown:
            raise UserError(
                f"source {name!r} in settings has unknown key(s) {', '.join(map(repr, unknown))}",
                fix=f"use {', '.join(sorted(_TABLE_FIELDS | {'url'}))}",
            )
        for optional in _OPTIONAL_COLUMNS:  # TOML has no null: "" (or false) maps no column
            if values.get(optional) in ("", False):
                values[optional] = None
        if "table" not in values:
            raise UserError(f"source {name!r} in settings names no table", fix='add table = "schema.table"')
        _check_text(name, {"url": url, **values})
        with _named(name):
            found[name] = Source(name, EventTable(**values), url)
    return found


def _check_text(name: str, values: dict[str, Any]) -> None:
    """Every value a source's settings hold is text (or None: a column not mapped)."""
    for key, value in values.items():
        if value is not None and not isinstance(value, str):
            raise UserError(
                f"source {name!r} in settings: {key!r} = {value!r} is not text"[:300],
                fix=f'write it as a string, e.g. {key} = "..."',
            )


@contextlib.contextmanager
def _named(name: str) -> Iterator[None]:
    """A mapping's refusal, or a wrong key, prefixed with the source it is about."""
    try:
        yield
    except UserError as error:
        raise UserError(f"source {name!r} in settings: {error.message}", fix=error.fix) from None
    except TypeError as error:
        raise UserError(f"source {name!r} in settings is invalid: {error}", fix="check its keys") from None


def _kafka_from_settings(name: str, values: dict[str, Any]) -> KafkaSource:
    servers = values.pop("bootstrap_servers", None)
    unknown = sorted(set(values) - _KAFKA_FIELDS)
    if unknown:
        raise UserError(
            f"Kafka source {name!r} in settings has unknown key(s) {', '.join(map(repr, unknown))}",
            fix=f"use kind, bootstrap_servers, {', '.join(sorted(_KAFKA_FIELDS))}",
        )
    for optional in ("type_header", "type_field", "version_header"):  # TOML has no null: "" reads nothing
        if values.get(optional) in ("", False):
            values[optional] = None
    if "topic" not in values:
        raise UserError(f"Kafka source {name!r} in settings names no topic", fix='add topic = "orders"')
    _check_text(name, {"bootstrap_servers": servers, **values})
    with _named(name):
        source = KafkaSource(name, KafkaTopic(**values), servers)
    return source


def _kinesis_from_settings(name: str, values: dict[str, Any]) -> KinesisSource:
    region = values.pop("region", None)
    endpoint = values.pop("endpoint_url", None)
    unknown = sorted(set(values) - _KINESIS_FIELDS)
    if unknown:
        raise UserError(
            f"Kinesis source {name!r} in settings has unknown key(s) {', '.join(map(repr, unknown))}",
            fix=f"use kind, region, endpoint_url, {', '.join(sorted(_KINESIS_FIELDS))}",
        )
    if values.get("version_field") in ("", False):  # TOML has no null: "" reads nothing
        values["version_field"] = None
    if "stream" not in values:
        raise UserError(f"Kinesis source {name!r} in settings names no stream", fix='add stream = "orders"')
    _check_text(name, {"region": region, "endpoint_url": endpoint, **values})
    with _named(name):
        source = KinesisSource(name, KinesisStream(**values), region, endpoint)
    return source
