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

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from serving.catalog import Product
from serving.config import RecommenderConfig
from serving.index import VectorIndex
from serving.lexical import LexicalModel, SparseVec, cosine_many
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


def ranked(items: Iterable[ScoredItem]) -> Items:
    """Best content score first, ties by id (every ranking of the core breaks ties by id)."""
    return tuple(sorted(items, key=lambda i: (-i.score, i.product_id)))


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
    """``owner``'s duplicates among ``ids`` (any superset of them), ranked."""
    # Pairs that neither test can pass are dropped before they are scored: variants, and
    # titles whose numbers differ without a shared key (a line of sizes: "hdmi cable 1..3000").
    others = sorted(i for i in ids if i != owner.product_id and i in profiles
                    and not variants(owner.group_id, profiles[i].group_id)
                    and (not numbers_differ(owner, profiles[i]) or rule_reasons(owner, profiles[i])))
    if not others:
        return ()
    dense = pair_dense(vector, vectors(others))
    lexical = cosine_many(lex[owner.product_id], [lex[o] for o in others])
    items = (duplicate_item(owner, profiles[o], d, lx, config)
             for o, d, lx in zip(others, dense, lexical, strict=True))
    return ranked(i for i in items if i is not None)


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
    """Every owned product's duplicates, by brute force over every pair (the definition).

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
        out[pid] = score_pairs(profs[pid], ids, vector=mat[row],
                               vectors=lambda others: mat[[pos[o] for o in others]],
                               lex=lex, profiles=profs, config=config)
    return out
