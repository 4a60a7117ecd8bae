"""The versioned domain's Account with a small cost per event, for the snapshot rebuild's crash test: with it a
chunk keeps its transaction open long enough for a SIGKILL to land inside one (see tests/helpers/slow_domain.py)."""

from __future__ import annotations

import os
import time
from typing import ClassVar

from rehydrate import Event
from tests.helpers.versioned import Account

EVENT_COST_SECONDS = float(os.environ.get("REHYDRATE_TEST_EVENT_COST", "0.00025"))


class SlowAccount(Account):
    aggregate_type: ClassVar[str] = "slow_account"

    def _apply(self, event: Event) -> None:
        time.sleep(EVENT_COST_SECONDS)
        super()._apply(event)
