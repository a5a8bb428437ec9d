"""Behaviour signals: sessions, decayed item co-occurrence, normalised pair scores.

Pure and deterministic given its inputs (no clocks, no I/O, no logging of user ids).

Flow, split so that the streams layer can repartition by item id:

* ``observe(event)`` runs on the partition that owns the *user*: it sessionizes the event
  (by ``session_id`` when given, else by user with an inactivity gap) and returns the
  ``PairUpdate`` list the event causes. Nothing about items is stored there.
* ``apply_pair(update)`` runs on the partition that owns ``update.item``. An update with
  ``partner == item`` is a *count* update (the item's own occurrence ``n(item)``); the
  normaliser needs ``n`` of both ends, so the streams layer must deliver count updates to
  every owner (one per event, cheap). Pair updates go to the owner of ``item`` only.
* ``ingest(event)`` = ``observe`` + ``apply_pair`` of every update, the single-process run.
* ``BehaviorRow.from_model(model, item, k)``: what the recommender takes from the model for
  one owned item (its partners, and its complements from co-cart and co-purchase).

Normalisation (documented formula, per channel)::

    sim(a, b) = c(a, b) / sqrt(n(a) * n(b))  *  c(a, b) / (c(a, b) + shrink)

a cosine over sessions, damped for pairs seen only a few times, so that popular items do not
dominate. ``c`` and ``n`` are exponentially decayed with ``half_life_s`` using a lazy-decay
cell ``(value, ref_ts)``: an update decays the stored value to the new time and adds, O(1).
Channel ``"all"`` blends channels by the event-type weights and is clipped to ``[0, 1]``.

Memory is bounded by the settings, not by the number of events: at most ``max_items`` rows
(least recently touched evicted), each with at most ``2 * top_n`` partners between prunings
(pruned to ``top_n`` and below ``min_count``), at most ``max_sessions`` open sessions each
holding at most ``max_events_per_session`` items.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from serving.catalog import UserEvent, UserEventType
from serving.errors import InvalidInput

CHANNELS = ("view", "cart", "purchase")
_CHANNEL_OF = {
    UserEventType.VIEW: "view",
    UserEventType.ADD_TO_CART: "cart",
    UserEventType.PURCHASE: "purchase",
}


@dataclass(frozen=True)
class BehaviorConfig:
    """Settings of the behaviour model; every memory bound lives here."""

    session_gap_s: float = 30 * 60.0
    half_life_s: float = 7 * 86400.0
    view_weight: float = 1.0
    cart_weight: float = 3.0
    purchase_weight: float = 5.0
    top_n: int = 100
    min_count: float = 0.05
    max_events_per_session: int = 50
    max_items: int = 200_000
    max_sessions: int = 100_000
    shrink: float = 1.0
    #: pairs ``d`` positions apart in a session count ``1 / d**distance_power`` (0: flat).
    distance_power: float = 1.0

    def __post_init__(self) -> None:
        if self.session_gap_s <= 0 or self.half_life_s <= 0:
            raise InvalidInput("session_gap_s and half_life_s must be > 0")
        if min(self.top_n, self.max_events_per_session, self.max_items, self.max_sessions) < 1:
            raise InvalidInput("top_n and the max_* bounds must be >= 1")
        if self.shrink < 0 or self.min_count < 0 or self.distance_power < 0:
            raise InvalidInput("shrink, min_count and distance_power must be >= 0")

    def channel_weight(self, channel: str) -> float:
        """The event-type weight of one channel."""
        return {"view": self.view_weight, "cart": self.cart_weight, "purchase": self.purchase_weight}[channel]


@dataclass(frozen=True, slots=True)
class PairUpdate:
    """One decayed increment for row ``item``; ``partner == item`` means a count update."""

    item: str
    partner: str
    channel: str
    weight: float
    ts: float

    @property
    def is_count(self) -> bool:
        """Whether this updates ``n(item)`` rather than ``c(item, partner)``."""
        return self.item == self.partner


@dataclass(slots=True)
class _Cell:
    value: float
    ts: float

    def at(self, ts: float, half_life: float) -> float:
        # later-only decay: an out-of-order older update does not inflate the value
        return self.value * (0.5 ** (max(0.0, ts - self.ts) / half_life))

    def add(self, w: float, ts: float, half_life: float) -> None:
        if ts >= self.ts:
            self.value = self.at(ts, half_life) + w
            self.ts = ts
        else:
            self.value += w * (0.5 ** ((self.ts - ts) / half_life))


@dataclass(slots=True)
class _Session:
    last_ts: float
    items: dict[str, list[str]] = field(default_factory=dict)  # channel -> ordered items


class BehaviorModel:
    """Sessionizer plus per-item decayed co-occurrence rows (see module docstring)."""

    def __init__(self, config: BehaviorConfig | None = None) -> None:
        self.config = config or BehaviorConfig()
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()
        self._user_sessions: dict[str, set[tuple[str, str]]] = {}
        # (channel, item) -> partner -> cell
        self._rows: OrderedDict[tuple[str, str], dict[str, _Cell]] = OrderedDict()
        self._counts: OrderedDict[tuple[str, str], _Cell] = OrderedDict()
        self._now = 0.0

    # --- user side ------------------------------------------------------------------------
    def _session_for(self, ev: UserEvent) -> _Session:
        cfg = self.config
        key = (ev.user_id, ev.session_id) if ev.session_id is not None else (ev.user_id, "")
        s = self._sessions.get(key)
        if s is None or (ev.session_id is None and ev.ts - s.last_ts > cfg.session_gap_s):
            s = _Session(last_ts=ev.ts)
            self._sessions[key] = s
            self._user_sessions.setdefault(ev.user_id, set()).add(key)
        self._sessions.move_to_end(key)
        s.last_ts = max(s.last_ts, ev.ts)
        while len(self._sessions) > cfg.max_sessions:
            (uid, sid), _ = self._sessions.popitem(last=False)
            keys = self._user_sessions.get(uid)
            if keys is not None:
                keys.discard((uid, sid))
                if not keys:
                    del self._user_sessions[uid]
        return s

    def observe(self, event: UserEvent) -> list[PairUpdate]:
        """Sessionize one event and return the pair and count updates it causes.

        A repeat of an item already in the session's channel adds nothing; ``remove_from_cart``
        takes the item out of the session's cart so later cart items do not pair with it;
        ``forget`` drops the user's open sessions. Updates come in a deterministic order.
        """
        cfg = self.config
        if event.type is UserEventType.FORGET:
            self.forget_user(event.user_id)
            return []
        if not event.product_id:
            raise InvalidInput(f"{event.type} event without product_id")
        if not math.isfinite(event.ts):
            raise InvalidInput("event ts must be finite")
        self._now = max(self._now, event.ts)
        s = self._session_for(event)
        item = event.product_id
        if event.type is UserEventType.REMOVE_FROM_CART:
            cart = s.items.get("cart")
            if cart and item in cart:
                cart.remove(item)
            return []
        channel = _CHANNEL_OF[event.type]
        seq = s.items.setdefault(channel, [])
        if item in seq:
            return []
        out = [PairUpdate(item, item, channel, 1.0, event.ts)]
        for d, other in enumerate(reversed(seq), start=1):
            w = 1.0 / d**cfg.distance_power
            out.append(PairUpdate(item, other, channel, w, event.ts))
            out.append(PairUpdate(other, item, channel, w, event.ts))
        seq.append(item)
        if len(seq) > cfg.max_events_per_session:
            del seq[0]
        return out

    def forget_user(self, user_id: str) -> bool:
        """Drop the user's open sessions; aggregate counts hold no user ids. True if any."""
        keys = self._user_sessions.pop(user_id, set())
        for k in keys:
            self._sessions.pop(k, None)
        return bool(keys)

    def drop_users(self, drop: Callable[[str], bool]) -> int:
        """Forget the open sessions of every user ``drop`` accepts (a rebalance moved them
        to another worker); returns how many users."""
        users = [u for u in self._user_sessions if drop(u)]
        for user_id in users:
            self.forget_user(user_id)
        return len(users)

    # --- item side ------------------------------------------------------------------------
    def drop_items(self, drop: Callable[[str], bool]) -> int:
        """Forget the rows and counts of every item ``drop`` accepts (another worker owns
        them now); returns how many rows and counts went."""
        rows = [key for key in self._rows if drop(key[1])]
        counts = [key for key in self._counts if drop(key[1])]
        for key in rows:
            del self._rows[key]
        for key in counts:
            del self._counts[key]
        return len(rows) + len(counts)

    def items(self) -> set[str]:
        """Every item with a row or a count here."""
        return {item for _, item in self._rows} | {item for _, item in self._counts}

    def apply_pair(self, update: PairUpdate) -> None:
        """Apply one update on the owner of ``update.item`` (O(1) amortised)."""
        cfg = self.config
        hl = cfg.half_life_s
        self._now = max(self._now, update.ts)
        key = (update.channel, update.item)
        if update.is_count:
            cell = self._counts.get(key)
            if cell is None:
                self._counts[key] = _Cell(update.weight, update.ts)
            else:
                cell.add(update.weight, update.ts, hl)
            self._counts.move_to_end(key)
            while len(self._counts) > cfg.max_items * len(CHANNELS):
                self._counts.popitem(last=False)
            return
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = {}
        self._rows.move_to_end(key)
        cell = row.get(update.partner)
        if cell is None:
            row[update.partner] = _Cell(update.weight, update.ts)
        else:
            cell.add(update.weight, update.ts, hl)
        if len(row) > 2 * cfg.top_n:
            self._prune(row, update.ts)
        while len(self._rows) > cfg.max_items * len(CHANNELS):
            self._rows.popitem(last=False)

    def _prune(self, row: dict[str, _Cell], ts: float) -> None:
        cfg = self.config
        hl = cfg.half_life_s
        ranked = sorted(row.items(), key=lambda kv: (-kv[1].at(ts, hl), kv[0]))
        keep = [(p, c) for p, c in ranked[: cfg.top_n] if c.at(ts, hl) >= cfg.min_count]
        row.clear()
        row.update(keep)

    def ingest(self, event: UserEvent) -> list[PairUpdate]:
        """Single-process run: ``observe`` then ``apply_pair`` every update it returns."""
        updates = self.observe(event)
        for u in updates:
            self.apply_pair(u)
        return updates

    def ingest_all(self, events: Iterable[UserEvent]) -> None:
        """``ingest`` each event in order."""
        for ev in events:
            self.ingest(ev)

    # --- reads ----------------------------------------------------------------------------
    def count(self, item: str, channel: str, now: float | None = None) -> float:
        """Decayed ``n(item)`` in one channel."""
        cell = self._counts.get((channel, item))
        return 0.0 if cell is None else cell.at(self._now if now is None else now, self.config.half_life_s)

    def raw(self, a: str, b: str, channel: str, now: float | None = None) -> float:
        """Decayed co-occurrence ``c(a, b)`` in one channel (0 if pruned or unseen)."""
        row = self._rows.get((channel, a))
        cell = None if row is None else row.get(b)
        return 0.0 if cell is None else cell.at(self._now if now is None else now, self.config.half_life_s)

    def _sim(self, a: str, b: str, c: float, channel: str, now: float) -> float:
        if c <= 0:
            return 0.0
        na, nb = self.count(a, channel, now), self.count(b, channel, now)
        denom = math.sqrt(max(na, c) * max(nb, c))
        return min(1.0, c / denom) * c / (c + self.config.shrink)

    def partners(
        self, item: str, channel: str = "all", k: int = 20, now: float | None = None
    ) -> list[tuple[str, float]]:
        """Top-``k`` partners of ``item`` by normalised score, ties broken by id."""
        t = self._now if now is None else now
        chans = CHANNELS if channel == "all" else (channel,)
        if channel != "all" and channel not in CHANNELS:
            raise InvalidInput(f"unknown channel {channel!r}; use one of {CHANNELS} or 'all'")
        hl = self.config.half_life_s
        scores: dict[str, float] = {}
        for ch in chans:
            row = self._rows.get((ch, item))
            if not row:
                continue
            w = self.config.channel_weight(ch) if channel == "all" else 1.0
            for p, cell in row.items():
                s = self._sim(item, p, cell.at(t, hl), ch, t)
                if s > 0:
                    scores[p] = scores.get(p, 0.0) + w * s
        if channel == "all":
            total = sum(self.config.channel_weight(ch) for ch in CHANNELS)
            scores = {p: min(1.0, s / total * len(CHANNELS)) for p, s in scores.items()}
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]

    def score(self, a: str, b: str, now: float | None = None) -> float:
        """Normalised behaviour score of the pair in ``[0, 1]`` (channel ``"all"``)."""
        t = self._now if now is None else now
        total = 0.0
        for ch in CHANNELS:
            total += self.config.channel_weight(ch) * self._sim(a, b, self.raw(a, b, ch, t), ch, t)
        wsum = sum(self.config.channel_weight(ch) for ch in CHANNELS)
        return min(1.0, total / wsum * len(CHANNELS))

    def size(self) -> dict[str, int]:
        """State size, for boundedness checks and metrics."""
        return {
            "rows": len(self._rows),
            "cells": sum(len(r) for r in self._rows.values()),
            "counts": len(self._counts),
            "sessions": len(self._sessions),
            "session_items": sum(len(v) for s in self._sessions.values() for v in s.items.values()),
        }


#: The channels whose partners make an item's complements (bought or carted together).
COMPLEMENT_CHANNELS = ("cart", "purchase")


@dataclass(frozen=True, slots=True)
class BehaviorRow:
    """One owned item's behaviour partners, as the stream last computed them.

    ``partners``: (id, score in [0, 1]) over every channel (co-view, co-cart, co-purchase),
    which feeds the ``behavior`` part of similar-items and substitutes. ``complements``:
    (id, score in [0, 1]) over co-cart and co-purchase only, which makes the complements
    list. The recommender stores rows as given, so its lists are a deterministic function
    of catalog, vectors and rows (the behaviour model's clock never leaks in).
    """

    partners: tuple[tuple[str, float], ...] = ()
    complements: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_model(cls, model: BehaviorModel, item: str, k: int) -> BehaviorRow:
        """The row of ``item`` now: top-``k`` partners, and top-``k`` complements.

        A complement's score is the event-weighted mean of its co-cart and co-purchase
        scores, so a pair bought together outranks one only carted together.
        """
        cfg = model.config
        weights = {ch: cfg.channel_weight(ch) for ch in COMPLEMENT_CHANNELS}
        total = sum(weights.values())
        mixed: dict[str, float] = {}
        for ch, w in weights.items():
            for other, score in model.partners(item, ch, k):
                mixed[other] = mixed.get(other, 0.0) + w * score
        complements = sorted(((o, min(1.0, s / total)) for o, s in mixed.items()), key=lambda t: (-t[1], t[0]))
        return cls(partners=tuple(model.partners(item, "all", k)), complements=tuple(complements[:k]))

    def names(self) -> set[str]:
        """Every product the row mentions."""
        return {c for c, _s in self.partners} | {c for c, _s in self.complements}

    def validate(self, owner: str) -> None:
        """Raise ``InvalidInput`` for a row no behaviour model could have produced."""
        for label, pairs in (("partners", self.partners), ("complements", self.complements)):
            for other, score in pairs:
                if not isinstance(other, str) or not other:
                    raise InvalidInput(f"behaviour row of {owner!r}: {label} ids must be non-empty strings")
                if not (isinstance(score, float | int) and math.isfinite(score) and 0.0 <= score <= 1.0):
                    raise InvalidInput(
                        f"behaviour row of {owner!r}: {label} score for {other!r} must be in [0, 1], got {score!r}"
                    )
