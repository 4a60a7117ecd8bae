"""Connecting to real clusters: TLS and API key from settings, Temporal's own profile configuration, and no
credential in a replay's workflow history."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from temporalio.client import Client
from temporalio.service import TLSConfig

from rehydrate.errors import UserError
from rehydrate.models import ReplayInput
from rehydrate.settings import Settings
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.store import EventStore
from rehydrate.temporal import connect_client, connect_options, tls_config
from rehydrate.worker import running_worker
from tests import support

PEM = b"-----BEGIN CERTIFICATE-----\nnot a real one\n-----END CERTIFICATE-----\n"


def test_mtls_settings_build_the_tls_config_from_the_files(tmp_path: Path) -> None:
    for name in ("client.pem", "client.key", "ca.pem"):
        (tmp_path / name).write_bytes(PEM + name.encode())
    settings = Settings(
        temporal_tls_client_cert_path=tmp_path / "client.pem",
        temporal_tls_client_key_path=tmp_path / "client.key",
        temporal_tls_server_ca_cert_path=tmp_path / "ca.pem",
        temporal_tls_server_name="temporal.internal",
    )
    tls = tls_config(settings)
    assert tls == TLSConfig(
        server_root_ca_cert=PEM + b"ca.pem",
        client_cert=PEM + b"client.pem",
        client_private_key=PEM + b"client.key",
        domain="temporal.internal",
    )
    assert connect_options(settings)["tls"] == tls


def test_a_missing_certificate_or_key_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(UserError, match=f"cannot read TEMPORAL_TLS_CLIENT_CERT_PATH '{missing}'"):
        tls_config(Settings(temporal_tls_client_cert_path=missing, temporal_tls_client_key_path=missing))
    (tmp_path / "c.pem").write_bytes(PEM)
    with pytest.raises(UserError, match="needs both a client certificate and its key"):
        tls_config(Settings(temporal_tls_client_cert_path=tmp_path / "c.pem"))


def test_an_api_key_turns_tls_on_and_is_never_printed() -> None:
    settings = Settings(temporal_address="acme.a1b2c.tmprl.cloud:7233", temporal_api_key="key-123-secret")
    options = connect_options(settings)
    assert (options["api_key"], options["tls"], options["target_host"]) == (
        "key-123-secret",
        True,
        "acme.a1b2c.tmprl.cloud:7233",
    )
    assert "key-123-secret" not in repr(settings) + str(settings.model_dump())


async def test_temporal_profile_file_and_variables_are_honoured(
    temporal_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in (
        "REHYDRATE_TEMPORAL_ADDRESS",
        "TEMPORAL_ADDRESS",
        "TEMPORAL_NAMESPACE",
        "REHYDRATE_TEMPORAL_NAMESPACE",
    ):
        monkeypatch.delenv(variable, raising=False)
    config = tmp_path / "temporal.toml"
    config.write_text(f'[profile.staging]\naddress = "{temporal_address}"\nnamespace = "default"\n')
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(config))
    monkeypatch.setenv("TEMPORAL_PROFILE", "staging")
    monkeypatch.chdir(tmp_path)  # no stray .env
    client = await connect_client(Settings())
    assert client.service_client.config.target_host == temporal_address
    monkeypatch.setenv("TEMPORAL_PROFILE", "missing")
    with pytest.raises(UserError, match="client configuration is invalid"):
        connect_options(Settings())


async def test_no_credential_reaches_a_replays_workflow_history(
    client: Client, settings: Settings, store: EventStore
) -> None:
    # The embedded Postgres trusts local connections: a password in the URL is accepted and ignored.
    parts = urlsplit(str(settings.database_url))
    user = parts.username or "postgres"
    secret = "s3cret-db-password"
    url = urlunsplit(
        parts._replace(netloc=f"{user}:{secret}@{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}")
    )
    settings = settings.model_copy(update={"database_url": url})
    await support.append_all(store, support.random_history(51, events=100))
    async with running_worker(settings, support.registry(), client=client):
        handle = await start_replay(client, settings, ReplayInput("accounts", lanes=2, chunk_size=20))
        await wait_for_replay(handle)
    history = (await handle.fetch_history()).to_json()
    assert "accounts" in history
    for leak in (secret, url, str(parts.path.strip("/"))):
        assert leak not in history
