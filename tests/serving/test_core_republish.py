"""Reconciling with a topic: versions continue from what the topic holds; lists republish as they are."""

from __future__ import annotations

import numpy as np

from serving.catalog import ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.index import ExactIndex
from serving.recommender import Kind, Recommender


def test_versions_continue_from_the_topic_and_republish_carries_the_current_list() -> None:
    config = RecommenderConfig(dim=4, k=2, candidate_depth=3)
    rec = Recommender(config, ExactIndex(config.dim))
    vectors = {"a": [1, 0, 0, 0], "b": [0.9, 0.1, 0, 0], "c": [0, 1, 0, 0]}
    for pid, vector in vectors.items():
        rec.apply(ProductUpsert(pid, 1.0, title=f"product {pid}"), np.array(vector, dtype=np.float32))

    rec.seed_version(Kind.SIMILAR, "a", 41)
    rec.seed_version(Kind.SIMILAR, "a", 3)  # lower than held: ignored
    pub = rec.republish(Kind.SIMILAR, "a")
    assert pub.version == 42 and pub.items == rec.similar("a") and pub.items is not None
    assert pub.items[0].product_id == "b"

    rec.apply(ProductDelete("c", 2.0))
    gone = rec.republish(Kind.SUBSTITUTES, "c")
    assert gone.items is None and gone.kind is Kind.SUBSTITUTES
