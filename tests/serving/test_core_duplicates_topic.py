"""The ``duplicates`` lists: the definition, its symmetry, and exact incremental upkeep."""

from __future__ import annotations

import itertools
from dataclasses import replace
from unittest.mock import patch

import numpy as np
import pytest
from core_helpers import SMALL, Stream, check_against_exact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core_propagation import half, op_strategy, run_stream

from serving.catalog import ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.duplicates import (
    SAME_CODE,
    SAME_TITLE,
    DuplicateBatch,
    bounds,
    candidate_ids,
    capped,
    exact_duplicates,
    rank_key,
    score_pairs,
    threshold_reason,
)
from serving.index import ExactIndex
from serving.recommender import Items, Kind, Recommender
from serving.scoring import content_score

CONFIG = RecommenderConfig(dim=4, k=3, candidate_depth=4, candidate_slack=0, duplicate_threshold=0.8)

#: The threshold found over the lexical postings (it needs lexical evidence: t > 1 - w) ...
LEXICAL_PATH = replace(SMALL, duplicate_threshold=0.55)
#: ... and over a dense range search of the index (a dense score alone may reach it).
DENSE_PATH = replace(SMALL, lexical_weight=0.2, duplicate_threshold=0.6)
#: The textual rule alone.
RULE_ONLY = replace(SMALL, duplicate_threshold=1.5)
#: Lists cut at two items: what the cap leaves out must come back when a listed item goes.
CAPPED = replace(LEXICAL_PATH, duplicate_max_items=2)


def build(config: RecommenderConfig = CONFIG) -> Recommender:
    rec = Recommender(config, ExactIndex(config.dim))
    rows = [
        ("stuffit-a", "Stuffit Deluxe 11", None, [1.0, 0.0, 0.0, 0.0]),
        ("stuffit-b", "stuffit deluxe 11", None, [0.0, 1.0, 0.0, 0.0]),  # embedded far away: the rule still holds
        ("stuffit-12", "Stuffit Deluxe 12", None, [0.0, 0.0, 1.0, 0.0]),
        ("mug-red", "Acme mug", "mugs", [0.0, 0.0, 0.0, 1.0]),
        ("mug-blue", "Acme mug", "mugs", [0.0, 0.0, 0.0, 1.0]),  # a variant of one group, never a duplicate
    ]
    for pid, title, group, vec in rows:
        rec.apply(ProductUpsert(pid, 1.0, title=title, group_id=group), np.array(vec, dtype=np.float32))
    return rec


def ids(rec: Recommender, pid: str) -> list[str]:
    return [i.product_id for i in rec.duplicates(pid) or ()]


def test_the_textual_rule_finds_listings_that_embed_far_apart_and_skips_variants() -> None:
    rec = build()
    assert ids(rec, "stuffit-a") == ["stuffit-b"] and ids(rec, "stuffit-b") == ["stuffit-a"]
    item = (rec.duplicates("stuffit-a") or ())[0]
    assert item.reasons == (SAME_TITLE,) and item.score == content_score(item.dense, item.lexical, CONFIG)
    assert ids(rec, "stuffit-12") == [] and ids(rec, "mug-red") == [] and ids(rec, "mug-blue") == []


def test_a_retitle_that_ends_the_duplicate_updates_both_sides_and_a_delete_tombstones() -> None:
    rec = build()
    pubs = rec.apply(ProductUpsert("stuffit-b", 2.0, title="stuffit deluxe 12 upgrade"),
                     np.array([0.0, 1.0, 0.0, 0.0], dtype=np.float32))
    dup = {p.product_id: p for p in pubs if p.kind is Kind.DUPLICATES}
    assert dup["stuffit-a"].items == () and dup["stuffit-b"].items == ()
    assert dup["stuffit-a"].version == 3  # empty while alone, then naming stuffit-b, now empty again
    # A second listing under the same brand and model code, and its group moved away and back.
    rec.apply(ProductUpsert("ear-1", 3.0, title="Sony WH-1000XM4 headphones", brand="Sony", group_id="g"),
              np.array([0.5, 0.5, 0.5, 0.5], dtype=np.float32))
    rec.apply(ProductUpsert("ear-2", 3.0, title="WH1000XM4 wireless, black", brand="Sony", group_id="h"),
              np.array([-0.5, 0.5, -0.5, 0.5], dtype=np.float32))
    assert [i.reasons for i in rec.duplicates("ear-1") or ()] == [(SAME_CODE,)]
    pubs = rec.apply(ProductUpsert("ear-2", 4.0, group_id="g"))
    assert {p.product_id: p.items for p in pubs if p.kind is Kind.DUPLICATES} == {"ear-1": (), "ear-2": ()}
    rec.apply(ProductUpsert("ear-2", 5.0, group_id="h"))
    pubs = rec.apply(ProductDelete("ear-2", 6.0))
    dup = {p.product_id: p.items for p in pubs if p.kind is Kind.DUPLICATES}
    assert dup == {"ear-2": None, "ear-1": ()}


def test_a_pair_above_the_threshold_is_listed_on_both_sides_with_the_same_numbers() -> None:
    rec = Recommender(CONFIG, ExactIndex(CONFIG.dim))
    rec.apply(ProductUpsert("a", 1.0, title="photo editor suite for windows"), np.array([1, 0.1, 0, 0], np.float32))
    rec.apply(ProductUpsert("b", 1.0, title="photo editor suite windows"), np.array([1, 0.12, 0, 0], np.float32))
    rec.apply(ProductUpsert("c", 1.0, title="garden hose"), np.array([1, 0.1, 0.01, 0], np.float32))
    (ab,) = rec.duplicates("a") or ()
    (ba,) = rec.duplicates("b") or ()
    assert (ab.product_id, ba.product_id) == ("b", "a")
    assert (ab.score, ab.dense, ab.lexical, ab.reasons) == (ba.score, ba.dense, ba.lexical, ba.reasons)
    assert ab.reasons == (threshold_reason(CONFIG),) and ab.score >= CONFIG.duplicate_threshold
    assert rec.duplicates("c") == ()  # as close by meaning, nothing shared by text


@settings(max_examples=200, deadline=None)
@given(dense=st.floats(-1, 1), lexical=st.floats(0, 1), weight=st.floats(0, 1), floor=st.floats(0, 0.9),
       threshold=st.floats(0.05, 1.2))
def test_the_candidate_bounds_never_lose_a_pair(dense: float, lexical: float, weight: float, floor: float,
                                                threshold: float) -> None:
    config = replace(SMALL, lexical_weight=weight, lexical_floor=floor, duplicate_threshold=threshold)
    min_dense, min_lexical = bounds(config)
    if content_score(dense, lexical, config) >= threshold:
        assert dense >= min_dense - 1e-9 and lexical >= min_lexical - 1e-9


def check_duplicates_exact(stream: Stream) -> None:
    rec = stream.rec
    want = exact_duplicates(list(rec.catalog), rec.vectors(), rec.config, rec.lexical, owns=rec.owns)
    got = rec.lists(Kind.DUPLICATES)
    assert got == want
    for pid, items in got.items():
        pub = stream.published[(Kind.DUPLICATES, pid)]
        assert pub.items == items


def check_symmetric(rec: Recommender) -> None:
    """A pair listed on one side is listed on the other with the same numbers, unless the
    other side's list is full of better items (the cap)."""
    lists = rec.lists(Kind.DUPLICATES)
    cap = rec.config.duplicate_max_items
    for p, items in lists.items():
        for item in items:
            back = lists.get(item.product_id)
            if back is None:  # not owned here
                continue
            mirror = [i for i in back if i.product_id == p]
            if not mirror:
                assert len(back) == cap and rank_key(back[-1]) < (-item.score, p)
                continue
            assert (mirror[0].score, mirror[0].dense, mirror[0].lexical, mirror[0].reasons) == (
                item.score, item.dense, item.lexical, item.reasons)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from([LEXICAL_PATH, DENSE_PATH, RULE_ONLY, CAPPED]),
    kind=st.sampled_from(["exact", "hnsw"]),
    seed=st.integers(0, 2**31),
    initial=st.integers(0, 40),
    ops=st.lists(op_strategy, max_size=60),
    partitioned=st.booleans(),
)
def test_duplicates_equal_recomputation_after_random_changes(
    config: RecommenderConfig, kind: str, seed: int, initial: int, ops: list[tuple[str, int]], partitioned: bool
) -> None:
    """Inserts, re-embeds, near-duplicates, retitles, group and stock changes, deletes and
    re-inserts: every published duplicates list equals the from-scratch definition
    (``check_against_exact`` covers every content kind), and the relation is symmetric."""
    stream = run_stream(kind, config, seed, initial, ops, owns=half if partitioned else None)
    check_against_exact(stream, exact=kind == "exact")
    if config is not DENSE_PATH:  # found over the lexical postings: exact whatever the index
        check_duplicates_exact(stream)
    check_symmetric(stream.rec)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), ops=st.lists(op_strategy, max_size=40),
       defer=st.sampled_from([(True, True), (False, True)]), config=st.sampled_from([LEXICAL_PATH, CAPPED]),
       batched=st.booleans())
def test_deferred_changes_and_a_refit_settle_to_recomputation(
    seed: int, ops: list[tuple[str, int]], defer: tuple[bool, bool], config: RecommenderConfig, batched: bool
) -> None:
    """Whole-catalog steps (the bootstrap's deferred changes, then a refit) end at the
    definition, whether their duplicates come one owner at a time or from one batch."""
    with patch("serving.propagation.BATCH_MIN_OWNERS", 1 if batched else 10**9):
        stream = run_stream("exact", config, seed, 25, ops, defer=defer)
        stream.settle()
        check_against_exact(stream, exact=True)
        for pub in stream.rec.refit_lexical():
            stream.published[pub.key] = pub
            stream.all_pubs.append(pub)
    check_against_exact(stream, exact=True)
    check_symmetric(stream.rec)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), n=st.integers(0, 80), cap=st.integers(1, 6), share=st.floats(0.05, 1.0),
       threshold=st.floats(0.45, 0.9), owners_block=st.integers(1, 9), pairs_block=st.integers(1, 40),
       fitted=st.booleans(), steps=st.integers(1, 4), again=st.booleans())
def test_a_batch_equals_the_lists_built_one_owner_at_a_time(
    seed: int, n: int, cap: int, share: float, threshold: float, owners_block: int, pairs_block: int,
    fitted: bool, steps: int, again: bool,
) -> None:
    """The all-pairs join finds every pair the per-owner candidate search finds, and scores
    each bit for bit the same, however it cuts the owners and the pairs into blocks, however
    long the prefixes are, and whether the owners come in one call, in several in order (a
    settle's steps: each pair scored once, by its first owner), or again out of order."""
    config = replace(LEXICAL_PATH, duplicate_threshold=threshold, duplicate_max_items=cap)
    rng = np.random.default_rng(seed)
    rec = Recommender(config, ExactIndex(config.dim))
    centers = rng.normal(size=(3, config.dim))
    for i in range(n):
        title = random_title(rng)
        if i and rng.random() < 0.3:  # another listing of an earlier one
            source = rec.catalog.get(f"p{int(rng.integers(i)):03d}")
            assert source is not None
            title = source.title.lower()
        rec.apply(ProductUpsert(f"p{i:03d}", 1.0, title=title, brand=str(rng.choice(["Acme", "Smith"])),
                                group_id=str(rng.choice(["g0", "g1"])) if rng.random() < 0.3 else None),
                  (centers[i % 3] + 0.3 * rng.normal(size=config.dim)).astype(np.float32))
    if fitted:
        rec.refit_lexical()
    core = rec._propagation
    with patch("serving.duplicates.BATCH_REST_SHARE", share), patch("serving.duplicates.BATCH_OWNERS", owners_block), \
            patch("serving.duplicates.BATCH_PAIRS", pairs_block):
        batch = DuplicateBatch(core.lex, core.profiles, rec.index.get_vectors, config)
        assert batch.usable
        owners = sorted(core.profiles)
        got: dict[str, Items] = {}
        for part in np.array_split(np.array(owners, dtype=object), steps):
            got.update(batch.lists(list(part)))
        if again and owners:
            got.update(batch.lists(owners[: len(owners) // 2 + 1]))  # earlier owners again
    for pid in sorted(core.profiles):
        mates = core.dup_keys.mates(pid) | candidate_ids(pid, index=rec.index, lex=core.lex, postings=core.postings,
                                                          config=config)
        one = capped(score_pairs(core.profiles[pid], mates, vector=rec.index.get_vector(pid),
                                 vectors=rec.index.get_vectors, lex=core.lex, profiles=core.profiles,
                                 config=config), config)
        assert got[pid] == one, pid
    assert got == exact_duplicates(list(rec.catalog), rec.vectors(), config, rec.lexical)


def test_a_full_list_takes_back_what_the_cap_left_out() -> None:
    """Three listings of one title under a cap of one: each lists the lowest other id, and
    when that one is retitled away or deleted, the next comes back into the list."""
    config = replace(CONFIG, duplicate_max_items=1)
    rec = Recommender(config, ExactIndex(config.dim))
    for pid in ("a", "b", "c"):
        rec.apply(ProductUpsert(pid, 1.0, title="Stuffit Deluxe 11"), np.array([1, 0, 0, 0], np.float32))
    assert (ids(rec, "a"), ids(rec, "b"), ids(rec, "c")) == (["b"], ["a"], ["a"])
    pubs = rec.apply(ProductUpsert("a", 2.0, title="garden hose"), np.array([0, 1, 0, 0], np.float32))
    assert {p.product_id: [i.product_id for i in p.items or ()] for p in pubs if p.kind is Kind.DUPLICATES} == {
        "a": [], "b": ["c"], "c": ["b"]}
    rec.apply(ProductUpsert("a", 3.0, title="stuffit deluxe 11"), np.array([1, 0, 0, 0], np.float32))
    assert (ids(rec, "b"), ids(rec, "c")) == (["a"], ["a"])
    pubs = rec.apply(ProductDelete("a", 4.0))
    assert {p.product_id: [i.product_id for i in p.items or ()] for p in pubs if p.kind is Kind.DUPLICATES} == {
        "a": [], "b": ["c"], "c": ["b"]}


def test_the_cluster_hands_duplicates_over_exactly() -> None:
    from core_helpers import Cluster

    for seed, turn in itertools.product(range(3), range(1, 3)):
        rng = np.random.default_rng(seed)
        ops = [(str(rng.choice(["new", "near_dup", "delete", "retitle", "move"])), int(rng.integers(10_000)))
               for _ in range(25)]
        stream = run_stream("exact", LEXICAL_PATH, seed, 20, [*ops, ("rebalance", turn)], workers=3)
        assert isinstance(stream, Cluster)
        stream.check(exact=True)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 60), min_cosine=st.floats(0.05, 1.0),
       changes=st.lists(st.sampled_from(["retitle", "delete", "new", "query"]), max_size=12))
def test_the_postings_prefix_filter_keeps_every_product_at_the_bound(
    seed: int, n: int, min_cosine: float, changes: list[str]
) -> None:
    """Built rows, and marked products through the delta (synced by the queries in between:
    a product marked again, deleted, or new since the build), all pass the bound."""
    from serving.lexical import LexicalModel, cosine_many
    from serving.postings import LexicalPostings

    rng = np.random.default_rng(seed)
    words = ["stuffit", "deluxe", "11", "12", "photo", "editor", "suite", "windows", "mac", "pro", "2007", "x100"]
    texts = {f"p{i}": " ".join(rng.choice(words, size=int(rng.integers(1, 6)))) for i in range(n)}
    model = LexicalModel.fit(texts.values())
    vectors = {pid: model.vectorize(t) for pid, t in texts.items()}
    postings = LexicalPostings()

    def check() -> None:
        for vec in list(vectors.values()):
            found = postings.candidates(vectors, vec, min_cosine)
            assert found <= vectors.keys(), "a deleted product is no candidate"
            others = sorted(vectors)
            want = {o for o, c in zip(others, cosine_many(vec, [vectors[o] for o in others]), strict=True)
                    if c >= min_cosine}
            assert want <= found

    postings.candidates(vectors, vectors["p0"], min_cosine)  # built here; later changes are marked
    for i, op in enumerate(changes):
        pid = f"p{int(rng.integers(n))}" if op != "new" else f"new{i}"
        if op == "query":
            check()
        elif op == "delete":
            vectors.pop(pid, None)
            postings.mark(pid)
        else:
            vectors[pid] = model.vectorize(" ".join(rng.choice(words, size=3)))
            postings.mark(pid)
        if vectors:
            postings.candidates(vectors, next(iter(vectors.values())), min_cosine)  # the delta catches up
    if vectors:
        check()


def test_postings_candidates_read_marked_products_from_the_delta_without_scoring_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each marked product enters the delta once, at the first query after its mark; later
    queries read it from there instead of scoring every marked product again."""
    from serving import postings as postings_module
    from serving.lexical import LexicalModel, cosine_many

    texts = {f"p{i}": f"stuffit deluxe {i} photo editor" for i in range(50)}
    model = LexicalModel.fit(texts.values())
    vectors = {pid: model.vectorize(t) for pid, t in texts.items()}
    postings = postings_module.LexicalPostings()
    postings.candidates(vectors, vectors["p0"], 0.5)
    for i in range(20):
        vectors[f"p{i}"] = model.vectorize(f"stuffit deluxe {i} photo suite")
        postings.mark(f"p{i}")
    others = sorted(vectors)
    put: list[str] = []
    real_put = postings_module._Delta.put
    monkeypatch.setattr(postings_module._Delta, "put", lambda self, pid, vec: put.append(pid) or real_put(self, pid, vec))
    for query in ("p3", "p7", "p30"):
        want = {o for o, c in zip(others, cosine_many(vectors[query], [vectors[o] for o in others]), strict=True)
                if c >= 0.5}
        assert want <= postings.candidates(vectors, vectors[query], 0.5)
    assert {"p3", "p7"} <= postings.candidates(vectors, vectors["p3"], 0.5)
    assert sorted(put) == sorted(f"p{i}" for i in range(20)), "each marked product synced once, not per query"
    assert postings.builds == 1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 30), min_cosine=st.floats(0.05, 1.0))
def test_postings_built_over_no_product_find_the_marked_ones_through_the_delta(
    seed: int, n: int, min_cosine: float
) -> None:
    """Postings first built over an empty catalog: every product is marked since, and the
    delta alone answers, with every product at the bound."""
    from serving.lexical import LexicalModel, cosine_many
    from serving.postings import LexicalPostings

    rng = np.random.default_rng(seed)
    words = ["stuffit", "deluxe", "11", "photo", "editor", "suite", "mac", "pro"]
    texts = {f"p{i}": " ".join(rng.choice(words, size=int(rng.integers(1, 5)))) for i in range(n)}
    model = LexicalModel.fit(texts.values())
    vectors: dict = {}
    postings = LexicalPostings()
    assert postings.candidates(vectors, model.vectorize("stuffit"), min_cosine) == set()
    for pid, text in texts.items():
        vectors[pid] = model.vectorize(text)
        postings.mark(pid)
    vectors.pop("p0")
    postings.mark("p0")
    others = sorted(vectors)
    for vec in list(vectors.values()):
        want = {o for o, c in zip(others, cosine_many(vec, [vectors[o] for o in others]), strict=True)
                if c >= min_cosine}
        found = postings.candidates(vectors, vec, min_cosine)
        assert want <= found <= vectors.keys()
    assert postings.builds == 1


#: Titles from a small vocabulary, a few with numbers: many pairs near the threshold, editions among them.
WORDS = ["stuffit", "deluxe", "photo", "editor", "suite", "windows", "mac", "pro", "home", "studio"]
NUMBERS = ["11", "12", "2007", "x100"]
DUP_OPS = ["new", "copy", "retitle", "group", "stock", "price", "delete", "reinsert"]


def random_title(rng: np.random.Generator) -> str:
    words = list(rng.choice(WORDS, size=int(rng.integers(1, 5))))
    if rng.random() < 0.3:
        words.append(str(rng.choice(NUMBERS)))
    return " ".join(words)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from([LEXICAL_PATH, replace(SMALL, duplicate_threshold=0.7), DENSE_PATH, CAPPED,
                            replace(CAPPED, duplicate_max_items=1)]),
    seed=st.integers(0, 2**31),
    ops=st.lists(st.tuples(st.sampled_from(DUP_OPS), st.integers(0, 10_000)), max_size=50),
    partitioned=st.booleans(),
    defer=st.booleans(),
)
def test_threshold_duplicates_follow_every_change_exactly(
    config: RecommenderConfig, seed: int, ops: list[tuple[str, int]], partitioned: bool, defer: bool
) -> None:
    """Copies of other listings (same title, a nearby vector), retitles with and without
    numbers, group moves, stock and price changes, deletes and re-inserts: the duplicates
    lists equal the pair-wise definition after every few changes, and what was published
    last per key is the current list (a tombstone for the deleted), versions increasing."""
    rng = np.random.default_rng(seed)
    rec = Recommender(config, ExactIndex(config.dim), owns=half if partitioned else None)
    stream = Stream(rec, defer=defer)
    centers = rng.normal(size=(3, config.dim))
    ts = 1.0

    def upsert(pid: str, title: str, vector: np.ndarray) -> None:
        stream.apply(ProductUpsert(pid, ts, title=title, brand=str(rng.choice(["Acme", "Smith"]))), vector)

    for i in range(12):
        upsert(f"p{i:02d}", random_title(rng), centers[i % 3] + 0.3 * rng.normal(size=config.dim))
    deleted: list[str] = []
    for step, (op, pick) in enumerate(ops):
        ts += 1
        live = sorted(stream.vectors)
        if op == "new" or not live:
            upsert(f"n{step:02d}", random_title(rng), centers[pick % 3] + 0.3 * rng.normal(size=config.dim))
            continue
        pid, other = live[pick % len(live)], live[(pick // 7) % len(live)]
        current = rec.catalog.get(pid)
        assert current is not None
        if op == "copy":  # another listing of `other`: its title, its vector give or take
            source = rec.catalog.get(other)
            assert source is not None
            stream.apply(ProductUpsert(pid, ts, title=source.title.upper(), brand=source.brand),
                         stream.vectors[other] + 1e-3 * rng.normal(size=config.dim))
        elif op == "retitle":
            stream.apply(ProductUpsert(pid, ts, title=random_title(rng)), stream.vectors[pid])
        elif op == "group":
            stream.apply(ProductUpsert(pid, ts, group_id=str(rng.choice(["g0", "g1"])) if pick % 3 else None))
        elif op == "stock":
            stream.apply(ProductUpsert(pid, ts, in_stock=not current.in_stock))
        elif op == "price":
            stream.apply(ProductUpsert(pid, ts, price=float(pick % 50 + 1)))
        elif op == "delete":
            stream.apply(ProductDelete(pid, ts))
            deleted.append(pid)
        elif op == "reinsert" and deleted:
            upsert(deleted.pop(pick % len(deleted)), random_title(rng), rng.normal(size=config.dim))
        if step % 10 == 9 and not defer:
            check_duplicates_exact(stream)
    stream.settle()
    check_duplicates_exact(stream)
    check_symmetric(rec)
    for (kind, pid), pub in stream.published.items():
        if kind is Kind.DUPLICATES and pid not in rec.catalog:
            assert pub.items is None, f"{pid} must end with a tombstone"


def test_editions_and_sizes_are_not_duplicates_by_score() -> None:
    rec = Recommender(CONFIG, ExactIndex(CONFIG.dim))
    vec = np.array([1, 0.1, 0, 0], np.float32)
    for pid, title in (("s11", "Stuffit Deluxe 11"), ("s12", "Stuffit Deluxe 12"), ("s11-pro", "Stuffit Deluxe 11 Pro"),
                       ("c1", "hdmi cable"), ("c2", "hdmi cable 2 m")):
        rec.apply(ProductUpsert(pid, 1.0, title=title), vec)
    assert ids(rec, "s11") == ["s11-pro"]  # shares its number; 12 is another edition
    assert ids(rec, "s12") == []
    assert ids(rec, "c1") == ["c2"]  # one title without numbers: the score decides


def test_a_batch_takes_products_without_lexical_features() -> None:
    """A text with no feature at all (an empty vector) anywhere in the catalog, the last
    one included, pairs only by the textual rule."""
    from serving.catalog import Product
    from serving.lexical import LexicalModel
    from serving.scoring import profile

    config = CAPPED
    model = LexicalModel()
    products = {pid: Product(pid, title, 1.0, brand="Acme")
                for pid, title in (("a", "Stuffit Deluxe 11"), ("b", "stuffit deluxe 11"), ("z", "x"))}
    lex = {pid: model.vectorize(p.title) for pid, p in products.items()}
    lex["z"] = (np.zeros(0, np.int32), np.zeros(0, np.float32))
    profiles = {pid: profile(p) for pid, p in products.items()}
    vectors = {"a": [1, 0, 0, 0, 0, 0, 0, 0], "b": [1, 0, 0, 0, 0, 0, 0, 0], "z": [0, 1, 0, 0, 0, 0, 0, 0]}
    batch = DuplicateBatch(lex, profiles, lambda ids: np.array([vectors[i] for i in ids], np.float32), config)
    got = batch.lists(["a", "b", "z"])
    assert [i.product_id for i in got["a"]] == ["b"] and [i.product_id for i in got["b"]] == ["a"]
    assert got["z"] == ()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), cap=st.integers(1, 2),
       ops=st.lists(st.tuples(st.sampled_from(["retitle", "move", "delete", "new"]), st.integers(0, 10_000)),
                    min_size=5, max_size=40))
def test_lists_of_many_listings_follow_their_reserve_exactly(seed: int, cap: int, ops: list[tuple[str, int]]) -> None:
    """Clusters larger than what a list keeps (its published items and the reserve): items
    leave, come back with other scores, and newcomers rank before, inside and after the
    known prefix; every list equals the definition after every change."""
    config = replace(LEXICAL_PATH, duplicate_max_items=cap)
    rng = np.random.default_rng(seed)
    rec = Recommender(config, ExactIndex(config.dim))
    stream = Stream(rec)
    titles = ["Stuffit Deluxe 11 photo editor", "garden hose reel pro"]
    base = rng.normal(size=config.dim)

    def near() -> np.ndarray:
        return base + float(rng.uniform(0.05, 0.6)) * rng.normal(size=config.dim)

    for i in range(10):
        stream.apply(ProductUpsert(f"p{i:02d}", 1.0, title=titles[0] if i < 8 else titles[1]), near())
    ts = 2.0
    for step, (op, pick) in enumerate(ops):
        ts += 1
        live = sorted(stream.vectors)
        if op == "new" or not live:
            stream.apply(ProductUpsert(f"n{step:02d}", ts, title=titles[pick % 2]), near())
        else:
            pid = live[pick % len(live)]
            if op == "retitle":
                stream.apply(ProductUpsert(pid, ts, title=titles[(pick // 3) % 2]), stream.vectors[pid])
            elif op == "move":
                stream.apply(ProductUpsert(pid, ts, title=titles[0]), near())
            else:
                stream.apply(ProductDelete(pid, ts))
        check_duplicates_exact(stream)
    check_symmetric(rec)
