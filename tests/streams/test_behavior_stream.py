"""User events through the behaviour pipeline, without a broker: pairs keyed by item, debounced
rows, complements and behaviour parts in the lists, feeds, forget, privacy in logs."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_engine import NOW, load, make_pipeline, message

from encoders.hashing import HashingEncoder
from serving.behavior import CHANNELS, BehaviorConfig, PairUpdate
from serving.config import RecommenderConfig
from serving.errors import InvalidInput
from serving.index import ExactIndex
from serving.recommender import Recommender
from streams.behavior_stream import BehaviorPipeline, pairs_from_wire, pairs_to_wire
from streams.engine import Engine
from streams.metrics import Metrics
from streams.outputs import Inbound, Outbound
from streams.settings import Settings

USER = "user-7f3a91"


def event(kind: str, product: str | None, ts: float, user: str = USER, **extra: Any) -> Inbound:
    value: dict[str, Any] = {"user_id": user, "type": kind, "ts": ts, **extra}
    if product is not None:
        value["product_id"] = product
    return message(value, key=user, topic="user-events")


def as_inbound(records: list[Outbound], topic: str) -> list[Inbound]:
    out = []
    for i, r in enumerate(records):
        if r.topic == topic:
            key, value = r.encoded()
            out.append(Inbound(topic, 0, i, key, value))
    return out


@pytest.fixture
async def stack() -> tuple[BehaviorPipeline, Engine]:
    settings = Settings(behavior_debounce_ms=1000, behavior_weight=0.5)
    config = RecommenderConfig(k=3, candidate_depth=5, behavior_weight=settings.behavior_weight)
    products = Engine(settings, Metrics(), clock=lambda: NOW,
                               recommender=Recommender(config, ExactIndex(config.dim)), encoder=HashingEncoder())
    await load(products)
    users = BehaviorPipeline(settings, Metrics(), clock=lambda: NOW, core=lambda: products.core)
    return users, products


def shop(users: BehaviorPipeline, steps: list[tuple[str, str]], user: str = USER, t0: float = NOW - 60) -> list[Outbound]:
    out: list[Outbound] = []
    for i, (kind, product) in enumerate(steps):
        out += users.handle(event(kind, product, t0 + i, user=user))
    return out


async def test_pairs_are_keyed_by_item_and_feed_follows_each_event(stack: Any) -> None:
    users, _ = stack
    out = shop(users, [("view", "H1")])
    feeds = [r for r in out if r.topic == "user-recommendations"]
    assert len(feeds) == 1 and feeds[0].key == USER and feeds[0].value is not None
    assert "H1" not in [i["product_id"] for i in feeds[0].value["items"]]  # history is excluded
    out = shop(users, [("view", "H2")], t0=NOW - 50)
    pairs = [r for r in out if r.topic == "simstream-pair-updates"]
    # One record per item whose row changes, keyed by that item: H2's count and pair, H1's pair.
    decoded = {r.key: [(u.item, u.partner) for u in pairs_from_wire(r.encoded()[1])] for r in pairs}
    assert decoded == {"H2": [("H2", "H2"), ("H2", "H1")], "H1": [("H1", "H2")]}


async def test_a_batch_sends_one_pair_record_per_item(stack: Any) -> None:
    users, _ = stack
    batch = [event(kind, product, NOW - 60 + i) for i, (kind, product) in
             enumerate([("view", "H1"), ("view", "H2"), ("view", "H3"), ("add_to_cart", "H2")])]
    out = users.handle_batch(batch)
    keys = [r.key for r in out if r.topic == "simstream-pair-updates"]
    assert sorted(keys) == ["H1", "H2", "H3"]  # not one record per pair
    assert [r.topic for r in out].count("user-recommendations") == 4  # a feed per event


async def test_bought_together_becomes_complements_and_behaviour_parts(stack: Any) -> None:
    users, products = stack
    records: list[Outbound] = []
    for n in range(3):  # three shoppers buy a headphone and a keyboard together
        records += shop(users, [("purchase", "H1"), ("purchase", "K2")], user=f"u{n}", t0=NOW - 60 + 5 * n)
    users.apply_pairs(as_inbound(records, "simstream-pair-updates"))
    assert set(users.dirty) == {"H1", "K2"}
    pubs = users.publish_rows(users.due())
    by_key = {(str(p.kind), p.product_id): p for p in pubs}
    assert [i.product_id for i in by_key[("complements", "H1")].items or ()] == ["K2"]
    assert [i.product_id for i in by_key[("complements", "K2")].items or ()] == ["H1"]
    k2 = next(i for i in products.core.similar("H1") or () if i.product_id == "K2")
    assert k2.behavior > 0  # the keyboard entered the headphone's similar items through behaviour
    wire = products.lists_to_records(pubs)
    assert {r.topic for r in wire} >= {"complements", "similar-items"}


async def test_a_hot_item_republishes_at_most_once_per_interval_and_its_last_state_always(stack: Any) -> None:
    users, _ = stack
    users.apply_pairs(as_inbound(shop(users, [("add_to_cart", "H1"), ("add_to_cart", "K1")]), "simstream-pair-updates"))
    t = 1000.0
    assert set(users.due(now=t)) == {"H1", "K1"}
    users.apply_pairs(as_inbound(shop(users, [("add_to_cart", "K2")], t0=NOW - 30), "simstream-pair-updates"))
    # Within the interval H1 and K1 are held back (K2 was never published, so it goes now)...
    assert set(users.due(now=t + 0.5)) == {"K2"}
    assert {"H1", "K1"} <= set(users.dirty)  # ... but not dropped
    late = users.due(now=t + 1.0)
    assert set(late) == {"H1", "K1"} and not users.dirty
    assert {"K1", "K2"} <= {c for c, _ in late["H1"].complements}  # the final state


async def test_purchased_and_out_of_stock_items_leave_the_feed(stack: Any) -> None:
    users, products = stack
    shop(users, [("view", "H1")])
    feed = [i.product_id for i in users.recommend(USER, NOW)]
    assert "H2" in feed and "H3" in feed
    shop(users, [("purchase", "H2")], t0=NOW - 40)
    assert "H2" not in [i.product_id for i in users.recommend(USER, NOW)]
    out = await products.handle([message({"op": "upsert", "product_id": "H3", "ts": NOW - 5, "in_stock": False},
                                         key="H3", offset=99)])
    assert out.gone == {"H3"}
    refreshed = users.feeds_without(out.gone)
    assert [r.key for r in refreshed] == [USER]
    assert "H3" not in [i["product_id"] for i in (refreshed[0].value or {})["items"]]


async def test_forget_erases_the_user_and_tombstones_the_feed(stack: Any, caplog: pytest.LogCaptureFixture) -> None:
    users, _ = stack
    caplog.set_level(logging.DEBUG)
    shop(users, [("view", "H1"), ("purchase", "H2")])
    assert users.feeds.history(USER, NOW)
    out = users.handle(event("forget", None, NOW))
    assert [(r.topic, r.key, r.value) for r in out] == [("user-recommendations", USER, None)]
    assert users.feeds.history(USER, NOW) == [] and USER not in users.feed_of
    # Bad events of this user are dead-lettered with the reason, and the log names no user.
    bad = users.handle(event("like", "H1", NOW))
    assert bad[0].topic == "simstream-dead-letters" and "unknown event type" in (bad[0].value or {})["error"]
    assert USER not in caplog.text


async def test_events_for_unknown_products_are_counted_and_create_nothing(stack: Any) -> None:
    users, products = stack
    records = shop(users, [("purchase", "ghost-1"), ("purchase", "H1")])
    assert users.metrics.unknown_product_events._value.get() == 1
    users.apply_pairs(as_inbound(records, "simstream-pair-updates"))
    users.publish_rows(users.due())
    assert "ghost-1" not in products.core.catalog
    for kind in ("similar", "complements"):
        for items in products.core.lists(kind).values():  # type: ignore[arg-type]
            assert "ghost-1" not in [i.product_id for i in items]


async def test_a_malformed_pair_update_is_dead_lettered() -> None:
    users = BehaviorPipeline(Settings(), Metrics(), core=lambda: make_pipeline().core)
    out = users.apply_pairs([Inbound("simstream-pair-updates", 0, 1, b"X", b'{"item": "X"}')])
    assert out[0].topic == "simstream-dead-letters" and "not a pair update" in (out[0].value or {})["error"]


async def test_a_new_user_gets_trending_items_within_a_known_category(stack: Any) -> None:
    users, _ = stack
    for n in range(3):
        shop(users, [("purchase", "K1"), ("view", "H1")], user=f"t{n}", t0=NOW - 60 + 5 * n)
    trending = [i.product_id for i in users.recommend("never-seen", NOW)]
    assert trending[:2] == ["K1", "H1"]
    assert [i.product_id for i in users.recommend("never-seen", NOW, category="Audio")] == ["H1"]


async def test_a_flush_step_takes_at_most_limit_rows_longest_dirty_first(stack: Any) -> None:
    users, _ = stack
    users.apply_pairs(as_inbound(shop(users, [("view", p) for p in ("H1", "H2", "H3", "K1", "K2")]),
                                 "simstream-pair-updates"))
    order = list(users.dirty)
    first = users.due(now=1000.0, limit=2)
    assert list(first) == order[:2] and list(users.dirty) == order[2:]
    rest = users.due(now=1000.0, limit=10)
    assert list(rest) == order[2:] and not users.dirty


def raw_pairs(item: str, updates: list[list[Any]]) -> bytes:
    return json.dumps({"item": item, "updates": updates}).encode()


@pytest.mark.parametrize("updates, reason", [
    ([["K1", "view", float("nan"), NOW]], "weight"),
    ([["K1", "view", float("inf"), NOW]], "weight"),
    ([["K1", "cart", 0.0, NOW]], "weight"),
    ([["K1", "view", 2.0, NOW]], "weight"),  # above the view channel's event weight
    ([["K1", "view", 0.5, NOW + 3 * 86400]], "ts"),  # far ahead: decay would stop for good
    ([["K1", "view", 0.5, 1_000]], "ts"),
    ([["K1", "like", 0.5, NOW]], "channel"),
])
def test_pair_updates_that_would_poison_a_row_are_refused(updates: list[list[Any]], reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        pairs_from_wire(raw_pairs("H1", updates), now=NOW)


async def test_a_pair_update_keyed_by_another_item_is_dead_lettered(stack: Any) -> None:
    users, _ = stack
    out = users.apply_pairs([Inbound("simstream-pair-updates", 0, 1, b"K1", raw_pairs("H1", [["K1", "view", 0.5, NOW]]))])
    assert "keyed by another item" in (out[0].value or {})["error"] and not users.dirty


ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
pair_updates = st.builds(
    lambda item, rows: [PairUpdate(item, partner, ch, w, ts) for partner, ch, w, ts in rows],
    ids,
    st.lists(st.tuples(ids, st.sampled_from(CHANNELS), st.floats(0.001, 1.0), st.floats(NOW - 1e8, NOW)), max_size=6),
)


@given(pair_updates)
def test_pair_updates_survive_the_wire(updates: list[PairUpdate]) -> None:
    if not updates:
        return
    raw = json.dumps(pairs_to_wire(updates[0].item, updates)).encode()
    assert pairs_from_wire(raw, now=NOW, config=BehaviorConfig()) == updates


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.sampled_from(["item", "updates", "x"]), children),
    max_leaves=20,
)


@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_are_pair_updates_or_refused_never_a_crash(raw: bytes) -> None:
    try:
        updates = pairs_from_wire(raw, now=NOW)
    except InvalidInput:
        return
    for u in updates:
        assert u.channel in CHANNELS and math.isfinite(u.weight) and u.weight > 0 and math.isfinite(u.ts)


# ---------------------------------------------------------------------- rebalances


async def test_a_new_owner_rebuilds_the_same_behaviour_state_from_the_topics(stack: Any) -> None:
    """Handover (DESIGN.md, "Scale-out"): what the old owner built from the stream, the new one
    rebuilds by replaying the same user events and pair-update records, and publishes nothing."""
    users, products = stack
    steps = [("view", "H1"), ("view", "H2"), ("add_to_cart", "H2"), ("add_to_cart", "C1"), ("purchase", "H2"),
             ("view", "K1"), ("view", "H3")]
    shoppers = ["user-a", "user-b", "user-c"]
    user_events: list[Inbound] = []
    pair_records: list[Outbound] = []
    for n, user in enumerate(shoppers):
        for i, (kind, product) in enumerate(steps[n:] + steps[:n]):
            inbound = event(kind, product, NOW - 300 + 10 * i + n, user=user)
            user_events.append(inbound)
            out = users.handle(inbound)
            pair_records += [r for r in out if r.topic == "simstream-pair-updates"]
    pair_updates = as_inbound(pair_records, "simstream-pair-updates")
    users.apply_pairs(pair_updates)

    heir = BehaviorPipeline(users.settings, Metrics(), clock=lambda: NOW, core=lambda: products.core)
    items = heir.replay(user_events, pair_updates)
    assert items == users.model.items()
    assert heir.rows_of(sorted(items)) == users.rows_of(sorted(items))
    for user in shoppers:
        assert heir.recommend(user, NOW) == users.recommend(user, NOW)
        assert heir.feeds.history(user, NOW) == users.feeds.history(user, NOW)
    assert not heir.dirty  # a replay publishes nothing by itself

    # Their next event pairs with the replayed session, exactly as on the old owner.
    nxt = event("add_to_cart", "H3", NOW - 10, user="user-a")
    assert [r.value for r in heir.handle(nxt)] == [r.value for r in users.handle(nxt)]


async def test_keep_only_drops_the_state_of_users_and_items_that_moved_away(stack: Any) -> None:
    users, _ = stack
    for user in ("user-a", "user-b"):
        out = shop(users, [("view", "H1"), ("view", "H2")], user=user)
        users.apply_pairs(as_inbound(out, "simstream-pair-updates"))
    assert users.dirty and users.model.items() == {"H1", "H2"}
    users.keep_only(lambda u: u == "user-a", lambda i: i == "H1")
    assert users.model.items() == {"H1"} and set(users.dirty) == {"H1"}
    assert users.feeds.history("user-b", NOW) == [] and users.feeds.history("user-a", NOW)
    assert "user-b" not in users.feed_of
    assert all("user-b" not in listed for listed in users.listed_in.values())
