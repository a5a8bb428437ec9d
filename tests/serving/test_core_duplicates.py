"""Two listings of one product take one place in a list; the kept one names the other."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from serving.catalog import ProductUpsert
from serving.config import RecommenderConfig
from serving.index import ExactIndex
from serving.recommender import Kind, Recommender
from serving.scoring import duplicate_keys

#: Dense only, so the ranking is the one the vectors below spell out.
CONFIG = RecommenderConfig(dim=4, k=3, candidate_depth=6, candidate_slack=0, lexical_weight=0.0)


def test_listings_of_one_product_share_a_key_and_variants_do_not() -> None:
    assert set(duplicate_keys("Stuffit Deluxe 11", None)) & set(duplicate_keys("stuffit  deluxe 11!", None))
    # The brand's own words and the word order do not matter; one brand's model code names one product.
    assert set(duplicate_keys("Sony WH-1000XM4 headphones", "Sony")) & set(
        duplicate_keys("headphones WH-1000XM4", "sony"))
    assert set(duplicate_keys("WH-1000XM4 wireless noise cancelling", "Sony")) & set(
        duplicate_keys("Sony WH1000XM4 Headphones, Black", "Sony"))
    assert not set(duplicate_keys("Stuffit Deluxe 11", None)) & set(duplicate_keys("Stuffit Deluxe 11 - 2-pack", None))
    assert not set(duplicate_keys("Stuffit Deluxe 11", None)) & set(duplicate_keys("Stuffit Deluxe 12", None))
    # A model code alone, without a brand, names nothing for sure.
    assert not set(duplicate_keys("X100 cable", None)) & set(duplicate_keys("X100 charger", None))


def build(config: RecommenderConfig = CONFIG, **overrides: ProductUpsert) -> Recommender:
    rec = Recommender(config, ExactIndex(config.dim))
    products = {
        "owner": ProductUpsert("owner", 1.0, title="Disney's 1st & 2nd grade bundle", price=20.0),
        "stuffit-a": ProductUpsert("stuffit-a", 1.0, title="Stuffit Deluxe 11", price=20.0),
        "stuffit-b": ProductUpsert("stuffit-b", 1.0, title="stuffit deluxe 11", price=21.0),
        "reader": ProductUpsert("reader", 1.0, title="Reader Rabbit 2nd grade", price=19.0),
        "math": ProductUpsert("math", 1.0, title="Math Blaster grade 2", price=18.0),
    }
    products.update(overrides)
    vectors = {"owner": [1, 0, 0, 0], "stuffit-a": [0.9, 0.1, 0, 0], "stuffit-b": [0.89, 0.11, 0, 0],
               "reader": [0.8, 0.3, 0, 0], "math": [0.7, 0.4, 0.1, 0]}
    for pid, product in products.items():
        rec.apply(product, np.array(vectors[pid], dtype=np.float32))
    return rec


def ids(items: tuple) -> list[str]:  # type: ignore[type-arg]
    return [i.product_id for i in items]


def test_the_best_listing_stays_and_names_the_other_in_its_reasons() -> None:
    rec = build()
    similar = rec.similar("owner")
    assert similar is not None
    assert ids(similar) == ["stuffit-a", "reader", "math"]
    assert "duplicate_of: stuffit-b" in similar[0].reasons
    assert all(not r.startswith("duplicate_of") for i in similar[1:] for r in i.reasons)


def test_collapsing_is_configurable() -> None:
    rec = build(replace(CONFIG, collapse_duplicates=False))
    assert ids(rec.similar("owner") or ()) == ["stuffit-a", "stuffit-b", "reader"]


def test_variants_of_one_group_are_not_duplicates() -> None:
    rec = build(**{
        "stuffit-a": ProductUpsert("stuffit-a", 1.0, title="Stuffit Deluxe 11", price=20.0, group_id="g"),
        "stuffit-b": ProductUpsert("stuffit-b", 1.0, title="stuffit deluxe 11", price=21.0, group_id="g"),
    })
    assert ids(rec.similar("owner") or ()) == ["stuffit-a", "stuffit-b", "reader"]


def test_an_in_stock_listing_stands_in_for_an_out_of_stock_one_among_substitutes() -> None:
    rec = build()
    rec.apply(ProductUpsert("stuffit-a", 2.0, in_stock=False))
    subs = rec.substitutes("owner")
    assert subs is not None and ids(subs)[0] == "stuffit-b"
    assert "stuffit-a" not in ids(subs)
    # The similar list still shows the better ranked listing, standing for both.
    similar = rec.similar("owner")
    assert similar is not None and similar[0].product_id == "stuffit-a"
    assert "duplicate_of: stuffit-b" in similar[0].reasons


def test_when_the_kept_listing_goes_the_other_takes_its_place_without_the_reason() -> None:
    from serving.catalog import ProductDelete

    rec = build()
    pubs = rec.apply(ProductDelete("stuffit-a", 2.0))
    similar = rec.similar("owner")
    assert similar is not None and ids(similar) == ["stuffit-b", "reader", "math"]
    assert all(not r.startswith("duplicate_of") for i in similar for r in i.reasons)
    assert (Kind.SIMILAR, "owner") in {p.key for p in pubs}


def test_a_price_change_of_the_kept_listing_keeps_what_it_stands_for() -> None:
    """The kept listing's reasons change with its price gap; the listings it stands for stay
    named, exactly as a rebuild of the list gives them."""
    rec = build()
    pubs = rec.apply(ProductUpsert("stuffit-a", 2.0, price=25.0))
    similar = rec.similar("owner")
    assert similar is not None and ids(similar) == ["stuffit-a", "reader", "math"]
    assert "price within 25%" in similar[0].reasons
    assert "duplicate_of: stuffit-b" in similar[0].reasons
    assert any(p.kind is Kind.SIMILAR and p.product_id == "owner" for p in pubs)
    fresh = build(**{"stuffit-a": ProductUpsert("stuffit-a", 1.0, title="Stuffit Deluxe 11", price=25.0)})
    assert similar == fresh.similar("owner")


def test_a_version_tag_is_not_a_model_code() -> None:
    """A brand's line shares its version tags: they name no single product."""
    for a, b in (("Adobe Photoshop CS3 [mac]", "Adobe InDesign CS3 [mac]"),
                 ("CA ArcServe backup r11.5 agent", "CA ArcServe protection suite r11.5"),
                 ("Instant Immersion German v2.0", "Instant Immersion Italian v2.0")):
        assert not set(duplicate_keys(a, "Brand")) & set(duplicate_keys(b, "Brand")), (a, b)
    assert set(duplicate_keys("Samsung SM-G991B phone", "Samsung")) & set(duplicate_keys("SMG991B, black", "Samsung"))
