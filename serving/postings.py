"""``LexicalPostings``: the exact lexical top-n of a query over every product (numpy only).

Semantic search (``serving.search``) needs lexical candidates beside the dense ones: a query
that names a model number must find the product that carries it even when the encoder ranks
it far down. Scoring a query's sparse vector against every product's one by one
(``serving.lexical.cosine_many``) costs a pass over every non-zero of the catalog; at 100k
products that is tens of milliseconds. This module keeps the same vectors the other way
round, by hashed feature (an inverted index: bucket -> the rows that have it, with their
weights), so a query touches only the rows of its own buckets.

* **Exact.** The score of a row is the float64 sum, in ascending bucket order, of the
  products of matching weights: bit for bit what ``cosine_many`` gives the same pair.
* **Built lazily, from the recommender's own vectors.** Nothing is built until the first
  search or the first ``duplicates`` list (``serving.duplicates`` finds its candidates here,
  with ``candidates``), so a core that owns no list and serves no search pays nothing.
  Building reads every vector once (about a second at 100k products on the development
  machine; see BENCHMARKS.md).
* **Changes without a rebuild.** Products whose text changed or that were deleted since the
  build are *marked* (``mark``, called by ``Recommender.apply``); a query skips their
  built rows and reads their current vectors from a small *delta* index (by bucket, append
  only) that each query brings up to date with the products marked since the last one, so
  no query rescans every marked product (``candidates`` runs once per text change, for the
  duplicates). Once the marked products pass ``max(MIN_REBUILD, live /
  REBUILD_SHARE)`` the next query rebuilds. A new lexical model (a refit,
  ``Recommender.use_lexical``) or a new vectors mapping drops everything.

Not thread-safe, like the recommender that owns it: call it on the core thread.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping

import numpy as np

from serving.lexical import N_BUCKETS, SparseVec

#: ``candidates`` scores the rarest buckets of a query until the weights left out have a norm
#: below this share of the cosine asked for: the lower, the more (common) buckets are scored
#: and the fewer products pass the bound. Measured on 8,000 products of ``build_catalog`` at
#: a threshold of 0.735 (BENCHMARKS.md, "duplicates"): share 1 (the minimal prefix) let 2,742
#: candidates through on average, 0.35 lets 191, for 2.7 ms per product at the median.
PREFIX_REST_SHARE = 0.35
#: Marked products that are scored one by one before a query rebuilds the postings.
MIN_REBUILD = 2048
#: ... or this share of the live products, whichever is larger (1/16 of them).
REBUILD_SHARE = 16


def by_column(
    indptr: np.ndarray, columns: np.ndarray, data: np.ndarray, n_columns: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CSR matrix (row ``i`` holds ``columns[indptr[i]:indptr[i + 1]]`` with ``data``)
    by column: the column pointers, and per column its rows in ascending order with their
    data. scipy's transpose is a counting sort, four times a stable argsort's speed at 10M
    entries."""
    from scipy import sparse  # imported here: only whole-catalog steps need it

    csc = sparse.csr_array((data, columns, indptr), shape=(len(indptr) - 1, n_columns)).tocsc()
    return csc.indptr.astype(np.int64, copy=False), csc.indices.astype(np.int32, copy=False), csc.data


class LexicalPostings:
    """An inverted index over a recommender's lexical vectors (see the module docstring)."""

    def __init__(self) -> None:
        self._source: Mapping[str, SparseVec] | None = None
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._indptr = np.zeros(N_BUCKETS + 1, np.int64)
        self._rows = np.zeros(0, np.int32)
        self._weights = np.zeros(0, np.float32)
        self._marked: set[str] = set()
        self._delta = _Delta()
        #: Marked since the delta was last brought up to date.
        self._unsynced: set[str] = set()
        #: How many times the postings were built (for tests and the bench).
        self.builds = 0

    @property
    def built(self) -> bool:
        return self._source is not None

    def reset(self) -> None:
        """Forget the build (a new lexical model): the next query builds again."""
        self._source = None
        self._ids, self._row = [], {}
        self._rows, self._weights = np.zeros(0, np.int32), np.zeros(0, np.float32)
        self._marked = set()
        self._delta, self._unsynced = _Delta(), set()

    def mark(self, product_id: str) -> None:
        """``product_id``'s lexical vector changed or went away since the build."""
        if self._source is not None:
            self._marked.add(product_id)
            self._unsynced.add(product_id)

    def build(self, vectors: Mapping[str, SparseVec]) -> None:
        """Index every vector of ``vectors`` (kept by reference: later queries read its
        current values for the marked products)."""
        ids = list(vectors)
        parts = [vectors[pid] for pid in ids]
        lengths = np.fromiter((len(p[0]) for p in parts), dtype=np.int64, count=len(parts))
        if parts and int(lengths.sum()):
            buckets = np.concatenate([p[0] for p in parts])
            weights = np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False)
            # Within one bucket the rows stay in id order.
            self._indptr, self._rows, self._weights = by_column(
                np.concatenate([[0], np.cumsum(lengths)]), buckets, weights, N_BUCKETS)
        else:
            self._indptr = np.zeros(N_BUCKETS + 1, np.int64)
            self._rows, self._weights = np.zeros(0, np.int32), np.zeros(0, np.float32)
        self._ids = ids
        self._row = {pid: i for i, pid in enumerate(ids)}
        self._source = vectors
        self._marked = set()
        self._delta, self._unsynced = _Delta(), set()
        self.builds += 1

    def _current(self, vectors: Mapping[str, SparseVec]) -> None:
        stale = self._source is not vectors
        if not stale:
            stale = len(self._marked) > max(MIN_REBUILD, len(vectors) // REBUILD_SHARE)
        if stale:
            self.build(vectors)

    def scores(self, vectors: Mapping[str, SparseVec], query: SparseVec) -> tuple[list[str], np.ndarray, dict[str, float]]:
        """The lexical cosine of ``query`` with every product of ``vectors``.

        Returns the built ids, their scores (float64, 0 for a marked row) and the scores of
        the marked products that still have a vector.
        """
        self._current(vectors)
        qi, qv = query
        n = len(self._ids)
        built = np.zeros(n, np.float64)
        if n and qi.size:
            # Row by row the products are added in ascending bucket order (qi is sorted),
            # each in float64: the very sum cosine_many makes. A row occurs once per bucket,
            # so the fancy-indexed += adds every product.
            indptr, rows, weights = self._indptr, self._rows, self._weights
            for b, q in zip(qi.tolist(), qv.astype(np.float64).tolist(), strict=True):
                start, end = int(indptr[b]), int(indptr[b + 1])
                if start < end:
                    built[rows[start:end]] += weights[start:end].astype(np.float64) * q
        extra: dict[str, float] = {}
        if self._marked:
            marked_rows = [self._row[p] for p in self._marked if p in self._row]
            if marked_rows:
                built[np.asarray(marked_rows, np.int64)] = 0.0
            self._sync_delta(vectors)
            extra = self._delta.scores(qi, qv.astype(np.float64))
        return self._ids, built, extra

    def _sync_delta(self, vectors: Mapping[str, SparseVec]) -> None:
        """Bring the delta up to date with the products marked since the last query."""
        for pid in sorted(self._unsynced):
            self._delta.put(pid, vectors.get(pid))
        self._unsynced = set()

    def candidates(self, vectors: Mapping[str, SparseVec], query: SparseVec, min_cosine: float) -> set[str]:
        """Every product of ``vectors`` whose cosine with ``query`` may reach ``min_cosine``
        (> 0): a small superset, found without scoring the common buckets (prefix filtering).

        The query's buckets are taken rarest first until the weights left out have a norm
        ``rest`` below ``PREFIX_REST_SHARE * min_cosine``. A product's cosine is at most its
        partial score over the taken buckets plus ``rest`` (Cauchy-Schwarz, both vectors being
        unit), so only the rows of those short posting lists are scored, and only those whose
        partial score plus ``rest`` reaches ``min_cosine`` are kept. Marked products are scored
        directly.
        """
        self._current(vectors)
        qi, qv = query
        out: set[str] = set()
        # Slack for the float32 weights: a product is kept rather than lost at the edge.
        edge = min_cosine * (1.0 - 1e-6)
        if qi.size and min_cosine > 0 and self._ids:
            lengths = self._indptr[qi + 1] - self._indptr[qi]
            order = np.argsort(lengths, kind="stable")
            weights = qv[order].astype(np.float64)
            left = np.maximum(float(np.sum(weights**2)) - np.cumsum(weights**2), 0.0)
            below = np.flatnonzero(left < (edge * PREFIX_REST_SHARE) ** 2)
            taken = int(below[0]) + 1 if below.size else len(order)
            rest = float(np.sqrt(left[taken - 1]))
            partial = np.zeros(len(self._ids), np.float64)
            indptr, rows, wts = self._indptr, self._rows, self._weights
            for b, q in zip(qi[order[:taken]].tolist(), weights[:taken].tolist(), strict=True):
                start, end = int(indptr[b]), int(indptr[b + 1])
                if start < end:
                    partial[rows[start:end]] += wts[start:end].astype(np.float64) * q
            out = {self._ids[r] for r in np.flatnonzero(partial + rest >= edge).tolist() if partial[r] > 0.0}
            if self._marked:
                out -= self._marked  # their built rows are stale: the delta has their vectors
                self._sync_delta(vectors)
                out |= self._delta.candidates(qi[order[:taken]], weights[:taken], rest, edge)
        elif self._marked and qi.size and min_cosine > 0:  # built over no product: the delta is all there is
            self._sync_delta(vectors)
            out = {p for p, sc in self._delta.scores(qi, qv.astype(np.float64)).items() if sc >= edge}
        return out

    def top(
        self,
        vectors: Mapping[str, SparseVec],
        query: SparseVec,
        n: int,
        accept: Callable[[str], bool] | None = None,
        *,
        limit: int | None = None,
    ) -> list[tuple[str, float]]:
        """Up to ``n`` (id, lexical cosine) pairs with a positive cosine, best first (ties by
        id), that ``accept``; at most ``limit`` products are looked at (every one by default)."""
        if n <= 0:
            return []
        ids, built, extra = self.scores(vectors, query)
        positive = np.flatnonzero(built > 0.0)
        pool = [(float(built[i]), ids[i]) for i in positive] if positive.size <= 4 * n else None
        if pool is None:
            # Many positive rows: sort only as many as needed, widening until n are accepted.
            return self._top_wide(ids, built, positive, extra, n, accept, limit)
        pool += [(s, p) for p, s in extra.items() if s > 0.0]
        pool.sort(key=lambda t: (-t[0], t[1]))
        return _take(pool, n, accept, limit)

    def _top_wide(
        self,
        ids: list[str],
        built: np.ndarray,
        positive: np.ndarray,
        extra: dict[str, float],
        n: int,
        accept: Callable[[str], bool] | None,
        limit: int | None,
    ) -> list[tuple[str, float]]:
        cap = positive.size + len(extra) if limit is None else min(limit, positive.size + len(extra))
        want = min(cap, 4 * n)
        extras = sorted(((s, p) for p, s in extra.items() if s > 0.0), key=lambda t: (-t[0], t[1]))
        values = built[positive]
        while True:
            m = min(want, positive.size)
            if m < positive.size:
                # The m best, plus every row tied with the m-th (ties are broken by id below).
                kth = np.partition(values, positive.size - m)[positive.size - m]
                chosen = positive[values >= kth]
            else:
                chosen = positive
            pool = [(float(built[i]), ids[i]) for i in chosen] + extras
            pool.sort(key=lambda t: (-t[0], t[1]))
            out = _take(pool[:want], n, accept, limit)
            if len(out) >= n or want >= cap:
                return out
            want = min(cap, want * 4)


def _take(
    pool: list[tuple[float, str]], n: int, accept: Callable[[str], bool] | None, limit: int | None
) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for looked, (score, pid) in enumerate(pool):
        if limit is not None and looked >= limit:
            break
        if accept is None or accept(pid):
            out.append((pid, score))
            if len(out) >= n:
                break
    return out


class _Delta:
    """The current vectors of the marked products, by bucket (append only: a product marked
    again gets a new row and its old one is ignored), until the next full build."""

    def __init__(self) -> None:
        self._rows: dict[int, array[int]] = {}
        self._weights: dict[int, array[float]] = {}
        self._ids: list[str] = []
        self._live: list[bool] = []
        self._row: dict[str, int] = {}

    def put(self, product_id: str, vector: SparseVec | None) -> None:
        """``product_id`` now has ``vector`` (``None``: deleted)."""
        old = self._row.pop(product_id, None)
        if old is not None:
            self._live[old] = False
        if vector is None:
            return
        row = len(self._ids)
        self._ids.append(product_id)
        self._live.append(True)
        self._row[product_id] = row
        for bucket, weight in zip(vector[0].tolist(), vector[1].tolist(), strict=True):
            rows = self._rows.get(bucket)
            if rows is None:
                self._rows[bucket], self._weights[bucket] = array("i", [row]), array("f", [weight])
            else:
                rows.append(row)
                self._weights[bucket].append(weight)

    def scores(self, buckets: np.ndarray, weights: np.ndarray) -> dict[str, float]:
        """The cosine of a query (its ``buckets``, ascending, and float64 ``weights``) with every
        live product: summed in ascending bucket order in float64, bit for bit ``cosine_many``."""
        partial = self._partial(buckets, weights)
        return {self._ids[r]: float(partial[r]) for r in np.flatnonzero(np.asarray(self._live, dtype=bool)).tolist()}

    def _partial(self, buckets: np.ndarray, weights: np.ndarray) -> np.ndarray:
        partial = np.zeros(len(self._ids), np.float64)
        for bucket, q in zip(buckets.tolist(), weights.tolist(), strict=True):
            rows = self._rows.get(bucket)
            if rows is not None:
                at = np.frombuffer(rows, dtype=np.int32)
                partial[at] += np.frombuffer(self._weights[bucket], dtype=np.float32).astype(np.float64) * q
        return partial

    def candidates(self, buckets: np.ndarray, weights: np.ndarray, rest: float, edge: float) -> set[str]:
        """The live products whose score over ``buckets`` (a query's taken prefix, with its
        ``weights``) plus ``rest`` reaches ``edge``, as ``LexicalPostings.candidates`` keeps
        its built rows."""
        if not self._ids:
            return set()
        partial = self._partial(buckets, weights)
        live = np.asarray(self._live, dtype=bool)
        return {self._ids[r] for r in np.flatnonzero((partial + rest >= edge) & (partial > 0.0) & live).tolist()}
