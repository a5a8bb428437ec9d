"""``hybrid_rank`` uses the worker's scoring."""

from __future__ import annotations

import numpy as np
import pytest

from serving.catalog import Product, ProductUpsert
from serving.config import RecommenderConfig
from serving.errors import InvalidInput, InvalidVector
from serving.evaluation.matching import hybrid_rank
from serving.index import ExactIndex
from serving.lexical import LexicalModel
from serving.recommender import Recommender

# The plain linear blend (no floor): these tests are about the mechanism of the re-rank.
CFG = RecommenderConfig(dim=4, k=2, candidate_depth=3, candidate_slack=0, lexical_weight=0.5, lexical_floor=0.0)


def prod(pid: str, title: str) -> Product:
    return Product(product_id=pid, title=title, ts=0.0)


CORPUS = [prod("x", "Bose QuietComfort 45"), prod("y", "WH-1000XM4 replacement ear pads"), prod("z", "cable")]
CVECS = np.array([[0.95, 0.05, 0, 0], [0.8, 0.2, 0, 0], [0, 0, 1.0, 0]])
QUERY = [prod("q", "Sony WH-1000XM4 headphones")]
QVEC = np.array([[1.0, 0, 0, 0]])


@pytest.mark.parametrize("index", ["hnsw", "exact"])
def test_lexical_part_reranks_dense_candidates(index: str) -> None:
    assert hybrid_rank(QUERY, QVEC, CORPUS, CVECS, 2, CFG, index=index) == [["y", "x"]]  # type: ignore[arg-type]
    dense_only = RecommenderConfig(dim=4, k=2, candidate_depth=3, lexical_weight=0.0)
    assert hybrid_rank(QUERY, QVEC, CORPUS, CVECS, 3, dense_only) == [["x", "y", "z"]]


def test_candidate_depth_limits_the_pool() -> None:
    # With C=1 only the dense nearest survives stage 1, whatever its lexical score.
    cfg = RecommenderConfig(dim=4, k=1, candidate_depth=1, lexical_weight=0.9)
    assert hybrid_rank(QUERY, QVEC, CORPUS, CVECS, 1, cfg) == [["x"]]


def test_same_scores_as_the_worker() -> None:
    """The worker's similar list for q, over the same catalog and frozen IDF, ranks alike."""
    rng = np.random.default_rng(0)
    titles = [f"{b} {n} X{m}" for b in ("sony", "acme", "bose") for n in ("cable", "mouse") for m in (1, 2, 3)]
    vecs = rng.normal(size=(len(titles) + 1, 4))
    corpus = [prod(f"c{i}", t) for i, t in enumerate(titles)]
    query = prod("q", "sony mouse X2")
    model = LexicalModel.fit([t for t in titles])
    cfg = RecommenderConfig(dim=4, k=5, candidate_depth=8, candidate_slack=2)
    ranked = hybrid_rank([query], vecs[:1], corpus, vecs[1:], 5, cfg, lexical=model, index="exact")[0]
    rec = Recommender(cfg, ExactIndex(4), lexical=model)
    rec.apply(ProductUpsert("q", 1, title=query.title), vecs[0])
    for p, v in zip(corpus, vecs[1:], strict=True):
        rec.apply(ProductUpsert(p.product_id, 1, title=p.title), v)
    sim = rec.similar("q")
    assert sim is not None and [i.product_id for i in sim] == ranked


def test_bad_input() -> None:
    with pytest.raises(InvalidInput):
        hybrid_rank(QUERY, QVEC, CORPUS, CVECS[:2], 1, CFG)
    with pytest.raises(InvalidInput):
        hybrid_rank(QUERY, QVEC, [CORPUS[0], CORPUS[0]], CVECS[:2], 1, CFG)
    with pytest.raises(InvalidVector):
        hybrid_rank(QUERY, np.zeros((1, 4)), CORPUS, CVECS, 1, CFG)
    assert hybrid_rank(QUERY, QVEC, [], np.zeros((0, 4)), 3, CFG) == [[]]


def test_texts_override_product_text() -> None:
    # Lexical evidence from the given texts flips the order the product titles would give.
    texts = ["alpha beta", "gamma delta", "zzz"]
    got = hybrid_rank(QUERY, QVEC, CORPUS, CVECS, 2, CFG, query_texts=["gamma delta"], corpus_texts=texts)
    assert got == [["y", "x"]]
    got = hybrid_rank(QUERY, QVEC, CORPUS, CVECS, 2, CFG, query_texts=["alpha beta"], corpus_texts=texts)
    assert got == [["x", "y"]]
    with pytest.raises(InvalidInput):
        hybrid_rank(QUERY, QVEC, CORPUS, CVECS, 2, CFG, corpus_texts=texts[:2])
