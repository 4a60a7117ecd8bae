"""The repair workflow's input and result, and its activity's input."""

from dataclasses import dataclass, field

from rehydrate.models.verify import Drift


@dataclass
class RepairInput:
    """Rebuild the rows of a few keys of a projection's live read model from their whole history:
    `{"projection": "accounts", "keys": ["acct-42"]}` is a complete input (e.g. from the Temporal Web UI).

    Keys are as the read model's key column shows them, as text. `dry_run` says which keys would change and changes
    nothing. Keys are repaired `batch_size` at a time, each batch in one transaction (readers see its keys all
    before or all after); `show` is how many changed keys the result names.
    """

    projection: str
    keys: list[str] = field(default_factory=list)
    dry_run: bool = False
    batch_size: int = 500
    show: int = 10
    wrong_worker_patience_seconds: float = 300.0


@dataclass
class RepairBatchInput:
    projection: str
    keys: list[str]
    dry_run: bool = False
    show: int = 10


@dataclass
class RepairResult:
    """What a repair did (or, in a dry run, would do): keys asked, keys whose rows changed, events folded."""

    projection: str
    generation: int = 0
    keys: int = 0
    changed: int = 0
    events: int = 0
    first: list[Drift] = field(default_factory=list)
    dry_run: bool = False
    stale: bool = False  # the live generation was built from other code than the keys were rebuilt with
    batches: int = 0
