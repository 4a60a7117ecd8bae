"""The Temporal client's settings: TLS and an API key from settings, read without a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.core.temporal import connect_options, tls_config

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
