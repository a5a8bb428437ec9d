"""Known answers and edge cases of ``Recommender.apply``."""

from __future__ import annotations

import numpy as np
import pytest

from serving.catalog import ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.errors import ConfigurationError, InvalidChange, InvalidVector, MissingVector, SimstreamError
from serving.index import ExactIndex, HnswIndex
from serving.recommender import Kind, Publication, Recommender, Trigger

CFG = RecommenderConfig(dim=4, k=2, candidate_depth=3, candidate_slack=1, lexical_weight=0.0)

A = ProductUpsert(
    "A", 1, title="Sony headphones WH1000", brand="Sony", category=("Audio", "Headphones"),
    price=100.0, attributes=(("color", "black"),),
)
B = ProductUpsert(
    "B", 1, title="Sony headphones WH900", brand="Sony", category=("Audio", "Headphones"),
    price=90.0, attributes=(("color", "black"),),
)
C = ProductUpsert("C", 1, title="Bose headphones QC45", brand="Bose", category=("Audio", "Headphones"), price=300.0)
D = ProductUpsert("D", 1, title="Acme speaker", brand="Acme", category=("Audio", "Speakers"), price=95.0)
E = ProductUpsert("E", 1, title="Acme cable", brand="Acme", category=("Cables",), price=5.0)
VECS = {
    "A": np.array([1.0, 0, 0, 0]),
    "B": np.array([0.9, 0.1, 0, 0]),
    "C": np.array([0.8, 0.3, 0, 0]),
    "D": np.array([0.7, 0, 0.7, 0]),
    "E": np.array([0, 0, 0, 1.0]),
}


def build(index_kind: str = "exact", config: RecommenderConfig = CFG) -> tuple[Recommender, list[Publication]]:
    index = ExactIndex(config.dim) if index_kind == "exact" else HnswIndex.from_config(config)
    rec = Recommender(config, index)
    pubs: list[Publication] = []
    for change in (A, B, C, D, E):
        pubs += rec.apply(change, VECS[change.product_id])
    return rec, pubs


def ids(items: object) -> list[str]:
    assert isinstance(items, tuple)
    return [i.product_id for i in items]


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_known_answer_lists(kind: str) -> None:
    rec, _ = build(kind)
    assert ids(rec.similar("A")) == ["B", "C"]
    assert ids(rec.similar("B")) == ["A", "C"]
    assert ids(rec.similar("C")) == ["B", "A"]
    assert ids(rec.similar("D")) == ["A", "B"]
    assert ids(rec.similar("E")) == ["A", "B"]  # all orthogonal: ties break by id
    # A: C is out of the price band, D is another leaf category.
    assert ids(rec.substitutes("A")) == ["B"]
    assert ids(rec.substitutes("C")) == []  # nothing within 30% of 300 in its top-3
    assert ids(rec.substitutes("D")) == []  # no other speaker
    top = rec.similar("A")
    assert top is not None
    first = top[0]
    assert first.dense == pytest.approx(0.9 / np.sqrt(0.82))
    assert first.score == first.content == pytest.approx(first.dense) and first.behavior == 0.0
    assert first.reasons == ("same brand", "same category: Headphones", "price within 10%", "shared color: black")
    assert top[1].reasons == ("same category: Headphones",)  # a 200% price gap is no reason


def test_stock_flip_publishes_out_of_stock_trigger_and_refreshes_lists_it_leaves() -> None:
    rec, _ = build()
    v_before = {key: rec.versions[key] for key in rec.versions}
    pubs = rec.apply(ProductUpsert("B", 2, in_stock=False))
    by_key = {(p.kind, p.product_id): p for p in pubs}
    own = by_key[(Kind.SUBSTITUTES, "B")]
    assert own.trigger is Trigger.OUT_OF_STOCK and ids(own.items) == ["A"]
    assert own.version == v_before[(Kind.SUBSTITUTES, "B")] + 1
    assert ids(by_key[(Kind.SUBSTITUTES, "A")].items) == []  # B left A's substitutes
    assert by_key[(Kind.SUBSTITUTES, "A")].trigger is Trigger.REFRESH
    assert all(p.kind is Kind.SUBSTITUTES for p in pubs)
    # Back in stock: A's list gets B again; B's own list did not change, so it is not republished.
    pubs = rec.apply(ProductUpsert("B", 3, in_stock=True))
    assert [(p.kind, p.product_id) for p in pubs] == [(Kind.SUBSTITUTES, "A")]
    assert ids(pubs[0].items) == ["B"]


def test_price_change_moves_substitutes_and_reasons_without_embedding() -> None:
    rec, _ = build()
    change = ProductUpsert("C", 2, price=110.0)
    assert rec.needs_embedding(change) is None
    pubs = rec.apply(change)
    keys = {(p.kind, p.product_id) for p in pubs}
    assert (Kind.SUBSTITUTES, "A") in keys and (Kind.SIMILAR, "A") in keys  # reasons mention price
    assert ids(rec.substitutes("A")) == ["B", "C"]
    sim_a = rec.similar("A")
    assert sim_a is not None and "price within 10%" in sim_a[1].reasons


def test_delete_publishes_tombstones_and_refills_lists_that_named_it() -> None:
    rec, _ = build()
    pubs = rec.apply(ProductDelete("A", 2))
    tombstones = [p for p in pubs if p.items is None]
    assert {(p.kind, p.product_id) for p in tombstones} == {
        (Kind.SIMILAR, "A"), (Kind.SUBSTITUTES, "A"), (Kind.DUPLICATES, "A")}
    assert rec.similar("A") is None and rec.substitutes("A") is None
    refreshed = {p.product_id for p in pubs if p.kind is Kind.SIMILAR and p.items is not None}
    assert refreshed == {"B", "C", "D", "E"}
    assert ids(rec.similar("B")) == ["C", "D"]
    for kind in Kind:
        for items in rec.lists(kind).values():
            assert "A" not in ids(items)
    # A late upsert older than the delete cannot bring it back.
    assert rec.apply(A, VECS["A"]) == [] and "A" not in rec.catalog
    # Re-insert: versions keep increasing after the tombstone.
    pubs = rec.apply(ProductUpsert("A", 3, title="Sony headphones WH1000"), VECS["A"])
    again = next(p for p in pubs if p.key == (Kind.SIMILAR, "A"))
    assert again.version > next(p for p in tombstones if p.kind is Kind.SIMILAR).version


def test_lexical_blend_reranks_on_model_number() -> None:
    # The plain linear blend (no floor): an unfitted IDF over three titles gives the shared
    # model number only a cosine of about 0.3 (tests/serving/test_core_lexical.py has the floor).
    cfg = RecommenderConfig(dim=4, k=2, candidate_depth=3, candidate_slack=1, lexical_weight=0.5, lexical_floor=0.0)
    rec = Recommender(cfg, ExactIndex(4))
    rec.apply(ProductUpsert("q", 1, title="Sony WH-1000XM4 headphones"), np.array([1.0, 0, 0, 0]))
    rec.apply(ProductUpsert("x", 1, title="Bose QuietComfort 45"), np.array([0.95, 0.05, 0, 0]))
    rec.apply(ProductUpsert("y", 1, title="WH-1000XM4 replacement ear pads"), np.array([0.8, 0.2, 0, 0]))
    sim = rec.similar("q")
    assert sim is not None
    assert [i.product_id for i in sim] == ["y", "x"]
    assert sim[0].dense < sim[1].dense and sim[0].lexical > sim[1].lexical
    assert sim[0].content == pytest.approx(0.5 * sim[0].dense + 0.5 * sim[0].lexical)
    # Dense alone would order them the other way.
    dense_only = Recommender(CFG, ExactIndex(4))
    for pid, change in [("q", 1), ("x", 2), ("y", 3)]:
        src = rec.catalog.get(pid)
        assert src is not None
        dense_only.apply(ProductUpsert(pid, change, title=src.title), rec.index.get_vector(pid))
    assert ids(dense_only.similar("q")) == ["x", "y"]


def test_needs_embedding_only_for_new_products_and_text_changes() -> None:
    rec, _ = build()
    assert rec.needs_embedding(ProductUpsert("new", 5, title="New thing")) is not None
    assert rec.needs_embedding(ProductUpsert("A", 5, price=1.0, in_stock=False, group_id="g")) is None
    merged = rec.needs_embedding(ProductUpsert("A", 5, title="Sony headphones WH1000 XM5"))
    assert merged is not None and merged.price == 100.0 and merged.brand == "Sony"
    assert rec.needs_embedding(ProductUpsert("A", 0, title="stale")) is None
    assert rec.needs_embedding(ProductDelete("A", 5)) is None
    with pytest.raises(InvalidChange):
        rec.needs_embedding(ProductUpsert("new", 5, price=3.0))


def snapshot_state(rec: Recommender) -> tuple[object, ...]:
    return (
        list(rec.catalog),
        rec.lists(Kind.SIMILAR),
        rec.lists(Kind.SUBSTITUTES),
        dict(rec.versions),
        sorted(rec.index.ids()),
        rec.index.get_vectors(sorted(rec.index.ids())).tobytes(),
    )


@pytest.mark.parametrize(
    "bad", [np.ones(5), np.full(4, np.nan), np.array([np.inf, 0, 0, 0]), np.zeros(4)],
    ids=["wrong-dim", "nan", "inf", "zero"],
)
def test_bad_vector_is_typed_error_and_state_unchanged(bad: np.ndarray) -> None:
    rec, _ = build()
    before = snapshot_state(rec)
    with pytest.raises(InvalidVector):
        rec.apply(ProductUpsert("A", 5, title="changed title"), bad)
    with pytest.raises(InvalidVector):
        rec.apply(ProductUpsert("Z", 5, title="new"), bad)
    assert snapshot_state(rec) == before


def test_text_change_without_vector_is_typed_error_and_state_unchanged() -> None:
    rec, _ = build()
    before = snapshot_state(rec)
    with pytest.raises(MissingVector, match="embed product_text"):
        rec.apply(ProductUpsert("A", 5, title="changed title"))
    with pytest.raises(MissingVector):
        rec.apply(ProductUpsert("Z", 5, title="new"))
    with pytest.raises(InvalidChange):
        rec.apply(ProductUpsert("Z", 5, price=1.0))
    assert snapshot_state(rec) == before


def test_stale_and_unknown_delete_are_counted_no_ops() -> None:
    rec, _ = build()
    before = snapshot_state(rec)
    assert rec.apply(ProductUpsert("A", 0.5, title="old", price=1.0)) == []
    assert rec.apply(ProductDelete("A", 0.5)) == []
    assert rec.apply(ProductDelete("ghost", 3)) == []
    stats = rec.stats()
    assert stats.stale_events == 2 and stats.unknown_deletes == 1
    assert stats.products == stats.index_live == 5 and stats.lists == 5
    assert snapshot_state(rec) == before
    # A change that alters nothing visible publishes nothing.
    assert rec.apply(ProductUpsert("A", 2, image_url="https://img/a.jpg")) == []


def test_apply_many_keeps_last_publication_per_key_and_reports_errors() -> None:
    rec = Recommender(CFG, ExactIndex(4))
    errors: list[tuple[int, SimstreamError]] = []
    items = [(c, VECS[c.product_id]) for c in (A, B, C)] + [
        (ProductUpsert("bad", 1, title="x"), np.zeros(4)),
        (ProductUpsert("B", 2, in_stock=False), None),
    ]
    pubs = rec.apply_many(items, on_error=lambda i, e: errors.append((i, e)))
    assert [i for i, _ in errors] == [3] and isinstance(errors[0][1], InvalidVector)
    keys = [p.key for p in pubs]
    assert len(keys) == len(set(keys)) == 9  # similar, substitutes and duplicates of A, B and C
    for p in pubs:
        assert p.items == rec.list_of(p.kind, p.product_id)
    with pytest.raises(InvalidVector):
        rec.apply_many([(ProductUpsert("bad", 1, title="x"), np.zeros(4))])


def test_ownership_limits_lists_to_owned_products() -> None:
    rec = Recommender(CFG, ExactIndex(4), owns=lambda pid: pid in {"A", "C"})
    pubs: list[Publication] = []
    for change in (A, B, C, D, E):
        pubs += rec.apply(change, VECS[change.product_id])
    assert {p.product_id for p in pubs} == {"A", "C"}
    assert set(rec.lists(Kind.SIMILAR)) == {"A", "C"}
    assert ids(rec.similar("A")) == ["B", "C"]  # unowned products still count as candidates


def test_config_and_index_validation() -> None:
    with pytest.raises(ConfigurationError):
        RecommenderConfig(k=20, candidate_depth=10)
    with pytest.raises(ConfigurationError):
        RecommenderConfig(lexical_weight=1.5)
    with pytest.raises(ConfigurationError):
        Recommender(CFG, ExactIndex(8))
    index = ExactIndex(4)
    index.upsert(["x"], np.ones(4))
    with pytest.raises(ConfigurationError):
        Recommender(CFG, index)


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_bulk_load_equals_one_at_a_time(kind: str) -> None:
    from core_helpers import SMALL, Stream, check_against_exact, make_index, random_upsert

    rng = np.random.default_rng(3)
    changes = [random_upsert(rng, f"p{i:03d}", 1.0) for i in range(120)]
    vectors = rng.normal(size=(120, SMALL.dim))
    bulk = Recommender(SMALL, make_index(kind, SMALL))
    pubs = bulk.bulk_load(changes, vectors)
    assert len({p.product_id for p in pubs if p.kind is Kind.SIMILAR}) == 120
    one = Recommender(SMALL, make_index("exact", SMALL))
    for change, v in zip(changes, vectors, strict=True):
        one.apply(change, v)
    if kind == "exact":
        assert bulk.lists(Kind.SIMILAR) == one.lists(Kind.SIMILAR)
        assert bulk.lists(Kind.SUBSTITUTES) == one.lists(Kind.SUBSTITUTES)
    stream = Stream(bulk, vectors={c.product_id: v for c, v in zip(changes, vectors, strict=True)})
    stream.published = {p.key: p for p in pubs}
    stream.all_pubs = list(pubs)
    check_against_exact(stream, exact=kind == "exact")
    with pytest.raises(ConfigurationError):
        bulk.bulk_load(changes[:1], vectors[:1])
    fresh = Recommender(SMALL, make_index(kind, SMALL))
    with pytest.raises(InvalidVector):
        fresh.bulk_load(changes[:2], np.vstack([vectors[0], np.zeros(SMALL.dim)]))
    assert len(fresh.catalog) == 0 and len(fresh.index) == 0
