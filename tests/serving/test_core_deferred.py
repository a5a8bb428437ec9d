"""Deferred changes (a worker far behind its input): merged at once, propagated by one settle."""

from __future__ import annotations

from dataclasses import replace

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
    steps = rec.settle_steps(chunk=7)
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


def test_deferred_text_changes_reach_the_index_in_batches_of_stage_batch() -> None:
    from serving import recommender

    rec, _rng = loaded(recommender.STAGE_BATCH - 1)
    assert len(rec.index) == 0, "staged, not inserted one by one"
    rng = np.random.default_rng(9)
    rec.apply(ProductUpsert("last", 1.0, title="cable 9"), rng.normal(size=CONFIG.dim), defer=True)
    assert len(rec.index) == recommender.STAGE_BATCH
    rec.apply(ProductUpsert("one more", 1.0, title="cable 9"), rng.normal(size=CONFIG.dim), defer=True)
    assert len(rec.index) == recommender.STAGE_BATCH
    rec.settle()
    assert len(rec.index) == recommender.STAGE_BATCH + 1


@pytest.mark.parametrize("index_kind", ["exact", "hnsw"])
def test_staged_moves_deletes_and_returns_settle_to_what_applying_each_change_gives(index_kind: str) -> None:
    from serving.index import create_index
    from serving.lists import exact_lists

    config = RecommenderConfig(dim=8, k=3, candidate_depth=5, candidate_slack=2, index=index_kind)
    rng = np.random.default_rng(11)
    deferred = Recommender(config, create_index(index_kind, config))
    plain = Recommender(config, create_index(index_kind, config))
    changes: list[tuple[ProductUpsert | ProductDelete, np.ndarray | None]] = []
    for i in range(40):
        changes.append((ProductUpsert(f"p{i:02d}", 1.0, title=f"cable {i % 5}", brand="Acme", category=("Cables",),
                                      price=10.0, in_stock=True), rng.normal(size=8)))
    # Moved while staged, deleted while staged, deleted and back, moved after an insert.
    # After the first settle: moved while in the index, moved while staged, deleted while
    # staged, deleted and back while staged.
    changes += [(ProductUpsert("p03", 2.0, title="plug 3"), rng.normal(size=8)),
                (ProductUpsert("p23", 2.0, title="plug 23"), rng.normal(size=8)),
                (ProductDelete("p24", 2.0), None),
                (ProductDelete("p25", 2.0), None),
                (ProductUpsert("p25", 3.0, title="plug 25"), rng.normal(size=8))]
    for change, vector in changes[:20]:
        deferred.apply(change, vector, defer=True)
        plain.apply(change, vector)
    deferred.settle()
    for change, vector in changes[20:]:
        deferred.apply(change, vector, defer=True)
        plain.apply(change, vector)
    assert len(deferred.index) < len(deferred.catalog), "some changes are still staged"
    deferred.settle()
    assert deferred.vectors().keys() == plain.vectors().keys()
    for pid, v in plain.vectors().items():
        assert np.array_equal(deferred.vectors()[pid], v), pid
    expected = exact_lists(list(deferred.catalog), deferred.vectors(), config, deferred.lexical)
    for kind in (Kind.SIMILAR, Kind.SUBSTITUTES):
        want = {p: [i.product_id for i in items] for p, items in expected[kind].items()}
        assert {p: [i.product_id for i in items] for p, items in deferred.lists(kind).items()} == want


def test_a_catch_up_ending_in_a_refit_vectorizes_each_product_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.lexical import LexicalModel

    calls: list[str] = []
    vectorize = LexicalModel.vectorize

    def counted(self: LexicalModel, text: str) -> object:
        calls.append(text)
        return vectorize(self, text)

    monkeypatch.setattr(LexicalModel, "vectorize", counted)
    rec, _rng = loaded(30)
    assert calls == [], "a deferred text change leaves its lexical vector for later"
    rec.refit_lexical()
    rec.settle()
    assert len(calls) == 30, "once, by the refit: not again at the settle"
    assert rec.lexical_vectors.keys() == {f"p{i:02d}" for i in range(30)}


def test_lexical_vectors_read_while_changes_wait_include_the_deferred_ones() -> None:
    from serving.lexical import LexicalModel

    rec, rng = loaded(10)
    rec.settle()
    rec.apply(ProductUpsert("p03", 2.0, title="plug 3"), rng.normal(size=CONFIG.dim), defer=True)
    rec.apply(ProductUpsert("p11", 2.0, title="socket 11"), rng.normal(size=CONFIG.dim), defer=True)
    rec.apply(ProductDelete("p11", 3.0), defer=True)
    lex = rec.lexical_vectors
    assert "p11" not in lex
    from serving.text import product_text

    product = rec.catalog.get("p03")
    assert product is not None
    want = LexicalModel().vectorize(product_text(product))
    assert np.array_equal(lex["p03"][0], want[0]) and np.array_equal(lex["p03"][1], want[1])
    assert rec.lexical_top(want, 1) == [("p03", pytest.approx(1.0))]


def shop(n: int = 60) -> list[tuple[ProductUpsert, np.ndarray]]:
    """Listings with duplicates (shared titles, model codes) and near misses."""
    rng = np.random.default_rng(11)
    words = ["usb", "cable", "hdmi", "charger", "braided", "fast", "adapter", "dock", "hub", "mouse"]
    out = []
    for i in range(n):
        title = " ".join(words[j] for j in rng.choice(len(words), size=3, replace=False)) + f" X{i % 7}"
        out.append((ProductUpsert(f"p{i:03d}", 1.0, title=title, brand="Acme" if i % 2 else "Bolt",
                                  category=("Cables",), price=float(10 + i % 5), in_stock=True),
                    rng.normal(size=CONFIG.dim)))
    return out


def settled(chunk: int, *, bulk: bool = False, config: RecommenderConfig = CONFIG
            ) -> tuple[Recommender, list[tuple[object, ...]]]:
    rec = Recommender(config, ExactIndex(config.dim))
    if bulk:
        changes = shop()
        pubs = rec.bulk_load([c for c, _ in changes], np.stack([v for _, v in changes]))
    else:
        for change, vector in shop():
            rec.apply(change, vector, defer=True)
        pubs = [p for step in rec.settle_steps(chunk=chunk) for p in step]
    return rec, [(p.kind, p.product_id, p.items, p.trigger, p.version) for p in pubs]


@pytest.mark.parametrize("bulk", [False, True], ids=["settle", "bulk_load"])
def test_the_duplicates_join_in_a_child_process_gives_what_this_process_computes(
    bulk: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-catalog step runs the duplicates join in a forked child beside the buffers;
    what it publishes is what the join in this process gives, list for list."""
    from serving import duplicates, propagation

    here, here_pubs = settled(13, bulk=bulk)
    assert here.lists(Kind.DUPLICATES) and any(here.lists(Kind.DUPLICATES).values())
    started: list[duplicates.JoinAhead] = []
    real_start = duplicates.JoinAhead.start.__func__  # type: ignore[attr-defined]

    def start(cls: type, *args: object) -> duplicates.JoinAhead | None:
        ahead = real_start(cls, *args)
        started.append(ahead)
        return ahead  # type: ignore[no-any-return]

    monkeypatch.setattr(duplicates.JoinAhead, "start", classmethod(start))
    monkeypatch.setattr(propagation, "JOIN_AHEAD_MIN_OWNERS", 1)
    forked, forked_pubs = settled(13, bulk=bulk)
    assert len(started) == 1 and started[0].failure is None
    assert forked_pubs == here_pubs
    for kind in Kind:
        assert forked.lists(kind) == here.lists(kind)
    assert forked.export_state().duplicates_known == here.export_state().duplicates_known

    started.clear()
    settled(13, bulk=bulk, config=replace(CONFIG, join_in_child=False))
    assert started == [], "join_in_child=False: no fork"


@pytest.mark.parametrize("how", ["raises", "dies"])
def test_a_failed_child_leaves_the_join_to_this_process(
    how: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    from serving import duplicates, propagation

    here, here_pubs = settled(13)
    parent = os.getpid()
    real_known = duplicates.DuplicateBatch.known
    calls = []

    def known(self: duplicates.DuplicateBatch, owners: object, depth: int) -> object:
        calls.append(1)
        if os.getpid() != parent and len(calls) == 2:
            if how == "dies":
                os._exit(3)
            raise MemoryError("no room for the join")
        return real_known(self, owners, depth)  # type: ignore[arg-type]

    monkeypatch.setattr(duplicates.DuplicateBatch, "known", known)
    monkeypatch.setattr(propagation, "JOIN_AHEAD_MIN_OWNERS", 1)
    forked, forked_pubs = settled(13)
    assert forked_pubs == here_pubs
    assert forked.export_state().duplicates_known == here.export_state().duplicates_known
    assert "computing it here" in caplog.text
    assert ("MemoryError" in caplog.text) == (how == "raises")
