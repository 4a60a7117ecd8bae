"""An import checks the usual line on a quick path and every other on the full one: the quick path must clear only
lines the full check accepts, and write them exactly as it does; and the file reader must number and skip lines as
iterating the file does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from rehydrate.core.errors import UserError
from rehydrate.engine.importer import READ_BUFFER, _quick_record, _record, read_jsonl

NOW = "2026-01-02T03:04:05.678901+00:00"
TRICKY = 'tab\there, newline\nthere, cr\r, backslash \\ and \\n literally, quote ", é ✓ 🚀, \\u0000 text, \x00'

TEXTS = st.sampled_from(["s-1", "", "é", "a b", "a\tb", "s\\1", "\x00", "\u2028", "\xa0", TRICKY]) | st.text(max_size=6)
TIMES = st.sampled_from(
    [
        "2025-01-01T00:00:51+00:00",
        "2025-01-01 00:00+05",
        "2025-01-01T00:00:51.123456Z",
        "2025-01-01T00:00:51.1234567+00:00",
        "2025-01-01T00:00:51",
        "2025-01-01",
        "2025-13-01T00:00:00+00:00",
        "2025-02-29T00:00:00+00:00",
        "2025-01-01T24:00:00+00:00",
        "2025-01-01T00:00:51+00:00:30",
        "2025-01-01T00:00+00:00:30",
        "2025-01-01T000051.1+00:00",
        "2025-01-01 00:00:51+00:00",
        "2025-01-01T00:00:51-24:00",
        "2025-01-01T00:00:60+00:00",
        "2025-01-01T00:00:51+00:00 ",
        "2025-01-01T00:00:51+00:001",
        "20250101T000051+0000",
        "2025-W01-1T00:00+00:00",
    ]
) | st.text(max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | TEXTS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=3),
    max_leaves=6,
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "stream_id": TEXTS | JSON,
    "type": TEXTS | JSON,
    "data": st.dictionaries(TEXTS, JSON, max_size=3) | JSON,
    "stream_version": st.integers(-1, 3) | JSON,
    "schema_version": st.integers(-1, 3) | st.sampled_from([2**31 - 1, 2**31, True]) | JSON,
    "metadata": st.dictionaries(TEXTS, JSON, max_size=2) | JSON,
    "recorded_at": TIMES | JSON,
    "extra": JSON,
}


@st.composite
def lines(draw: st.DrawFn) -> Any:
    """A usual line with a few of its fields changed, added or removed (sometimes not an object at all)."""
    line: dict[str, Any] = {"stream_id": "order-1", "type": "OrderPlaced", "data": {"n": 1}}
    for field in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            line.pop(field, None)
        else:
            line[field] = draw(FIELDS[field])
    return draw(JSON) if draw(st.integers(0, 19)) == 0 else line


def full(line: Any) -> Any:
    try:
        return _record(lambda: "input:1", line, NOW)
    except UserError as error:
        return error


@hypothesis_settings(
    max_examples=2000,
    database=None,
    derandomize=True,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
    deadline=None,
)
@given(lines())
def test_the_quick_check_clears_only_lines_the_full_check_writes_and_writes_them_alike(line: Any) -> None:
    quick = _quick_record(line, NOW, {})
    if quick is not None:
        assert quick == full(line)


def test_the_quick_check_clears_the_usual_lines() -> None:
    usual = [
        {"stream_id": "order-1", "type": "OrderPlaced", "data": {"customer": "c-1", "note": 'a "quote"'}},
        {"stream_id": "order-1", "type": "ItemAdded", "data": {}, "recorded_at": "2025-01-01T00:00:51+00:00"},
        {"stream_id": "order-1", "type": "Paid", "data": {"é": 1.5}, "metadata": {"by": "x"}, "schema_version": 2},
        {"stream_id": "order-1", "type": "Paid", "data": {}, "stream_version": 4, "recorded_at": None},
    ]
    for line in usual:
        assert _quick_record(line, NOW, {}) == full(line), line


def test_the_file_reader_numbers_lines_as_iterating_the_file_does(tmp_path: Path) -> None:
    """Blank and whitespace lines are skipped but counted, CRLF endings and a last line without its newline are
    read, and lines across the reader's block boundaries, or longer than a block, are read whole."""
    path = tmp_path / "events.jsonl"
    long = {"stream_id": "s", "type": "T", "data": {"blob": "x" * 300_000}}
    longer = {"stream_id": "s", "type": "T", "data": {"blob": "y" * (READ_BUFFER * 2 + 1)}}
    text = b"\n".join(
        [orjson.dumps({"n": 1}), b"", b"  \t\r", orjson.dumps({"n": 2}) + b"\r", orjson.dumps(long)] * 20
        + [orjson.dumps(longer), orjson.dumps({"n": 3})]
    )
    path.write_bytes(text)
    expected = [(n, orjson.loads(line)) for n, line in enumerate(text.split(b"\n"), start=1) if line.strip()]
    reader = read_jsonl(path)
    assert list(reader) == expected
    assert reader.bytes_read == reader.size == len(text)
