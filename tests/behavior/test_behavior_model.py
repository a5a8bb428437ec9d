"""Unit and property tests of sessions, decayed co-occurrence, pruning and normalisation."""

from __future__ import annotations

import math
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.behavior import BehaviorConfig, BehaviorModel, PairUpdate
from serving.catalog import UserEvent, UserEventType
from serving.errors import InvalidInput
from tests.behavior.conftest import MakeEvent

DAY = 86400.0


def test_pairs_counted_within_session_only(ev: MakeEvent) -> None:
    m = BehaviorModel(BehaviorConfig(distance_power=0.0))
    m.ingest_all(
        [ev("u", "view", "a", 0, "s1"), ev("u", "view", "b", 1, "s1"), ev("u", "view", "c", 2, "s2")]
    )
    assert m.raw("a", "b", "view", now=1) == pytest.approx(1.0)
    assert m.raw("b", "a", "view", now=1) == pytest.approx(1.0)
    assert m.raw("a", "c", "view") == 0.0
    assert m.count("a", "view", now=0) == pytest.approx(1.0)


def test_inactivity_gap_splits_sessions_without_session_id(ev: MakeEvent) -> None:
    m = BehaviorModel(BehaviorConfig(session_gap_s=60))
    m.ingest_all([ev("u", "view", "a", 0), ev("u", "view", "b", 30), ev("u", "view", "c", 200)])
    assert m.raw("a", "b", "view") > 0
    assert m.raw("b", "c", "view") == 0.0


def test_channels_are_separate_and_repeats_not_recounted(ev: MakeEvent) -> None:
    m = BehaviorModel()
    m.ingest_all(
        [
            ev("u", "add_to_cart", "a", 0, "s"),
            ev("u", "add_to_cart", "b", 1, "s"),
            ev("u", "view", "a", 2, "s"),
            ev("u", "view", "a", 3, "s"),
        ]
    )
    assert m.raw("a", "b", "cart", now=1) == pytest.approx(1.0)
    assert m.raw("a", "b", "view") == 0.0
    assert m.count("a", "view", now=2) == pytest.approx(1.0)


def test_remove_from_cart_stops_future_cart_pairs(ev: MakeEvent) -> None:
    m = BehaviorModel()
    m.ingest_all(
        [
            ev("u", "add_to_cart", "a", 0, "s"),
            ev("u", "remove_from_cart", "a", 1, "s"),
            ev("u", "add_to_cart", "b", 2, "s"),
        ]
    )
    assert m.raw("a", "b", "cart") == 0.0


def test_decay_halves_after_one_half_life(ev: MakeEvent) -> None:
    m = BehaviorModel(BehaviorConfig(half_life_s=DAY))
    m.ingest_all([ev("u", "view", "a", 0, "s"), ev("u", "view", "b", 0, "s")])
    assert m.raw("a", "b", "view", now=DAY) == pytest.approx(0.5)
    assert m.raw("a", "b", "view", now=3 * DAY) == pytest.approx(0.125)
    # a new pair one half-life later adds to the decayed value
    m.ingest_all([ev("v", "view", "a", DAY, "t"), ev("v", "view", "b", DAY, "t")])
    assert m.raw("a", "b", "view", now=DAY) == pytest.approx(1.5)


def test_normalisation_keeps_popular_items_from_dominating(ev: MakeEvent) -> None:
    m = BehaviorModel(BehaviorConfig(shrink=0.0, distance_power=0.0))
    events = []
    # "pop" co-occurs with everything once; "x" and "y" always appear together (3 sessions)
    for i in range(20):
        events += [ev(f"u{i}", "view", "pop", i, f"p{i}"), ev(f"u{i}", "view", f"o{i}", i, f"p{i}")]
    for i in range(3):
        events += [
            ev(f"w{i}", "view", "x", 100 + i, f"q{i}"),
            ev(f"w{i}", "view", "y", 100 + i, f"q{i}"),
            ev(f"w{i}", "view", "pop", 100 + i, f"q{i}"),
        ]
    m.ingest_all(events)
    top = m.partners("x", "view", 3, now=102)
    assert top[0][0] == "y"
    assert top[0][1] == pytest.approx(1.0, rel=1e-3)
    assert dict(top)["pop"] < 0.5
    assert all(0.0 <= s <= 1.0 for _, s in m.partners("pop", "all", 50))
    assert 0.0 < m.score("x", "y") <= 1.0


def test_shrinkage_damps_rare_pairs(ev: MakeEvent) -> None:
    m = BehaviorModel(BehaviorConfig(shrink=5.0))
    m.ingest_all([ev("u", "view", "a", 0, "s"), ev("u", "view", "b", 0, "s")])
    assert m.partners("a", "view", now=0)[0][1] == pytest.approx(1 / 6)


def test_unknown_channel_and_missing_product_rejected(ev: MakeEvent) -> None:
    m = BehaviorModel()
    with pytest.raises(InvalidInput):
        m.partners("a", "nope")
    with pytest.raises(InvalidInput):
        m.observe(ev("u", "view", None, 0))
    with pytest.raises(InvalidInput):
        BehaviorConfig(top_n=0)


def test_forget_drops_open_sessions(ev: MakeEvent) -> None:
    m = BehaviorModel()
    m.ingest(ev("u", "view", "a", 0, "s"))
    assert m.forget_user("u") is True
    assert m.forget_user("u") is False
    m.ingest(ev("u", "view", "b", 1, "s"))
    assert m.raw("a", "b", "view") == 0.0  # the old session was erased
    assert m.observe(UserEvent("u", UserEventType.FORGET, 2.0)) == []


events_st = st.lists(
    st.tuples(
        st.integers(0, 5),  # user
        st.sampled_from(["view", "add_to_cart", "purchase", "remove_from_cart"]),
        st.integers(0, 30),  # item
        st.integers(0, 3),  # ts step
        st.booleans(),  # with session id
    ),
    max_size=120,
)


def _events(raw: list[tuple[int, str, int, int, bool]]) -> list[UserEvent]:
    ts = 0.0
    out = []
    for u, kind, item, step, sid in raw:
        ts += step * 600
        out.append(UserEvent(f"u{u}", UserEventType(kind), ts, f"i{item}", f"s{u}" if sid else None))
    return out


@settings(max_examples=60, deadline=None)
@given(events_st)
def test_bounds_hold_whatever_the_events(raw: list[tuple[int, str, int, int, bool]]) -> None:
    cfg = BehaviorConfig(top_n=3, max_items=5, max_sessions=2, max_events_per_session=4, min_count=0.0)
    m = BehaviorModel(cfg)
    m.ingest_all(_events(raw))
    size = m.size()
    assert size["rows"] <= cfg.max_items * 3
    assert size["counts"] <= cfg.max_items * 3
    assert size["sessions"] <= cfg.max_sessions
    assert size["session_items"] <= cfg.max_sessions * 3 * cfg.max_events_per_session
    assert all(len(r) <= 2 * cfg.top_n for r in m._rows.values())
    for it in range(31):
        for ch in ("view", "cart", "purchase", "all"):
            for _, s in m.partners(f"i{it}", ch, 10):
                assert 0.0 < s <= 1.0 and math.isfinite(s)


def test_state_does_not_grow_with_event_count() -> None:
    cfg = BehaviorConfig(top_n=5, max_items=50, max_sessions=20, max_events_per_session=5)
    m = BehaviorModel(cfg)
    sizes = []
    for n in range(1, 4):
        for i in range(5000):
            j = n * 5000 + i
            m.ingest(UserEvent(f"u{j % 97}", UserEventType.VIEW, float(j), f"p{(j * 7919) % 1000}", None))
        sizes.append(sum(m.size().values()))
    assert max(sizes) <= 2 * cfg.top_n * cfg.max_items * 3 + cfg.max_items * 6 + cfg.max_sessions * (
        1 + cfg.max_events_per_session * 3
    )
    assert sizes[2] <= sizes[0] * 1.5  # plateaued, not linear in events


@settings(max_examples=60, deadline=None)
@given(events_st, st.integers(1, 4))
def test_repartitioned_run_equals_single_process(
    raw: list[tuple[int, str, int, int, bool]], parts: int
) -> None:
    cfg = BehaviorConfig(top_n=4, min_count=0.0)
    events = _events(raw)
    single = BehaviorModel(cfg)
    single.ingest_all(events)

    router = BehaviorModel(cfg)  # owns users
    owners = [BehaviorModel(cfg) for _ in range(parts)]  # own items by hash
    for e in events:
        for u in router.observe(e):
            assert isinstance(u, PairUpdate)
            if u.is_count:  # counts are broadcast: every owner needs n(partner)
                for o in owners:
                    o.apply_pair(u)
            else:
                owners[zlib.crc32(u.item.encode()) % parts].apply_pair(u)
    for it in range(31):
        item = f"i{it}"
        owner = owners[zlib.crc32(item.encode()) % parts]
        for ch in ("view", "cart", "purchase", "all"):
            assert owner.partners(item, ch, 10, now=1e6) == single.partners(item, ch, 10, now=1e6)
