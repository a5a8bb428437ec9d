"""The live stream of the page (``GET /live``): the last changes and what each republished,
freshness percentiles over the last minutes, and counters.

``LiveFeed.observe`` is handed every batch of records once the broker acknowledged it
(``Worker.publish``), so it shows what consumers can read, never what is still in flight.
List records are grouped by the change that caused them (their ``caused_by``; a list with no
cause, such as a restart's reconciliation or a bulk catch-up, is grouped under ``None``).
Everything is bounded: a ring buffer of ``MAX_CHANGES`` changes, ``MAX_LISTS_PER_CHANGE``
lists shown per change (the rest counted), and freshness samples of the last ``WINDOW_S``
seconds (at most ``MAX_SAMPLES``). Runs on the event loop, like ``Worker.publish``.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from streams.outputs import Outbound
from streams.records import iso

#: Changes kept for the page.
MAX_CHANGES = 50
#: Lists shown per change (a change that moves thousands of lists, such as a refit, is cut).
MAX_LISTS_PER_CHANGE = 25
#: Freshness is reported over this many seconds, ...
WINDOW_S = 300.0
#: ... from at most this many samples (the latest ones).
MAX_SAMPLES = 20_000


class LiveFeed:
    """The ring buffer and the freshness window behind ``GET /live``."""

    def __init__(self, list_topics: Mapping[str, str], clock: Callable[[], float] = time.time) -> None:
        """``list_topics`` maps each list topic to its kind (``Settings.list_topic``)."""
        self.list_topics = dict(list_topics)
        self.clock = clock
        self.changes: deque[dict[str, Any]] = deque(maxlen=MAX_CHANGES)
        self.samples: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (acked at, freshness s)
        self.lists_published: Counter[str] = Counter()
        self.tombstones = 0
        self.changes_seen = 0

    def observe(self, records: Iterable[Outbound], now: float | None = None) -> None:
        """Take a batch of acknowledged records."""
        now = self.clock() if now is None else now
        batch: dict[str | None, dict[str, Any]] = {}
        for record in records:
            kind = self.list_topics.get(record.topic)
            if kind is None:
                continue
            value = record.value
            cause = value.get("caused_by") if value is not None else None
            # A tombstone carries no value: it is the deleted product's own list when it has an event time.
            cause_id = cause.get("product_id") if isinstance(cause, dict) else (
                record.key if record.event_ts is not None else None)
            change = batch.get(cause_id)
            if change is None:
                change = batch[cause_id] = {
                    "product_id": cause_id,
                    "event_ts": cause.get("event_ts") if isinstance(cause, dict) else (
                        iso(record.event_ts) if record.event_ts is not None else None),
                    "published_at": now, "freshness_s": None, "lists": [], "more_lists": 0,
                }
            self.lists_published[kind] += 1
            if value is None:
                self.tombstones += 1
            if record.event_ts is not None:
                fresh = max(0.0, now - record.event_ts)
                self.samples.append((now, fresh))
                change["freshness_s"] = round(fresh, 4)
            if len(change["lists"]) >= MAX_LISTS_PER_CHANGE:
                change["more_lists"] += 1
                continue
            change["lists"].append({
                "kind": kind, "product_id": record.key,
                "version": value.get("version") if value is not None else None,
                "items": len(value.get("items", ())) if value is not None else None,
                "trigger": record.trigger,
            })
        self.changes_seen += sum(1 for c in batch if c is not None)
        self.changes.extend(batch.values())

    def freshness(self, now: float | None = None) -> dict[str, Any]:
        """p50, p99 and max of event time to acknowledged publication, over the last ``WINDOW_S``."""
        now = self.clock() if now is None else now
        while self.samples and self.samples[0][0] < now - WINDOW_S:
            self.samples.popleft()
        values = np.array([s for _at, s in self.samples], dtype=np.float64)
        if not values.size:
            return {"window_s": WINDOW_S, "count": 0, "p50_s": None, "p99_s": None, "max_s": None}
        p50, p99 = np.percentile(values, [50, 99])
        return {"window_s": WINDOW_S, "count": int(values.size), "p50_s": round(float(p50), 4),
                "p99_s": round(float(p99), 4), "max_s": round(float(values.max()), 4)}

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        """The last changes (newest first), freshness and counters."""
        return {
            "changes": list(reversed(self.changes)),
            "freshness": self.freshness(now),
            "counters": {"changes": self.changes_seen, "tombstones": self.tombstones,
                         "lists_published": dict(sorted(self.lists_published.items()))},
        }
