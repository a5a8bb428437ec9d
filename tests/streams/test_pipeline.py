"""The edge, list-in list-out: consumed records become catalog changes, outputs or dead letters."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streams.metrics import Metrics
from streams.pipeline import CatalogPipeline, Inbound
from streams.settings import Settings

NOW = 1_795_000_000.0


@pytest.fixture
def pipeline() -> CatalogPipeline:
    return CatalogPipeline(Settings(), Metrics(), clock=lambda: NOW)


def message(value: Any, *, key: str | None = "B1", offset: int = 0, topic: str = "product-changes") -> Inbound:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return Inbound(topic, 0, offset, key.encode() if key else None, raw, timestamp=NOW - 10)


def upsert(ts: float, **fields: Any) -> dict[str, Any]:
    return {"op": "upsert", "product_id": "B1", "ts": ts, **fields}


def test_a_valid_upsert_is_applied_and_persisted(pipeline: CatalogPipeline) -> None:
    out = pipeline.handle_product_message(message(upsert(NOW - 60, title="Sony WH-1000XM4", price=278.0)))
    assert [(o.topic, o.key) for o in out] == [("simstream-products", "B1")]
    assert out[0].value is not None and out[0].value["title"] == "Sony WH-1000XM4"
    assert pipeline.catalog.get("B1") is not None


def test_a_delete_persists_a_tombstone(pipeline: CatalogPipeline) -> None:
    pipeline.handle_product_message(message(upsert(NOW - 60, title="x")))
    out = pipeline.handle_product_message(message({"op": "delete", "product_id": "B1", "ts": NOW - 30}))
    assert [(o.topic, o.key, o.value) for o in out] == [("simstream-products", "B1", None)]
    assert pipeline.catalog.get("B1") is None


def test_an_older_event_is_ignored_and_counted(pipeline: CatalogPipeline) -> None:
    pipeline.handle_product_message(message(upsert(NOW - 60, title="new", price=5.0)))
    out = pipeline.handle_product_message(message(upsert(NOW - 120, price=1.0), offset=1))
    assert out == []
    assert pipeline.catalog.stale_events == 1
    product = pipeline.catalog.get("B1")
    assert product is not None and product.price == 5.0


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{oops", "malformed JSON"),
        ([1], "must be a JSON object"),
        ({"op": "upsert", "title": "x", "ts": NOW}, "missing required field 'product_id'"),
        (upsert(NOW, title=7), "'title' must be a string"),
        ({"op": "explode", "product_id": "B1", "ts": NOW}, "unknown op"),
        (upsert(NOW, title="x", price=-3), "outside the allowed range"),
        (upsert(NOW, title="x" * 5_000_000), "over the 1,000,000-byte limit"),
        (upsert(NOW, price=3.0), "is new, so its upsert needs a non-empty 'title'"),
    ],
)
def test_bad_input_becomes_one_dead_letter_with_where_and_why(
    pipeline: CatalogPipeline, value: Any, reason: str
) -> None:
    out = pipeline.handle_product_message(message(value, offset=17))
    assert len(out) == 1 and out[0].topic == "simstream-dead-letters"
    letter = out[0].value
    assert letter is not None
    assert reason in letter["error"]
    assert (letter["source_topic"], letter["partition"], letter["offset"], letter["key"]) == (
        "product-changes", 0, 17, "B1")
    assert len(pipeline.catalog) == 0


def test_a_key_that_is_not_the_product_id_is_refused(pipeline: CatalogPipeline) -> None:
    out = pipeline.handle_product_message(message(upsert(NOW, title="x"), key="B2"))
    assert out[0].topic == "simstream-dead-letters" and "differs from product_id" in out[0].value["error"]  # type: ignore[index]


def test_an_unexpected_error_is_dead_lettered_not_raised(
    pipeline: CatalogPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(change: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline.catalog, "apply", boom)
    out = pipeline.handle_product_message(message(upsert(NOW, title="x")))
    assert out[0].topic == "simstream-dead-letters"
    assert out[0].value is not None and out[0].value["error"] == "internal error (RuntimeError): disk on fire"


def test_user_events_are_validated(pipeline: CatalogPipeline) -> None:
    good = message({"user_id": "u1", "product_id": "B1", "type": "view", "ts": NOW}, key="u1", topic="user-events")
    bad = message({"user_id": "u1", "product_id": "B1", "type": "like", "ts": NOW}, key="u1", topic="user-events")
    assert pipeline.handle_user_message(good) == []
    out = pipeline.handle_user_message(bad)
    assert out[0].topic == "simstream-dead-letters" and "unknown event type" in out[0].value["error"]  # type: ignore[index]
