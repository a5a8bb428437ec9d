"""Competitor offers matched to own products (``serving.offers``): matching, confidence, price
gaps, publications, and the exact re-match property against a from-scratch matching."""

from __future__ import annotations

import math
import zlib
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.catalog import ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.errors import InvalidInput
from serving.index import ExactIndex
from serving.offers import (
    Calibration,
    Offer,
    OfferDelete,
    OfferMatcher,
    OfferPublication,
    PricePublication,
    exact_offer_matches,
)
from serving.recommender import Recommender

CONFIG = RecommenderConfig(dim=8, k=1, candidate_depth=1, candidate_slack=3, index="exact")
CALIBRATION = Calibration(slope=12.0, intercept=-6.0, threshold=0.5)  # confidence 0.5 at score 0.5

WORDS = ["sony", "bose", "headphones", "speaker", "x100", "x200", "cable", "pro"]
PRODUCT_IDS = ["P1", "P2", "P3", "P4", "P5", "P6"]
OFFER_KEYS = [("shopA", "1"), ("shopA", "2"), ("shopB", "1"), ("shopB", "9")]


def vector(seed: int, dim: int = CONFIG.dim) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def text_vector(text: str) -> np.ndarray:
    """A vector that depends on the text only, so equal texts embed alike (as with an encoder)."""
    return vector(zlib.crc32(text.encode()))


def new_core() -> Recommender:
    return Recommender(CONFIG, ExactIndex(CONFIG.dim))


class Shop:
    """A core, a matcher, and what a consumer of the two output topics would hold."""

    def __init__(self, calibration: Calibration = CALIBRATION) -> None:
        self.core = new_core()
        self.matcher = OfferMatcher(calibration, CONFIG)
        self.matches: dict[str, OfferPublication] = {}
        self.prices: dict[str, PricePublication] = {}

    def record(self, update: object) -> None:
        for pub in update.matches:  # type: ignore[attr-defined]
            prev = self.matches.get(pub.key)
            assert prev is None or pub.version > prev.version, "offer-match versions must increase per key"
            self.matches[pub.key] = pub
        for pp in update.prices:  # type: ignore[attr-defined]
            prev_p = self.prices.get(pp.product_id)
            assert prev_p is None or pp.version > prev_p.version, "competitor-price versions must increase"
            self.prices[pp.product_id] = pp

    def product(self, pid: str, title: str, ts: float, price: float | None = None, brand: str | None = None) -> None:
        change = ProductUpsert(pid, ts, title=title, price=price, brand=brand, currency="USD")
        needed = self.core.needs_embedding(change)
        self.core.apply(change, text_vector(title) if needed is not None else None)
        self.record(self.matcher.on_products_changed(self.core, [pid]))

    def delete_product(self, pid: str, ts: float) -> None:
        self.core.apply(ProductDelete(pid, ts))
        self.record(self.matcher.on_products_changed(self.core, [pid]))

    def offer(self, competitor: str, offer_id: str, title: str, ts: float, price: float | None = None,
              brand: str | None = None) -> None:
        offer = Offer(competitor, offer_id, title, ts, brand=brand, price=price, currency="USD",
                      url=f"https://{competitor}.example/{offer_id}")
        vec = text_vector(offer.text) if self.matcher.needs_embedding(offer) else None
        self.record(self.matcher.apply(self.core, [(offer, vec)]))

    def withdraw(self, competitor: str, offer_id: str, ts: float) -> None:
        self.record(self.matcher.apply(self.core, [(OfferDelete(competitor, offer_id, ts), None)]))

    def check_exact(self) -> None:
        """Incremental matches and what the topics hold agree with a from-scratch matching."""
        core, matcher = self.core, self.matcher
        offer_vectors = {k: matcher.index.get(k) for k in matcher.offers}
        scratch = exact_offer_matches({p.product_id: p for p in core.catalog}, core.vectors(), matcher.offers,
                                      offer_vectors, core.lexical, core.config)
        assert set(matcher.matches) == set(matcher.offers) == set(scratch)
        for key, expected in scratch.items():
            got = matcher.matches[key].candidate
            if expected.product_id is None:
                assert got.product_id is None
                continue
            assert got.product_id is not None
            # Same arg-max up to float noise: the incremental pick scores the best score.
            assert got.score == pytest.approx(expected.score, abs=1e-9), (key, got, expected)
            if got.product_id != expected.product_id:
                assert abs(got.score - expected.score) <= 1e-9
        # The topics: the last record per key is the current match, tombstones for the rest.
        for key, pub in self.matches.items():
            assert pub.match == matcher.matches.get(key)
        assert set(matcher.matches) <= set(self.matches)
        for pid in {*self.prices, *matcher.by_candidate}:
            pub_p = self.prices.get(pid)
            assert (pub_p.offers if pub_p else ()) == matcher.offers_of(pid)
            for m in matcher.offers_of(pid):
                assert m.product_id == pid and not m.no_match


def test_an_offer_matches_the_best_own_product_with_reasons_and_price_gap() -> None:
    shop = Shop()
    shop.product("SONY", "Sony WH-1000XM4 headphones", 1.0, price=300.0, brand="Sony")
    shop.product("BOSE", "Bose QC45 headphones", 1.0, price=250.0, brand="Bose")
    shop.offer("shopA", "7", "Sony WH-1000XM4 headphones", 2.0, price=270.0, brand="Sony")
    match = shop.matcher.matches["shopA|7"]
    assert match.product_id == "SONY" and not match.no_match
    assert match.confidence > 0.9 and match.candidate.score == pytest.approx(1.0)
    assert match.price_gap is not None and match.price_gap.amount == -30.0 and match.price_gap.percent == -10.0
    assert "same brand" in match.reasons and "model number: wh1000xm4" in match.reasons
    assert "competitor 10% cheaper" in match.reasons
    assert [m.offer.key for m in shop.matcher.offers_of("SONY")] == ["shopA|7"]
    assert shop.prices["SONY"].offers == (match,) and shop.prices["SONY"].price == 300.0
    shop.check_exact()


def test_below_the_threshold_is_no_match_and_names_the_candidate() -> None:
    shop = Shop(replace(CALIBRATION, threshold=0.999))
    shop.product("SONY", "Sony headphones", 1.0)
    shop.offer("shopA", "1", "garden hose 20 m", 2.0)
    match = shop.matcher.matches["shopA|1"]
    assert match.no_match and match.product_id is None and match.candidate.product_id == "SONY"
    assert any(r.startswith("no match: best candidate SONY below the threshold") for r in match.reasons)
    assert shop.matcher.offers_of("SONY") == () and "SONY" not in shop.prices


def test_an_empty_catalog_has_no_candidate_and_a_later_product_is_matched() -> None:
    shop = Shop()
    shop.offer("shopA", "1", "Sony headphones", 1.0)
    assert shop.matcher.matches["shopA|1"].no_match and shop.matcher.matches["shopA|1"].confidence == 0.0
    shop.product("SONY", "Sony headphones", 2.0)
    assert shop.matcher.matches["shopA|1"].product_id == "SONY"
    assert shop.matches["shopA|1"].version == 2


def test_re_match_when_an_own_product_changes_or_goes() -> None:
    shop = Shop()
    shop.product("A", "sony x100 headphones", 1.0, price=100.0)
    shop.product("B", "bose speaker", 1.0, price=80.0)
    shop.offer("c", "1", "sony x100 headphones", 2.0, price=90.0)
    assert shop.matcher.matches["c|1"].product_id == "A"
    # A price change moves the gap: the match is republished, the competitor-price list too.
    before = shop.matches["c|1"].version
    shop.product("A", "sony x100 headphones", 3.0, price=120.0)
    assert shop.matches["c|1"].version == before + 1 and shop.matches["c|1"].match.price_gap.amount == -30.0  # type: ignore[union-attr]
    assert shop.prices["A"].price == 120.0
    # A's title moves away from the offer and B's into it: the offer follows to B.
    shop.product("A", "cable pro", 4.0)
    shop.product("B", "sony x100 headphones", 5.0)
    assert shop.matcher.matches["c|1"].product_id == "B"
    assert "A" not in shop.prices or shop.prices["A"].offers == ()
    shop.delete_product("B", 6.0)
    assert shop.matcher.matches["c|1"].candidate.product_id == "A"
    assert shop.prices["B"].offers == ()
    shop.check_exact()


def test_unchanged_matches_are_not_republished_and_stale_offers_are_ignored() -> None:
    shop = Shop()
    shop.product("A", "sony x100 headphones", 1.0)
    shop.offer("c", "1", "sony x100 headphones", 5.0, price=10.0)
    version = shop.matches["c|1"].version
    shop.product("Z", "garden hose", 2.0)  # cannot beat the match: nothing is published
    assert shop.matches["c|1"].version == version
    shop.offer("c", "1", "bose speaker", 4.0)  # older than the offer held
    assert shop.matcher.stale_events == 1 and shop.matcher.offers["c|1"].title == "sony x100 headphones"
    shop.withdraw("c", "1", 6.0)
    assert shop.matches["c|1"].match is None and "c|1" not in shop.matcher.matches
    assert shop.prices["A"].offers == ()


def test_a_refit_of_the_idf_re_matches_every_offer() -> None:
    shop = Shop()
    for i, title in enumerate(["sony x100 headphones", "sony x200 headphones", "bose speaker pro"]):
        shop.product(f"P{i}", title, 1.0)
    shop.offer("c", "1", "sony x200", 2.0)
    shop.record(shop.matcher.on_products_changed(shop.core, []))
    shop.core.refit_lexical()
    shop.record(shop.matcher.sync(shop.core))
    shop.check_exact()


def test_the_best_product_may_be_in_neither_top_list() -> None:
    """With a candidate depth of 1, the winner is neither the dense nor the lexical top one:
    the bounded search must go deeper."""
    shop = Shop()
    e = np.eye(CONFIG.dim, dtype=np.float32)
    mixed = 0.9 * e[0] + math.sqrt(1 - 0.81) * e[1]
    for pid, title, vec in (("D", "garden hose", e[0]), ("L", "sony x100 headphones pro", e[2]),
                            ("M", "sony x100 headphones", mixed)):
        shop.core.apply(ProductUpsert(pid, 1.0, title=title), vec)
    shop.record(shop.matcher.apply(shop.core, [(Offer("c", "1", "sony x100 headphones pro", 2.0), e[0])]))
    assert shop.matcher.matches["c|1"].candidate.product_id == "M"
    shop.check_exact()


def test_a_price_gap_lowers_the_confidence_but_never_picks_the_product() -> None:
    shop = Shop(Calibration(slope=12.0, intercept=-6.0, threshold=0.5, price_weight=4.0, unknown_price_gap=0.5))
    shop.product("A", "sony x100 headphones", 1.0, price=100.0)
    shop.offer("c", "1", "sony x100 headphones", 2.0, price=100.0)
    assert not shop.matcher.matches["c|1"].no_match and shop.matcher.matches["c|1"].confidence > 0.99
    shop.product("A", "sony x100 headphones", 3.0, price=1000.0)  # ten times dearer: another edition?
    match = shop.matcher.matches["c|1"]
    assert match.candidate.product_id == "A" and match.no_match and shop.matches["c|1"].version == 2
    assert shop.prices["A"].offers == ()  # it left the product's competitor-price list
    shop.offer("c", "2", "sony x100 headphones", 4.0)  # no price: the typical gap
    unknown = shop.matcher.matches["c|2"]
    assert unknown.confidence == pytest.approx(1 / (1 + np.exp(-(12.0 * unknown.candidate.score - 4.0 * 0.5 - 6.0))))
    shop.check_exact()


def test_calibration_maps_scores_to_confidences() -> None:
    assert CALIBRATION.confidence(0.5) == pytest.approx(0.5)
    assert CALIBRATION.confidence(1.0) > 0.99 and CALIBRATION.confidence(-math.inf) == 0.0
    assert Calibration(1000.0, -900.0, 0.5).confidence(-5.0) == pytest.approx(0.0)  # no overflow
    with pytest.raises(InvalidInput):
        Calibration(0.0, 1.0, 0.5)
    with pytest.raises(InvalidInput):
        Calibration(1.0, 1.0, 1.5)


def test_a_new_offer_needs_a_vector() -> None:
    shop = Shop()
    with pytest.raises(InvalidInput, match="pass its vector"):
        shop.matcher.apply(shop.core, [(Offer("c", "1", "x", 1.0), None)])


# --- the property: incremental == from scratch, after any sequence of changes ---------------------
# A small vocabulary: equal and overlapping titles (hence ties and strong lexical evidence) are common.
titles = st.lists(st.sampled_from(WORDS[:5]), min_size=1, max_size=3).map(" ".join)
product_op = st.tuples(st.just("product"), st.sampled_from(PRODUCT_IDS), titles,
                       st.one_of(st.none(), st.floats(1, 500)))
delete_op = st.tuples(st.just("delete_product"), st.sampled_from(PRODUCT_IDS), st.none(), st.none())
offer_op = st.tuples(st.just("offer"), st.sampled_from(range(len(OFFER_KEYS))), titles,
                     st.one_of(st.none(), st.floats(1, 500)))
withdraw_op = st.tuples(st.just("withdraw"), st.sampled_from(range(len(OFFER_KEYS))), st.none(), st.none())
refit_op = st.tuples(st.just("refit"), st.none(), st.none(), st.none())
ops = st.lists(st.one_of(product_op, product_op, delete_op, offer_op, offer_op, withdraw_op, refit_op),
               min_size=1, max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_incremental_matching_equals_a_from_scratch_matching(sequence: list[tuple[Any, Any, Any, Any]]) -> None:
    shop = Shop()
    for ts, (op, who, title, price) in enumerate(sequence, start=1):
        if op == "product":
            shop.product(who, title, float(ts), price=price)
        elif op == "delete_product":
            shop.delete_product(who, float(ts))
        elif op == "offer":
            competitor, offer_id = OFFER_KEYS[who]
            shop.offer(competitor, offer_id, title, float(ts), price=price)
        elif op == "withdraw":
            competitor, offer_id = OFFER_KEYS[who]
            shop.withdraw(competitor, offer_id, float(ts))
        else:
            shop.core.refit_lexical()
            shop.record(shop.matcher.sync(shop.core))
    shop.check_exact()
