"""Feed rules: exclusions, diversity caps, because, recency, forget, cold start, bounds."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from serving.catalog import Product, UserEvent, UserEventType
from serving.errors import InvalidInput
from serving.feeds import FeedConfig, UserFeeds
from tests.behavior.conftest import MakeEvent


def _p(pid: str, *, stock: bool = True, group: str | None = None, cat: tuple[str, ...] = ()) -> Product:
    return Product(product_id=pid, title=pid, ts=0.0, in_stock=stock, group_id=group, category=cat)


def _catalog(*items: Product) -> dict[str, Product]:
    return {p.product_id: p for p in items}


def _none(_: str) -> Sequence[tuple[str, float]]:
    return []


def test_feed_scores_neighbours_of_history_with_because(ev: MakeEvent) -> None:
    cat = _catalog(_p("a"), _p("b"), _p("c"), _p("d"))
    sim = {"a": [("c", 0.9), ("d", 0.2)], "b": [("d", 0.8)]}
    comp = {"a": [("d", 0.5)]}
    f = UserFeeds()
    f.observe(ev("u", "view", "a", 0))
    f.observe(ev("u", "view", "b", 0))
    feed = f.recommend(
        "u", 0, similar=lambda i: sim.get(i, []), complements=lambda i: comp.get(i, []), products=cat.get
    )
    by = {x.product_id: x for x in feed}
    assert set(by) == {"c", "d"}  # history items a and b excluded
    assert by["d"].score == 1.0 and by["d"].because == ("b", "a")  # 0.8 from b, 0.2 + 0.5 from a
    assert by["c"].because == ("a",)
    assert by["c"].score == pytest.approx(0.9 / 1.5)


def test_purchased_out_of_stock_unknown_excluded(ev: MakeEvent) -> None:
    cat = _catalog(_p("a"), _p("x"), _p("oos", stock=False), _p("ok"))
    f = UserFeeds()
    f.observe(ev("u", "purchase", "x", 0))
    f.observe(ev("u", "view", "a", 1))
    sim = {"a": [("x", 0.9), ("oos", 0.9), ("ghost", 0.9), ("ok", 0.1)]}
    feed = f.recommend("u", 1, similar=lambda i: sim.get(i, []), complements=_none, products=cat.get)
    assert [x.product_id for x in feed] == ["ok"]


def test_event_weight_and_recency_order_candidates(ev: MakeEvent) -> None:
    cat = _catalog(*(_p(i) for i in "abcd"))
    sim = {"a": [("c", 1.0)], "b": [("d", 1.0)]}
    f = UserFeeds(FeedConfig(recency_half_life_s=100))
    f.observe(ev("u", "view", "a", 0))
    f.observe(ev("u", "view", "b", 100))  # newer view wins
    feed = f.recommend("u", 100, similar=lambda i: sim.get(i, []), complements=_none, products=cat.get)
    assert [x.product_id for x in feed] == ["d", "c"]
    f.observe(ev("u", "add_to_cart", "a", 100))  # a cart weighs 3x a view
    feed = f.recommend("u", 100, similar=lambda i: sim.get(i, []), complements=_none, products=cat.get)
    assert [x.product_id for x in feed] == ["c", "d"]


def test_diversity_caps_group_and_leaf_in_top(ev: MakeEvent) -> None:
    items = [_p(f"g{i}", group="G") for i in range(3)] + [_p(f"l{i}", cat=("root", "L")) for i in range(5)]
    cat = _catalog(_p("h"), *items)
    sim = {"h": [(p.product_id, 1.0 - n / 100) for n, p in enumerate(items)]}
    f = UserFeeds(FeedConfig(max_per_group=1, max_per_leaf=2, diversity_top=3))
    f.observe(ev("u", "view", "h", 0))
    feed = [
        x.product_id
        for x in f.recommend("u", 0, similar=lambda i: sim.get(i, []), complements=_none, products=cat.get)
    ]
    assert feed[:3] == ["g0", "l0", "l1"]
    assert sorted(feed) == sorted(p.product_id for p in items)  # capped items follow, not dropped


def test_cold_start_trending_per_category_and_ttl(ev: MakeEvent) -> None:
    cat = _catalog(_p("a", cat=("shoes",)), _p("b", cat=("hats",)), _p("c", cat=("hats",), stock=False))
    f = UserFeeds(FeedConfig(history_ttl_s=50, trending_half_life_s=10))
    for i in range(3):
        f.observe(ev(f"o{i}", "view", "b", 0))
        f.observe(ev(f"o{i}", "view", "c", 0))
    f.observe(ev("o9", "view", "a", 20))  # fewer but fresher
    new = f.recommend("new", 20, similar=_none, complements=_none, products=cat.get)
    assert [x.product_id for x in new] == ["a", "b"]  # 1 vs 3 * 0.25; c out of stock
    assert new[0].because == ()
    hats = f.recommend("new", 20, similar=_none, complements=_none, products=cat.get, category="hats")
    assert [x.product_id for x in hats] == ["b"]
    # a user whose history expired is treated as cold again
    assert f.history("o0", 100) == []
    assert [
        x.product_id for x in f.recommend("o0", 100, similar=_none, complements=_none, products=cat.get)
    ] == ["a", "b"]


def test_forget_erases_user_state(ev: MakeEvent) -> None:
    cat = _catalog(_p("a"), _p("b"))
    f = UserFeeds()
    f.observe(ev("u", "purchase", "a", 0))
    assert f.forget("u") is True
    assert f.forget("u") is False
    assert f.history("u", 0) == []
    # no purchase memory left: the user is cold and sees trending, "a" included
    assert [
        x.product_id for x in f.recommend("u", 0, similar=_none, complements=_none, products=cat.get)
    ] == ["a"]
    f.observe(UserEvent("v", UserEventType.VIEW, 0, "b"))
    f.observe(UserEvent("v", UserEventType.FORGET, 1))
    assert f.size()["users"] == 0
    with pytest.raises(InvalidInput):
        f.observe(ev("u", "view", None, 0))


def test_state_bounded_by_settings() -> None:
    cfg = FeedConfig(history_len=3, max_users=10, max_trending=20, max_purchased=2)
    f = UserFeeds(cfg)
    for j in range(5000):
        f.observe(UserEvent(f"u{j % 37}", UserEventType.PURCHASE, float(j), f"p{j % 101}"))
    s = f.size()
    assert s["users"] <= 10 and s["history"] <= 30 and s["purchased"] <= 20 and s["trending"] <= 20
