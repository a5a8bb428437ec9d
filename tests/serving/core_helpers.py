"""Shared helpers for the serving tests: a stream simulator and the invariant checks."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serving.catalog import ProductChange, ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.index import ExactIndex, HnswIndex, VectorIndex
from serving.recommender import (
    CONTENT_KINDS,
    BehaviorRow,
    Kind,
    Publication,
    Recommender,
    exact_lists,
    last_per_key,
)
from serving.rules import is_substitute

SMALL = RecommenderConfig(
    dim=8, k=4, candidate_depth=10, candidate_slack=3, hnsw_ef=64, hnsw_initial_capacity=32
)

BRANDS = ["Sony", "Bose", "Acme", "Apple", None]
NOUNS = ["headphones", "speaker", "cable", "charger", "mouse", "keyboard"]
CATEGORIES = [("Electronics", "Audio"), ("Electronics", "Accessories"), ("Computers", "Input"), ()]
COLORS = ["black", "white", "red"]


def make_index(kind: str, config: RecommenderConfig) -> VectorIndex:
    if kind == "exact":
        return ExactIndex(config.dim)
    return HnswIndex.from_config(config)


@dataclass
class Stream:
    """Drives a recommender and remembers what a consumer of the topics would hold."""

    rec: Recommender
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    published: dict[tuple[Kind, str], Publication] = field(default_factory=dict)
    all_pubs: list[Publication] = field(default_factory=list)
    #: Apply changes with ``defer`` (a worker far behind its input); ``settle`` propagates them.
    defer: bool = False

    def apply_behavior(self, rows: dict[str, BehaviorRow]) -> list[Publication]:
        return self._record(self.rec.apply_behavior(rows))

    def _record(self, pubs: list[Publication]) -> list[Publication]:
        for pub in pubs:
            prev = self.published.get(pub.key)
            assert prev is None or pub.version > prev.version, "versions must increase per key"
            self.published[pub.key] = pub
        self.all_pubs.extend(pubs)
        return pubs

    def workers(self) -> list[Recommender]:
        return [self.rec]

    def settle(self) -> list[Publication]:
        pubs: list[Publication] = []
        for rec in self.workers():
            pubs += rec.settle()
        return self._record(pubs)

    def apply(self, change: ProductChange, vector: np.ndarray | None = None) -> list[Publication]:
        needed = self.rec.needs_embedding(change)
        pubs: list[Publication] = []
        for rec in self.workers():
            pubs += rec.apply(change, vector if needed is not None else None, defer=self.defer)
        if needed is not None:
            assert vector is not None
            self.vectors[change.product_id] = np.asarray(vector)
        if isinstance(change, ProductDelete) and change.product_id not in self.rec.catalog:
            self.vectors.pop(change.product_id, None)
        return self._record(pubs)


def random_upsert(rng: np.random.Generator, pid: str, ts: float, *, full: bool = True) -> ProductUpsert:
    noun = NOUNS[int(rng.integers(len(NOUNS)))]
    brand = BRANDS[int(rng.integers(len(BRANDS)))]
    model = f"X{int(rng.integers(100, 130))}"
    attrs = (("color", COLORS[int(rng.integers(len(COLORS)))]),) if rng.random() < 0.7 else ()
    return ProductUpsert(
        product_id=pid,
        ts=ts,
        title=f"{brand or ''} {noun} {model}".strip(),
        brand=brand,
        category=CATEGORIES[int(rng.integers(len(CATEGORIES)))],
        price=float(rng.choice([9.0, 10.0, 12.0, 15.0, 20.0, 40.0])) if rng.random() < 0.9 else None,
        in_stock=bool(rng.random() < 0.8),
        group_id=f"g{int(rng.integers(4))}" if rng.random() < 0.4 else None,
        attributes=attrs,
    )


def check_against_exact(stream: Stream, *, exact: bool, min_overlap: float = 0.95) -> float:
    """Assert the invariant; return the mean similar-items overlap with the recomputation."""
    rec = stream.rec
    config = rec.config
    live = {p.product_id: p for p in rec.catalog}
    assert set(stream.vectors) == set(live)
    expected = exact_lists(
        list(live.values()), stream.vectors, config, rec.lexical, owns=rec.owns, behavior=rec.behavior_rows()
    )
    overlaps: list[float] = []
    complements = rec.lists(Kind.COMPLEMENTS)
    assert set(complements) <= set(live), "complements left for deleted products"
    for pid, want in expected[Kind.COMPLEMENTS].items():
        got = complements.get(pid, ())
        assert [i.product_id for i in got] == [i.product_id for i in want], f"complements[{pid}]"
        for a, b in zip(got, want, strict=True):
            assert a.score == b.score and abs(a.dense - b.dense) < 1e-9 and a.reasons == b.reasons
        pub = stream.published.get((Kind.COMPLEMENTS, pid))
        assert ((pub.items or ()) if pub is not None else ()) == got, f"complements[{pid}] not published as current"
    for kind in CONTENT_KINDS:
        current = rec.lists(kind)
        owned = {p for p in live if rec.owns(p)}
        assert set(current) == owned, f"{kind}: lists missing or left for deleted products"
        for pid, items in current.items():
            pub = stream.published.get((kind, pid))
            assert pub is not None and pub.items == items, f"{kind}[{pid}] not published as current"
            owner = live[pid]
            for item in items:
                assert item.product_id in live and item.product_id != pid
                if kind is Kind.SUBSTITUTES:
                    assert is_substitute(owner, live[item.product_id], config)
            want = expected[kind][pid]
            got_ids = [i.product_id for i in items]
            want_ids = [i.product_id for i in want]
            if exact:
                assert got_ids == want_ids, f"{kind}[{pid}]: {got_ids} != {want_ids}"
                for a, b in zip(items, want, strict=True):
                    assert abs(a.score - b.score) < 1e-9 and abs(a.lexical - b.lexical) < 1e-9
                    assert a.reasons == b.reasons
            if kind is Kind.SIMILAR and want_ids:
                overlaps.append(len(set(got_ids) & set(want_ids)) / len(want_ids))
    for key, pub in stream.published.items():
        if key[1] not in live:
            assert pub.items is None, f"{key} must end with a tombstone"
    assert {p.key: p for p in last_per_key(stream.all_pubs)} == stream.published
    mean = float(np.mean(overlaps)) if overlaps else 1.0
    assert mean >= (1.0 if exact else min_overlap), f"mean overlap {mean:.3f}"
    return mean


def split(members: int, turn: int) -> list[Callable[[str], bool]]:
    """Ownership of ``members`` workers: worker i owns the ids hashing to ``(i + turn) % members``."""
    return [
        (lambda pid, want=(i + turn) % members: zlib.crc32(pid.encode()) % members == want) for i in range(members)
    ]


class Cluster(Stream):
    """Several workers, each replicating every change and owning a split of the lists; their
    publications land on one set of topics (``published``), as in a consumer group."""

    def __init__(self, recs: list[Recommender]) -> None:
        super().__init__(recs[0])
        self.recs = recs

    def workers(self) -> list[Recommender]:
        return self.recs

    def apply_behavior(self, rows: dict[str, BehaviorRow]) -> list[Publication]:
        pubs: list[Publication] = []
        for rec in self.recs:  # rows travel to the item's owner (repartitioned by item)
            pubs += rec.apply_behavior({pid: row for pid, row in rows.items() if rec.owns(pid)})
        return self._record(pubs)

    def rebalance(self, turn: int) -> list[Publication]:
        """Move ownership; each new owner first continues the versions the topics hold."""
        pubs: list[Publication] = []
        rows = {pid: row for rec in self.recs for pid, row in rec.behavior_rows().items()}
        for rec, owns in zip(self.recs, split(len(self.recs), turn), strict=True):
            for (kind, pid), pub in self.published.items():
                if owns(pid):
                    rec.seed_version(kind, pid, pub.version)
            pubs += rec.set_ownership(owns, rows)
        return self._record(pubs)

    def check(self, *, exact: bool) -> None:
        """The invariant for every worker's own lists, against the shared topics."""
        live = {p.product_id for p in self.rec.catalog}
        owned: list[str] = []
        for rec in self.recs:
            check_against_exact(Stream(rec, self.vectors, self.published, self.all_pubs), exact=exact)
            owned += [p for p in live if rec.owns(p)]
        assert sorted(owned) == sorted(live), "every live product has exactly one owner"
