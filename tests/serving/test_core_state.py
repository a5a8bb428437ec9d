"""Explicit state export and import: ``Recommender.export_state`` / ``Recommender.from_state``."""

from __future__ import annotations

import dataclasses

import pytest
from core_helpers import SMALL, make_index
from test_core_snapshot import feed, make_changes

from serving.catalog import ProductDelete
from serving.errors import ConfigurationError, ListsDiffer
from serving.recommender import BehaviorRow, Kind, Recommender, RecommenderState


def build(kind: str) -> Recommender:
    rec = Recommender(SMALL, make_index(kind, SMALL), owns=lambda pid: pid[-1] != "3")
    feed(rec, make_changes(11, 250))
    live = sorted(p.product_id for p in rec.catalog if rec.owns(p.product_id))
    rec.apply_behavior({live[0]: BehaviorRow(partners=((live[1], 0.5),), complements=((live[2], 0.8),))})
    rec.offsets = {"product-changes": {0: 250}}
    return rec


def observed(rec: Recommender) -> tuple[object, ...]:
    return (
        {kind: rec.lists(kind) for kind in Kind},
        dict(rec.versions),
        rec.behavior_rows(),
        rec.stats(),
        dict(rec.offsets),
        sorted(rec.catalog, key=lambda p: p.product_id),
        rec.catalog.deletions(),
    )


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_from_state_of_export_state_is_the_same_recommender(kind: str) -> None:
    rec = build(kind)
    before = observed(rec)
    state = rec.export_state()
    assert isinstance(state, RecommenderState)
    assert state.catalog is rec.catalog and state.index is rec.index, "export shares, never copies"
    assert set(state.buffers) == set(rec.lists(Kind.SIMILAR)) and set(state.behavior) == set(rec.behavior_rows())
    versions = dict(rec.versions)
    back = Recommender.from_state(state, SMALL, owns=rec.owns)
    assert observed(back) == before

    # The restored recommender carries on as the original would have.
    victim = sorted(back.lists(Kind.SIMILAR))[0]
    pubs = back.apply(ProductDelete(victim, 10_000.0))
    assert {p.key for p in pubs if p.product_id == victim} >= {(Kind.SIMILAR, victim), (Kind.SUBSTITUTES, victim)}
    assert all(p.version > versions.get(p.key, 0) for p in pubs)


def test_import_state_skips_rows_of_products_it_does_not_own_and_checks_the_dimension() -> None:
    rec = build("exact")
    state = rec.export_state()
    stranger = sorted(p.product_id for p in rec.catalog if not rec.owns(p.product_id))[0]
    rows = dict(state.behavior)
    rows[stranger] = BehaviorRow(partners=(("x", 0.5),))
    back = Recommender.from_state(dataclasses.replace(state, behavior=rows), SMALL, owns=rec.owns)
    assert stranger not in back.behavior_rows() and back.similar(stranger) is None

    wrong = dataclasses.replace(SMALL, dim=SMALL.dim * 2)
    with pytest.raises(ConfigurationError, match="dimension"):
        Recommender.from_state(state, wrong)


def test_a_restore_takes_the_saved_lists_over_only_when_a_sample_recomputes_to_them() -> None:
    fields = {f.name for f in dataclasses.fields(RecommenderState)}
    assert not fields & {"profiles", "reasons", "holders"}, "derived state is recomputed, never saved"
    rec = build("exact")
    state = rec.export_state()
    assert state.lists is not None
    back = Recommender.from_state(state, SMALL, owns=rec.owns)
    for kind in (Kind.SIMILAR, Kind.SUBSTITUTES, Kind.COMPLEMENTS):
        assert back.lists(kind) == rec.lists(kind)
    # A saved list that its buffer does not give (a bug, a bit flip behind the checksums).
    victim = next(p for p, items in sorted(state.lists[Kind.SIMILAR].items()) if len(items) > 1)
    lists = {kind: dict(held) for kind, held in state.lists.items()}
    lists[Kind.SIMILAR][victim] = lists[Kind.SIMILAR][victim][::-1]
    with pytest.raises(ListsDiffer, match=victim):
        Recommender.from_state(dataclasses.replace(build("exact").export_state(), lists=lists), SMALL,
                               owns=rec.owns)
