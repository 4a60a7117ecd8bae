"""The names runs go by: a verify's sandbox label fits an identifier and is its projection's alone."""

from __future__ import annotations

from rehydrate.engine.readmodels import sandbox_schema
from rehydrate.models.names import verify_label


def test_a_verify_label_fits_and_two_long_names_alike_get_two_sandboxes() -> None:
    assert verify_label("accounts") == "verify_accounts"
    first = "customer_lifetime_value_by_region_and_quarter_v1"
    second = "customer_lifetime_value_by_region_and_quarter_v2"
    labels = {verify_label(first), verify_label(second)}
    assert len(labels) == 2
    for label in labels:
        assert len(label) == 45
        assert len(sandbox_schema(label)) <= 63  # a valid schema name, accepted as one
    assert verify_label(first) == verify_label(first)
