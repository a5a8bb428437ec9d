"""The live stream behind ``GET /live``: grouping by cause, bounds, the freshness window."""

from __future__ import annotations

from streams.live import MAX_CHANGES, MAX_LISTS_PER_CHANGE, WINDOW_S, LiveFeed
from streams.outputs import Outbound

TOPICS = {"similar-items": "similar", "duplicates": "duplicates"}


def listed(topic: str, key: str, cause: str | None, *, version: int = 1, items: int = 1,
           event_ts: float | None = None) -> Outbound:
    value = {"product_id": key, "items": [{"product_id": "x"}] * items, "version": version}
    if cause is not None:
        value["caused_by"] = {"product_id": cause, "event_ts": "2026-11-30T07:00:00.000Z"}
    return Outbound(topic, key, value, event_ts=event_ts)


def test_lists_are_grouped_by_the_change_that_caused_them() -> None:
    feed = LiveFeed(TOPICS)
    feed.observe([
        listed("similar-items", "A", "A", event_ts=99.0),
        listed("duplicates", "B", "A", version=3, items=0),
        Outbound("simstream-products", "A", {"product_id": "A"}),  # not a list: ignored
        Outbound("duplicates", "C", None, event_ts=99.5),  # C deleted: its own tombstone
        listed("similar-items", "D", None),  # no single cause (a refit)
    ], now=100.0)
    body = feed.as_json(now=100.0)
    by_cause = {c["product_id"]: c for c in body["changes"]}
    assert set(by_cause) == {"A", "C", None}
    assert [(x["kind"], x["product_id"], x["version"], x["items"]) for x in by_cause["A"]["lists"]] == [
        ("similar", "A", 1, 1), ("duplicates", "B", 3, 0)]
    assert by_cause["A"]["freshness_s"] == 1.0 and by_cause["A"]["event_ts"] == "2026-11-30T07:00:00.000Z"
    assert by_cause["C"]["lists"][0]["items"] is None and by_cause["C"]["event_ts"] is not None
    assert body["counters"] == {"changes": 2, "tombstones": 1, "lists_published": {"duplicates": 2, "similar": 2}}
    fresh = body["freshness"]
    assert fresh["count"] == 2 and fresh["p50_s"] == 0.75 and fresh["max_s"] == 1.0


def test_everything_is_bounded_and_old_samples_leave_the_window() -> None:
    feed = LiveFeed(TOPICS)
    for i in range(MAX_CHANGES + 10):
        feed.observe([listed("similar-items", f"P{i}", f"P{i}", event_ts=float(i) - 0.5)], now=float(i))
    body = feed.as_json(now=float(MAX_CHANGES + 9))
    assert len(body["changes"]) == MAX_CHANGES and body["changes"][0]["product_id"] == f"P{MAX_CHANGES + 9}"
    assert feed.freshness(now=WINDOW_S + 1000)["count"] == 0
    big = LiveFeed(TOPICS)
    big.observe([listed("similar-items", f"K{i}", "BIG") for i in range(MAX_LISTS_PER_CHANGE + 5)], now=0.0)
    change = big.as_json()["changes"][0]
    assert len(change["lists"]) == MAX_LISTS_PER_CHANGE and change["more_lists"] == 5
