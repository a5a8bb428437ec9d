"""User events in the stream: behaviour pairs repartitioned by item, debounced list updates,
and real-time user feeds. Thin glue around ``serving.behavior`` and ``serving.feeds``.

Flow (DESIGN.md, "Scale-out"):

* ``user-events`` (partitioned by user): each event is sessionized on the user's owner
  (``BehaviorModel.observe``) and becomes pair updates, written to the internal topic
  ``simstream-pair-updates`` keyed by *item*, so the owner of an item holds that item's row.
  The same event updates the user's history and republishes their feed.
* ``simstream-pair-updates`` (partitioned by item): ``apply_pair`` on the item's owner marks
  the item dirty. A timer publishes dirty items at most once per debounce interval each: the
  behaviour row goes to ``Recommender.apply_behavior``, which returns the similar-items,
  substitutes and complements lists that changed. A hot item's last state is always
  published, because the timer keeps running until nothing is dirty.
* A product going out of stock or deleted republishes the feeds that listed it.

Count updates (``partner == item``) are the item's own occurrence count, which every row's
normaliser reads; they travel on the same topic keyed by the item. With one worker that is
all it needs. With several workers a row's normaliser also reads its partners' counts, which
live on their owners: they are then approximated by the counts this worker has seen (noted
in the README under scale-out).

Privacy: user ids never reach a log line (``Edge.reject`` keeps user-event reasons on the
dead-letter topic only), and ``forget`` erases the user's sessions and history and publishes
a tombstone for their feed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from serving.behavior import CHANNELS, BehaviorConfig, BehaviorModel, PairUpdate
from serving.catalog import UserEventType
from serving.errors import InvalidInput
from serving.feeds import FeedConfig, FeedItem, UserFeeds
from serving.recommender import BehaviorRow, Publication, Recommender
from streams.edge import Edge
from streams.outputs import Inbound, Outbound
from streams.records import MAX_FUTURE_S, MIN_TS, iso
from streams.settings import Settings

log = logging.getLogger(__name__)

#: Behaviour rows handed to the core per step of a flush. A row costs about a millisecond of
#: core time (three lists rebuilt); between steps the event loop serves user events, so a
#: flush of hundreds of hot items never holds feeds back for more than one step.
FLUSH_CHUNK = 16


def behavior_config(settings: Settings) -> BehaviorConfig:
    """The behaviour model's bounds and weights, from the settings."""
    return BehaviorConfig(
        session_gap_s=settings.session_gap_s,
        half_life_s=settings.behavior_half_life_s,
        top_n=settings.behavior_top_n,
        max_items=settings.behavior_max_items,
        max_sessions=settings.behavior_max_sessions,
    )


def feed_config(settings: Settings) -> FeedConfig:
    """The feeds' bounds and diversity caps, from the settings."""
    return FeedConfig(
        history_len=settings.feed_history_len,
        history_ttl_s=settings.feed_history_ttl_s,
        max_per_group=settings.feed_max_per_group,
        max_per_leaf=settings.feed_max_per_leaf,
        max_users=settings.feed_max_users,
    )


def pairs_to_wire(item: str, updates: Iterable[PairUpdate]) -> dict[str, Any]:
    """One ``simstream-pair-updates`` value: every update of one item's row from a batch of
    events (one record per item, not per pair: the records are most of the worker's traffic)."""
    return {"item": item, "updates": [[u.partner, u.channel, u.weight, u.ts] for u in updates]}


def pairs_from_wire(raw: bytes | None, now: float | None = None,
                    config: BehaviorConfig | None = None) -> list[PairUpdate]:
    """Decode one ``simstream-pair-updates`` value; ``InvalidInput`` when it is not one.

    The topic is internal, but anything may write to it, and one bad update would poison a
    row for good (an infinite weight, or a ``ts`` far ahead that stops decay): so a weight
    must lie in (0, the channel's event weight, or 1 for a count] and a ``ts`` follow the
    user-event rule (2000-01-01 to 24 hours ahead of ``now``).
    """
    try:
        obj = json.loads(raw or b"")
        item = str(obj["item"])
        updates = [PairUpdate(item, str(p), str(c), float(w), float(t)) for p, c, w, t in obj["updates"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"not a pair update ({type(exc).__name__}: {exc})") from exc
    if not item:
        raise InvalidInput("not a pair update: empty item")
    now = time.time() if now is None else now
    config = config or BehaviorConfig()
    for u in updates:
        if u.channel not in CHANNELS or not u.partner:
            raise InvalidInput(f"not a pair update: channel {u.channel!r}")
        cap = max(1.0, config.channel_weight(u.channel))  # a count update weighs 1
        if not 0.0 < u.weight <= cap:  # NaN fails too
            raise InvalidInput(f"pair update of {item!r}: weight {u.weight!r} outside (0, {cap}]")
        if not MIN_TS <= u.ts <= now + MAX_FUTURE_S:
            raise InvalidInput(f"pair update of {item!r}: ts {u.ts!r} outside 2000-01-01 to 24 hours ahead")
    return updates


def feed_to_wire(user_id: str, items: Iterable[FeedItem], at: float) -> dict[str, Any]:
    """The ``user-recommendations`` value (DESIGN.md)."""
    return {
        "user_id": user_id,
        "items": [{"product_id": i.product_id, "score": i.score, "because": list(i.because)} for i in items],
        "updated_at": iso(at),
    }


@dataclass
class BehaviorPipeline(Edge):
    """``user-events`` and ``simstream-pair-updates`` (see the module docstring)."""

    #: The live core (a rollover or a rebuild swaps it, so it is asked for each time).
    core: Callable[[], Recommender] = field(default=lambda: _no_core())
    model: BehaviorModel = field(init=False)
    feeds: UserFeeds = field(init=False)
    #: item -> monotonic time it became dirty (insertion order = first dirty first)
    dirty: dict[str, float] = field(default_factory=dict)
    #: item -> monotonic time its row was last published (debounce)
    last_flush: dict[str, float] = field(default_factory=dict)
    #: product -> users whose last published feed lists it (bounded by users x feed_k)
    listed_in: dict[str, set[str]] = field(default_factory=dict)
    feed_of: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model = BehaviorModel(behavior_config(self.settings))
        self.feeds = UserFeeds(feed_config(self.settings))

    # ------------------------------------------------------------------ user side
    def handle_batch(self, messages: Iterable[Inbound]) -> list[Outbound]:
        """User events in order: their pair updates grouped into one record per item, then
        each event's feed (and dead letters, tombstones)."""
        by_item: dict[str, list[PairUpdate]] = {}
        out: list[Outbound] = []
        for message in messages:
            records, updates = self._handle(message)
            out += records
            for u in updates:
                by_item.setdefault(u.item, []).append(u)
        pairs = [Outbound(self.settings.topic_pair_updates, item, pairs_to_wire(item, ups)) for item, ups in by_item.items()]
        return pairs + out

    def handle(self, message: Inbound) -> list[Outbound]:
        """One user event: pair updates for the item owners, and the user's new feed."""
        return self.handle_batch([message])

    def _handle(self, message: Inbound) -> tuple[list[Outbound], list[PairUpdate]]:
        try:
            event = self.decode_user(message).to_core()
            updates = self.model.observe(event)
            self.feeds.observe(event)
        except Exception as exc:  # noqa: BLE001 - one bad event must never stop the stream
            return [self.reject(message, exc)], []
        self.metrics.events.labels(message.topic, "accepted").inc()
        if event.type is UserEventType.FORGET:
            self._unlist(event.user_id)
            self.metrics.forgotten_users.inc()
            return [Outbound(self.settings.topic_user_recommendations, event.user_id, None)], []
        if event.product_id is not None and self.core().catalog.get(event.product_id) is None:
            # Counted, and harmless: lists and feeds only ever name products in the catalog.
            self.metrics.unknown_product_events.inc()
        return [self.feed_record(event.user_id, event.ts)], updates

    def recommend(
        self, user_id: str, now: float | None = None, k: int | None = None, category: str | None = None
    ) -> list[FeedItem]:
        """The user's feed now, from the current lists and catalog (cold start: trending,
        within ``category`` when given)."""
        core = self.core()

        def similar(pid: str) -> list[tuple[str, float]]:
            return [(i.product_id, i.score) for i in core.similar(pid) or ()]

        def complements(pid: str) -> list[tuple[str, float]]:
            return [(i.product_id, i.score) for i in core.complements(pid) or ()]

        return self.feeds.recommend(
            user_id, time.time() if now is None else now, similar=similar, complements=complements,
            products=core.catalog.get, k=k or self.settings.feed_k, category=category,
        )

    def feed_record(self, user_id: str, now: float) -> Outbound:
        items = self.recommend(user_id, now)
        self._unlist(user_id)
        listed = tuple(i.product_id for i in items)
        self.feed_of[user_id] = listed
        for pid in listed:
            self.listed_in.setdefault(pid, set()).add(user_id)
        while len(self.feed_of) > self.feeds.config.max_users:  # the least recently updated go first
            self._unlist(next(iter(self.feed_of)))
        return Outbound(self.settings.topic_user_recommendations, user_id, feed_to_wire(user_id, items, self.clock()))

    def _unlist(self, user_id: str) -> None:
        for pid in self.feed_of.pop(user_id, ()):
            users = self.listed_in.get(pid)
            if users is not None:
                users.discard(user_id)
                if not users:
                    del self.listed_in[pid]

    def feeds_without(self, gone: Iterable[str]) -> list[Outbound]:
        """Fresh feeds of the users whose feed lists a product in ``gone`` (out of stock or
        deleted; with several workers, also products another worker owns)."""
        users = sorted({u for pid in gone for u in self.listed_in.get(pid, ())})
        now = time.time()
        return [self.feed_record(u, now) for u in users]

    # ------------------------------------------------------------------ item side
    def apply_pairs(self, messages: Iterable[Inbound]) -> list[Outbound]:
        """Apply pair updates on the item owner and mark the items dirty; dead-letter bad ones."""
        out: list[Outbound] = []
        now = time.monotonic()
        for message in messages:
            try:
                updates = pairs_from_wire(message.value, config=self.model.config)
                if updates and message.key is not None and message.key.decode(errors="replace") != updates[0].item:
                    # Keyed by another item, it would sit on that item's owner (scale-out).
                    raise InvalidInput("pair update keyed by another item than its own")
                for update in updates:
                    self.model.apply_pair(update)
            except Exception as exc:  # noqa: BLE001
                out.append(self.reject(message, exc))
                continue
            for update in updates:
                self.dirty.setdefault(update.item, now)
        return out

    def due(self, now: float | None = None, limit: int | None = None) -> dict[str, BehaviorRow]:
        """Rows of the dirty items whose debounce interval has passed (at most ``limit``, the
        longest dirty first); they stop being dirty."""
        now = time.monotonic() if now is None else now
        interval = self.settings.behavior_debounce_ms / 1000.0
        ready = list(islice((i for i in self.dirty if now - self.last_flush.get(i, -1e18) >= interval), limit))
        rows: dict[str, BehaviorRow] = {}
        for item in ready:
            del self.dirty[item]
            self.last_flush[item] = now
            rows[item] = BehaviorRow.from_model(self.model, item, self.settings.behavior_top_n)
        # Forget flush times older than the interval: they no longer hold anything back.
        if len(self.last_flush) > 4 * max(1, len(self.dirty)) + 1024:
            self.last_flush = {i: t for i, t in self.last_flush.items() if now - t < interval}
        return rows

    # ------------------------------------------------------------------ rebalances
    def keep_only(self, user_kept: Callable[[str], bool], item_kept: Callable[[str], bool]) -> None:
        """Drop the state of users and items this worker no longer holds, or is about to
        rebuild from the topics (``replay``): sessions, histories, rows, dirty marks."""
        self.model.drop_users(lambda u: not user_kept(u))
        for user_id in self.feeds.drop_users(lambda u: not user_kept(u)):
            self._unlist(user_id)
        self.model.drop_items(lambda i: not item_kept(i))
        for item in [i for i in self.dirty if not item_kept(i)]:
            del self.dirty[item]

    def replay(self, user_events: Iterable[Inbound], pair_updates: Iterable[Inbound]) -> set[str]:
        """Rebuild what a rebalance handed over, publishing nothing: sessions and histories
        from the gained users' events, rows from the gained items' pair updates (records
        the previous owner already applied and published, or dead-lettered). Returns the
        items whose rows were rebuilt."""
        for message in user_events:
            try:
                event = self.decode_user(message).to_core()
                self.model.observe(event)  # its pair updates were written by the previous owner
                self.feeds.observe(event)
            except Exception:  # noqa: BLE001 - dead-lettered when it was first consumed
                continue
        items: set[str] = set()
        for message in pair_updates:
            try:
                updates = pairs_from_wire(message.value, config=self.model.config)
            except InvalidInput:
                continue
            if updates and message.key is not None and message.key.decode(errors="replace") != updates[0].item:
                continue
            for update in updates:
                self.model.apply_pair(update)
                items.add(update.item)
        return items

    def rows_of(self, items: Iterable[str]) -> dict[str, BehaviorRow]:
        """The current behaviour rows of ``items``."""
        return {i: BehaviorRow.from_model(self.model, i, self.settings.behavior_top_n) for i in items}

    def publish_rows(self, rows: dict[str, BehaviorRow]) -> list[Publication]:
        """Hand rows to the core (call it where the core is applied, between batches)."""
        return self.core().apply_behavior(rows) if rows else []


def _no_core() -> Recommender:
    raise RuntimeError("BehaviorPipeline needs the worker's live core (core=lambda: engine.core)")
