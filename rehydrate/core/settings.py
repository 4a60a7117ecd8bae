"""Settings for every rehydrate process, the same in each: from `REHYDRATE_*` variables (and Temporal's `TEMPORAL_*`),
`.env`, `rehydrate.toml`, and `[tool.rehydrate]` in `pyproject.toml`, the first that sets a value winning."""

from __future__ import annotations

import os
import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    PyprojectTomlConfigSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from rehydrate.core.errors import UserError
from rehydrate.core.identifiers import check_identifier
from rehydrate.core.limits import MAX_LANES, MAX_PARALLEL

PROJECT_FILE = "rehydrate.toml"
PYPROJECT_TABLE = ("tool", "rehydrate")
# What a process loads when nothing names projections or aggregates: the demo's order domain.
EXAMPLE_PROJECTIONS = ("rehydrate.examples.orders",)
EXAMPLE_AGGREGATES = ("rehydrate.examples.order_aggregate",)


class Settings(BaseSettings):
    """Where rehydrate finds Postgres, Temporal and the user's projections.

    Leaving `database_url` unset means the embedded Postgres in `data_dir`; the Temporal address defaults
    to the dev server that `rehydrate dev` runs on localhost.
    """

    model_config = SettingsConfigDict(
        env_prefix="REHYDRATE_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
        toml_file=PROJECT_FILE,
        pyproject_toml_table_header=PYPROJECT_TABLE,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, `.env`, `rehydrate.toml`, `[tool.rehydrate]` in `pyproject.toml` (both in
        the current directory): a project's files give every process of it (`dev`, workers, each command in any
        shell) the same projections and database, and a variable still overrides them."""
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            TomlConfigSettingsSource(settings_cls),
            PyprojectTomlConfigSettingsSource(settings_cls),
            file_secret_settings,
        )

    database_url: str | None = Field(
        default=None,
        description="Postgres URL (libpq options such as sslmode in the query). Unset: the embedded Postgres in "
        "data_dir, which rehydrate dev, demo and worker start",
        repr=False,
    )
    schema_name: str = Field(
        default="rehydrate",
        validation_alias=AliasChoices("REHYDRATE_SCHEMA", "REHYDRATE_SCHEMA_NAME"),
        description="The schema of rehydrate's own tables: the events and the control tables",
    )
    read_model_schema: str = Field(
        default="public", description="The schema of the read models: the views readers query and their tables"
    )
    data_dir: Path = Field(
        default=Path(".rehydrate"),
        description="Where the embedded Postgres (pgdata) and the dev server's history (temporal.db) live",
    )

    temporal_address: str = Field(
        default="localhost:7233",
        validation_alias=AliasChoices("REHYDRATE_TEMPORAL_ADDRESS", "TEMPORAL_ADDRESS"),
        description="host:port of Temporal's frontend (by default the dev server that rehydrate dev runs)",
    )
    temporal_namespace: str = Field(
        default="default",
        validation_alias=AliasChoices("REHYDRATE_TEMPORAL_NAMESPACE", "TEMPORAL_NAMESPACE"),
        description="The Temporal namespace of every workflow and schedule",
    )
    temporal_task_queue: str = Field(
        default="rehydrate",
        validation_alias=AliasChoices("REHYDRATE_TEMPORAL_TASK_QUEUE", "TEMPORAL_TASK_QUEUE"),
        description="The task queue workers poll and runs are started on (tails' activities use <queue>.tails)",
    )
    temporal_ui_url: str | None = Field(default=None, description="Base URL of the Temporal Web UI for links")
    # Real clusters. Temporal's own environment configuration (TEMPORAL_PROFILE, TEMPORAL_CONFIG_FILE and the
    # TOML profile file) is read too; these settings, when set, win over it.
    temporal_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("REHYDRATE_TEMPORAL_API_KEY", "TEMPORAL_API_KEY"),
        description="An API key (Temporal Cloud); turns TLS on. Never printed",
    )
    temporal_tls: bool | None = Field(
        default=None,
        validation_alias=AliasChoices("REHYDRATE_TEMPORAL_TLS", "TEMPORAL_TLS"),
        description="true: TLS with the system's CAs; false: no TLS even with certificates set; unset: TLS when "
        "certificates, a server name or an API key are set",
    )
    temporal_tls_client_cert_path: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("REHYDRATE_TEMPORAL_TLS_CLIENT_CERT_PATH", "TEMPORAL_TLS_CLIENT_CERT_PATH"),
        description="mTLS: the client certificate (PEM file), with its key",
    )
    temporal_tls_client_key_path: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("REHYDRATE_TEMPORAL_TLS_CLIENT_KEY_PATH", "TEMPORAL_TLS_CLIENT_KEY_PATH"),
        description="mTLS: the client certificate's private key (PEM file)",
    )
    temporal_tls_server_ca_cert_path: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("REHYDRATE_TEMPORAL_TLS_SERVER_CA_CERT_PATH", "TEMPORAL_TLS_SERVER_CA_CERT_PATH"),
        description="A private CA to verify the server with (PEM file)",
    )
    temporal_tls_server_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REHYDRATE_TEMPORAL_TLS_SERVER_NAME", "TEMPORAL_TLS_SERVER_NAME"),
        description="The server name to verify (SNI), when it differs from the address's host",
    )
    temporal_profile: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REHYDRATE_TEMPORAL_PROFILE", "TEMPORAL_PROFILE"),
        description="The profile to use from Temporal's TOML client configuration (TEMPORAL_CONFIG_FILE)",
    )

    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="Serve Prometheus /metrics here")
    log_format: Literal["text", "json"] = Field(
        default="text", description="text, or json: one JSON object a line with the activity's projection, lane, chunk"
    )
    tracing: Literal["off", "otlp", "console"] = Field(
        default="off",
        description="OpenTelemetry tracing (needs rehydrate[otel]): otlp exports where the OTEL_* variables say",
    )

    # NoDecode: the variable is a comma-separated list, not JSON (the validator below splits it).
    projections: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Modules that define projections"
    )
    aggregates: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Modules that define aggregates (for bulk snapshot rebuilds)"
    )
    lanes: int | None = Field(
        default=None,
        ge=1,
        le=MAX_LANES,
        description="Lanes per replay. Unset: 8 when the lanes split by stream range (fewer on a small store: halved "
        "until each holds 25,000 events or more, 1 under 50,000), 4 by hash. Range lanes each "
        "read only their own streams, so more lanes than chunk slots cost nothing, and a slot that a finished lane "
        "frees takes another lane's next chunk instead of idling; hash lanes each scan every event.",
    )
    lane_split: Literal["auto", "range", "hash"] = Field(
        default="auto",
        description="How a stream-keyed projection's lanes split the streams: by ranges of stream id, each lane "
        "reading only its own events through the (stream_id, stream_version) index (in random heap order), or by "
        "hash, each lane scanning every event in position order (sequential reads) and keeping its own. auto: "
        "range while the events table fits in Postgres' effective_cache_size, hash beyond. Payload-keyed "
        "projections always split by hash.",
    )
    chunk_size: int = Field(
        default=100_000,
        ge=1,
        description="Events per chunk: one activity, one transaction. Memory holds its touched rows and one fetch "
        "(50,000 rows, folded 5,000 at a time), not the chunk's events; each chunk costs a few Temporal tasks and a "
        "commit.",
    )
    max_parallel: int = Field(
        default=8, ge=1, le=MAX_PARALLEL, description="Chunks of one replay running at once, over all its lanes"
    )
    retain_generations: int = Field(default=1, ge=0, description="Retired generations kept for rollback")
    max_concurrent_activities: int = Field(
        default=2,
        ge=1,
        description="Replay chunks (and other short activities) one worker process runs at once. A chunk keeps a "
        "core busy: run one worker process per core, each with 2 (one folding while the other waits on Postgres). "
        "Tails have slots of their own.",
    )
    tails: bool = Field(default=True, description="Workers start the tails of active projections by themselves")
    db_idle_in_transaction_timeout: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a worker's transaction may sit idle (between two statements) before Postgres ends the "
        "session (idle_in_transaction_session_timeout): a worker that froze or lost the network in the middle of a "
        "chunk then stops holding its lane's lock, and the chunk's retry goes on. Well above the longest healthy "
        "pause inside a transaction: folding one fetch of events in Python, or reading a batch from another "
        "database or a Kafka topic. 0: never",
    )
    db_peer_timeout: float = Field(
        default=60.0,
        ge=0,
        description="Seconds after which a worker's peer that does not answer counts as gone: Postgres drops a "
        "worker's session when TCP keepalives go unanswered or sent data stays unacknowledged that long "
        "(tcp_keepalives_*, tcp_user_timeout), and a worker gives up opening a connection after it. A live peer's "
        "network stack answers however busy its process is, so a slow worker is never cut. 0: the system's defaults "
        "(keepalives after 2 hours) and asyncpg's 60 s connect timeout",
    )
    sources: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Event sources projections may read besides rehydrate's own store, by name: for each, the "
        'table and its columns, kind = "kafka" with its brokers and topic, or kind = "kinesis" with its stream and '
        "region (a [sources.NAME] table in rehydrate.toml; see the event sources, Kafka and Kinesis guides). A "
        "source's database URL may come from REHYDRATE_SOURCE_NAME_URL, a topic's brokers from "
        "REHYDRATE_SOURCE_NAME_BOOTSTRAP_SERVERS, a stream's region and endpoint from REHYDRATE_SOURCE_NAME_REGION "
        "and REHYDRATE_SOURCE_NAME_ENDPOINT_URL",
    )
    worker_deployment: str = Field(
        default="",
        description="The Temporal worker deployment workers join (Worker Versioning): a worker's build id is derived "
        "from its projections' and aggregates' code, and each replay, verify and snapshot rebuild runs to its end on "
        "the build it started on, while tails move to the current one. Empty: unversioned workers",
    )
    worker_promote: bool = Field(
        default=True,
        description="With a worker deployment: a worker makes its build the deployment's current version when it "
        "starts, unless a newer build is current (an old worker restarting never takes new work back). False: the "
        "deploy tool sets it (temporal worker deployment set-current-version)",
    )

    @field_validator("projections", "aggregates", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                try:
                    return orjson.loads(value)
                except orjson.JSONDecodeError:
                    pass
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("schema_name", "read_model_schema")
    @classmethod
    def _plain_identifier(cls, value: str) -> str:
        return check_identifier(value, "schema name")

    @cached_property
    def ui_url(self) -> str:
        """The Temporal Web UI's base URL: set, or the dev server's (its gRPC port + 1000)."""
        if self.temporal_ui_url:
            return self.temporal_ui_url.rstrip("/")
        host, _, port = self.temporal_address.rpartition(":")
        try:
            return f"http://{host or 'localhost'}:{int(port) + 1000}"
        except ValueError:
            return f"http://{self.temporal_address}"

    @property
    def uses_examples(self) -> bool:
        """Nothing names projections or aggregates: every process loads the examples (the demo's order domain)."""
        return not self.projections and not self.aggregates

    @property
    def projection_modules(self) -> list[str]:
        """The modules whose projections every process of this project loads."""
        return list(EXAMPLE_PROJECTIONS) if self.uses_examples else list(self.projections)

    @property
    def aggregate_modules(self) -> list[str]:
        """The modules whose aggregate types every process of this project loads."""
        return list(EXAMPLE_AGGREGATES) if self.uses_examples else list(self.aggregates)

    def workflow_url(self, workflow_id: str, run_id: str | None = None) -> str:
        """A link to one run in the Temporal Web UI."""
        tail = f"/{run_id}" if run_id else ""
        return f"{self.ui_url}/namespaces/{self.temporal_namespace}/workflows/{workflow_id}{tail}"


def project_settings_files() -> list[tuple[str, dict[str, object]]]:
    """The project's settings tables that exist in the current directory: (where, table)."""
    found: list[tuple[str, dict[str, object]]] = []
    for path, header, where in (
        (Path(PROJECT_FILE), (), PROJECT_FILE),
        (Path("pyproject.toml"), PYPROJECT_TABLE, "[tool.rehydrate] in pyproject.toml"),
    ):
        if not path.is_file():
            continue
        try:
            table: object = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise UserError(f"{path} cannot be read: {error}", fix=f"fix {path}'s TOML") from None
        for key in header:
            table = table.get(key, {}) if isinstance(table, dict) else {}
        if isinstance(table, dict) and table:
            found.append((where, table))
    return found


def _check_project_keys() -> None:
    """A misspelt key in a project's settings file would be ignored without a word: refuse it, naming it."""
    known = set(Settings.model_fields)
    for where, table in project_settings_files():
        unknown = sorted(set(table) - known)
        if unknown:
            raise UserError(
                f"{where} has unknown setting(s) {', '.join(unknown)}",
                fix=f"use the setting names of the settings reference, e.g. {', '.join(sorted(known)[:4])}, …",
            )


def projections_origin(settings: Settings) -> str:
    """Where the projections this process loads are named, in words for people."""
    if settings.uses_examples:
        return (
            "the examples (nothing names projections: set REHYDRATE_PROJECTIONS, or `projections` in "
            f"{PROJECT_FILE} or [tool.rehydrate] in pyproject.toml)"
        )
    if os.environ.get("REHYDRATE_PROJECTIONS"):
        return "REHYDRATE_PROJECTIONS"
    for where, table in project_settings_files():
        if "projections" in table:
            return where
    return "settings"


def load_settings(**overrides: object) -> Settings:
    """Read settings, turning a validation failure into one line naming the variable and the fix."""
    _check_project_keys()
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except Exception as error:  # pydantic.ValidationError, but keep the message short
        if isinstance(error, SettingsError):
            raise UserError(f"settings are invalid: {error}", fix="check the REHYDRATE_* variables and .env") from None
        if isinstance(error, ValidationError):
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "settings"
            raise UserError(
                f"setting {field!r} is invalid: {first['msg']}",
                fix=f"check REHYDRATE_{field.upper()} in the environment or .env",
            ) from None
        raise


_USER_INFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/]*):(?P<password>.*)@")


def redact_url(url: str) -> str:
    """A database URL with its password replaced, fit for logs and errors.

    Read without a URL parser, so that a malformed URL (an unescaped `/`, `?`, `#` or `[` in the password) is
    redacted too: everything between the user name's `:` and the last `@` is the password.
    """
    match = _USER_INFO.match(url)
    if match is None or not match["password"]:
        return url
    return f"{match['scheme']}{match['user']}:***@{url[match.end() :]}"


def url_password(url: str) -> str | None:
    """The password of a database URL as written (percent-encoded or not), read as `redact_url` reads it."""
    match = _USER_INFO.match(url)
    return match["password"] if match and match["password"] else None


def is_ci() -> bool:
    return bool(os.environ.get("CI"))


RANGE_LANES = 8  # 2 workers x 2 chunk slots, twice over (bench/replay_speed.py: 8 lanes beat 4 by 10% on average)
HASH_LANES = 4


# A chunk costs about 15 ms whatever its size (an activity, a workflow task, a transaction; 2 cores), so a lane
# must hold enough events to repay it. Replays of the demo's orders with 2 workers, `replay start` to the end,
# median of 3, explicit lanes: 1,000 events in 1 lane 0.26 s, in 8 0.34 s; 50,000 in 2 lanes 0.95 s, in 8 1.19 s;
# from 200,000 on, 4 and 8 lanes alike.
EVENTS_PER_LANE = 25_000


def lanes_for(settings: Settings, split: str) -> int:
    """The lanes of a replay that asked for none, by how they split the events ("range" or "hash")."""
    if settings.lanes is not None:
        return settings.lanes
    return RANGE_LANES if split == "range" else HASH_LANES


def sized_lanes(settings: Settings, boundaries: list[str], lanes: int, events: int) -> tuple[list[str], int]:
    """The stream-range boundaries and lanes of a replay that asked for no lane count, from the `boundaries` that
    `stream_boundaries` found for `lanes_for`'s `lanes` and the `events` below the mark: fewer lanes on a small
    store, halving until each holds about EVENTS_PER_LANE events or more (one under twice that). Lanes set in the
    settings are kept."""
    if settings.lanes is not None:
        return boundaries, lanes
    if events < 2 * EVENTS_PER_LANE:
        return [], 1
    if len(boundaries) != lanes - 1:  # too few streams to cut `lanes` ranges: the caller splits by hash
        return boundaries, lanes
    wanted = lanes
    while wanted % 2 == 0 and events < wanted * EVENTS_PER_LANE:
        wanted //= 2
    # The boundaries cut the events into `lanes` equal parts: every (lanes / wanted)-th cuts them into `wanted`.
    step = lanes // wanted
    return boundaries[step - 1 :: step][: wanted - 1], wanted
