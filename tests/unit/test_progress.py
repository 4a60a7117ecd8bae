"""What `replay status` and the Web UI's details say of a replay's progress, whether its total is known or not."""

from __future__ import annotations

from rehydrate.models.replay import ReplayProgress


def test_a_known_total_gives_the_share_and_the_eta() -> None:
    progress = ReplayProgress("orders", "building", 1, 250, 1_000, rate=100.0, eta_seconds=7.5)
    assert progress.counts() == "250 of 1,000 events (25%), 100 events/s, ETA 8 s"
    paused = ReplayProgress("orders", "building", 1, 250, 1_000, rate=100.0, eta_seconds=7.5, paused=True)
    assert paused.counts() == "250 of 1,000 events (25%), 100 events/s"


def test_an_unknown_or_exceeded_total_gives_neither_a_share_nor_an_eta() -> None:
    # A stream's shards have no end at plan time: its total is 0 until the lanes are done.
    unknown = ReplayProgress("ledger", "building", 1, 1_234, 0, rate=500.0, eta_seconds=-2.0)
    assert unknown.counts() == "1,234 events (the total is known once every lane is done), 500 events/s"
    # A table's total estimated low from a sample.
    exceeded = ReplayProgress("orders", "building", 1, 1_100, 1_000, rate=500.0, eta_seconds=-0.2)
    assert "of 1,000" not in exceeded.counts() and "ETA" not in exceeded.counts()
    # Nothing to apply, once built: all of nothing.
    assert ReplayProgress("empty", "done", 1, 0, 0).counts() == "0 of 0 events (100%), 0 events/s"
