"""Wire contracts: what a product change or user event may look like, and what it becomes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serving.catalog import ProductDelete, ProductUpsert, UserEventType
from streams.records import (
    DecodeError,
    dead_letter,
    decode_product_change,
    decode_product_label,
    decode_user_event,
    product_from_wire,
    product_to_wire,
)

NOW = 1_795_000_000.0  # 2026-11-17
TS = "2026-11-10T03:00:00Z"
TS_UNIX = 1_794_279_600.0


def upsert(**fields: Any) -> bytes:
    return json.dumps({"op": "upsert", "product_id": "B1", "title": "Sony WH-1000XM4", "ts": TS, **fields}).encode()


def decode(raw: bytes | str, **kw: Any) -> Any:
    return decode_product_change(raw, now=NOW, **kw).to_core()


def test_a_full_upsert_becomes_a_frozen_core_change() -> None:
    change = decode(upsert(
        description="Noise cancelling", brand="Sony", category=["Electronics", "Audio", "Headphones"],
        price=278.0, currency="USD", in_stock=True, group_id="wh1000", attributes={"color": "black", "weight": 254},
        image_url="https://example.invalid/1.jpg",
    ))
    assert change == ProductUpsert(
        product_id="B1", ts=TS_UNIX, title="Sony WH-1000XM4", description="Noise cancelling", brand="Sony",
        category=("Electronics", "Audio", "Headphones"), price=278.0, currency="USD", in_stock=True,
        group_id="wh1000", attributes=(("color", "black"), ("weight", "254")),
        image_url="https://example.invalid/1.jpg",
    )
    with pytest.raises(AttributeError):
        change.title = "changed"  # type: ignore[misc]


def test_absent_and_null_fields_mean_keep_what_is_stored() -> None:
    change = decode(json.dumps({"op": "upsert", "product_id": "B1", "price": 10, "brand": None, "ts": TS}))
    assert isinstance(change, ProductUpsert)
    assert change.price == 10.0 and change.title is None and change.brand is None and change.in_stock is None


def test_delete_needs_only_id_and_ts() -> None:
    assert decode(json.dumps({"op": "delete", "product_id": "B1", "ts": TS})) == ProductDelete("B1", TS_UNIX)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object, got array"),
        (b"", "empty message"),
        (b"\xff\xfe", "not valid UTF-8"),
        (json.dumps({"product_id": "B1", "title": "x", "ts": TS}), "missing required field 'op'"),
        (json.dumps({"op": "merge", "product_id": "B1", "ts": TS}), "unknown op 'merge'"),
        (json.dumps({"op": "upsert", "title": "x", "ts": TS}), "missing required field 'product_id'"),
        (json.dumps({"op": "upsert", "product_id": 7, "title": "x", "ts": TS}), "'product_id' must be a string"),
        (json.dumps({"op": "upsert", "product_id": " ", "title": "x", "ts": TS}), "non-empty id"),
        (upsert(title=5), "'title' must be a string, got number"),
        (upsert(title="   "), "'title' is blank"),
        (upsert(title="x" * 3000), "over the limit of 2,000"),
        (upsert(description=["a"]), "'description' must be a string, got array"),
        (upsert(brand=True), "'brand' must be a string, got boolean"),
        (upsert(category="Audio", price="12"), "'price' must be a number, got string"),
        (upsert(category=[1, 2]), "'category' must be an array of strings"),
        (upsert(price=-1), "outside the allowed range"),
        (upsert(price=1e12), "outside the allowed range"),
        (upsert(price=True), "'price' must be a number, got boolean"),
        (upsert(currency="dollars"), "over the limit of 3"),
        (upsert(currency="usd"), "ISO-4217"),
        (upsert(in_stock="yes"), "'in_stock' must be true or false"),
        (upsert(group_id=3), "'group_id' must be a string"),
        (upsert(attributes=["color"]), "'attributes' must be an object"),
        (upsert(attributes={"color": {"r": 1}}), "attribute 'color'"),
        (upsert(image_url=1), "'image_url' must be a string"),
        (upsert(ts="yesterday"), "not an ISO-8601 timestamp"),
        (upsert(ts=1_794_279_600_000), "more than 24 hours in the future"),
        (upsert(ts=12), "before 2000-01-01"),
        (upsert(ts=[1]), "'ts' must be an ISO-8601 string or unix seconds"),
    ],
)
def test_bad_product_changes_are_rejected_with_a_one_line_reason(raw: bytes | str, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode(raw)
    assert reason in str(err.value)
    assert "\n" not in str(err.value)


def test_an_oversized_message_is_rejected_before_parsing() -> None:
    raw = upsert(title="x" * 5_000_000)
    with pytest.raises(DecodeError, match="over the 1,000,000-byte limit"):
        decode(raw, max_bytes=1_000_000)


def test_ts_may_be_unix_seconds_or_missing_with_the_kafka_timestamp_as_fallback() -> None:
    assert decode(upsert(ts=TS_UNIX)).ts == TS_UNIX
    no_ts = json.dumps({"op": "upsert", "product_id": "B1", "title": "x"})
    assert decode(no_ts, kafka_ts=TS_UNIX + 1).ts == TS_UNIX + 1
    with pytest.raises(DecodeError, match="missing 'ts'"):
        decode(no_ts)


def test_ts_with_an_offset_is_converted_to_utc() -> None:
    assert decode(upsert(ts="2026-11-10T04:00:00+01:00")).ts == TS_UNIX


def test_category_string_is_a_one_level_path_and_blank_levels_are_dropped() -> None:
    assert decode(upsert(category="Audio")).category == ("Audio",)
    assert decode(upsert(category=["Audio", " ", "Headphones "])).category == ("Audio", "Headphones")


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert decode(upsert(colour_hex="#000")).title == "Sony WH-1000XM4"


def test_user_events_decode_to_core_events() -> None:
    raw = json.dumps({"user_id": "u42", "product_id": "B1", "type": "add_to_cart", "ts": TS, "session_id": "s1"})
    event = decode_user_event(raw, now=NOW).to_core()
    assert event.type is UserEventType.ADD_TO_CART
    assert (event.user_id, event.product_id, event.session_id, event.ts) == ("u42", "B1", "s1", TS_UNIX)
    forget = decode_user_event(json.dumps({"user_id": "u42", "type": "forget", "ts": TS}), now=NOW).to_core()
    assert forget.type is UserEventType.FORGET and forget.product_id is None


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"user_id": "u1", "product_id": "B1", "type": "like", "ts": TS}, "unknown event type 'like'"),
        ({"user_id": "u1", "product_id": "B1", "ts": TS}, "missing required field 'type'"),
        ({"product_id": "B1", "type": "view", "ts": TS}, "missing required field 'user_id'"),
        ({"user_id": "u1", "type": "view", "ts": TS}, "missing required field 'product_id'"),
        ({"user_id": 1, "product_id": "B1", "type": "view", "ts": TS}, "'user_id' must be a string"),
    ],
)
def test_bad_user_events_are_rejected(obj: dict[str, Any], reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_user_event(json.dumps(obj), now=NOW)


def test_products_round_trip_through_their_wire_form() -> None:
    change = decode(upsert(brand="Sony", category=["Audio"], price=9.5, attributes={"color": "black"}))
    assert isinstance(change, ProductUpsert)
    from serving.catalog import Catalog

    product = Catalog().apply(change).after
    assert product is not None
    assert product_from_wire(json.loads(json.dumps(product_to_wire(product)))) == product


def test_dead_letters_carry_where_and_why_and_cut_huge_payloads() -> None:
    letter = dead_letter(source_topic="product-changes", partition=2, offset=41, key=b"B1",
                         payload=b"x" * 200_000, error="malformed JSON: oops\nsecond line", at=TS_UNIX)
    assert letter["source_topic"] == "product-changes" and letter["partition"] == 2 and letter["offset"] == 41
    assert letter["key"] == "B1" and letter["error"] == "malformed JSON: oops"
    assert letter["payload_truncated"] is True and letter["payload_bytes"] == 200_000
    assert len(letter["payload"]) == 64 * 1024
    assert letter["at"] == "2026-11-10T03:00:00.000Z"


# --- product-labels ------------------------------------------------------------------------------
def test_a_label_becomes_a_pair_label_and_booleans_or_0_1_mean_the_same() -> None:
    yes = decode_product_label('{"left_id": "a", "right_id": "b", "label": true, "ts": 1700000000, "source": "ops"}')
    assert yes.source == "ops"
    label = yes.to_core()
    assert (label.left_id, label.right_id, label.positive, label.ts) == ("a", "b", True, 1700000000.0)
    assert label.key == ("a", "b") == decode_product_label(
        '{"left_id": "b", "right_id": "a", "label": 0, "ts": 1700000000}').to_core().key
    assert decode_product_label('{"left_id": "b", "right_id": "a", "label": 0}', kafka_ts=1.7e9).to_core().positive \
        is False


@pytest.mark.parametrize(("raw", "reason"), [
    ("{not json", "malformed JSON"),
    ('{"right_id": "b", "label": 1, "ts": 1700000000}', "missing required field 'left_id'"),
    ('{"left_id": "a", "right_id": "a", "label": 1, "ts": 1700000000}', "pairs two different products"),
    ('{"left_id": "a", "right_id": "b", "ts": 1700000000}', "missing required field 'label'"),
    ('{"left_id": "a", "right_id": "b", "label": 2, "ts": 1700000000}', "must be 0, 1, true or false, got 2"),
    ('{"left_id": "a", "right_id": "b", "label": "yes", "ts": 1700000000}', "must be 0, 1, true or false, got string"),
    ('{"left_id": "a", "right_id": 5, "label": 1, "ts": 1700000000}', "field 'right_id' must be a string"),
    ('{"left_id": "a", "right_id": "b", "label": 1}', "missing 'ts'"),
])
def test_bad_labels_are_rejected_with_a_one_line_reason(raw: str, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_product_label(raw)
    assert reason in str(err.value) and "\n" not in str(err.value), str(err.value)
