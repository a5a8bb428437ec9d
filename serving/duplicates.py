"""Duplicate listings: the other listings of the shop that are the same product.

The definition every published ``duplicates`` list must match (``exact_duplicates``
computes it from scratch; ``serving.propagation`` keeps it incrementally):

``duplicates[p]`` holds every other live product ``q`` that is not a variant of ``p``
(the same ``group_id``: colours and pack sizes are different products), for which

* the textual rule of the lists says so: ``p`` and ``q`` share a duplicate key
  (``serving.scoring.duplicate_keys``: the brand with the title's words in any order, or one
  brand's model code), the very rule that collapses them inside a list; or
* their hybrid content score (``serving.scoring.content_score``, the score the lists rank
  by) reaches ``RecommenderConfig.duplicate_threshold``, calibrated on labelled
  same-product pairs (``docs/quality.md``, "Duplicate listings"), unless both titles carry
  numbers and share none (``numbers_differ``: "stuffit deluxe 11" and "12", "hdmi cable 1"
  and "2" are editions or sizes of a line, whose n-grams overlap as much as two listings
  of one product do).

Items are ranked by content score, best first, ties by id; ``reasons`` say which test
passed. The relation is symmetric and pair-wise: whether ``q`` is in ``duplicates[p]``, and
the item's numbers, depend on ``p`` and ``q`` alone, and are computed the same way from
either side (``pair_dense``; ``serving.lexical.cosine_many`` is symmetric too). So a change
of ``q`` can only change the entry for ``q`` in other lists, which is what makes the
incremental maintenance exact and cheap.

Finding the pairs above the threshold without scoring every product: the content score is
``a * dense + b * max(0, lexical - floor)`` with ``a = 1 - w`` and ``b = w / (1 - floor)``,
so a pair can only reach ``t`` when ``lexical >= floor + (t - a) / b`` (if ``t > a``: no
dense score makes up for missing lexical evidence), or else when ``dense >= (t - w) / a``.
``candidate_ids`` uses the first bound over the lexical postings when it applies
(``LexicalPostings.candidates``: only the query's rare buckets are looked up, and the
bound makes that exact), the second over the vector index otherwise (then as exact as the index: exact with
``ExactIndex``, as good as its recall with HNSW).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from serving.catalog import Product
from serving.config import RecommenderConfig
from serving.index import VectorIndex
from serving.lexical import N_BUCKETS, LexicalModel, SparseVec, cosine_many
from serving.postings import LexicalPostings
from serving.publication import Items, ScoredItem
from serving.scoring import Profile, content_score, profile, variants
from serving.text import product_text

#: The reason given when two listings share the brand and their title words.
SAME_TITLE = "same brand and title words"
#: The reason given when two listings share one brand's model code.
SAME_CODE = "same brand and model code"

#: Slack on the candidate bounds: the index ranks by float32 scores, the bounds are float64.
_MARGIN = 1e-6
#: First depth of a dense range search; it doubles until the last hit is below the bound.
_FIRST_DEPTH = 32


def threshold_reason(config: RecommenderConfig) -> str:
    """The reason given when a pair's content score reaches the threshold."""
    return f"content score >= {config.duplicate_threshold:g}"


def rule_reasons(a: Profile, b: Profile) -> tuple[str, ...]:
    """Why the textual rule says ``a`` and ``b`` are one product (empty: it does not)."""
    shared = set(a.dup_keys).intersection(b.dup_keys)
    if not shared:
        return ()
    out = []
    if any(k.startswith("t\x00") for k in shared):
        out.append(SAME_TITLE)
    if any(k.startswith("c\x00") for k in shared):
        out.append(SAME_CODE)
    return tuple(out)


def numbers_differ(a: Profile, b: Profile) -> bool:
    """Whether both titles carry numbers and share none (then the score cannot make them one)."""
    return bool(a.title_numbers and b.title_numbers and a.title_numbers.isdisjoint(b.title_numbers))


def duplicate_item(owner: Profile, other: Profile, dense: float, lexical: float,
                   config: RecommenderConfig) -> ScoredItem | None:
    """The entry for ``other`` in ``owner``'s duplicates, or ``None`` when it is not one."""
    if owner.product_id == other.product_id or variants(owner.group_id, other.group_id):
        return None
    content = content_score(dense, lexical, config)
    reasons = rule_reasons(owner, other)
    if content >= config.duplicate_threshold and not numbers_differ(owner, other):
        reasons = (*reasons, threshold_reason(config))
    if not reasons:
        return None
    return ScoredItem(product_id=other.product_id, score=content, content=content, dense=dense,
                      lexical=lexical, behavior=0.0, reasons=reasons)


def rank_key(item: ScoredItem) -> tuple[float, str]:
    """An item's place in a duplicates list: best content score first, ties by id (every
    ranking of the core breaks ties by id)."""
    return -item.score, item.product_id


def ranked(items: Iterable[ScoredItem]) -> Items:
    """``items`` in list order (``rank_key``)."""
    return tuple(sorted(items, key=rank_key))


def pair_dense(vector: np.ndarray, others: np.ndarray) -> list[float]:
    """Dense scores (float64) of one stored unit vector with each row of ``others``.

    Summed from the element-wise products, which are the same numbers whichever side the
    pair is scored from, so ``duplicates[p]`` and ``duplicates[q]`` hold the same score
    (a matrix product does not promise that).
    """
    if len(others) == 0:
        return []
    prod = np.asarray(others, dtype=np.float64) * np.asarray(vector, dtype=np.float64)
    return [float(x) for x in prod.sum(axis=1)]


def bounds(config: RecommenderConfig) -> tuple[float, float]:
    """``(min_dense, min_lexical)``: a pair below either cannot reach the threshold
    (``-inf`` where the score gives no bound); see the module docstring."""
    t, w, floor = config.duplicate_threshold, config.lexical_weight, config.lexical_floor
    a, b = 1.0 - w, w / (1.0 - floor)
    min_dense = (t - w) / a if a > 0 else -math.inf
    min_lexical = floor + (t - a) / b if b > 0 and t > a else -math.inf
    return min_dense, min_lexical


def candidate_ids(
    pid: str,
    *,
    index: VectorIndex,
    lex: Mapping[str, SparseVec],
    postings: LexicalPostings,
    config: RecommenderConfig,
) -> set[str]:
    """Every product other than ``pid`` whose content score with it may reach the threshold
    (a superset; ``duplicate_item`` decides)."""
    min_dense, min_lexical = bounds(config)
    if min_lexical > config.lexical_floor:
        out = postings.candidates(lex, lex[pid], min_lexical - _MARGIN)
        out.discard(pid)
        return out
    vector = index.get_vector(pid)
    total = len(index)
    depth = _FIRST_DEPTH
    while True:
        hits = index.query(vector, depth, exclude=(pid,))
        if len(hits) < depth or depth >= total or hits[-1][1] < min_dense - _MARGIN:
            return {h for h, s in hits if s >= min_dense - _MARGIN}
        depth *= 2


def score_pairs(
    owner: Profile,
    ids: Iterable[str],
    *,
    vector: np.ndarray,
    vectors: Callable[[list[str]], np.ndarray],
    lex: Mapping[str, SparseVec],
    profiles: Mapping[str, Profile],
    config: RecommenderConfig,
) -> Items:
    """Every duplicate of ``owner`` among ``ids`` (any superset of them), ranked, uncapped
    (``capped`` makes the published list of it)."""
    others = sorted(i for i in ids if i != owner.product_id and i in profiles)
    if not others:
        return ()
    dense = np.asarray(pair_dense(vector, vectors(others)), dtype=np.float64)
    lexical = np.asarray(cosine_many(lex[owner.product_id], [lex[o] for o in others]), dtype=np.float64)
    # Vectorised first: only pairs above the threshold or sharing a key can pass, and the
    # exact decision (``duplicate_item``) is made for those alone.
    keys = set(owner.dup_keys)
    passing = content_scores(dense, lexical, config) >= config.duplicate_threshold
    items = (
        duplicate_item(owner, profiles[o], float(dense[j]), float(lexical[j]), config)
        for j, o in enumerate(others)
        if passing[j] or (keys and not keys.isdisjoint(profiles[o].dup_keys))
    )
    return ranked(i for i in items if i is not None)


def capped(items: Items, config: RecommenderConfig) -> Items:
    """The published list: the ``duplicate_max_items`` best of a ranked list."""
    return items[: config.duplicate_max_items]


#: A list's known best duplicates, kept beyond the published ones, and whether they are all
#: of them. Without the complete flag they are an exact prefix of the ranking.
Known = tuple[Items, bool]
#: How many times ``duplicate_max_items`` the core keeps per list (``Known``): when a listed
#: item goes, the next one is taken from there instead of a search from scratch. A product
#: listed hundreds of times otherwise made every holder of a retitled listing search again
#: (p99 of a title edit 4.9 s at 100k products).
RESERVE_FACTOR = 2


def known_of(items: Items, config: RecommenderConfig) -> Known:
    """What a core keeps of a full ranking (``Known``)."""
    depth = RESERVE_FACTOR * config.duplicate_max_items
    return items[:depth], len(items) <= depth


def content_scores(dense: np.ndarray, lexical: np.ndarray, config: RecommenderConfig) -> np.ndarray:
    """``content_score`` of many pairs, bit for bit (the same float64 operations in the same order)."""
    floor, w = config.lexical_floor, config.lexical_weight
    return (1.0 - w) * dense + w / (1.0 - floor) * np.where(lexical > floor, lexical - floor, 0.0)


class DuplicateKeys:
    """Which live products share each duplicate key (the textual rule's side of the search)."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[str]] = {}
        self._keys: dict[str, tuple[str, ...]] = {}

    def rebuild(self, profiles: Mapping[str, Profile]) -> None:
        """Index every profile of ``profiles`` afresh."""
        self._by_key, self._keys = {}, {}
        for pid, prof in profiles.items():
            self.put(pid, prof.dup_keys)

    def put(self, pid: str, keys: Sequence[str]) -> None:
        """``pid`` now has ``keys`` (its old ones are forgotten)."""
        self.discard(pid)
        if keys:
            self._keys[pid] = tuple(keys)
            for key in keys:
                self._by_key.setdefault(key, set()).add(pid)

    def discard(self, pid: str) -> None:
        """``pid`` is gone."""
        for key in self._keys.pop(pid, ()):
            holders = self._by_key.get(key)
            if holders is not None:
                holders.discard(pid)
                if not holders:
                    del self._by_key[key]

    def mates(self, pid: str) -> set[str]:
        """The other products that share a key with ``pid``."""
        out: set[str] = set()
        for key in self._keys.get(pid, ()):
            out |= self._by_key.get(key, set())
        out.discard(pid)
        return out


def exact_duplicates(
    products: Iterable[Product],
    vectors: Mapping[str, np.ndarray],
    config: RecommenderConfig,
    lexical: LexicalModel | None = None,
    *,
    owns: Callable[[str], bool] | None = None,
) -> dict[str, Items]:
    """Every owned product's duplicates list, by brute force over every pair (the definition).

    ``vectors`` are the stored float32 unit vectors (``Recommender.vectors()``, or what
    ``normalize_rows`` makes of the raw ones); ``lexical`` the recommender's model.
    """
    lexical = lexical or LexicalModel()
    prods = {p.product_id: p for p in products}
    ids = sorted(prods)
    profs = {i: profile(prods[i]) for i in ids}
    lex = {i: lexical.vectorize(product_text(prods[i])) for i in ids}
    mat = np.stack([np.asarray(vectors[i], dtype=np.float32) for i in ids]) if ids else np.zeros((0, config.dim))
    pos = {pid: row for row, pid in enumerate(ids)}
    out: dict[str, Items] = {}
    for row, pid in enumerate(ids):
        if owns is not None and not owns(pid):
            continue
        out[pid] = capped(score_pairs(profs[pid], ids, vector=mat[row],
                                      vectors=lambda others: mat[[pos[o] for o in others]],
                                      lex=lex, profiles=profs, config=config), config)
    return out


#: Owners whose duplicates ``DuplicateBatch`` finds at once (one sparse product per block).
BATCH_OWNERS = 512
#: Candidate pairs scored at once (bounds the memory of the row gathers: ~2 KB per pair).
BATCH_PAIRS = 50_000
#: A prefix is cut once what is left of the vector has a norm below this share of the
#: lexical bound: the lower, the longer the prefixes (a dearer join) and the
#: fewer pairs the first bound lets through. With the second bound (the owner's weight on
#: the rest) the shortest prefixes measured fastest at 100k products of ``build_catalog``
#: with a fitted IDF: 1.6 ms per owner at share 1.0, 1.8 at 0.8, 2.2 at 0.6.
BATCH_REST_SHARE = 1.0


def batch_usable(config: RecommenderConfig) -> bool:
    """Whether ``config``'s threshold lets a ``DuplicateBatch`` find the pairs (it needs
    lexical evidence, ``bounds``)."""
    _, min_lexical = bounds(config)
    return min_lexical > config.lexical_floor


class _PairLexical:
    """Pair codes (``owner * n + other``), appended in increasing order, with their lexical
    cosine; looked up in bulk."""

    def __init__(self) -> None:
        self._codes = np.zeros(1024, np.int64)
        self._lexical = np.zeros(1024, np.float64)
        self._size = 0

    def append(self, codes: np.ndarray, lexical: np.ndarray) -> None:
        end = self._size + len(codes)
        if end > len(self._codes):
            grown = max(end, 2 * len(self._codes))
            self._codes = np.resize(self._codes, grown)
            self._lexical = np.resize(self._lexical, grown)
        self._codes[self._size : end] = codes
        self._lexical[self._size : end] = lexical
        self._size = end

    def lookup(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(whether each code is held, its cosine where it is)."""
        held = self._codes[: self._size]
        if not len(held):
            return np.zeros(len(codes), dtype=bool), np.zeros(len(codes))
        at = np.minimum(np.searchsorted(held, codes), len(held) - 1)
        return held[at] == codes, self._lexical[: self._size][at]


class DuplicateBatch:
    """Many products' duplicates lists at once: a whole catalog's build, refit or restore.

    Equal, list for list, to ``capped(score_pairs(...))`` over ``candidate_ids`` one owner at
    a time (a property test holds them together), but found by an all-pairs similarity join
    over the lexical vectors instead of one postings scan per owner:

    * every product's features are ordered globally, rarest first, and its *prefix* is the
      shortest run of them after which the rest has a norm ``r`` below the bound ``m`` on the
      lexical cosine (``bounds``). Two vectors whose prefixes share no feature have a cosine
      below ``m`` (the one whose prefix ends first has all shared features in its rest), so
      the pairs are those of the sparse product of the prefixes, pruned by
      ``prefix dot + r_p + r_q >= m``;
    * the pairs left, and those of a shared duplicate key, are scored exactly: the lexical
      cosine from the element-wise product of the two rows summed in bucket order (the very
      sum ``cosine_many`` makes), the dense score as ``pair_dense`` sums it, the content score
      by ``content_scores``; variants, the numbers veto and the threshold are applied to
      arrays, and ``duplicate_item`` is called for the ``duplicate_max_items`` best alone.

    A snapshot of ``lex``, ``profiles`` and the vectors taken at construction: build it
    when the whole state is still, and drop it after. Only for a threshold that needs
    lexical evidence (``bounds``); otherwise ``usable`` is false and callers go one by one.
    """

    def __init__(
        self,
        lex: Mapping[str, SparseVec],
        profiles: Mapping[str, Profile],
        vectors: Callable[[list[str]], np.ndarray],
        config: RecommenderConfig,
    ) -> None:
        self.config = config
        self._vectors = vectors
        self._profiles = profiles
        _, min_lexical = bounds(config)
        self.usable = batch_usable(config)
        self.ids = sorted(profiles)
        self._row = {pid: i for i, pid in enumerate(self.ids)}
        # Each pair is scored by the first of its owners to come (in this call or an earlier
        # one: a settle asks for its owners in steps, in order) and looked up by the second;
        # the lexical cosine is the same, bit for bit, both ways round, and so is the rule
        # (a key is shared). ``_done``: rows already scored; ``_ahead``: the pairs they
        # scored towards later rows, with their cosine.
        self._done = np.zeros(len(self.ids), dtype=bool)
        self._ahead = _PairLexical()
        self._last_row = -1
        if not self.usable:
            return
        from scipy import sparse  # imported here: only whole-catalog steps need it

        ids = self.ids
        n = len(ids)
        parts = [lex[pid] for pid in ids]
        lengths = np.fromiter((len(v[0]) for v in parts), dtype=np.int64, count=n)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if n and int(lengths.sum()):
            indices = np.concatenate([v[0] for v in parts]).astype(np.int32)
            data = np.concatenate([v[1] for v in parts]).astype(np.float64)
        else:
            indices, data = np.zeros(0, np.int32), np.zeros(0, np.float64)
        self._lex = sparse.csr_matrix((data, indices, indptr), shape=(n, N_BUCKETS))
        self._lex.has_sorted_indices = True  # each SparseVec's buckets are sorted and unique
        self._min_lexical = min_lexical
        self._edge = (min_lexical - _MARGIN) * (1.0 - 1e-6)
        # Prefixes: each row's entries in the global order (rarest bucket first, ties by bucket).
        rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
        df = np.bincount(indices, minlength=N_BUCKETS)
        rank = np.empty(N_BUCKETS, np.int64)
        rank[np.lexsort((np.arange(N_BUCKETS), df))] = np.arange(N_BUCKETS)
        order = np.lexsort((rank[indices], rows))
        w2 = data[order] ** 2
        before = np.cumsum(w2) - w2  # the squares summed before each entry, over every row
        row_total = np.bincount(rows, weights=w2, minlength=n)
        row_base = np.zeros(n)
        row_base[lengths > 0] = before[indptr[:-1][lengths > 0]]
        left = row_total[rows] - (before - row_base[rows])  # this entry and the rest of its row
        cut = (self._edge * BATCH_REST_SHARE) ** 2
        taken = left >= cut - 1e-9  # slack for the running sums: a longer prefix is never wrong
        self._rest = np.sqrt(np.maximum(row_total - np.bincount(rows[taken], weights=w2[taken], minlength=n), 0.0))
        self._rest += 1e-7  # float32 weights: norms are 1 to about 1e-7
        # Per row, in the global order: each entry's rank and the norm of it and what follows
        # (to bound an owner's weight on the buckets another product left out of its prefix).
        self._entry_rank = rank[indices][order]
        self._entry_left = np.sqrt(np.maximum(left, 0.0)) + 1e-7
        first_left_out = np.full(n, N_BUCKETS, np.int64)  # the rank where a row's rest starts
        out_rows = rows[~taken]
        np.minimum.at(first_left_out, out_rows, self._entry_rank[~taken])
        self._cut_rank = first_left_out
        self._prefix = sparse.csr_matrix((data[order][taken], (rows[taken], indices[order][taken])),
                                         shape=(n, N_BUCKETS))
        self._prefix_t = self._prefix.T.tocsr()
        # The vetoes, as arrays: group codes (-1: none) and the title numbers as a sparse 0/1 matrix.
        groups: dict[str | None, int] = {None: -1}
        self._group = np.array([groups.setdefault(profiles[p].group_id, len(groups) - 1) for p in ids], dtype=np.int64)
        numbers: dict[str, int] = {}
        num_rows = [(i, numbers.setdefault(t, len(numbers))) for i, p in enumerate(ids) for t in profiles[p].title_numbers]
        nr = np.array([r for r, _ in num_rows], dtype=np.int64)
        nc = np.array([c for _, c in num_rows], dtype=np.int64)
        self._numbers = sparse.csr_matrix((np.ones(len(num_rows)), (nr, nc)), shape=(n, max(1, len(numbers))))
        self._has_numbers = np.diff(self._numbers.indptr) > 0
        # The textual rule's side: the same key index the stream keeps.
        self._keys = DuplicateKeys()
        self._keys.rebuild(profiles)

    def lists(self, owners: Iterable[str]) -> dict[str, Items]:
        """The duplicates list of each of ``owners`` (live products of the snapshot)."""
        cap = self.config.duplicate_max_items
        return {p: items[:cap] for p, (items, _) in self.known(owners, cap).items()}

    def known(self, owners: Iterable[str], depth: int) -> dict[str, Known]:
        """Each owner's ``depth`` best duplicates, and whether that is all of them (``Known``)."""
        rows = sorted(self._row[p] for p in owners)
        out: dict[str, Items] = {self.ids[r]: () for r in rows}
        n = len(self.ids)
        if rows and rows[0] <= self._last_row:
            # Owners before ones already scored (not a settle's steps in order): start over,
            # as the pairs kept for later owners are looked up in increasing order.
            self._done, self._ahead = np.zeros(n, dtype=bool), _PairLexical()
        done, ahead = self._done, self._ahead
        for start in range(0, len(rows), BATCH_OWNERS):
            block = np.asarray(rows[start : start + BATCH_OWNERS], dtype=np.int64)
            owner, other, rule = self._pairs(block)
            lexical = np.full(len(owner), np.nan)
            earlier = np.flatnonzero(done[other])
            if len(earlier):
                found, values = ahead.lookup(other[earlier] * n + owner[earlier])
                lexical[earlier[found]] = values[found]
                # A pair the other side did not score has no lexical evidence and no key.
                keep = np.ones(len(owner), dtype=bool)
                keep[earlier[~found]] = False
                owner, other, rule, lexical = owner[keep], other[keep], rule[keep], lexical[keep]
            for at in range(0, len(owner), BATCH_PAIRS):
                part = slice(at, at + BATCH_PAIRS)
                scored_owner, scored_other, scored_lexical = self._score(
                    owner[part], other[part], rule[part], lexical[part], depth + 1, out)
                later = scored_other > block[-1]
                ahead.append(scored_owner[later] * n + scored_other[later], scored_lexical[later])
            done[block] = True
            self._last_row = int(block[-1])
        return {p: (items[:depth], len(items) <= depth) for p, items in out.items()}

    def _pairs(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate pairs of ``block``'s owners: (owner rows, other rows, shares a key), by
        owner then other, each pair once."""
        joined = (self._lex[block] @ self._prefix_t).tocoo()
        local, other, partial = joined.row.astype(np.int64), joined.col.astype(np.int64), joined.data
        # cosine <= (owner . other's prefix) + |other's rest|, and the tighter
        # (owner . other's prefix) + |other's rest| * |owner's part on the buckets ranked at or
        # after where other's rest starts| (Cauchy-Schwarz on the rest alone).
        keep = (partial + self._rest[other] >= self._edge) & (block[local] != other)
        local, other, partial = local[keep], other[keep], partial[keep]
        starts, ends = self._lex.indptr[block], self._lex.indptr[block + 1]
        span = (np.concatenate([np.arange(a, b) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)])
                if len(block) else np.zeros(0, np.int64))
        local_row = np.repeat(np.arange(len(block), dtype=np.int64), ends - starts)
        tail = np.zeros(len(local))
        if len(span):
            keys = local_row * (N_BUCKETS + 1) + self._entry_rank[span]
            at = np.minimum(np.searchsorted(keys, local * (N_BUCKETS + 1) + self._cut_rank[other]), len(keys) - 1)
            tail = np.where(local_row[at] == local, self._entry_left[span[at]], 0.0)
            tail[keys[at] < local * (N_BUCKETS + 1) + self._cut_rank[other]] = 0.0  # past the owner's last entry
        keep = partial + self._rest[other] * tail >= self._edge
        owner, other = block[local[keep]], other[keep]
        mates = [(r, self._row[m]) for r in block.tolist() for m in self._keys.mates(self.ids[r])]
        n = len(self.ids)
        code = owner * n + other
        rule_code = np.unique(np.array([r * n + m for r, m in mates], dtype=np.int64))
        code = np.union1d(code, rule_code)  # sorted: by owner, then other
        return code // n, code % n, np.isin(code, rule_code)

    def _cosines(self, owner: np.ndarray, other: np.ndarray) -> np.ndarray:
        """The lexical cosine of each pair (``owner`` sorted), bit for bit ``cosine_many``'s:
        the other row's entries in bucket order, each times the owner's weight there (0 where
        it has none, looked up in the owner's vector spread over every bucket), summed in that
        order by ``bincount``."""
        indptr, buckets, weights = self._lex.indptr, self._lex.indices, self._lex.data
        starts = indptr[other]
        lengths = indptr[other + 1] - starts
        offsets = np.cumsum(lengths) - lengths
        entries = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))
        entry_buckets = buckets[entries]
        products = weights[entries]
        spread = np.zeros(N_BUCKETS, np.float64)
        bounds_at = np.flatnonzero(np.diff(owner)) + 1
        for first, last in zip(np.concatenate([[0], bounds_at]).tolist(),
                               np.concatenate([bounds_at, [len(owner)]]).tolist(), strict=True):
            row = int(owner[first])
            own = buckets[indptr[row] : indptr[row + 1]]
            spread[own] = weights[indptr[row] : indptr[row + 1]]
            span = slice(int(offsets[first]), int(offsets[last - 1] + lengths[last - 1]))
            products[span] *= spread[entry_buckets[span]]
            spread[own] = 0.0
        return np.bincount(np.repeat(np.arange(len(owner)), lengths), weights=products, minlength=len(owner))

    def _score(self, owner: np.ndarray, other: np.ndarray, rule: np.ndarray, known_lexical: np.ndarray,
               keep_best: int, out: dict[str, Items]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score the pairs (``known_lexical``: their cosine where already known, NaN where not)
        into ``out``; return the pairs that had lexical evidence or a key, with their cosine."""
        config = self.config
        lexical = known_lexical.copy()
        todo = np.isnan(lexical)
        if todo.any():
            lexical[todo] = self._cosines(owner[todo], other[todo])
        scored = rule | (lexical >= self._min_lexical - _MARGIN)
        owner, other, rule, lexical = owner[scored], other[scored], rule[scored], lexical[scored]
        evidence = owner, other, lexical
        if not len(owner):
            return evidence
        needed = np.unique(np.concatenate([owner, other]))
        mat = self._vectors([self.ids[r] for r in needed.tolist()])
        at = np.searchsorted(needed, owner), np.searchsorted(needed, other)
        dense = (mat[at[1]].astype(np.float64) * mat[at[0]].astype(np.float64)).sum(axis=1)
        content = content_scores(dense, lexical, config)
        same = self._numbers[owner].multiply(self._numbers[other]).getnnz(axis=1) > 0
        differ = self._has_numbers[owner] & self._has_numbers[other] & ~same
        variant = (self._group[owner] >= 0) & (self._group[owner] == self._group[other])
        keep = ~variant & (rule | ((content >= config.duplicate_threshold) & ~differ))
        owner, other, dense, lexical, content = owner[keep], other[keep], dense[keep], lexical[keep], content[keep]
        # Best first within each owner, ties by id (rows are in id order), then the cap.
        order = np.lexsort((other, -content, owner))
        owner, other, dense, lexical = owner[order], other[order], dense[order], lexical[order]
        first = np.searchsorted(owner, owner)
        chosen = np.flatnonzero(np.arange(len(owner)) - first < keep_best)
        profiles, ids = self._profiles, self.ids
        grouped: dict[str, list[ScoredItem]] = {}
        for j in chosen.tolist():
            p, q = ids[int(owner[j])], ids[int(other[j])]
            item = duplicate_item(profiles[p], profiles[q], float(dense[j]), float(lexical[j]), config)
            if item is not None:
                grouped.setdefault(p, []).append(item)
        for p, items in grouped.items():
            # An owner's pairs may span two chunks: merge with what the first one found.
            out[p] = ranked([*out[p], *items])[:keep_best] if out[p] else tuple(items)
        return evidence


class JoinAhead:
    """``DuplicateBatch.known`` for a whole-catalog step's chunks of owners, computed in a
    forked child while this process builds the candidate buffers and the other lists.

    A settle or a bulk load spends about half its time in the duplicates join and half in
    the buffers, on one thread: the join's numpy and scipy work holds the GIL for most of it.
    The child sees the state as it was at the fork (copy-on-write), builds the batch there
    (its ~1 GB of working arrays at 100k products never touch this process), and writes
    each chunk's result, in order, to a pipe; ``take`` reads the next one. The results are
    those of the same calls made here: the child runs the same code on the same state.

    Nothing in the state the join reads (lexical vectors, profiles, vectors, duplicate keys)
    may change until the last ``take``: a settle and a bulk load change only buffers and
    lists. When the child fails or dies, ``take`` returns ``None`` and the caller computes
    the rest itself. ``close`` ends the child whatever its state.
    """

    def __init__(self, pid: int, reader: int) -> None:
        self._pid: int | None = pid
        self._in = os.fdopen(reader, "rb", buffering=1 << 20)
        #: Why the child's results stopped (``None`` while they come).
        self.failure: str | None = None

    @classmethod
    def start(cls, make_batch: Callable[[], DuplicateBatch | None], chunks: Sequence[Sequence[str]],
              depth: int) -> JoinAhead | None:
        """Fork the child; ``None`` where this platform cannot fork."""
        if not hasattr(os, "fork"):
            return None
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no logging, no locks of the parent's threads, os._exit
            code = 1
            try:
                os.close(reader)
                _child_signals()
                with os.fdopen(writer, "wb", buffering=1 << 20) as out:
                    try:
                        batch = make_batch()
                        if batch is None:
                            raise RuntimeError("the duplicates threshold needs no batch")
                        for chunk in chunks:
                            pickle.dump(("ok", batch.known(chunk, depth)), out, protocol=pickle.HIGHEST_PROTOCOL)
                            out.flush()
                        code = 0
                    except BaseException as exc:  # noqa: BLE001 - reported to the parent, whatever it is
                        pickle.dump(("error", f"{type(exc).__name__}: {exc}"), out)
            finally:
                os._exit(code)
        os.close(writer)
        return cls(pid, reader)

    def take(self) -> dict[str, Known] | None:
        """The next chunk's duplicates; ``None`` (and ``failure`` set) once the child failed."""
        if self.failure is not None:
            return None
        try:
            status, value = pickle.load(self._in)
        except Exception as exc:  # noqa: BLE001 - a dead child (EOF) or a torn record
            status, value = "error", f"the child stopped: {type(exc).__name__}: {exc}"
        if status == "ok":
            return value  # type: ignore[no-any-return]
        self.failure = str(value)
        self.close()
        return None

    def close(self) -> None:
        """End the child (killed if it is still computing) and reap it."""
        pid, self._pid = self._pid, None
        if pid is None:
            return
        self._in.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _child_signals() -> None:
    """In a forked child: the parent's handlers (asyncio writes signals to its loop's wakeup
    fd, shared with the parent) must not act on a signal meant for the child."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
