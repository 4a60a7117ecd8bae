"""Projections with child tables: what a declaration must hold, and what the fold does with a key's child rows (the
fold is plain Python; the tables are written by the integration tests)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlmodel import Field, SQLModel

from rehydrate import Children, Event, Projection, Row
from rehydrate.core.errors import ProjectionError, UserError
from rehydrate.engine.apply import fold
from rehydrate.engine.children import ChildState
from rehydrate.examples.order_lines import OrderLine, orders


class Basket(SQLModel, table=True):
    __tablename__ = "unit_baskets"
    basket_id: str = Field(primary_key=True)
    items: int = 0


class BasketItem(SQLModel, table=True):
    __tablename__ = "unit_basket_items"
    basket_id: str = Field(primary_key=True)
    sku: str = Field(primary_key=True)
    quantity: int = 1


class Loose(SQLModel, table=True):
    """A table without the basket's key: not a child of baskets."""

    __tablename__ = "unit_loose"
    sku: str = Field(primary_key=True)
    note: str = ""


class OnlyKey(SQLModel, table=True):
    __tablename__ = "unit_only_key"
    basket_id: str = Field(primary_key=True)
    note: str = ""


class WrongType(SQLModel, table=True):
    __tablename__ = "unit_wrong_type"
    basket_id: int = Field(primary_key=True)
    sku: str = Field(primary_key=True)


def event(type: str, data: dict[str, Any], position: int = 1, stream: str = "b-1") -> Event:
    return Event(position, stream, position, type, 1, data, {}, datetime(2025, 1, 1, tzinfo=UTC))


def test_a_child_table_must_hold_the_projections_key_in_its_primary_key_and_a_key_of_its_own() -> None:
    with pytest.raises(UserError, match="child table 'unit_loose' has no column 'basket_id'") as raised:
        Projection("baskets", version=1, table=Basket, children=[Loose])
    assert "Field(primary_key=True)" in (raised.value.fix or "")
    with pytest.raises(UserError, match="child table 'unit_only_key' has no key of its own"):
        Projection("baskets", version=1, table=Basket, children=[OnlyKey])
    with pytest.raises(UserError, match="column 'basket_id' of child table 'unit_wrong_type' is INTEGER"):
        Projection("baskets", version=1, table=Basket, children=[WrongType])
    with pytest.raises(UserError, match="names table 'unit_basket_items' twice"):
        Projection("baskets", version=1, table=Basket, children=[BasketItem, BasketItem])
    # Another column may hold the key when named.
    Projection("loose", version=1, table=Basket, children={BasketItem: "basket_id"})


def test_handlers_declare_what_they_take_and_read() -> None:
    plain = Projection("plain_baskets", version=1, table=Basket)
    with pytest.raises(UserError, match=r"takes a third parameter .* but the projection has no child tables"):
        plain.on("Added")(lambda row, event, children: row)
    with pytest.raises(UserError, match="'unit_loose' is not a child table of projection 'baskets'"):
        Projection("baskets", version=1, table=Basket, children=[BasketItem]).on("Added", reads=Loose)
    with pytest.raises(UserError, match="reads child tables but takes no third parameter"):
        Projection("baskets", version=1, table=Basket, children=[BasketItem]).on("Added", reads=BasketItem)(
            lambda row, event: row
        )


def test_the_fingerprint_of_a_single_table_projection_is_unchanged_by_child_tables_support() -> None:
    one = Projection("baskets", version=1, table=Basket)
    two = Projection("baskets", version=1, table=Basket, children=[BasketItem])
    assert one.fingerprint != two.fingerprint
    assert one.fingerprint == Projection("baskets", version=1, table=Basket).fingerprint


def baskets() -> Projection:
    projection = Projection("baskets", version=1, table=Basket, children=[BasketItem])

    @projection.on("Added")
    def added(row: Row | None, event: Event, children: Children) -> Row:
        children[BasketItem].put({"sku": event.data["sku"], "quantity": event.data.get("quantity", 1)})
        return {"items": (row or {"items": 0})["items"] + 1}

    @projection.on("Changed", reads=BasketItem)
    def changed(row: Row | None, event: Event, children: Children) -> Row | None:
        items = children["unit_basket_items"]
        item = items.get(event.data["sku"])
        if item is not None:
            items.put({**item, "quantity": event.data["quantity"]})
        return row

    @projection.on("Removed")
    def removed(row: Row | None, event: Event, children: Children) -> Row | None:
        children[BasketItem].delete(event.data["sku"])
        return row

    @projection.on("Emptied")
    def emptied(row: Row | None, event: Event) -> None:
        return None

    return projection


def child_rows(state: ChildState, key: str) -> dict[Any, Row | None]:
    return state[key]["unit_basket_items"].changed


def test_the_fold_records_child_writes_and_deleting_a_key_deletes_its_child_rows() -> None:
    projection = baskets()
    state: dict[Any, Row | None] = {}
    last: dict[Any, Event] = {}
    children: ChildState = {}
    history = [
        event("Added", {"sku": "a"}, 1),
        event("Added", {"sku": "b", "quantity": 3}, 2),
        event("Changed", {"sku": "b", "quantity": 5}, 3),
        event("Removed", {"sku": "a"}, 4),
    ]
    assert fold(projection, history, state, last, None, children, set()) == 4
    assert state["b-1"] == {"basket_id": "b-1", "items": 2}
    assert child_rows(children, "b-1") == {"b": {"basket_id": "b-1", "sku": "b", "quantity": 5}, "a": None}
    fold(projection, [event("Emptied", {}, 5)], state, last, None, children, set())
    assert state["b-1"] is None
    assert children["b-1"]["unit_basket_items"].cleared and not child_rows(children, "b-1")


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (lambda row, event, children: children[Loose].put({"sku": "x"}), "'unit_loose' is not a child table"),
        (lambda row, event, children: children[BasketItem].get("x"), "did not name the table in reads="),
        (lambda row, event, children: list(children[BasketItem]), "cannot iterate over the child rows"),
        (lambda row, event, children: children[BasketItem].put({"quantity": 2}), "no value for its key column"),
        (lambda row, event, children: children[BasketItem].put({"sku": "x", "colour": 1}), r"unknown column\(s\)"),
        (
            lambda row, event, children: children[BasketItem].put({"sku": "x", "basket_id": "b-2"}),
            "sets 'basket_id' to 'b-2', but the event's key is 'b-1'",
        ),
    ],
)
def test_a_handler_that_misuses_child_rows_fails_naming_the_table_and_the_fix(handler: Any, message: str) -> None:
    projection = Projection("baskets", version=1, table=Basket, children=[BasketItem])
    projection.on("Bad")(handler)
    with pytest.raises(ProjectionError, match=message) as raised:
        fold(projection, [event("Bad", {}, 9)], {}, {}, None, {}, set())
    assert raised.value.position == 9 and raised.value.fix


def test_the_order_lines_example_reads_and_writes_its_lines() -> None:
    assert [shape.name for shape in orders.tables] == ["orders", "order_lines"]
    assert orders.child(OrderLine).child_key == ("sku",)
    assert orders.reads["ItemAdded"] == frozenset({"order_lines"})
    assert orders.takes_children["ItemAdded"] and not orders.takes_children["OrderPaid"]
