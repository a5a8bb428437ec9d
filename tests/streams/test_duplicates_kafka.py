"""The ``duplicates`` topic end to end: one worker on a real broker publishes the other listings
of each product, follows a retitle that ends a duplicate and a delete, and shows both on
``GET /products/{id}/duplicates`` and the live stream on ``GET /live``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from serving.duplicates import SAME_CODE, SAME_TITLE
from streams.kafka_io import create_topics, latest_by_key, read_topic
from streams.settings import Settings
from tests.support import WorkerProcess, send_products, wait_for

pytestmark = pytest.mark.integration

PRODUCTS = [
    # One product listed twice, typed differently: the textual rule (brand and title words).
    ("STUFF-A", "Stuffit Deluxe 11", "Smith Micro"),
    ("STUFF-B", "stuffit  deluxe 11", "smith micro"),
    # One brand's model code, the rest of the titles apart.
    ("EAR", "Sony WH-1000XM4 wireless headphones", "Sony"),
    ("EAR-2", "WH1000XM4 noise cancelling, black", "Sony"),
    ("KEYS", "Logitech MX Keys wireless keyboard", "Logitech"),
]


def test_duplicates_are_published_followed_and_shown(
    settings_for: Callable[..., Settings], worker_factory: Callable[..., WorkerProcess],
) -> None:
    settings = settings_for()
    create_topics(settings)
    worker = worker_factory()
    worker.wait_ready()

    def topic() -> dict[str, Any]:
        return latest_by_key(read_topic(settings, settings.topic_duplicates, timeout_s=10))

    def listed(state: dict[str, Any], pid: str) -> list[str] | None:
        value = state.get(pid)
        return None if value is None else [i["product_id"] for i in value["items"]]

    now = time.time()
    send_products(settings, [{"op": "upsert", "product_id": pid, "title": title, "brand": brand, "ts": now - 5}
                             for pid, title, brand in PRODUCTS])
    def when(ok: Callable[[dict[str, Any]], bool]) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            state = topic()
            return state if ok(state) else None
        return check

    state = wait_for(when(lambda s: all(pid in s for pid, _t, _b in PRODUCTS) and listed(s, "STUFF-B") == ["STUFF-A"]
                          and listed(s, "EAR-2") == ["EAR"]), what="every product's duplicates on the topic",
                     worker=worker)
    assert listed(state, "STUFF-A") == ["STUFF-B"] and listed(state, "EAR") == ["EAR-2"]
    assert listed(state, "KEYS") == []  # every product has a record; an empty list is "none"
    assert SAME_TITLE in state["STUFF-A"]["items"][0]["reasons"]
    assert SAME_CODE in state["EAR"]["items"][0]["reasons"]
    before = state["STUFF-A"]["version"]

    status, body = worker.get("/products/STUFF-A/duplicates")
    assert status == 200 and body["duplicates"][0]["duplicate_id"] == "STUFF-B"
    assert body["duplicates"][0]["title"] == "stuffit  deluxe 11" and body["version"] == before
    assert worker.get("/products/NOPE/duplicates")[0] == 404

    # The re-typed listing becomes another product: both sides lose the pair. A delete
    # tombstones the product's own record and takes it out of the other's list.
    send_products(settings, [
        {"op": "upsert", "product_id": "STUFF-B", "title": "Poser 8 3D animation", "ts": now - 2},
        {"op": "delete", "product_id": "EAR-2", "ts": now - 1},
    ])
    state = wait_for(when(lambda s: listed(s, "STUFF-A") == [] and listed(s, "EAR") == [] and "EAR-2" not in s),
                     what="the duplicates to follow", worker=worker)
    assert listed(state, "STUFF-B") == [] and state["STUFF-A"]["version"] > before
    assert worker.get("/products/STUFF-A/duplicates")[1]["duplicates"] == []

    # The live stream: the last changes, what each republished, freshness, counters, models.
    def live_after_delete() -> dict[str, Any] | None:
        body: dict[str, Any] = worker.get("/live")[1]
        return body if any(c["product_id"] == "EAR-2" for c in body["changes"]) else None

    live = wait_for(live_after_delete, what="the delete on /live", worker=worker)
    by_cause: dict[str, Any] = {}
    for change in live["changes"]:  # newest first: the last change of each product
        by_cause.setdefault(change["product_id"], change)
    retitled = {(item["kind"], item["product_id"]) for item in by_cause["STUFF-B"]["lists"]}
    assert {("duplicates", "STUFF-A"), ("duplicates", "STUFF-B"), ("similar", "STUFF-B")} <= retitled
    assert {"kind": "duplicates", "product_id": "EAR-2", "version": None, "items": None,
            "trigger": None, "title": None} in by_cause["EAR-2"]["lists"]
    assert live["freshness"]["count"] > 0 and live["freshness"]["p99_s"] >= live["freshness"]["p50_s"] > 0
    assert live["counters"]["lists_published"]["duplicates"] >= len(PRODUCTS) + 3
    assert live["models"]["encoder"] and live["models"]["duplicate_threshold"] == settings.duplicate_threshold
