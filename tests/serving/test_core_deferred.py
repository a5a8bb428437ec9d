"""Deferred changes (a worker far behind its input): merged at once, propagated by one settle."""

from __future__ import annotations

import numpy as np
import pytest

from serving.catalog import ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.errors import ConfigurationError
from serving.index import ExactIndex
from serving.recommender import Kind, Recommender, Trigger

CONFIG = RecommenderConfig(dim=8, k=3, candidate_depth=5, candidate_slack=2)


def loaded(n: int = 30) -> tuple[Recommender, np.random.Generator]:
    rng = np.random.default_rng(5)
    rec = Recommender(CONFIG, ExactIndex(CONFIG.dim))
    for i in range(n):
        product = ProductUpsert(f"p{i:02d}", 1.0, title=f"cable {i % 4}", brand="Acme", category=("Cables",),
                                price=10.0, in_stock=True)
        assert rec.apply(product, rng.normal(size=CONFIG.dim), defer=True) == []
    return rec, rng


def test_a_deferred_catalog_publishes_each_list_once_at_settle() -> None:
    rec, _rng = loaded()
    assert rec.unsettled and rec.lists(Kind.SIMILAR) == {}
    pubs = rec.settle()
    assert not rec.unsettled and rec.settle() == []
    keys = [p.key for p in pubs]
    assert len(keys) == len(set(keys)), "one publication per list"
    assert {p.product_id for p in pubs if p.kind is Kind.SIMILAR} == {f"p{i:02d}" for i in range(30)}
    assert all(p.version == 1 for p in pubs)


def test_a_product_that_went_out_of_stock_meanwhile_gets_its_substitutes_with_the_trigger() -> None:
    rec, _rng = loaded()
    rec.settle()
    before = rec.substitutes("p03")
    assert rec.apply(ProductUpsert("p03", 2.0, in_stock=False), defer=True) == []
    pubs = rec.settle()
    own = [p for p in pubs if p.key == (Kind.SUBSTITUTES, "p03")]
    assert len(own) == 1 and own[0].trigger is Trigger.OUT_OF_STOCK and own[0].items == before
    assert all("p03" not in {i.product_id for i in p.items or ()} for p in pubs if p.kind is Kind.SUBSTITUTES)


def test_a_deferred_delete_tombstones_its_own_lists_at_once_and_leaves_every_list_at_settle() -> None:
    rec, _rng = loaded()
    rec.settle()
    holders = [p for p, items in rec.lists(Kind.SIMILAR).items() if "p07" in {i.product_id for i in items}]
    assert holders
    gone = rec.apply(ProductDelete("p07", 2.0), defer=True)
    assert {(p.key, p.items) for p in gone} == {((Kind.SIMILAR, "p07"), None), ((Kind.SUBSTITUTES, "p07"), None),
                                                 ((Kind.DUPLICATES, "p07"), None)}
    pubs = rec.settle()
    assert set(holders) <= {p.product_id for p in pubs if p.kind is Kind.SIMILAR}
    assert all("p07" not in {i.product_id for i in items} for items in rec.lists(Kind.SIMILAR).values())


def test_a_change_without_defer_settles_first_and_snapshots_refuse_unsettled_state() -> None:
    rec, rng = loaded()
    with pytest.raises(ConfigurationError, match="settle"):
        rec.export_state()
    pubs = rec.apply(ProductUpsert("p99", 2.0, title="cable 1"), rng.normal(size=CONFIG.dim))
    assert not rec.unsettled
    assert {p.product_id for p in pubs if p.kind is Kind.SIMILAR} >= {f"p{i:02d}" for i in range(30)}
    rec.export_state()


def test_a_settle_goes_in_steps_that_each_publish_their_owners_lists() -> None:
    from serving import propagation

    rec, _rng = loaded(30)
    steps = rec._propagation.settle_steps(chunk=7)
    published = [sorted({p.product_id for p in step}) for step in steps]
    assert len(published) == 5 and not rec.unsettled
    owners = sorted(f"p{i:02d}" for i in range(30))
    assert published == [owners[i : i + 7] for i in range(0, 30, 7)]
    assert propagation.SETTLE_CHUNK >= 100


def test_a_refit_while_changes_wait_leaves_the_one_rebuild_to_the_settle() -> None:
    from serving.lists import exact_lists

    rec, _rng = loaded()
    assert not rec.lexical.fitted
    assert rec.refit_lexical() == [] and rec.unsettled and rec.lexical.fitted
    pubs = rec.settle()
    assert len({p.key for p in pubs}) == len(pubs), "each list once"
    expected = exact_lists(list(rec.catalog), rec.vectors(), CONFIG, rec.lexical)
    for kind in (Kind.SIMILAR, Kind.SUBSTITUTES):
        got = rec.lists(kind)
        assert got.keys() == expected[kind].keys()
        for pid, items in got.items():
            want = expected[kind][pid]
            assert [i.product_id for i in items] == [i.product_id for i in want]
            assert all(abs(a.lexical - b.lexical) < 1e-9 and abs(a.score - b.score) < 1e-9
                       for a, b in zip(items, want, strict=True))
