"""Priming the reverse check for a batch (``Recommender.prime``) changes no result.

The stream primes the core with the vectors of every text change in a batch, so the reverse
check scores all owners against all of them in one matrix product. Within the batch, owners
change their vectors, new owners take new slots and deleted ones free theirs: the primed
scores must then be rescored where stale, and the lists must come out exactly as without
priming, and as a from-scratch recomputation.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.catalog import ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.index import normalize_rows
from serving.recommender import Publication, Recommender
from tests.serving.core_helpers import Stream, check_against_exact, make_index, random_upsert

#: Buffers of 13 or 3: nearly every admission comes through the primed check over all owners.
SHALLOW = RecommenderConfig(
    dim=8, k=4, candidate_depth=10, candidate_slack=3, hnsw_ef=200, hnsw_initial_capacity=32
)
#: Buffers of three: an owner's own search reaches three products, the far check the rest.
NARROW = RecommenderConfig(
    dim=8, k=2, candidate_depth=3, candidate_slack=0, hnsw_ef=200, hnsw_initial_capacity=32
)


def signature(pubs: list[Publication]) -> list[tuple[object, ...]]:
    return [(p.kind, p.product_id, p.version, p.trigger, p.items) for p in pubs]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["exact", "hnsw"]),
    config=st.sampled_from([SHALLOW, NARROW]),
    seed=st.integers(0, 2**31),
    initial=st.integers(5, 60),
    batches=st.lists(st.lists(st.sampled_from(["move", "new", "delete", "stock"]), min_size=1, max_size=12),
                     min_size=1, max_size=6),
)
def test_primed_batches_publish_what_unprimed_ones_do(
    kind: str, config: RecommenderConfig, seed: int, initial: int, batches: list[list[str]]
) -> None:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, config.dim))
    plain = Stream(Recommender(config, make_index(kind, config)))
    primed = Stream(Recommender(config, make_index(kind, config)))
    ts = 1.0
    next_id = 0

    def vec() -> np.ndarray:
        return centers[int(rng.integers(len(centers)))] + 0.6 * rng.normal(size=config.dim)

    for _ in range(initial):
        change, v = random_upsert(rng, f"p{next_id:04d}", ts), vec()
        next_id += 1
        ts += 1
        assert signature(plain.apply(change, v)) == signature(primed.apply(change, v))
    for ops in batches:
        batch: list[tuple[ProductUpsert | ProductDelete, np.ndarray | None]] = []
        live = sorted(plain.vectors)
        for op in ops:
            ts += 1
            if op == "new" or not live:
                batch.append((random_upsert(rng, f"p{next_id:04d}", ts), vec()))
                next_id += 1
            elif op == "move":
                pid = live[int(rng.integers(len(live)))]
                batch.append((ProductUpsert(pid, ts, title=f"retitled {next_id} {ts}"), vec()))
                next_id += 1
            elif op == "delete":
                batch.append((ProductDelete(live[int(rng.integers(len(live)))], ts), None))
            else:
                pid = live[int(rng.integers(len(live)))]
                product = plain.rec.catalog.get(pid)
                batch.append((ProductUpsert(pid, ts, in_stock=not (product and product.in_stock)), None))
        vectors = [v for _c, v in batch if v is not None]
        if len(vectors) > 1:
            primed.rec.prime(normalize_rows(np.stack(vectors), config.dim))
        for change, v in batch:
            gone = plain.rec.catalog.get(change.product_id) is None
            if gone and (isinstance(change, ProductDelete) or change.title is None):
                continue  # deleted earlier in this batch
            assert signature(plain.apply(change, v)) == signature(primed.apply(change, v))
        primed.rec.unprime()
    # HNSW lists are as good as its recall: with 8 dimensions, five clusters and in-place moves,
    # hnswlib can leave a node with no in-links (seen: a 3rd nearest unreachable at ef=200 over
    # 50 nodes). The primed-vs-plain comparison above stays exact for both kinds.
    check_against_exact(primed, exact=kind == "exact")
