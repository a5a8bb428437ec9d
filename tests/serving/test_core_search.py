"""Semantic search over the live core: candidates from both halves, fusion, filters, reasons,
bounds and errors; and the lexical postings, exact against ``cosine_many`` as the catalog moves.

With the exact index and the hashing encoder (a deterministic stand-in for MiniLM), so every
expectation below follows from the texts alone.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from encoders.hashing import HashingEncoder
from serving.catalog import ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.index import ExactIndex
from serving.lexical import cosine_many
from serving.postings import MIN_REBUILD, by_column
from serving.recommender import Recommender
from serving.search import (
    MAX_K,
    MAX_QUERY_CHARS,
    Fusion,
    InvalidSearch,
    SearchFilters,
    SearchRequest,
    normalize_query,
    parse_search_params,
    search,
)
from serving.text import product_text

ENCODER = HashingEncoder()
TS = 1_800_000_000.0
PRODUCTS = [
    ("H1", "Sony WH-1000XM4 wireless noise cancelling headphones", "Sony", ("Electronics", "Audio", "Headphones"), 278.0),
    ("H2", "Sony WH-1000XM5 wireless noise cancelling headphones", "Sony", ("Electronics", "Audio", "Headphones"), 349.0),
    ("H3", "Bose QuietComfort 45 wireless headphones", "Bose", ("Electronics", "Audio", "Headphones"), 289.0),
    ("S1", "JBL Flip 6 portable bluetooth speaker", "JBL", ("Electronics", "Audio", "Speakers"), 99.0),
    ("K1", "Logitech MX Keys wireless keyboard", "Logitech", ("Computers", "Keyboards"), 99.0),
    ("K2", "Apple Magic Keyboard", "Apple", ("Computers", "Keyboards"), None),
    ("C1", "Anker USB-C charging cable", "Anker", ("Electronics", "Accessories"), 12.0),
]


def vec(text: str) -> np.ndarray:
    return ENCODER.encode_blocking([text]).vectors[0]


def upsert(pid: str, title: str, brand: str | None = None, category: tuple[str, ...] = (),
           price: float | None = None, ts: float = TS, in_stock: bool = True) -> ProductUpsert:
    return ProductUpsert(product_id=pid, ts=ts, title=title, brand=brand, category=category, price=price,
                         in_stock=in_stock)


def add(rec: Recommender, change: ProductUpsert) -> None:
    product = rec.needs_embedding(change)
    rec.apply(change, vec(product_text(product)) if product is not None else None)


def catalog(config: RecommenderConfig | None = None) -> Recommender:
    rec = Recommender(config or RecommenderConfig(k=4, candidate_depth=5), ExactIndex(384))
    for pid, title, brand, category, price in PRODUCTS:
        add(rec, upsert(pid, title, brand, category, price))
    rec.refit_lexical()
    return rec


def find(rec: Recommender, query: str, k: int = 10, filters: SearchFilters | None = None, **kw: object) -> list[str]:
    return [h.product_id for h in search(rec, vec(normalize_query(query)), query, k, filters, **kw)]  # type: ignore[arg-type]


def test_the_right_product_comes_first_and_says_why() -> None:
    rec = catalog()
    hits = search(rec, vec("sony wh-1000xm4 headphones"), "Sony WH-1000XM4  headphones", 5)
    top = hits[0]
    assert top.product_id == "H1"
    assert top.matched == ("dense", "lexical")
    assert top.dense_rank == 1 and top.lexical_rank == 1
    assert top.reasons[0].startswith("dense ") and top.reasons[1].startswith("lexical ")
    assert "words: sony, 1000xm4, headphones" in top.reasons
    assert top.filters == ()
    # The parts are the exact scores: the inner product with the stored vector, the lexical cosine.
    query_vector = vec("sony wh-1000xm4 headphones")
    assert top.dense == pytest.approx(float(rec.index.get_vector("H1").astype(np.float64) @ query_vector))
    q_lex = rec.lexical.vectorize("sony wh-1000xm4 headphones")
    assert top.lexical == cosine_many(q_lex, [rec.lexical_vectors["H1"]])[0]
    # Best first, ties by id; the score is the worker's content score.
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    w = rec.config.lexical_weight
    f = rec.config.lexical_floor
    assert top.score == pytest.approx((1 - w) * top.dense + w * max(0.0, top.lexical - f) / (1 - f))


def test_a_model_number_alone_finds_its_product() -> None:
    rec = catalog()
    assert find(rec, "wh1000xm5")[0] == "H2"
    assert find(rec, "mx keys")[0] == "K1"


def test_filters_category_at_any_level_stock_and_price() -> None:
    rec = catalog()
    audio = search(rec, vec("wireless"), "wireless", 10, SearchFilters(category="audio"))
    assert {h.product_id for h in audio} <= {"H1", "H2", "H3", "S1"} and "H1" in {h.product_id for h in audio}
    assert all("category: Audio" in h.reasons and h.filters == ("category: Audio",) for h in audio)
    leaf = find(rec, "wireless", filters=SearchFilters(category="Keyboards"))
    assert set(leaf) <= {"K1", "K2"}
    assert "K1" in leaf
    cheap = search(rec, vec("wireless"), "wireless", 10, SearchFilters(price_min=50, price_max=290))
    assert {h.product_id for h in cheap} == {"H1", "H3", "S1", "K1"}  # every product priced 50 to 290
    assert all(h.filters[-1].startswith("price ") and h.filters[-1].endswith("in [50, 290]") for h in cheap)
    # A product without a price fails any price filter.
    assert "K2" not in find(rec, "apple magic keyboard", filters=SearchFilters(price_max=1000))
    assert find(rec, "apple magic keyboard")[0] == "K2"


def test_stock_changes_and_deletes_show_at_once() -> None:
    rec = catalog()
    assert set(find(rec, "sony headphones", filters=SearchFilters(in_stock=True))[:2]) == {"H1", "H2"}
    rec.apply(ProductUpsert(product_id="H1", ts=TS + 1, in_stock=False))
    in_stock = find(rec, "sony headphones", filters=SearchFilters(in_stock=True))
    assert "H1" not in in_stock and in_stock[0] == "H2"
    out = search(rec, vec("sony headphones"), "sony headphones", 5, SearchFilters(in_stock=False))
    assert [h.product_id for h in out] == ["H1"] and out[0].filters == ("out of stock",)
    rec.apply(ProductDelete("H2", TS + 2))
    assert "H2" not in find(rec, "sony wh-1000xm5 headphones")


def test_filters_that_drop_the_nearest_search_deeper() -> None:
    """Depth 2: the two nearest neighbours fail the filter; the one in stock is still found."""
    rec = Recommender(RecommenderConfig(k=2, candidate_depth=2), ExactIndex(384))
    for i in range(30):
        add(rec, upsert(f"P{i:02d}", f"acme desk lamp model {i}", "Acme", ("Home", "Lamps"), 20.0 + i,
                        in_stock=(i == 29)))
    rec.refit_lexical()
    hits = search(rec, vec("acme desk lamp"), "acme desk lamp", 2, SearchFilters(in_stock=True))
    assert [h.product_id for h in hits] == ["P29"]
    assert hits[0].filters == ("in stock",)


def test_blank_query_unknown_category_and_empty_catalog_have_no_hits() -> None:
    rec = catalog()
    assert search(rec, vec(""), "   ", 10) == []
    assert find(rec, "headphones", filters=SearchFilters(category="Garden")) == []
    empty = Recommender(RecommenderConfig(), ExactIndex(384))
    assert find(empty, "headphones") == []


def test_k_bounds() -> None:
    rec = catalog()
    assert len(find(rec, "wireless", k=1)) == 1
    assert len(find(rec, "wireless", k=MAX_K)) <= len(PRODUCTS)
    for k in (0, -1, MAX_K + 1):
        with pytest.raises(InvalidSearch, match=f"k must be an integer from 1 to {MAX_K}"):
            find(rec, "wireless", k=k)


def test_rrf_fusion_ranks_the_same_candidates() -> None:
    rec = catalog()
    content = search(rec, vec("sony headphones"), "sony headphones", 10)
    rrf = search(rec, vec("sony headphones"), "sony headphones", 10, fusion=Fusion.RRF)
    assert {h.product_id for h in rrf} == {h.product_id for h in content}
    assert all(h.score == pytest.approx(1 / (60 + h.dense_rank) + 1 / (60 + h.lexical_rank)) for h in rrf)


@pytest.mark.parametrize(("params", "message"), [
    ({"q": "x", "k": "ten"}, "k must be an integer from 1 to 50, got 'ten'"),
    ({"q": "x", "k": "0"}, "k must be an integer from 1 to 50, got '0'"),
    ({"q": "x", "k": "51"}, "k must be an integer from 1 to 50, got '51'"),
    ({"q": "x", "limit": "-1"}, "k must be an integer from 1 to 50, got '-1'"),
    ({"q": "x" * (MAX_QUERY_CHARS + 1)}, f"q is limited to {MAX_QUERY_CHARS} characters"),
    ({"q": "x", "in_stock": "maybe"}, "in_stock must be true or false, got 'maybe'"),
    ({"q": "x", "price_min": "cheap"}, "price_min must be a number of at least 0, got 'cheap'"),
    ({"q": "x", "price_max": "-5"}, "price_max must be a number of at least 0, got -5.0"),
    ({"q": "x", "price_max": "nan"}, "price_max must be a number of at least 0, got nan"),
    ({"q": "x", "price_min": "10", "price_max": "5"}, "price_min (10) is above price_max (5)"),
    ({"q": "x", "category": "  "}, f"category must be 1 to {MAX_QUERY_CHARS} characters, not blank"),
    ({"q": "x", "category": "c" * 201}, f"category must be 1 to {MAX_QUERY_CHARS} characters, not blank"),
])
def test_bad_parameters_are_one_line_errors(params: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidSearch) as raised:
        parse_search_params(params)
    assert str(raised.value) == message and "\n" not in message


def test_parameters_parse_into_a_request() -> None:
    request = parse_search_params({"q": "  Sony   WH-1000XM4 ", "k": "5", "category": "Audio", "in_stock": "true",
                                   "price_min": "10", "price_max": "300.5", "other": "ignored"})
    assert request == SearchRequest("sony wh-1000xm4", 5, SearchFilters("Audio", True, 10.0, 300.5))
    assert parse_search_params({}) == SearchRequest("", 20, SearchFilters())
    assert parse_search_params({"q": "x", "limit": "7", "in_stock": "", "category": ""}).k == 7
    assert parse_search_params({"q": "x", "in_stock": "0"}).filters.in_stock is False


def brute_lexical_top(rec: Recommender, query: str, n: int) -> list[tuple[str, float]]:
    q = rec.lexical.vectorize(query)
    vectors = rec.lexical_vectors
    ids = sorted(vectors)
    scores = cosine_many(q, [vectors[p] for p in ids])
    ranked = sorted(((s, p) for p, s in zip(ids, scores, strict=True) if s > 0), key=lambda t: (-t[0], t[1]))
    return [(p, s) for s, p in ranked[:n]]


def test_lexical_postings_are_exact_as_the_catalog_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inserts, text changes and deletes after the build are scored without a rebuild, bit for bit
    as cosine_many scores them; a refit (new IDF) and many changes rebuild."""
    rng = random.Random(7)
    words = ["sony", "bose", "wireless", "headphones", "cable", "usb", "speaker", "wh-1000xm4", "desk", "lamp",
             "black", "white", "pro", "mini", "charger", "keyboard"]
    rec = Recommender(RecommenderConfig(k=2, candidate_depth=3), ExactIndex(384), owns=lambda _pid: False)

    def title() -> str:
        return " ".join(rng.sample(words, rng.randint(1, 5)))

    for i in range(200):
        add(rec, upsert(f"P{i:03d}", title(), ts=TS))
    rec.refit_lexical()
    queries = ["sony headphones", "usb-c cable black", "wh1000xm4", "lamp", "zzz"]
    for q in queries:
        assert rec.lexical_top(rec.lexical.vectorize(q), 20) == brute_lexical_top(rec, q, 20)
    assert rec.postings.builds == 1
    for step in range(300):
        pid = f"P{rng.randrange(260):03d}"
        if rng.random() < 0.2 and pid in rec.catalog:
            rec.apply(ProductDelete(pid, TS + 1 + step))
        else:
            add(rec, upsert(pid, title(), ts=TS + 1 + step))
        if step % 50 == 0:
            for q in queries:
                assert rec.lexical_top(rec.lexical.vectorize(q), 20) == brute_lexical_top(rec, q, 20)
    assert rec.postings.builds == 1  # 300 changes: under MIN_REBUILD, no rebuild
    assert MIN_REBUILD > 300
    import serving.postings as postings_module

    def resync(*_args: object) -> None:
        raise AssertionError("the marked products are read from the delta, not synced again per query")

    rec.lexical_top(rec.lexical.vectorize("lamp"), 20)  # the delta takes the changes since the last query
    with monkeypatch.context() as patched:
        patched.setattr(postings_module._Delta, "put", resync)
        assert rec.lexical_top(rec.lexical.vectorize("usb cable"), 20) == brute_lexical_top(rec, "usb cable", 20)
    accept_even = [(p, s) for p, s in brute_lexical_top(rec, "sony headphones", 500) if int(p[1:]) % 2 == 0][:7]
    assert rec.lexical_top(rec.lexical.vectorize("sony headphones"), 7, lambda p: int(p[1:]) % 2 == 0) == accept_even
    rec.refit_lexical()
    assert rec.lexical_top(rec.lexical.vectorize("sony headphones"), 20) == brute_lexical_top(rec, "sony headphones", 20)
    assert rec.postings.builds == 2


@pytest.mark.parametrize("n_rows", [0, 1, 300])
def test_a_matrix_by_column_lists_each_columns_rows_in_ascending_order(n_rows: int) -> None:
    """The postings are the lexical vectors by bucket, rows in id order within a bucket (the
    order ``cosine_many`` sums in): what a stable sort of the entries by bucket gives."""
    rng = np.random.default_rng(n_rows)
    lengths = rng.integers(0, 40, size=n_rows)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    columns = np.concatenate([rng.choice(5000, size=k, replace=False) for k in lengths] or [np.zeros(0)]).astype(np.int32)
    data = rng.random(len(columns)).astype(np.float32)
    col_ptr, rows, values = by_column(indptr, columns, data, 5000)
    order = np.argsort(columns, kind="stable")
    assert np.array_equal(rows, np.repeat(np.arange(n_rows), lengths)[order]) and rows.dtype == np.int32
    assert np.array_equal(values, data[order]) and values.dtype == np.float32
    assert np.array_equal(col_ptr, np.concatenate([[0], np.cumsum(np.bincount(columns, minlength=5000))]))
