"""Behaviour inside the lists: ``Recommender.apply_behavior``, complements, and propagation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_core_recommender import CFG, VECS, A, B, C, D, E, build, ids

from serving.behavior import BehaviorModel
from serving.catalog import ProductDelete, ProductUpsert, UserEvent, UserEventType
from serving.errors import InvalidInput
from serving.recommender import BOUGHT_TOGETHER, BehaviorRow, Kind, Recommender, exact_lists

BLEND = dataclasses.replace(CFG, behavior_weight=0.5)
ROW_A = BehaviorRow(partners=(("E", 1.0),), complements=(("E", 0.9), ("D", 0.4), ("ghost", 1.0)))


def kinds(pubs: list) -> set[tuple[Kind, str]]:
    return {(p.kind, p.product_id) for p in pubs}


def test_behavior_partner_outside_the_dense_top_c_enters_similar_items() -> None:
    rec, _ = build(config=BLEND)
    assert ids(rec.similar("A")) == ["B", "C"]  # E is orthogonal to A: not a content candidate
    pubs = rec.apply_behavior({"A": ROW_A})
    assert kinds(pubs) == {(Kind.SIMILAR, "A"), (Kind.COMPLEMENTS, "A")}
    similar = rec.similar("A")
    assert ids(similar) == ["E", "B"]
    e = similar[0]
    # score = 0.5 * content + 0.5 * behaviour, and the parts travel with the item.
    assert e.behavior == 1.0 and e.content == pytest.approx(0.0) and e.score == pytest.approx(0.5)
    assert similar[1].behavior == 0.0
    assert rec.apply_behavior({"A": ROW_A}) == []  # the same row again changes nothing


def test_without_blend_weight_behavior_is_shown_but_ranks_nothing() -> None:
    rec, _ = build(config=CFG)
    before = ids(rec.similar("A"))
    rec.apply_behavior({"A": BehaviorRow(partners=(("B", 0.7), ("E", 1.0)))})
    assert ids(rec.similar("A")) == before
    assert rec.similar("A")[0].behavior == 0.7


def test_complements_are_live_in_stock_partners_best_first() -> None:
    rec, _ = build(config=BLEND)
    rec.apply_behavior({"A": ROW_A})
    comp = rec.complements("A")
    assert ids(comp) == ["E", "D"]  # "ghost" is no product (yet): never listed
    assert comp[0].score == 0.9 and comp[0].behavior == 0.9 and comp[0].reasons[0] == BOUGHT_TOGETHER
    assert comp[1].reasons[:2] == (BOUGHT_TOGETHER, "price within 5%")

    pubs = rec.apply(ProductUpsert("E", 2, in_stock=False))
    assert (Kind.COMPLEMENTS, "A") in kinds(pubs) and ids(rec.complements("A")) == ["D"]

    pubs = rec.apply(ProductDelete("D", 3))
    comp_pub = next(p for p in pubs if p.key == (Kind.COMPLEMENTS, "A"))
    assert comp_pub.items == ()  # emptied, not a tombstone: A still exists

    pubs = rec.apply(ProductUpsert("ghost", 4, title="Ghost cable"), VECS["E"])
    assert ids(rec.complements("A")) == ["ghost"]  # the partner now exists, so it is listed
    assert (Kind.COMPLEMENTS, "A") in kinds(pubs)

    pubs = rec.apply(ProductDelete("A", 5))
    tombstones = {p.key for p in pubs if p.items is None}
    assert tombstones == {(Kind.SIMILAR, "A"), (Kind.SUBSTITUTES, "A"), (Kind.COMPLEMENTS, "A"), (Kind.DUPLICATES, "A")}
    assert rec.behavior_rows() == {}


def test_rows_for_unknown_products_are_counted_and_create_nothing() -> None:
    rec, _ = build(config=BLEND)
    assert rec.apply_behavior({"nope": ROW_A}) == []
    assert rec.behavior_ignored == 1 and rec.complements("nope") is None and "nope" not in rec.catalog


@pytest.mark.parametrize(
    "row",
    [
        BehaviorRow(partners=(("B", 1.5),)),
        BehaviorRow(partners=(("B", float("nan")),)),
        BehaviorRow(complements=(("", 0.5),)),
    ],
)
def test_absurd_rows_are_refused_and_change_nothing(row: BehaviorRow) -> None:
    rec, _ = build(config=BLEND)
    with pytest.raises(InvalidInput, match="behaviour row"):
        rec.apply_behavior({"B": ROW_A, "A": row})
    assert rec.behavior_rows() == {} and rec.complements("B") is None


def test_exact_lists_agree_and_snapshot_keeps_rows(tmp_path: Path) -> None:
    rec, _ = build(config=BLEND)
    rec.apply_behavior({"A": ROW_A, "B": BehaviorRow(partners=(("D", 0.3),), complements=(("C", 0.2),))})
    expected = exact_lists(list(rec.catalog), VECS, BLEND, rec.lexical, behavior=rec.behavior_rows())
    for kind in Kind:
        got = rec.lists(kind)
        assert {p: ids(v) for p, v in got.items()} == {p: ids(v) for p, v in expected[kind].items() if v or p in got}
    rec.save(tmp_path)
    back = Recommender.load(tmp_path, BLEND)
    assert back.behavior_rows() == rec.behavior_rows()
    for kind in Kind:
        assert back.lists(kind) == rec.lists(kind)


def test_row_from_the_behavior_model_puts_bought_together_first() -> None:
    model = BehaviorModel()
    for user, items in (("u1", ["A", "B"]), ("u2", ["A", "B"]), ("u3", ["A", "C"])):
        for t, item in enumerate(items):
            model.ingest(UserEvent(user, UserEventType.VIEW, 1000.0 + t, item))
    model.ingest(UserEvent("u1", UserEventType.PURCHASE, 1010.0, "A"))
    model.ingest(UserEvent("u1", UserEventType.PURCHASE, 1011.0, "B"))
    row = BehaviorRow.from_model(model, "A", k=5)
    assert [c for c, _s in row.partners][:1] == ["B"]
    assert [c for c, _s in row.complements] == ["B"]  # C was only viewed with A
    assert all(0.0 < s <= 1.0 for _c, s in (*row.partners, *row.complements))


def test_handover_without_rows_replaces_the_old_owners_complements() -> None:
    """A new owner that did not receive the behaviour rows must not leave the previous
    owner's complements on the topic: it publishes an empty list, and a tombstone on delete."""
    rec, _ = build(config=BLEND)
    owns_nothing = Recommender(BLEND, owns=lambda _pid: False)
    for change in (A, B, C, D, E):
        owns_nothing.apply(change, VECS[change.product_id])
    assert owns_nothing.lists(Kind.SIMILAR) == {}
    owns_nothing.seed_version(Kind.COMPLEMENTS, "A", 3)
    pubs = owns_nothing.set_ownership(lambda _pid: True)
    comp = [p for p in pubs if p.kind is Kind.COMPLEMENTS]
    assert [(p.product_id, p.items, p.version) for p in comp] == [("A", (), 4)]
    assert ids(owns_nothing.similar("A")) == ids(rec.similar("A"))  # lists built from the replica
    pubs = owns_nothing.apply(ProductDelete("A", 9))
    assert (Kind.COMPLEMENTS, "A") in {p.key for p in pubs if p.items is None}

