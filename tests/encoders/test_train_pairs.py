"""Training pairs: sources, unknown ids, the split by item (property-tested), and `simstream train-pairs`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.training.pairs import (
    Pair,
    PairBuilder,
    behavior_pairs,
    group_pairs,
    load_pair_set,
    split_by_item,
)
from serving.behavior import BehaviorModel
from serving.catalog import Product, UserEvent, UserEventType
from serving.errors import InvalidInput
from streams.cli import main

ITEMS = [f"i{n}" for n in range(30)]


@settings(max_examples=200, deadline=None)
@given(
    edges=st.lists(st.tuples(st.sampled_from(ITEMS), st.sampled_from(ITEMS)), max_size=80),
    holdout=st.floats(0.0, 0.95),
    seed=st.integers(0, 1000),
    whole=st.integers(1, 60),
)
def test_split_by_item_never_puts_a_held_out_item_in_a_training_pair(
    edges: list[tuple[str, str]], holdout: float, seed: int, whole: int
) -> None:
    builder = PairBuilder(ITEMS)
    builder.add_all(edges, "test")
    pairs = builder.pairs
    split = split_by_item(pairs, holdout, seed, max_whole_component=whole)
    train_items = {i for p in split.train for i in p.key}
    valid_items = {i for p in split.valid for i in p.key}
    assert not train_items & split.held_out
    assert valid_items <= split.held_out
    assert len(split.train) + len(split.valid) + split.dropped == len(pairs)
    # Deterministic, and independent of the order the pairs come in.
    again = split_by_item(list(reversed(pairs)), holdout, seed, max_whole_component=whole)
    assert again.held_out == split.held_out and sorted(again.train, key=lambda p: p.key) == split.train


def test_small_components_are_held_out_whole_so_nothing_is_dropped() -> None:
    pairs = [Pair.of(f"a{i}", f"g{i}", "x") for i in range(200)] + [Pair.of("a0", "g1", "x")]
    split = split_by_item(pairs, 0.5, seed=3)
    assert split.dropped == 0
    assert 60 < len(split.valid) < 140  # about half of the components
    with pytest.raises(InvalidInput, match="holdout"):
        split_by_item(pairs, 1.0)


def test_unknown_ids_self_pairs_and_duplicates_are_counted_and_skipped() -> None:
    builder = PairBuilder(["a", "b", "c"])
    assert builder.add("a", "b", "labelled")
    assert not builder.add("b", "a", "group")  # same unordered pair
    assert not builder.add("a", "zz", "labelled")
    assert not builder.add("yy", "zz", "labelled")
    assert not builder.add("c", "c", "labelled")
    assert builder.pairs == [Pair("a", "b", "labelled")]
    stats = builder.stats.as_dict()
    assert stats["unknown_ids"] == {"labelled": 2}
    assert stats["duplicates"] == 1 and stats["self_pairs"] == 1
    assert stats["kept"] == {"labelled": 1}


def test_group_pairs_full_for_small_groups_ring_for_large() -> None:
    def product(pid: str, group: str | None) -> Product:
        return Product(pid, pid, 1.7e9, group_id=group)

    small = [product(f"s{i}", "g1") for i in range(3)]
    large = [product(f"l{i:02d}", "g2") for i in range(12)]
    pairs = group_pairs([*small, *large, product("alone", "g3"), product("none", None)], max_full=10)
    assert sorted(p for p in pairs if p[0].startswith("s")) == [("s0", "s1"), ("s0", "s2"), ("s1", "s2")]
    assert len([p for p in pairs if p[0].startswith("l")]) == 12


def test_behavior_pairs_come_from_co_cart_and_co_purchase_not_views() -> None:
    model = BehaviorModel()
    ts = 1.7e9
    for user in range(5):
        for item, kind in (("tent", UserEventType.ADD_TO_CART), ("stove", UserEventType.ADD_TO_CART),
                           ("hat", UserEventType.VIEW), ("tent", UserEventType.VIEW)):
            ts += 10
            model.ingest(UserEvent(f"u{user}", kind, ts, item))
    pairs = behavior_pairs(model, ["tent", "stove", "hat"], min_score=0.1)
    assert {tuple(sorted(p)) for p in pairs} == {("stove", "tent")}


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_train_pairs_command(tmp_path: Path) -> None:
    catalog = _write(tmp_path / "catalog.jsonl", [
        {"product_id": f"p{i}", "title": f"product {i}", "group_id": f"g{i // 2}"} for i in range(40)
    ])
    ts = 1.7e9
    events = []
    for user in range(4):
        for item in ("p0", "p7", "ghost"):
            ts += 5
            events.append({"user_id": f"u{user}", "type": "purchase", "product_id": item, "ts": ts})
    events_path = _write(tmp_path / "events.jsonl", events)
    with events_path.open("a", encoding="utf-8") as handle:
        handle.write('{"user_id": "u9", "type": "teleport"}\nnot json\n')
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("left_id,right_id\np1,p30\np2,unknown\n", encoding="utf-8")
    out = tmp_path / "pairs"
    result = CliRunner().invoke(main, ["train-pairs", "--catalog", str(catalog), "--events", str(events_path),
                                       "--labelled", str(labelled), "--holdout", "0.3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["kept"] == {"behavior": 1, "group": 20, "labelled": 1}  # p0-p7 once (p7-p0 is a duplicate)
    assert summary["unknown_ids"] == {"behavior": 4, "labelled": 1}  # "ghost" pairs both ways, then p2-unknown
    assert summary["bad_events"] == 2
    assert summary["train_pairs"] + summary["valid_pairs"] + summary["dropped_straddling"] == 22
    assert "unknown ids" in result.stderr
    pair_set, skipped = load_pair_set(out)
    assert skipped == 0 and len(pair_set.train) == summary["train_pairs"]
    held = {i for p in pair_set.valid for i in p.key}
    assert not held & {i for p in pair_set.train for i in p.key}
    assert pair_set.texts["p1"] == "product 1"
