"""Rows of the read statements as events: the timestamp's text read back as the instant it was, in UTC."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from rehydrate.sources.reading import events_of, moment


def row(at: str | None, data: str = "{}") -> tuple[object, ...]:
    return (1, "s", 1, "T", 1, data, None, at)


def test_the_usual_row_reads_in_one_loop_with_the_instant_in_utc() -> None:
    (event,) = events_of([row('"2024-02-29T23:59:59.5"')])
    assert event.recorded_at == datetime(2024, 2, 29, 23, 59, 59, 500000, tzinfo=UTC)
    assert event.recorded_at.tzinfo is UTC
    assert events_of([row(None)])[0].recorded_at is None  # a source that maps no recorded_at column


def test_the_unusual_timestamps_fail_the_loop_and_read_one_by_one() -> None:
    with pytest.raises(ValueError):
        events_of([row('"infinity"')])
    assert moment('"infinity"') == datetime.max.replace(tzinfo=UTC)
    assert moment('"-infinity"') == datetime.min.replace(tzinfo=UTC)
    with pytest.raises(ValueError, match=r"recorded_at '10000-01-01T00:00:00' is outside the years 1 to 9999"):
        moment('"10000-01-01T00:00:00"')
