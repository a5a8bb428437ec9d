"""Semantic search over the live catalog: ``search(core, query_vector, query_text, k, filters)``.

A query is matched two ways, and every hit says which:

* **dense**: the query's embedding (the same encoder as the products', through the engine's
  encoder port) against the vector index, the index the lists use;
* **lexical**: the query's TF-IDF vector (``serving.lexical``, the frozen IDF of the lists)
  against every product's, exactly, through ``serving.postings.LexicalPostings``.

Each half supplies its ``depth`` best candidates that pass the filters (``depth`` is
``max(RecommenderConfig.candidate_depth, k)``); every candidate of either half is then scored
on both (the dense inner product with its stored vector, the exact lexical cosine) and the
two are fused. The fusion rule, chosen by measurement (``simstream eval search``, see
docs/quality.md), is the worker's own content score (``serving.scoring.content_score``:
``(1 - w)·dense + w·max(0, lexical - f) / (1 - f)``); reciprocal-rank fusion
(``Fusion.RRF``) is kept for the evaluation.

**Filters** (``SearchFilters``): a category (any level of a product's category path,
case-insensitive), stock, and a price range (a product without a price fails a price
filter). When filters drop candidates the search goes deeper: the dense half asks the index
for four times more neighbours, up to ``MAX_DEPTH``, and the lexical half looks at up to
``MAX_DEPTH`` products in score order. So a filter that few products pass may return fewer
than ``k`` hits (or none, for an unknown category): the search is bounded, not exhaustive.

**Queries** are normalised like product text is before the encoder and the lexical score
see it (``normalize_query``: lower case, runs of whitespace as one space; both the
uncased encoder and the lexical transform lower-case anyway, so this changes no score and
lets one cache entry serve "Sony  XM4" and "sony xm4"). A blank query has no hits.

Call ``search`` on the core thread (``Engine.read``): the index and the recommender are not
thread-safe. Parameters given as strings (a query string) go through
``parse_search_params``, which raises ``InvalidSearch`` with a one-line message.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from serving.catalog import Product
from serving.errors import InvalidInput
from serving.index import normalize_rows
from serving.lexical import cosine_many, words
from serving.recommender import Recommender
from serving.scoring import blend, dense_scores
from serving.text import product_text

#: Hits per search: ``k`` is 1 to ``MAX_K``; ``DEFAULT_K`` when not given.
MAX_K = 50
DEFAULT_K = 20
#: Longest query and category, in characters.
MAX_QUERY_CHARS = 200
#: Deepest the dense half asks the index, and the most products the lexical half looks at,
#: when filters drop candidates.
MAX_DEPTH = 2000
#: Reciprocal-rank fusion's constant (Cormack et al., 2009).
RRF_K = 60
#: Words of the query that a hit's text shares, at most, in its reason (``words: ...``; words
#: of one or two letters without a digit are left out).
MAX_REASON_WORDS = 5


class InvalidSearch(InvalidInput):
    """A search parameter is missing, malformed or out of range; the message names it and
    its allowed values. Correct the request and send it again."""


class Fusion(enum.StrEnum):
    """How the two halves' scores become one."""

    #: The worker's content score (``serving.scoring``): the default.
    CONTENT = "content"
    #: Reciprocal-rank fusion: ``1/(RRF_K + dense rank) + 1/(RRF_K + lexical rank)``.
    RRF = "rrf"


def normalize_query(text: str) -> str:
    """The query as the encoder and the lexical transform see it: lower case, one space
    between words, no leading or trailing space."""
    return " ".join(text.lower().split())


@dataclass(frozen=True, slots=True)
class SearchFilters:
    """Which products a search may return; ``None`` leaves a field unfiltered.

    * ``category``: a category at any level of the product's path (``"Audio"`` matches
      ``["Electronics", "Audio", "Headphones"]``), compared case-insensitively;
    * ``in_stock``: the stock the product must have (``False``: out of stock only);
    * ``price_min`` / ``price_max``: inclusive bounds; a product without a price fails them.

    Raises ``InvalidSearch`` on a blank or too long category, a negative or non-finite
    price, or ``price_min > price_max``.
    """

    category: str | None = None
    in_stock: bool | None = None
    price_min: float | None = None
    price_max: float | None = None

    def __post_init__(self) -> None:
        if self.category is not None and (not self.category.strip() or len(self.category) > MAX_QUERY_CHARS):
            raise InvalidSearch(f"category must be 1 to {MAX_QUERY_CHARS} characters, not blank")
        for name in ("price_min", "price_max"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise InvalidSearch(f"{name} must be a number of at least 0, got {value!r}")
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise InvalidSearch(f"price_min ({self.price_min:g}) is above price_max ({self.price_max:g})")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.category, self.in_stock, self.price_min, self.price_max))

    def passed(self, product: Product | None) -> tuple[str, ...] | None:
        """The filters ``product`` passed, as reasons (``()`` with no filter), or ``None``
        when it fails one (or is not in the catalog)."""
        if product is None:
            return None
        out: list[str] = []
        if self.category is not None:
            wanted = self.category.strip().casefold()
            level = next((c for c in product.category if c.strip().casefold() == wanted), None)
            if level is None:
                return None
            out.append(f"category: {level.strip()}")
        if self.in_stock is not None:
            if product.in_stock != self.in_stock:
                return None
            out.append("in stock" if self.in_stock else "out of stock")
        if self.price_min is not None or self.price_max is not None:
            price = product.price
            if price is None:
                return None
            if self.price_min is not None and price < self.price_min:
                return None
            if self.price_max is not None and price > self.price_max:
                return None
            low = f"{self.price_min:g}" if self.price_min is not None else "0"
            high = f"{self.price_max:g}" if self.price_max is not None else "∞"
            out.append(f"price {price:g} in [{low}, {high}]")
        return tuple(out)


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """A validated search: the normalised query text, ``k`` and the filters."""

    text: str
    k: int = DEFAULT_K
    filters: SearchFilters = SearchFilters()

    def __post_init__(self) -> None:
        if len(self.text) > MAX_QUERY_CHARS:
            raise InvalidSearch(f"q is limited to {MAX_QUERY_CHARS} characters")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise InvalidSearch(f"k must be an integer from 1 to {MAX_K}, got {self.k!r}")


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One product found, with why.

    ``score`` is the fused score (the ranking), ``dense`` the inner product of the query's
    embedding with the product's, ``lexical`` the lexical cosine of the query with the
    product's text. ``dense_rank`` / ``lexical_rank`` (1-based) rank it among all candidates
    by each score. ``matched`` names the halves whose candidates it was among (``"dense"``,
    ``"lexical"``, or both), ``filters`` the filters it passed, and ``reasons`` says all of
    it in words.
    """

    product_id: str
    score: float
    dense: float
    lexical: float
    dense_rank: int
    lexical_rank: int
    matched: tuple[str, ...]
    filters: tuple[str, ...]
    reasons: tuple[str, ...]


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise InvalidSearch(f"{name} must be true or false, got {raw[:20]!r}")


def _parse_price(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidSearch(f"{name} must be a number of at least 0, got {raw[:20]!r}") from None
    return value


def parse_search_params(params: Mapping[str, str]) -> SearchRequest:
    """A ``SearchRequest`` from string parameters (``q``, ``k``, ``category``, ``in_stock``,
    ``price_min``, ``price_max``; ``limit`` is an older name of ``k``). Empty values count
    as absent; unknown names are ignored. Raises ``InvalidSearch`` with a one-line message."""
    text = params.get("q", "")
    if len(text) > MAX_QUERY_CHARS:
        raise InvalidSearch(f"q is limited to {MAX_QUERY_CHARS} characters")
    raw_k = params.get("k") or params.get("limit") or str(DEFAULT_K)
    if not raw_k.isdigit() or not 1 <= int(raw_k) <= MAX_K:
        raise InvalidSearch(f"k must be an integer from 1 to {MAX_K}, got {raw_k[:20]!r}")
    category = params.get("category") or None
    in_stock = _parse_bool("in_stock", params["in_stock"]) if params.get("in_stock") else None
    price_min = _parse_price("price_min", params["price_min"]) if params.get("price_min") else None
    price_max = _parse_price("price_max", params["price_max"]) if params.get("price_max") else None
    filters = SearchFilters(category=category, in_stock=in_stock, price_min=price_min, price_max=price_max)
    return SearchRequest(normalize_query(text), int(raw_k), filters)


def _dense_candidates(
    core: Recommender, qv: np.ndarray, depth: int, passed: Callable[[str], tuple[str, ...] | None]
) -> list[str]:
    """Up to ``depth`` ids, nearest first, that pass the filters; deeper while filters drop some."""
    ask = depth
    live = len(core.index)
    while True:
        found = core.index.query(qv, min(ask, live)) if live else []
        kept = [pid for pid, _ in found if passed(pid) is not None]
        if len(kept) >= depth or len(found) < ask or ask >= MAX_DEPTH:
            return kept[:depth]
        ask = min(MAX_DEPTH, ask * 4)


def search(
    core: Recommender,
    query_vector: np.ndarray,
    query_text: str,
    k: int,
    filters: SearchFilters | None = None,
    *,
    fusion: Fusion = Fusion.CONTENT,
    depth: int | None = None,
) -> list[SearchHit]:
    """The ``k`` best products for a query, best first (ties by id); see the module docstring.

    ``query_vector`` is the encoder's embedding of ``normalize_query(query_text)``;
    ``depth`` (default ``max(candidate_depth, k)``) is how many candidates each half
    supplies. Raises ``InvalidSearch`` for ``k`` outside 1 to ``MAX_K`` or a too long query,
    and ``InvalidVector`` for a vector of the wrong dimension. A blank query has no hits.
    """
    request = SearchRequest(normalize_query(query_text), k, filters or SearchFilters())
    if not request.text or not len(core.catalog):
        return []
    qv = normalize_rows(np.asarray(query_vector), core.config.dim)[0]
    depth = max(core.config.candidate_depth, k) if depth is None else max(depth, k)
    catalog = core.catalog
    checked: dict[str, tuple[str, ...] | None] = {}

    def passed(pid: str) -> tuple[str, ...] | None:
        if pid not in checked:
            checked[pid] = request.filters.passed(catalog.get(pid))
        return checked[pid]

    q_lex = core.lexical.vectorize(request.text)
    dense_ids = _dense_candidates(core, qv, depth, passed)
    lex_top = core.lexical_top(q_lex, depth, lambda pid: passed(pid) is not None, limit=MAX_DEPTH)
    candidates = list(dict.fromkeys([*dense_ids, *(pid for pid, _ in lex_top)]))
    if not candidates:
        return []
    dense = dense_scores(qv, core.index.get_vectors(candidates)).tolist()
    vectors = core.lexical_vectors
    lexical = cosine_many(q_lex, [vectors[pid] for pid in candidates])
    dense_rank = _ranks(candidates, dense)
    lexical_rank = _ranks(candidates, lexical)
    if fusion is Fusion.RRF:
        fused = [1.0 / (RRF_K + dense_rank[p]) + 1.0 / (RRF_K + lexical_rank[p]) for p in candidates]
    else:
        w_dense, w_ev, floor = blend(core.config)
        fused = [w_dense * d + w_ev * (lx - floor if lx > floor else 0.0) for d, lx in zip(dense, lexical, strict=True)]
    from_dense, from_lexical = set(dense_ids), {pid for pid, _ in lex_top}
    order = sorted(range(len(candidates)), key=lambda i: (-fused[i], candidates[i]))[:k]
    query_words = words(request.text)
    hits: list[SearchHit] = []
    for i in order:
        pid = candidates[i]
        matched = tuple(name for name, found in (("dense", from_dense), ("lexical", from_lexical)) if pid in found)
        passed_filters = passed(pid) or ()
        reasons = [f"dense {dense[i]:.3f} (#{dense_rank[pid]})", f"lexical {lexical[i]:.3f} (#{lexical_rank[pid]})"]
        product = catalog.get(pid)
        if product is not None and query_words:
            shared = [w for w in query_words if _telling(w) and w in _product_words(product)][:MAX_REASON_WORDS]
            if shared:
                reasons.append("words: " + ", ".join(shared))
        reasons += passed_filters
        hits.append(SearchHit(pid, fused[i], dense[i], lexical[i], dense_rank[pid], lexical_rank[pid], matched,
                              passed_filters, tuple(reasons)))
    return hits


def _telling(word: str) -> bool:
    """Whether a shared word is worth a reason: 3 characters or more, or with a digit ("on" is not)."""
    return len(word) >= 3 or any(ch.isdigit() for ch in word)


def _product_words(product: Product) -> set[str]:
    return set(words(product_text(product)))


def _ranks(ids: list[str], scores: list[float]) -> dict[str, int]:
    """1-based rank of each id by score, best first, ties by id."""
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
    return {ids[i]: r for r, i in enumerate(order, start=1)}
