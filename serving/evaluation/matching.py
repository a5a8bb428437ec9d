"""``hybrid_rank``: the worker's two-stage scoring, applied to an offline matching set.

``simstream eval matching --method hybrid`` calls this, so the number it reports is the
number the worker's lists get: the dense top-C candidates come from the same index type
(HNSW with the configured ``ef``/``M``), and the re-rank uses ``serving.scoring`` and the
``serving.lexical`` model exactly as ``Recommender`` does. The IDF is fitted on the corpus
(the worker fits it on its catalog), unless a frozen model is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from serving.catalog import Product
from serving.config import RecommenderConfig
from serving.errors import InvalidInput
from serving.index import create_index, normalize_rows
from serving.lexical import LexicalModel, cosine
from serving.scoring import dense_scores, rank_candidates
from serving.text import product_text


def hybrid_rank(
    queries: Sequence[Product],
    query_vectors: np.ndarray,
    corpus: Sequence[Product],
    corpus_vectors: np.ndarray,
    k: int,
    config: RecommenderConfig,
    *,
    lexical: LexicalModel | None = None,
    index: Literal["hnsw", "exact"] | None = None,
    query_texts: Sequence[str] | None = None,
    corpus_texts: Sequence[str] | None = None,
) -> list[list[str]]:
    """For each query, the ids of its ``k`` best corpus products by hybrid content score.

    Stage 1: the ``max(candidate_depth, k)`` nearest corpus products by dense cosine.
    Stage 2: re-rank them by ``(1 - lexical_weight) * dense + lexical_weight * lexical``
    (ties by id). Vectors need not be normalised. The lexical part reads
    ``serving.text.product_text`` (what the worker reads) unless ``query_texts`` /
    ``corpus_texts`` give the texts the vectors were embedded from. Raises ``InvalidInput``
    on mismatched lengths or duplicate corpus ids and ``InvalidVector`` on bad vectors.
    """
    if len(queries) != len(query_vectors) or len(corpus) != len(corpus_vectors):
        raise InvalidInput("hybrid_rank: pass one vector per query and one per corpus product")
    ids = [p.product_id for p in corpus]
    if len(set(ids)) != len(ids):
        raise InvalidInput("hybrid_rank: corpus product ids must be unique")
    q_texts = list(query_texts) if query_texts is not None else [product_text(p) for p in queries]
    c_texts = list(corpus_texts) if corpus_texts is not None else [product_text(p) for p in corpus]
    if len(q_texts) != len(queries) or len(c_texts) != len(corpus):
        raise InvalidInput("hybrid_rank: pass one text per query and one per corpus product")
    if k <= 0 or not corpus or not queries:
        return [[] for _ in queries]
    model = lexical if lexical is not None else LexicalModel.fit(c_texts)
    idx = create_index(index or config.index, config)
    idx.upsert(ids, np.asarray(corpus_vectors))
    corpus_lex = {p.product_id: model.vectorize(t) for p, t in zip(corpus, c_texts, strict=True)}
    depth = max(config.candidate_depth, k)
    qmat = normalize_rows(np.asarray(query_vectors), config.dim)
    out: list[list[str]] = []
    for text, qv in zip(q_texts, qmat, strict=True):
        found = [c for c, _ in idx.query(qv, depth)]
        dense = dense_scores(qv, idx.get_vectors(found)).tolist() if found else []
        q_lex = model.vectorize(text)
        ranked = rank_candidates(
            ((c, d, cosine(q_lex, corpus_lex[c])) for c, d in zip(found, dense, strict=True)), config
        )
        out.append([c for c, *_ in ranked[:k]])
    return out
