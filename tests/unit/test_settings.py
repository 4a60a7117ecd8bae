"""Settings come from the environment, .env, rehydrate.toml and [tool.rehydrate] in pyproject.toml, the first that
sets a value winning; a misspelt key in a project file is refused by name; nothing configured means the examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from rehydrate import UserError
from rehydrate.core.database import worker_session
from rehydrate.core.settings import (
    EXAMPLE_PROJECTIONS,
    RANGE_LANES,
    Settings,
    load_settings,
    projections_origin,
    redact_url,
    sized_lanes,
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("REHYDRATE_PROJECTIONS", "REHYDRATE_AGGREGATES", "REHYDRATE_LANES", "REHYDRATE_CHUNK_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_nothing_configured_means_the_examples_and_says_so(project: Path) -> None:
    settings = load_settings()
    assert settings.uses_examples and settings.projection_modules == list(EXAMPLE_PROJECTIONS)
    assert projections_origin(settings).startswith("the examples (nothing names projections")


def test_pyproject_then_rehydrate_toml_then_the_environment_win_in_turn(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "pyproject.toml").write_text(
        '[project]\nname = "shop"\n\n[tool.rehydrate]\nprojections = ["shop.views"]\nlanes = 4\nchunk_size = 7\n'
    )
    settings = load_settings()
    assert (settings.projections, settings.lanes, settings.chunk_size) == (["shop.views"], 4, 7)
    assert projections_origin(settings) == "[tool.rehydrate] in pyproject.toml"
    (project / "rehydrate.toml").write_text('projections = ["shop.read_models"]\nlanes = 2\n')
    settings = load_settings()
    assert (settings.projections, settings.lanes, settings.chunk_size) == (["shop.read_models"], 2, 7)
    assert projections_origin(settings) == "rehydrate.toml"
    monkeypatch.setenv("REHYDRATE_PROJECTIONS", "shop.a,shop.b")
    settings = load_settings()
    assert settings.projections == ["shop.a", "shop.b"] and projections_origin(settings) == "REHYDRATE_PROJECTIONS"
    assert not settings.uses_examples


@pytest.mark.parametrize(
    ("file", "text", "where"),
    [
        ("rehydrate.toml", 'projection = ["shop.views"]\n', "rehydrate.toml"),
        ("pyproject.toml", "[tool.rehydrate]\nlane = 4\n", "[tool.rehydrate] in pyproject.toml"),
    ],
)
def test_a_misspelt_key_in_a_project_file_is_refused_by_name(project: Path, file: str, text: str, where: str) -> None:
    (project / file).write_text(text)
    with pytest.raises(UserError) as refused:
        load_settings()
    assert refused.value.message.startswith(f"{where} has unknown setting(s) ")
    assert text.split("=")[0].split("\n")[-1].strip() in refused.value.message


def test_a_project_file_that_is_not_toml_is_refused_by_name(project: Path) -> None:
    (project / "rehydrate.toml").write_text("projections = [\n")
    with pytest.raises(UserError, match=r"rehydrate\.toml cannot be read"):
        load_settings()


def test_a_bad_value_in_a_project_file_names_the_setting(project: Path) -> None:
    (project / "rehydrate.toml").write_text("lanes = 0\n")
    with pytest.raises(UserError, match="setting 'lanes' is invalid"):
        load_settings()


def test_a_url_without_a_password_is_printed_as_it_is() -> None:
    assert redact_url("postgresql://postgres:@/postgres?host=/tmp/x") == "postgresql://postgres:@/postgres?host=/tmp/x"
    assert redact_url("postgresql://app:s3cret@db:5432/app") == "postgresql://app:***@db:5432/app"


def test_a_workers_sessions_ask_postgres_to_end_them_once_the_worker_goes_silent(project: Path) -> None:
    session = worker_session(load_settings())
    assert session == {
        "server_settings": {
            "idle_in_transaction_session_timeout": "60000ms",
            "tcp_keepalives_idle": "30",
            "tcp_keepalives_interval": "10",
            "tcp_keepalives_count": "3",
            "tcp_user_timeout": "60000ms",
        },
        "timeout": 60.0,
    }
    tuned = worker_session(load_settings(db_idle_in_transaction_timeout=2.5, db_peer_timeout=0))
    assert tuned == {"server_settings": {"idle_in_transaction_session_timeout": "2500ms"}}
    assert worker_session(load_settings(db_idle_in_transaction_timeout=0, db_peer_timeout=0)) == {}


@pytest.mark.parametrize(
    ("events", "lanes"),
    [(0, 1), (49_999, 1), (50_000, 2), (99_999, 2), (100_000, 4), (199_999, 4), (200_000, 8), (10_000_000, 8)],
)
def test_a_replay_without_a_lane_count_gets_fewer_lanes_on_a_small_store(events: int, lanes: int) -> None:
    found = [f"s{i}" for i in range(1, RANGE_LANES)]  # the 7 ids that cut the events into 8 equal ranges
    boundaries, sized = sized_lanes(Settings(), found, RANGE_LANES, events)
    assert sized == lanes == len(boundaries) + 1
    # The kept ids cut the same events into equal parts: every (8 / lanes)-th of the eight.
    assert boundaries == found[8 // lanes - 1 :: 8 // lanes][: lanes - 1]
    # Lanes set in the settings are kept; too few streams for 8 ranges leave the caller's hash split as it is.
    assert sized_lanes(Settings(lanes=8), found, 8, events) == (found, 8)
    if events >= 100_000:
        assert sized_lanes(Settings(), found[:3], 8, events) == (found[:3], 8)
