"""A throttled chunk spreads its slices over its time: small fetches, each let through at its turn, not one burst at
full speed and a pause."""

from __future__ import annotations

import asyncio

from rehydrate.engine.build import Pace, fetch_size
from rehydrate.sources.reading import FETCH_SIZE, SLICE


def test_a_chunk_fetches_about_ten_milliseconds_of_events_at_a_time_under_a_rate() -> None:
    assert fetch_size(None) == FETCH_SIZE
    assert fetch_size(60_000) == 600
    assert fetch_size(10_000_000) == SLICE  # a fetch is never more than a slice under a rate
    assert fetch_size(300) == 100  # nor less than 100 rows


async def test_each_slice_waits_for_its_turn_at_the_rate() -> None:
    loop = asyncio.get_running_loop()
    pace = Pace(loop, 10_000.0)
    turns = []
    for events in (1_000, 2_000, 3_000):
        await pace.after(events)
        turns.append(loop.time() - pace.began)
    # The n-th slice goes on no earlier than n / rate seconds after the chunk began (and not much later).
    for took, due in zip(turns, (0.1, 0.2, 0.3), strict=True):
        assert due <= took < due + 0.08, turns


async def test_a_chunk_without_a_rate_or_behind_its_rate_does_not_wait() -> None:
    loop = asyncio.get_running_loop()
    free = Pace(loop, None)
    started = loop.time()
    await free.after(1_000_000)
    behind = Pace(loop, 1_000.0)
    behind.began -= 5.0  # slow slices: 5 s have passed for 1,000 events due after 1 s
    await behind.after(1_000)
    assert loop.time() - started < 0.05
