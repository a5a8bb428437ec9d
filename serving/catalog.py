"""Catalog state: products as frozen dataclasses, merge-on-upsert, per-product ordering.

This module is the core's view of the ``product-changes`` contract (see DESIGN.md). The
wire layer (``streams/records.py``) validates JSON and hands over the dataclasses below;
nothing here ever sees JSON.

Rules kept here:

* An upsert merges: a field that is ``None`` in the change (absent on the wire, or an
  explicit JSON ``null``) keeps its stored value.
* A product that does not exist yet needs a ``title``.
* Every product carries the ``ts`` of the last change applied to it. A change whose ``ts``
  is older than that is *stale*: it is ignored and counted, so replays and reordering are
  harmless. Equal timestamps are applied (last writer wins within one instant), which makes
  an at-least-once redelivery of the same event idempotent.
* A delete remembers its ``ts`` so that a late upsert older than the delete cannot bring the
  product back.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace

from serving.errors import InvalidChange

Attributes = tuple[tuple[str, str], ...]


def freeze_attributes(attributes: Mapping[str, str] | None) -> Attributes:
    """Turn a mapping into the canonical, hashable attribute form (sorted key/value pairs)."""
    if not attributes:
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in attributes.items()))


@dataclass(frozen=True, slots=True)
class Product:
    """One live product, as the catalog stores it after merging every change.

    ``ts`` is the event time of the last applied change, in unix seconds (UTC).
    ``category`` runs from the root to the leaf, e.g. ``("Electronics", "Audio", "Headphones")``.
    """

    product_id: str
    title: str
    ts: float
    description: str = ""
    brand: str | None = None
    category: tuple[str, ...] = ()
    price: float | None = None
    currency: str | None = None
    in_stock: bool = True
    group_id: str | None = None
    attributes: Attributes = ()
    image_url: str | None = None

    @property
    def leaf_category(self) -> str | None:
        """The most specific category, or ``None`` when the product has none."""
        return self.category[-1] if self.category else None

    @property
    def attribute_map(self) -> dict[str, str]:
        return dict(self.attributes)

    @property
    def text_fields(self) -> tuple[str, str, str | None, tuple[str, ...], Attributes]:
        """Every field that feeds the product's text (``content_hash`` hashes these).

        Price, stock, currency, group and image are deliberately left out: a change to them
        must never trigger re-embedding.
        """
        return self.title, self.description, self.brand, self.category, self.attributes

    @property
    def content_hash(self) -> str:
        """A stable hash of ``text_fields``."""
        payload = json.dumps(self.text_fields, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ProductUpsert:
    """A partial update of a product. ``None`` means "keep what is stored"."""

    product_id: str
    ts: float
    title: str | None = None
    description: str | None = None
    brand: str | None = None
    category: tuple[str, ...] | None = None
    price: float | None = None
    currency: str | None = None
    in_stock: bool | None = None
    group_id: str | None = None
    attributes: Attributes | None = None
    image_url: str | None = None


@dataclass(frozen=True, slots=True)
class ProductDelete:
    """Removes a product from the catalog, the index and every list."""

    product_id: str
    ts: float


ProductChange = ProductUpsert | ProductDelete

_MERGED_FIELDS = tuple(f.name for f in fields(ProductUpsert) if f.name not in ("product_id", "ts"))


class UserEventType(enum.StrEnum):
    VIEW = "view"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    REMOVE_FROM_CART = "remove_from_cart"
    FORGET = "forget"


@dataclass(frozen=True, slots=True)
class UserEvent:
    """One shopper action. ``product_id`` is ``None`` only for ``forget``."""

    user_id: str
    type: UserEventType
    ts: float
    product_id: str | None = None
    session_id: str | None = None


class Outcome(enum.StrEnum):
    """What applying one change did to the catalog."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    STALE = "stale"  # older than the stored ts: ignored and counted
    UNKNOWN_DELETE = "unknown_delete"  # delete of a product never seen: a counted no-op


@dataclass(frozen=True, slots=True)
class CatalogUpdate:
    """The effect of one change: the product before and after, and what moved."""

    product_id: str
    outcome: Outcome
    before: Product | None
    after: Product | None

    @property
    def applied(self) -> bool:
        return self.outcome in (Outcome.CREATED, Outcome.UPDATED, Outcome.DELETED)

    @property
    def text_changed(self) -> bool:
        """True when the product needs (re-)embedding."""
        before, after = self.before, self.after
        if after is None:
            return False
        if before is None:
            return True
        # A stock or price change keeps the text fields' very objects: no need to hash them
        # (two JSON encodings and two SHA-256 per look, and a change is looked at thrice).
        return before.text_fields != after.text_fields and before.content_hash != after.content_hash

    @property
    def stock_changed(self) -> bool:
        return (
            self.before is not None
            and self.after is not None
            and self.before.in_stock != self.after.in_stock
        )

    @property
    def went_out_of_stock(self) -> bool:
        return self.stock_changed and self.after is not None and not self.after.in_stock

    @property
    def price_changed(self) -> bool:
        return (
            self.before is not None
            and self.after is not None
            and self.before.price != self.after.price
        )


@dataclass
class Catalog:
    """The set of live products, with merge and ordering rules. Not thread-safe."""

    _products: dict[str, Product] = field(default_factory=dict)
    _deleted_at: dict[str, float] = field(default_factory=dict)
    stale_events: int = 0
    unknown_deletes: int = 0

    def __len__(self) -> int:
        return len(self._products)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._products

    def __iter__(self) -> Iterator[Product]:
        return iter(self._products.values())

    def get(self, product_id: str) -> Product | None:
        return self._products.get(product_id)

    def preview(self, change: ProductChange) -> CatalogUpdate:
        """What ``apply`` would do, without changing anything.

        Raises ``InvalidChange`` for a new product without a title.
        """
        current = self._products.get(change.product_id)
        last_ts = current.ts if current is not None else self._deleted_at.get(change.product_id)
        if last_ts is not None and change.ts < last_ts:
            return CatalogUpdate(change.product_id, Outcome.STALE, current, current)
        if isinstance(change, ProductDelete):
            if current is None:
                return CatalogUpdate(change.product_id, Outcome.UNKNOWN_DELETE, None, None)
            return CatalogUpdate(change.product_id, Outcome.DELETED, current, None)
        if current is None:
            if not change.title:
                raise InvalidChange(
                    f"product {change.product_id!r} is new, so its upsert needs a non-empty 'title'"
                )
            merged = Product(
                product_id=change.product_id,
                ts=change.ts,
                **{name: value for name in _MERGED_FIELDS if (value := getattr(change, name)) is not None},
            )
            return CatalogUpdate(change.product_id, Outcome.CREATED, None, merged)
        updates = {name: value for name in _MERGED_FIELDS if (value := getattr(change, name)) is not None}
        if "title" in updates and not updates["title"]:
            raise InvalidChange(f"product {change.product_id!r}: 'title' cannot be set to empty")
        merged = replace(current, ts=change.ts, **updates)
        return CatalogUpdate(change.product_id, Outcome.UPDATED, current, merged)

    def apply(self, change: ProductChange) -> CatalogUpdate:
        """Merge one change into the catalog and say what it did."""
        update = self.preview(change)
        self.commit(update, change.ts)
        return update

    def commit(self, update: CatalogUpdate, ts: float) -> None:
        """Make a previewed update permanent (split from ``preview`` so callers can validate first)."""
        if update.outcome is Outcome.STALE:
            self.stale_events += 1
        elif update.outcome is Outcome.UNKNOWN_DELETE:
            self.unknown_deletes += 1
            self._deleted_at[update.product_id] = max(ts, self._deleted_at.get(update.product_id, ts))
        elif update.outcome is Outcome.DELETED:
            del self._products[update.product_id]
            self._deleted_at[update.product_id] = ts
        else:
            assert update.after is not None
            self._products[update.product_id] = update.after
            self._deleted_at.pop(update.product_id, None)

    def restore(self, product: Product) -> None:
        """Put a product back as-is (used when rebuilding from the compacted products topic)."""
        self._products[product.product_id] = product
        self._deleted_at.pop(product.product_id, None)

    def deletions(self) -> dict[str, float]:
        """A copy of the delete timestamps of ids that are not live (they order late events)."""
        return dict(self._deleted_at)

    def restore_deletions(self, deleted_at: Mapping[str, float]) -> None:
        """Take over delete timestamps (``deletions()`` of a saved catalog), after ``restore``."""
        self._deleted_at.update(deleted_at)
