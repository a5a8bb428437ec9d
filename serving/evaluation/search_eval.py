"""Semantic search on an offline matching set: what ``simstream eval search`` measures.

The corpus is loaded into a real ``Recommender`` (the index the worker uses, the IDF fitted
on the corpus as the worker's refit does, no lists: it owns no product), and every query
goes through ``serving.search.search`` exactly as ``GET /search`` sends it, so the numbers
are those of the endpoint. The lexical half alone (``Recommender.lexical_top``) is ranked
on the same core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import numpy as np

from serving.catalog import Product, ProductUpsert
from serving.config import RecommenderConfig
from serving.errors import InvalidInput
from serving.recommender import Recommender
from serving.search import MAX_K, Fusion, normalize_query, search

_UPSERT_FIELDS = tuple(f.name for f in fields(ProductUpsert))


def search_core(corpus: Sequence[Product], vectors: np.ndarray, config: RecommenderConfig) -> Recommender:
    """A recommender holding ``corpus`` (one vector per product, in order), its IDF fitted on
    the corpus, and no lists. Raises ``InvalidInput`` on mismatched lengths."""
    if len(corpus) != len(vectors):
        raise InvalidInput(f"search_core: {len(corpus)} products but {len(vectors)} vectors; pass one per product")
    core = Recommender(config, owns=lambda _pid: False)
    core.bulk_load([ProductUpsert(**{name: getattr(p, name) for name in _UPSERT_FIELDS}) for p in corpus], vectors)
    core.refit_lexical()
    return core


def search_rankings(
    core: Recommender, queries: Sequence[str], query_vectors: np.ndarray, k: int, fusion: Fusion = Fusion.CONTENT
) -> list[list[str]]:
    """The ids ``search`` returns for each query (its text and its embedding), best first."""
    if len(queries) != len(query_vectors):
        raise InvalidInput("search_rankings: pass one vector per query")
    k = min(k, MAX_K)
    return [[h.product_id for h in search(core, v, q, k, fusion=fusion)]
            for q, v in zip(queries, query_vectors, strict=True)]


def lexical_rankings(core: Recommender, queries: Sequence[str], k: int) -> list[list[str]]:
    """The lexical half alone: the ``k`` best products by lexical cosine per query."""
    return [[pid for pid, _ in core.lexical_top(core.lexical.vectorize(normalize_query(q)), k)] for q in queries]
