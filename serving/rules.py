"""Substitute rules: which candidates may replace a product on its substitutes list.

A candidate ``c`` is a substitute for ``p`` when all of these hold:

* ``c`` is not ``p`` and ``c`` is in stock;
* ``c`` has the same leaf category, when both have one (case-insensitive);
* ``c``'s price is within ``price_band`` of ``p``'s price, when both have prices;
* ``c`` belongs to a different ``group_id``, when ``p`` has one (variants of one product
  are not substitutes for each other).

The candidate pool is ``p``'s dense top-C (``candidate_depth``) neighbours, ranked by the
same hybrid score as similar items. A product with no valid candidate in its top-C gets an
empty substitute list: widening the search on demand would make the list depend on
index internals and break the "equal to a from-scratch recomputation" invariant.
"""

from __future__ import annotations

from serving.catalog import Product
from serving.config import RecommenderConfig
from serving.scoring import Profile, profile


def is_substitute(product: Product, candidate: Product, config: RecommenderConfig) -> bool:
    """True when ``candidate`` may be offered in place of ``product``."""
    return profile_is_substitute(profile(product), profile(candidate), config)


def profile_is_substitute(product: Profile, candidate: Profile, config: RecommenderConfig) -> bool:
    """``is_substitute`` on normalised profiles (the hot path)."""
    # Cheapest and most selective tests first: this runs for every top-C candidate.
    if not candidate.in_stock or candidate.product_id == product.product_id:
        return False
    if (
        product.price is not None
        and candidate.price is not None
        and abs(candidate.price - product.price) > config.price_band * abs(product.price) + 1e-9
    ):
        return False
    if product.group_id is not None and candidate.group_id == product.group_id:
        return False
    return not (product.has_leaf and candidate.has_leaf and product.leaf != candidate.leaf)
