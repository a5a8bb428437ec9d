"""Behaviour on a real broker: bought-together pairs reach complements and the behaviour part
of similar-items, feeds follow each event, purchases and stock-outs leave feeds, forget works
and no user id reaches the worker's log."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from streams.kafka_io import create_topics, latest_by_key, producer, read_topic
from streams.settings import Settings
from tests.support import wait_for

pytestmark = pytest.mark.integration

SHOPPER = "shopper-5c1e77"
NOW = time.time() - 600
CATALOG = [
    ("A1", "Sony WH-1000XM4 wireless noise cancelling headphones", "Audio", 278.0),
    ("A2", "Sony WH-1000XM5 wireless noise cancelling headphones", "Audio", 329.0),
    ("A3", "Bose QuietComfort 45 wireless noise cancelling headphones", "Audio", 299.0),
    ("A4", "Sennheiser Momentum 4 wireless headphones", "Audio", 289.0),
    ("C1", "Hard travel case for over-ear headphones", "Cases", 19.0),
    ("K1", "Logitech MX Keys wireless keyboard", "Keys", 99.0),
]


def send(settings: Settings, topic: str, records: list[tuple[str, dict[str, Any]]]) -> None:
    kafka = producer(settings)
    for key, value in records:
        kafka.send(topic, key=key.encode(), value=json.dumps(value).encode())
    kafka.flush()
    kafka.close()


def latest(settings: Settings, topic: str) -> dict[str, Any]:
    return latest_by_key(read_topic(settings, topic))


def feeds(settings: Settings) -> list[tuple[str, Any]]:
    """Every feed publication of the shopper, in order (the topic is not compacted)."""
    return [(r.key, r.value) for r in read_topic(settings, settings.topic_user_recommendations) if r.key == SHOPPER]


def shop(settings: Settings, user: str, steps: list[tuple[str, str | None]], t0: float) -> None:
    events = []
    for i, (kind, product) in enumerate(steps):
        value: dict[str, Any] = {"user_id": user, "type": kind, "ts": t0 + i}
        if product is not None:
            value["product_id"] = product
        events.append((user, value))
    send(settings, settings.topic_user_events, events)


def feed_ids(value: Any) -> list[str]:
    return [i["product_id"] for i in value["items"]]


def test_behaviour_reaches_lists_and_feeds_and_forget_erases_the_user(
    settings_for: Callable[..., Settings], worker_factory: Callable[..., Any]
) -> None:
    env = {"SIMSTREAM_BEHAVIOR_WEIGHT": "0.5", "SIMSTREAM_BEHAVIOR_DEBOUNCE_MS": "200", "SIMSTREAM_K": "3"}
    settings = settings_for(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    worker = worker_factory(**env)
    worker.wait_ready()
    send(settings, settings.topic_product_changes, [
        (pid, {"op": "upsert", "product_id": pid, "title": title, "category": [leaf], "price": price, "ts": NOW})
        for pid, title, leaf, price in CATALOG
    ])
    wait_for(lambda: len(latest(settings, settings.topic_similar_items)) == len(CATALOG), what="similar items")

    # Three shoppers buy headphones A1 with the travel case C1 (which is no similar item).
    for n in range(3):
        shop(settings, f"buyer-{n}", [("add_to_cart", "A1"), ("add_to_cart", "C1"),
                                      ("purchase", "A1"), ("purchase", "C1")], NOW + 10 * n)
    complements = wait_for(
        lambda: (lambda c: c if c.get("A1") and c.get("C1") else None)(latest(settings, settings.topic_complements)),
        what="complements", worker=worker)
    assert feed_ids(complements["A1"])[0] == "C1" and feed_ids(complements["C1"])[0] == "A1"
    assert "often bought together" in complements["A1"]["items"][0]["reasons"]
    similar = latest(settings, settings.topic_similar_items)["A1"]
    c1 = next(i for i in similar["items"] if i["product_id"] == "C1")
    assert c1["behavior"] > 0 and c1["score"] > 0.5 * c1["content"]

    # A feed follows every event of the shopper.
    shop(settings, SHOPPER, [("view", "A1")], NOW + 100)
    first = wait_for(lambda: feeds(settings), what="a first feed")
    assert len(first) == 1 and "A1" not in feed_ids(first[-1][1])
    assert "C1" in feed_ids(first[-1][1])  # bought with what they viewed
    shop(settings, SHOPPER, [("purchase", "C1")], NOW + 110)
    after_purchase = wait_for(lambda: (lambda f: f if len(f) >= 2 else None)(feeds(settings)), what="second feed")
    assert "C1" not in feed_ids(after_purchase[-1][1])
    listed = feed_ids(after_purchase[-1][1])
    assert listed, "the feed has similar items of A1"
    gone = listed[0]
    send(settings, settings.topic_product_changes,
         [(gone, {"op": "upsert", "product_id": gone, "in_stock": False, "ts": NOW + 120})])
    after_stock_out = wait_for(lambda: (lambda f: f if len(f) >= 3 else None)(feeds(settings)), what="third feed")
    assert gone not in feed_ids(after_stock_out[-1][1])
    status, body = worker.get(f"/users/{SHOPPER}/recommendations?k=5")
    assert status == 200 and body["history"] == 2 and gone not in feed_ids(body)
    assert worker.get(f"/users/{SHOPPER}/recommendations?k=5000")[0] == 400

    # Forget: a tombstone for the feed, the history gone, and the id never logged.
    shop(settings, SHOPPER, [("forget", None)], NOW + 130)
    wait_for(lambda: feeds(settings)[-1][1] is None, what="feed tombstone")
    status, body = worker.get(f"/users/{SHOPPER}/recommendations")
    assert status == 200 and body["history"] == 0
    shop(settings, SHOPPER, [("teleport", "A1")], NOW + 140)  # dead-lettered, with this user's id inside
    wait_for(lambda: any(r.value["source_topic"] == settings.topic_user_events
                         for r in read_topic(settings, settings.topic_dead_letters)), what="dead letter")
    assert worker.alive
    log = worker.log_path.read_text(errors="replace")
    assert "dead-lettered" in log and SHOPPER not in log and "buyer-0" not in log
