"""Catalog rules: merge on upsert, ordering by ts, content hash, deletes that stick."""

from __future__ import annotations

import pytest

from serving.catalog import Catalog, Outcome, ProductDelete, ProductUpsert
from serving.errors import InvalidChange


def test_a_new_product_needs_a_title() -> None:
    with pytest.raises(InvalidChange, match="needs a non-empty 'title'"):
        Catalog().apply(ProductUpsert("p", 1.0, price=3.0))


def test_upsert_merges_absent_fields_keep_stored_values() -> None:
    catalog = Catalog()
    catalog.apply(ProductUpsert("p", 1.0, title="Headphones", brand="Sony", price=100.0, category=("Audio",)))
    update = catalog.apply(ProductUpsert("p", 2.0, price=90.0))
    assert update.outcome is Outcome.UPDATED
    product = catalog.get("p")
    assert product is not None
    assert (product.title, product.brand, product.price, product.category, product.ts) == (
        "Headphones", "Sony", 90.0, ("Audio",), 2.0)


def test_price_and_stock_changes_do_not_change_the_content_hash() -> None:
    catalog = Catalog()
    catalog.apply(ProductUpsert("p", 1.0, title="Headphones", price=100.0))
    priced = catalog.apply(ProductUpsert("p", 2.0, price=90.0, in_stock=False, group_id="g"))
    assert not priced.text_changed and priced.price_changed and priced.went_out_of_stock
    retitled = catalog.apply(ProductUpsert("p", 3.0, title="Wireless headphones"))
    assert retitled.text_changed and not retitled.price_changed


def test_a_stock_or_price_change_is_told_apart_from_a_text_change_without_hashing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from serving.catalog import Product

    catalog = Catalog()
    catalog.apply(ProductUpsert("p", 1.0, title="Headphones", brand="Sony", category=("Audio",),
                                attributes=(("colour", "black"),), price=100.0))
    hashed: list[str] = []
    content_hash = Product.content_hash

    def counting(self: Product) -> str:
        hashed.append(self.product_id)
        return content_hash.fget(self)  # type: ignore[attr-defined, no-any-return]

    monkeypatch.setattr(Product, "content_hash", property(counting))
    assert not catalog.preview(ProductUpsert("p", 2.0, price=90.0, in_stock=False)).text_changed
    assert not hashed
    # Equal text under a new event (the same title sent again) is no text change either.
    assert not catalog.preview(ProductUpsert("p", 2.0, title="Headphones", brand="Sony")).text_changed
    assert catalog.preview(ProductUpsert("p", 2.0, attributes=(("colour", "white"),))).text_changed
    assert catalog.preview(ProductUpsert("p", 2.0, category=("Audio", "Headphones"))).text_changed


def test_older_events_are_ignored_and_counted_equal_ts_is_applied() -> None:
    catalog = Catalog()
    catalog.apply(ProductUpsert("p", 10.0, title="a"))
    assert catalog.apply(ProductUpsert("p", 9.0, title="old")).outcome is Outcome.STALE
    assert catalog.stale_events == 1
    assert catalog.apply(ProductUpsert("p", 10.0, title="same instant")).outcome is Outcome.UPDATED


def test_a_delete_sticks_against_older_upserts_but_not_newer_ones() -> None:
    catalog = Catalog()
    catalog.apply(ProductUpsert("p", 10.0, title="a"))
    assert catalog.apply(ProductDelete("p", 20.0)).outcome is Outcome.DELETED
    assert catalog.apply(ProductUpsert("p", 15.0, title="late replay")).outcome is Outcome.STALE
    assert "p" not in catalog
    assert catalog.apply(ProductUpsert("p", 25.0, title="re-listed")).outcome is Outcome.CREATED


def test_deleting_an_unknown_product_is_a_counted_no_op() -> None:
    catalog = Catalog()
    assert catalog.apply(ProductDelete("ghost", 1.0)).outcome is Outcome.UNKNOWN_DELETE
    assert catalog.unknown_deletes == 1 and len(catalog) == 0
