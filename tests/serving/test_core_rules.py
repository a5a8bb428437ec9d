"""Substitute rules and reasons, one rule at a time."""

from __future__ import annotations

from dataclasses import replace

import pytest

from serving.catalog import Product
from serving.config import RecommenderConfig
from serving.rules import is_substitute
from serving.scoring import content_score, final_score, reasons

CFG = RecommenderConfig(dim=4, price_band=0.3)
OWNER = Product(
    "p", "Sony WH-1000XM4", 0.0, brand="Sony", category=("Audio", "Headphones"), price=100.0,
    group_id="g1", attributes=(("color", "Black"), ("size", "M")),
)
GOOD = Product(
    "c", "Bose QC45", 0.0, brand="Bose", category=("Audio", "headphones "), price=129.0,
    group_id="g2", attributes=(("Color", "black"), ("size", "L")),
)


def test_a_valid_substitute() -> None:
    assert is_substitute(OWNER, GOOD, CFG)


@pytest.mark.parametrize(
    "change",
    [
        {"in_stock": False},
        {"category": ("Audio", "Speakers")},
        {"price": 131.0},
        {"price": 69.0},
        {"group_id": "g1"},
        {"product_id": "p"},
    ],
)
def test_each_rule_rejects(change: dict[str, object]) -> None:
    assert not is_substitute(OWNER, replace(GOOD, **change), CFG)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "owner_change,cand_change",
    [({"category": ()}, {}), ({}, {"category": ()}), ({"price": None}, {"price": 500.0}), ({}, {"price": None}),
     ({"group_id": None}, {"group_id": None})],
)
def test_rules_that_need_both_sides_are_skipped_when_one_is_unknown(
    owner_change: dict[str, object], cand_change: dict[str, object]
) -> None:
    owner = replace(OWNER, **owner_change)  # type: ignore[arg-type]
    cand = replace(GOOD, **{"price": 129.0, **cand_change})  # type: ignore[arg-type]
    assert is_substitute(owner, cand, CFG)


def test_band_edges_are_inclusive() -> None:
    assert is_substitute(OWNER, replace(GOOD, price=130.0), CFG)
    assert is_substitute(OWNER, replace(GOOD, price=70.0), CFG)


def test_reasons_and_scores() -> None:
    assert reasons(OWNER, GOOD) == ("same category: headphones", "price within 29%", "shared color: Black")
    same = replace(GOOD, brand="sony", price=100.0)
    assert reasons(OWNER, same)[0] == "same brand" and "same price" in reasons(OWNER, same)
    assert reasons(OWNER, replace(GOOD, price=None, category=(), attributes=())) == ()
    cfg = RecommenderConfig(dim=4, lexical_weight=0.25, behavior_weight=0.5, lexical_floor=0.0)
    assert content_score(0.8, 0.4, cfg) == pytest.approx(0.7)
    assert final_score(0.7, 0.1, cfg) == pytest.approx(0.4)
    # With a floor, a lexical cosine at or below it adds nothing and the rest is rescaled to [0, 1].
    floored = replace(cfg, lexical_floor=0.4)
    assert content_score(0.8, 0.4, floored) == content_score(0.8, 0.0, floored) == pytest.approx(0.6)
    assert content_score(0.8, 0.7, floored) == pytest.approx(0.75 * 0.8 + 0.25 * 0.5)
    assert content_score(0.8, 1.0, floored) == pytest.approx(0.75 * 0.8 + 0.25)


def test_lexical_cosine_is_bitwise_symmetric_and_batch_independent() -> None:
    from serving.lexical import LexicalModel, cosine, cosine_many

    model = LexicalModel.fit(["sony wh-1000xm4 headphones", "bose qc45 headphones", "usb-c cable 2m"])
    texts = ["Sony WH-1000XM4 black", "Bose QC45 headphones", "usb-c to usb-c cable", "", "xm4"]
    vecs = [model.vectorize(t) for t in texts]
    for a in vecs:
        batch = cosine_many(a, vecs)
        for b, value in zip(vecs, batch, strict=True):
            assert value == cosine(a, b) == cosine(b, a)
            assert -1e-6 <= value <= 1.0 + 1e-6
    assert cosine(vecs[0], vecs[0]) == pytest.approx(1.0, abs=1e-6)
    assert cosine(vecs[3], vecs[0]) == 0.0
