"""Real-time user feeds: short per-user history, candidate scoring, filters, cold start.

Pure: the caller supplies neighbour lists and product lookups as callables, so the same code
runs in the stream and in tests. User ids are never logged (this module logs nothing).

Score of a candidate ``c``::

    score(c) = sum over history items h of  w(type_h) * 0.5**(age_h / recency_half_life)
                                             * (similar_weight * sim(h, c) + complement_weight * comp(h, c))

normalised so the best candidate scores 1. ``because`` lists the history items that
contributed, strongest first. Excluded: purchased items, items out of stock or unknown, and
items in the history. Diversity: in the top ``diversity_top`` at most ``max_per_group`` per
``group_id`` and ``max_per_leaf`` per leaf category; capped items drop below, not out.
Cold start (no live history): trending items, counts decayed with ``trending_half_life_s``,
restricted to ``category`` when the caller knows one.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from serving.catalog import Product, UserEvent, UserEventType
from serving.errors import InvalidInput

Neighbors = Callable[[str], Sequence[tuple[str, float]]]
Lookup = Callable[[str], Product | None]


@dataclass(frozen=True)
class FeedConfig:
    """Settings of user feeds; the memory bounds are ``max_users``, ``history_len`` and ``max_trending``."""

    history_len: int = 20
    history_ttl_s: float = 7 * 86400.0
    recency_half_life_s: float = 86400.0
    view_weight: float = 1.0
    cart_weight: float = 3.0
    purchase_weight: float = 5.0
    similar_weight: float = 1.0
    complement_weight: float = 1.0
    max_per_group: int = 1
    max_per_leaf: int = 3
    diversity_top: int = 10
    max_purchased: int = 200
    max_users: int = 100_000
    max_trending: int = 10_000
    trending_half_life_s: float = 86400.0

    def __post_init__(self) -> None:
        if (
            min(self.history_len, self.max_per_group, self.max_per_leaf, self.max_users, self.max_trending)
            < 1
        ):
            raise InvalidInput("history_len, max_per_*, max_users and max_trending must be >= 1")
        if min(self.history_ttl_s, self.recency_half_life_s, self.trending_half_life_s) <= 0:
            raise InvalidInput("TTL and half-lives must be > 0")

    def weight(self, kind: UserEventType) -> float:
        """Event-type weight of a history entry."""
        if kind is UserEventType.PURCHASE:
            return self.purchase_weight
        if kind is UserEventType.ADD_TO_CART:
            return self.cart_weight
        return self.view_weight


@dataclass(frozen=True, slots=True)
class FeedItem:
    """One recommended product with the history items that produced it."""

    product_id: str
    score: float
    because: tuple[str, ...]


@dataclass(slots=True)
class _User:
    history: deque[tuple[str, UserEventType, float]]
    purchased: OrderedDict[str, None] = field(default_factory=OrderedDict)


class UserFeeds:
    """Per-user histories and a decayed trending counter (see module docstring)."""

    def __init__(self, config: FeedConfig | None = None) -> None:
        self.config = config or FeedConfig()
        self._users: OrderedDict[str, _User] = OrderedDict()
        self._trending: OrderedDict[str, tuple[float, float]] = OrderedDict()  # item -> (value, ts)

    def observe(self, event: UserEvent) -> None:
        """Record one event; ``forget`` erases the user."""
        cfg = self.config
        if event.type is UserEventType.FORGET:
            self.forget(event.user_id)
            return
        if not event.product_id:
            raise InvalidInput(f"{event.type} event without product_id")
        user = self._users.get(event.user_id)
        if user is None:
            user = self._users[event.user_id] = _User(history=deque(maxlen=cfg.history_len))
        self._users.move_to_end(event.user_id)
        while len(self._users) > cfg.max_users:
            self._users.popitem(last=False)
        kind = UserEventType.VIEW if event.type is UserEventType.REMOVE_FROM_CART else event.type
        user.history.append((event.product_id, kind, event.ts))
        if event.type is UserEventType.PURCHASE:
            user.purchased[event.product_id] = None
            user.purchased.move_to_end(event.product_id)
            while len(user.purchased) > cfg.max_purchased:
                user.purchased.popitem(last=False)
        self._bump_trending(event.product_id, cfg.weight(kind), event.ts)

    def _bump_trending(self, item: str, w: float, ts: float) -> None:
        hl = self.config.trending_half_life_s
        v, t = self._trending.get(item, (0.0, ts))
        if ts >= t:
            v, t = v * 0.5 ** ((ts - t) / hl) + w, ts
        else:
            v += w * 0.5 ** ((t - ts) / hl)
        self._trending[item] = (v, t)
        self._trending.move_to_end(item)
        while len(self._trending) > self.config.max_trending:
            self._trending.popitem(last=False)

    def drop_users(self, drop: Callable[[str], bool]) -> list[str]:
        """Drop the history of every user ``drop`` accepts (a rebalance moved them to
        another worker); returns their ids."""
        users = [u for u in self._users if drop(u)]
        for user_id in users:
            del self._users[user_id]
        return users

    def forget(self, user_id: str) -> bool:
        """Erase the user's history and state; True when something was erased."""
        return self._users.pop(user_id, None) is not None

    def history(self, user_id: str, now: float) -> list[tuple[str, UserEventType, float]]:
        """Live (within TTL) history entries, oldest first."""
        user = self._users.get(user_id)
        if user is None:
            return []
        return [h for h in user.history if now - h[2] <= self.config.history_ttl_s]

    def trending(
        self, now: float, products: Lookup, *, category: str | None = None, k: int = 20
    ) -> list[FeedItem]:
        """Time-decayed trending items in stock, within ``category`` when given."""
        hl = self.config.trending_half_life_s
        scored = []
        for item, (v, t) in self._trending.items():
            p = products(item)
            if p is None or not p.in_stock or (category is not None and category not in p.category):
                continue
            scored.append((v * 0.5 ** (max(0.0, now - t) / hl), item))
        scored.sort(key=lambda st: (-st[0], st[1]))
        top = scored[0][0] if scored else 1.0
        return [FeedItem(i, s / top, ()) for s, i in scored[:k]]

    def recommend(
        self,
        user_id: str,
        now: float,
        *,
        similar: Neighbors,
        complements: Neighbors,
        products: Lookup,
        k: int = 20,
        category: str | None = None,
    ) -> list[FeedItem]:
        """The user's feed (see module docstring); trending when there is no live history."""
        cfg = self.config
        hist = self.history(user_id, now)
        if not hist:
            return self.trending(now, products, category=category, k=k)
        user = self._users[user_id]
        excluded = {h[0] for h in hist} | set(user.purchased)
        # the strongest weight per history item: a view then a purchase counts as a purchase
        strength: dict[str, float] = {}
        for item, kind, ts in hist:
            w = cfg.weight(kind) * 0.5 ** (max(0.0, now - ts) / cfg.recency_half_life_s)
            strength[item] = max(strength.get(item, 0.0), w)
        scores: dict[str, float] = {}
        contrib: dict[str, dict[str, float]] = {}
        for h, w in strength.items():
            for source, sw in ((similar, cfg.similar_weight), (complements, cfg.complement_weight)):
                if sw <= 0:
                    continue
                for cand, s in source(h):
                    if cand in excluded or s <= 0:
                        continue
                    add = w * sw * s
                    scores[cand] = scores.get(cand, 0.0) + add
                    by = contrib.setdefault(cand, {})
                    by[h] = by.get(h, 0.0) + add
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        live: list[tuple[str, float, Product]] = []
        for cand, s in ranked:
            p = products(cand)
            if p is not None and p.in_stock:
                live.append((cand, s, p))
        ordered = _diversify(live, cfg)[:k]
        top = ordered[0][1] if ordered else 1.0
        return [
            FeedItem(
                c, s / top, tuple(h for h, _ in sorted(contrib[c].items(), key=lambda kv: (-kv[1], kv[0])))
            )
            for c, s, _ in ordered
        ]

    def size(self) -> dict[str, int]:
        """State size, for boundedness checks and metrics."""
        return {
            "users": len(self._users),
            "history": sum(len(u.history) for u in self._users.values()),
            "purchased": sum(len(u.purchased) for u in self._users.values()),
            "trending": len(self._trending),
        }


def _diversify(ranked: list[tuple[str, float, Product]], cfg: FeedConfig) -> list[tuple[str, float, Product]]:
    """Fill the top ``diversity_top`` respecting the caps; capped items follow, in order."""
    head: list[tuple[str, float, Product]] = []
    tail: list[tuple[str, float, Product]] = []
    groups: dict[str, int] = {}
    leaves: dict[str, int] = {}
    for row in ranked:
        p = row[2]
        g, leaf = p.group_id, p.leaf_category
        ok = (g is None or groups.get(g, 0) < cfg.max_per_group) and (
            leaf is None or leaves.get(leaf, 0) < cfg.max_per_leaf
        )
        if len(head) < cfg.diversity_top and ok:
            head.append(row)
            if g is not None:
                groups[g] = groups.get(g, 0) + 1
            if leaf is not None:
                leaves[leaf] = leaves.get(leaf, 0) + 1
        else:
            tail.append(row)
    return head + tail
