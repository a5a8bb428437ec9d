"""Scores, ranking and explanations shared by the worker, the recomputation and evaluation.

* ``content = (1 - lexical_weight) * dense + lexical_weight * lexical``
* ``score = (1 - behavior_weight) * content + behavior_weight * behavior``

Every ranking breaks ties by product id, so an incremental update and a from-scratch
recomputation agree on order whenever they agree on the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from serving.catalog import Product
from serving.config import RecommenderConfig


def content_score(dense: float, lexical: float, config: RecommenderConfig) -> float:
    """The hybrid content score of one pair."""
    return (1.0 - config.lexical_weight) * dense + config.lexical_weight * lexical


def final_score(content: float, behavior: float, config: RecommenderConfig) -> float:
    """The published score: content blended with behaviour."""
    return (1.0 - config.behavior_weight) * content + config.behavior_weight * behavior


def dense_scores(owner: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Inner products (float64) of one stored unit vector with a matrix of them."""
    if candidates.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    return np.asarray(candidates, dtype=np.float64) @ np.asarray(owner, dtype=np.float64)


Candidate = tuple[str, float, float]  # (product_id, dense, lexical)


def rank_candidates(
    candidates: Iterable[Candidate], config: RecommenderConfig
) -> list[tuple[str, float, float, float]]:
    """Re-rank (id, dense, lexical) by content score, best first; returns (id, content, dense, lexical)."""
    scored = [(pid, content_score(d, lx, config), d, lx) for pid, d, lx in candidates]
    scored.sort(key=lambda t: (-t[1], t[0]))
    return scored


def _norm(text: str | None) -> str:
    return (text or "").strip().casefold()


def price_gap_percent(owner: Product, candidate: Product) -> int | None:
    """Relative price difference to the owner's price, in whole percent (rounded up)."""
    if owner.price is None or candidate.price is None or owner.price <= 0:
        return None
    gap = abs(candidate.price - owner.price) / owner.price * 100.0
    # Round up so "within N%" never understates the gap; tolerate float noise.
    return max(0, int(np.ceil(gap - 1e-9)))


def reasons(owner: Product, candidate: Product, *, max_attributes: int = 3) -> tuple[str, ...]:
    """Human-readable reasons why ``candidate`` is listed for ``owner``."""
    out: list[str] = []
    if owner.brand and _norm(owner.brand) == _norm(candidate.brand):
        out.append("same brand")
    if owner.leaf_category and _norm(owner.leaf_category) == _norm(candidate.leaf_category):
        out.append(f"same category: {(candidate.leaf_category or '').strip()}")
    gap = price_gap_percent(owner, candidate)
    if gap is not None:
        out.append("same price" if gap == 0 else f"price within {gap}%")
    theirs = {_norm(k): v for k, v in candidate.attributes}
    shared = 0
    for key, value in owner.attributes:
        other = theirs.get(_norm(key))
        if other is not None and _norm(other) and _norm(other) == _norm(value):
            out.append(f"shared {key}: {value}")
            shared += 1
            if shared >= max_attributes:
                break
    return tuple(out)
