"""Scores, ranking and explanations shared by the worker, the recomputation and evaluation.

* ``content = (1 - lexical_weight) * dense + lexical_weight * evidence(lexical)``, where
  ``evidence(x) = max(0, x - lexical_floor) / (1 - lexical_floor)``
* ``score = (1 - behavior_weight) * content + behavior_weight * behavior``

The floor makes the lexical part count only where the texts share enough: every product of
one shop shares some n-grams ("gift card", "software"), and that weak overlap is noise that
pulled related-item lists away from the encoder's better ones, while the strong overlap of
a shared model number or brand and line still decides. With ``lexical_floor = 0`` this is
the plain linear blend, bit for bit. The arithmetic lives in ``content_score``;
``rank_candidates`` and ``serving.patching.best_unlisted`` inline the very same expression
(from ``blend``), so all three give bitwise equal values.

Every ranking breaks ties by product id, so an incremental update and a from-scratch
recomputation agree on order whenever they agree on the numbers.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from serving.catalog import Product
from serving.config import RecommenderConfig
from serving.lexical import codes, words


def blend(config: RecommenderConfig) -> tuple[float, float, float]:
    """``(w_dense, w_evidence, floor)``: ``content = w_dense * dense + w_evidence * (lexical - floor)``
    when ``lexical > floor``, else ``w_dense * dense + w_evidence * 0.0``."""
    floor = config.lexical_floor
    return 1.0 - config.lexical_weight, config.lexical_weight / (1.0 - floor), floor


def content_score(dense: float, lexical: float, config: RecommenderConfig) -> float:
    """The hybrid content score of one pair."""
    # blend(config), inlined: this runs for every candidate of every patched list.
    floor = config.lexical_floor
    w = config.lexical_weight
    return (1.0 - w) * dense + w / (1.0 - floor) * (lexical - floor if lexical > floor else 0.0)


def final_score(content: float, behavior: float, config: RecommenderConfig) -> float:
    """The published score: content blended with behaviour."""
    return (1.0 - config.behavior_weight) * content + config.behavior_weight * behavior


#: Rows per block in ``dense_scores`` (bounds its float64 temporary to ~12 MB at dim 384).
_DENSE_BLOCK = 4096


def dense_scores(owner: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Inner products (float64) of one stored unit vector with a matrix of them.

    Bit for bit the same whichever side computes a pair and whatever else is in the matrix:
    the products of float32 values are exact in float64, and each row is summed by numpy's
    pairwise sum on its own. A BLAS matrix-vector product rounds a row differently by its
    place in the matrix, so a pair scored from the owner's side (a buffer rebuild) and from
    the newcomer's (an insert) could differ in the last bit, and a list republish for it.
    """
    n = candidates.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    v = np.asarray(owner, dtype=np.float64)
    if n <= _DENSE_BLOCK:
        return (np.asarray(candidates, dtype=np.float64) * v).sum(axis=1)
    out = np.empty(n, dtype=np.float64)
    for at in range(0, n, _DENSE_BLOCK):
        out[at : at + _DENSE_BLOCK] = (np.asarray(candidates[at : at + _DENSE_BLOCK], dtype=np.float64) * v).sum(axis=1)
    return out


Candidate = tuple[str, float, float]  # (product_id, dense, lexical)


def rank_candidates(
    candidates: Iterable[Candidate], config: RecommenderConfig
) -> list[tuple[str, float, float, float]]:
    """Re-rank (id, dense, lexical) by content score, best first; returns (id, content, dense, lexical)."""
    w_dense, w_ev, floor = blend(config)
    # Same arithmetic, in the same order, as content_score (so the values are bitwise equal);
    # inlined and sorted on plain tuples because this runs for every list rebuild.
    keyed = [
        (-(w_dense * d + w_ev * (lx - floor if lx > floor else 0.0)), pid, d, lx) for pid, d, lx in candidates
    ]
    keyed.sort()
    return [(pid, -neg, d, lx) for neg, pid, d, lx in keyed]


def _norm(text: str | None) -> str:
    return (text or "").strip().casefold()


class Profile(NamedTuple):
    """The fields of a product that rules and reasons read, normalised once.

    Lists are rebuilt thousands of times per second; normalising strings on every
    comparison would dominate that cost. A named tuple, not a frozen dataclass: one is made
    per product at every restore and change, and a frozen dataclass of these 15 fields took
    longer to make than all the normalising. Callers compare profiles by identity (``is``).
    """

    product_id: str
    in_stock: bool
    price: float | None
    group_id: str | None
    has_brand: bool
    brand: str
    has_leaf: bool
    leaf: str
    leaf_display: str
    attrs: tuple[tuple[str, str, str, str], ...]  # (key, value, key_norm, value_norm)
    attr_map: dict[str, str]  # key_norm -> value_norm (last one wins)
    # Reason strings, formatted and interned once per product rather than once per pair.
    category_reason: str = ""
    attr_reasons: tuple[tuple[str, str, str], ...] = ()  # (key_norm, value_norm, reason)
    #: Two products that share a key are listings of the same product (``duplicate_keys``).
    dup_keys: tuple[str, ...] = ()
    #: The title's words that hold a digit ("11", "2007", "x100"): editions and versions.
    title_numbers: frozenset[str] = frozenset()


def profile(product: Product) -> Profile:
    """Normalise the rule and reason fields of a product."""
    leaf = product.leaf_category
    leaf_display = (leaf or "").strip()
    attributes = product.attributes
    attrs = tuple((k, v, _norm(k), _norm(v)) for k, v in attributes) if attributes else ()
    title_words = words(product.title)
    return Profile(
        product_id=product.product_id,
        in_stock=product.in_stock,
        price=product.price,
        group_id=product.group_id,
        has_brand=bool(product.brand),
        brand=sys.intern(_norm(product.brand)),
        has_leaf=bool(leaf),
        leaf=sys.intern(_norm(leaf)),
        leaf_display=sys.intern(leaf_display),
        attrs=attrs,
        attr_map={kn: vn for _k, _v, kn, vn in attrs},
        category_reason=sys.intern(f"same category: {leaf_display}"),
        attr_reasons=tuple((kn, vn, sys.intern(f"shared {k}: {v}")) for k, v, kn, vn in attrs) if attrs else (),
        dup_keys=_duplicate_keys(product.title, title_words, product.brand),
        title_numbers=frozenset(w for w in title_words if not w.isalpha() and any(ch.isdigit() for ch in w)),
    )


#: The prefix of the reason a kept listing gives for each listing of the same product it stands for.
DUPLICATE_OF = "duplicate_of: "


def duplicate_keys(title: str, brand: str | None) -> tuple[str, ...]:
    """Keys that two listings of one product share (and two different products do not):

    * the brand with the title's words, lower-cased, without punctuation and without the
      brand's own words, in sorted order ("Stuffit Deluxe 11" and "stuffit deluxe 11",
      "Sony WH-1000XM4 headphones" and "headphones WH 1000XM4" by Sony share it);
    * with a brand, the brand with the title's model codes (tokens of letters and digits,
      punctuation dropped: ``WH-1000XM4`` is ``wh1000xm4``), when the title has any: one
      brand's model number names one product, however the rest of the title is written.
      A model code has five characters or more, two letters and two digits at least
      (``model_code``): a version tag (``cs3``, ``v2.0``, ``r11.5``, ``11d``) is shared by a
      brand's whole line, and made "Adobe Photoshop CS3" a duplicate of "Adobe InDesign CS3".

    Variants of a product (another colour, a 2-pack) differ in a title word, so they stay.
    """
    return _duplicate_keys(title, words(title), brand)


def _duplicate_keys(title: str, title_words_found: dict[str, int], brand: str | None) -> tuple[str, ...]:
    brand_norm = _norm(brand)
    brand_words = words(brand_norm) if brand_norm else {}
    title_words = sorted(w for w in title_words_found if w not in brand_words)
    if not title_words:
        return ()
    keys = [f"t\x00{brand_norm}\x00{' '.join(title_words)}"]
    if brand_norm:
        title_codes = sorted(c for c in codes(title) if model_code(c))
        if title_codes:
            keys.append(f"c\x00{brand_norm}\x00{' '.join(title_codes)}")
    return tuple(keys)


def variants(group: str | None, other_group: str | None) -> bool:
    """Whether two listings are variants of one group (never duplicates of each other)."""
    return group is not None and group == other_group


def model_code(code: str) -> bool:
    """Whether a code token (``serving.lexical.codes``) is long enough to name one product."""
    return len(code) >= 5 and sum(ch.isdigit() for ch in code) >= 2 and sum(ch.isalpha() for ch in code) >= 2


#: Largest price gap, in percent, that is still given as a reason ("price within N%").
SIMILAR_PRICE_PERCENT = 50


_PRICE_REASONS = ["same price"] + [sys.intern(f"price within {g}%") for g in range(1, SIMILAR_PRICE_PERCENT + 1)]


def _price_gap(owner_price: float | None, price: float | None) -> int | None:
    if owner_price is None or price is None or owner_price <= 0:
        return None
    gap = abs(price - owner_price) / owner_price * 100.0
    # Round up so "within N%" never understates the gap; tolerate float noise.
    return max(0, math.ceil(gap - 1e-9))


def price_gap_percent(owner: Product, candidate: Product) -> int | None:
    """Relative price difference to the owner's price, in whole percent (rounded up)."""
    return _price_gap(owner.price, candidate.price)


def profile_reasons(owner: Profile, candidate: Profile, *, max_attributes: int = 3) -> tuple[str, ...]:
    """``reasons`` on normalised profiles."""
    out: list[str] = []
    if owner.has_brand and owner.brand == candidate.brand:
        out.append("same brand")
    if owner.has_leaf and owner.leaf == candidate.leaf:
        out.append(candidate.category_reason)
    gap = _price_gap(owner.price, candidate.price)
    # A price is a reason only when it is close; "price within 400%" explains nothing.
    if gap is not None and gap <= SIMILAR_PRICE_PERCENT:
        out.append(_PRICE_REASONS[gap])
    shared = 0
    theirs = candidate.attr_map
    for key_norm, value_norm, reason in owner.attr_reasons:
        other = theirs.get(key_norm)
        if other and other == value_norm:
            out.append(reason)
            shared += 1
            if shared >= max_attributes:
                break
    # Every string is interned: a few hundred distinct ones are shared by millions of items.
    return intern_reasons(tuple(out))


#: Reasons tuples seen so far, each stored once (``intern_reasons``).
_REASONS: dict[tuple[str, ...], tuple[str, ...]] = {}
#: Beyond this many distinct tuples new ones are no longer stored (a catalog whose
#: attribute values are all distinct would otherwise grow the table without end).
_REASONS_MAX = 200_000


def intern_reasons(reasons: tuple[str, ...]) -> tuple[str, ...]:
    """One shared object per distinct reasons tuple: a few thousand distinct tuples stand
    for millions of list entries, and a tuple object per entry cost ~0.8 KB per product."""
    held = _REASONS.get(reasons)
    if held is not None:
        return held
    if len(_REASONS) < _REASONS_MAX:
        _REASONS[reasons] = reasons
    return reasons


def reasons(owner: Product, candidate: Product, *, max_attributes: int = 3) -> tuple[str, ...]:
    """Human-readable reasons why ``candidate`` is listed for ``owner``: same brand, same
    leaf category, price gap, shared attribute values (case-insensitive)."""
    return profile_reasons(profile(owner), profile(candidate), max_attributes=max_attributes)
