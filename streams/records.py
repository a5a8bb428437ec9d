"""Wire records: the JSON contracts of DESIGN.md as ``faust.Record`` types, and strict decoding.

Decoding is strict on purpose. Faust's own coercion would turn ``"12"`` into ``12.0`` and
``5`` into ``"5"``; a shop that sends the wrong type has a bug, and a dead letter with a
one-line reason tells them where it is. Every check below raises ``DecodeError`` whose
message is that line.

Rules that the contracts leave open, decided here:

* ``ts`` is an ISO-8601 string (``Z`` or an offset) or unix seconds. When absent, the Kafka
  record's own timestamp is used. A ``ts`` more than 24 hours in the future is rejected: it
  would make every later real change look stale. Anything before 2000-01-01 is rejected.
* A JSON ``null`` for an optional field means "absent": it keeps the stored value.
* Unknown fields are ignored, so producers can add fields before simstream knows them.
* ``attributes`` values may be strings, numbers or booleans and are stored as strings.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import faust
from faust.models.fields import StringField

from encoders.training.pairs import PairLabel
from serving.catalog import (
    Product,
    ProductChange,
    ProductDelete,
    ProductUpsert,
    UserEvent,
    UserEventType,
    freeze_attributes,
)
from serving.errors import InvalidInput
from serving.offers import KEY_SEPARATOR, Offer, OfferChange, OfferDelete

MAX_ID_CHARS = 256
MAX_TITLE_CHARS = 2_000
MAX_DESCRIPTION_CHARS = 100_000
MAX_SHORT_CHARS = 256
MAX_URL_CHARS = 4_096
MAX_CATEGORY_DEPTH = 16
MAX_ATTRIBUTES = 64
MAX_PRICE = 1e9
MAX_FUTURE_S = 24 * 3600
MIN_TS = datetime(2000, 1, 1, tzinfo=UTC).timestamp()

_ID_PATTERN = re.compile(r"^[^\x00-\x1f\x7f]+$")
_CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")


class DecodeError(InvalidInput):
    """An input record that cannot become a core event; the message is its dead-letter reason."""


# --- wire records ---------------------------------------------------------------------------


class ProductChangeRecord(faust.Record, validation=True, serializer="json"):
    """``product-changes`` value. Build it with ``decode_product_change``; it is already checked."""

    op: str
    product_id: str
    ts: float
    title: str | None = None
    # Blank text is a legitimate value ("clear the description"); Faust refuses blanks by default.
    description: str | None = StringField(allow_blank=True, required=False, default=None)
    brand: str | None = StringField(allow_blank=True, required=False, default=None)
    category: list[str] | None = None
    price: float | None = None
    currency: str | None = None
    in_stock: bool | None = None
    group_id: str | None = None
    attributes: dict[str, str] | None = None
    image_url: str | None = StringField(allow_blank=True, required=False, default=None)

    def to_core(self) -> ProductChange:
        """The frozen core dataclass for this record."""
        if self.op == "delete":
            return ProductDelete(product_id=self.product_id, ts=self.ts)
        return ProductUpsert(
            product_id=self.product_id,
            ts=self.ts,
            title=self.title,
            description=self.description,
            brand=self.brand,
            category=tuple(self.category) if self.category is not None else None,
            price=self.price,
            currency=self.currency,
            in_stock=self.in_stock,
            group_id=self.group_id,
            attributes=freeze_attributes(self.attributes) if self.attributes is not None else None,
            image_url=self.image_url,
        )


class UserEventRecord(faust.Record, validation=True, serializer="json"):
    """``user-events`` value. Build it with ``decode_user_event``."""

    user_id: str
    type: str
    ts: float
    product_id: str | None = None
    session_id: str | None = None

    def to_core(self) -> UserEvent:
        return UserEvent(
            user_id=self.user_id,
            type=UserEventType(self.type),
            ts=self.ts,
            product_id=self.product_id,
            session_id=self.session_id,
        )


class ProductLabelRecord(faust.Record, validation=True, serializer="json"):
    """``product-labels`` value: a labelled pair for ``simstream learn``. Build it with ``decode_product_label``."""

    left_id: str
    right_id: str
    label: int
    ts: float
    source: str | None = None

    def to_core(self) -> PairLabel:
        return PairLabel(self.left_id, self.right_id, bool(self.label), self.ts)


class CompetitorOfferRecord(faust.Record, validation=True, serializer="json"):
    """``competitor-offers`` value. Build it with ``decode_competitor_offer``; it is already checked."""

    op: str
    competitor: str
    offer_id: str
    ts: float
    title: str | None = None
    brand: str | None = StringField(allow_blank=True, required=False, default=None)
    price: float | None = None
    currency: str | None = None
    url: str | None = None

    def to_core(self) -> OfferChange:
        """The frozen core dataclass for this record."""
        if self.op == "delete":
            return OfferDelete(self.competitor, self.offer_id, self.ts)
        assert self.title is not None
        return Offer(self.competitor, self.offer_id, self.title, self.ts, brand=self.brand or None, price=self.price,
                     currency=self.currency, url=self.url)


# --- strict field checks ----------------------------------------------------------------------


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__
    )


def _string(obj: Mapping[str, Any], name: str, max_chars: int, *, required: bool = False) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise DecodeError(f"missing required field '{name}'")
        return None
    if not isinstance(value, str):
        raise DecodeError(f"field '{name}' must be a string, got {_type_name(value)}")
    if len(value) > max_chars:
        raise DecodeError(f"field '{name}' is {len(value):,} characters, over the limit of {max_chars:,}")
    return value


def _identifier(obj: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = _string(obj, name, MAX_ID_CHARS, required=required)
    if value is None:
        return None
    if not value.strip() or not _ID_PATTERN.match(value):
        raise DecodeError(f"field '{name}' must be a non-empty id without control characters")
    return value


def _number(obj: Mapping[str, Any], name: str, *, low: float, high: float) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError(f"field '{name}' must be a number, got {_type_name(value)}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise DecodeError(f"field '{name}' is {value!r}, outside the allowed range [{low:g}, {high:g}]")
    return number


def _timestamp(obj: Mapping[str, Any], fallback_ts: float | None, now: float) -> float:
    raw = obj.get("ts")
    if raw is None:
        if fallback_ts is None:
            raise DecodeError("missing 'ts' and the Kafka record carries no timestamp")
        ts = fallback_ts
    elif isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
        except ValueError:
            raise DecodeError(f"field 'ts' is not an ISO-8601 timestamp: {raw[:40]!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        ts = parsed.timestamp()
    elif isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
        ts = float(raw)
    else:
        raise DecodeError(f"field 'ts' must be an ISO-8601 string or unix seconds, got {_type_name(raw)}")
    if ts < MIN_TS:
        raise DecodeError(f"field 'ts' is before 2000-01-01 ({ts:.0f}); send unix seconds, not milliseconds")
    if ts > now + MAX_FUTURE_S:
        raise DecodeError("field 'ts' is more than 24 hours in the future; fix the producer's clock")
    return ts


def _load_object(raw: bytes | str, max_bytes: int) -> dict[str, Any]:
    size = len(raw)
    if size > max_bytes:
        raise DecodeError(f"message is {size:,} bytes, over the {max_bytes:,}-byte limit (SIMSTREAM_MAX_MESSAGE_BYTES)")
    if not raw:
        raise DecodeError("empty message; a delete is {\"op\": \"delete\", ...}, not an empty value")
    try:
        obj = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError:
        raise DecodeError("message is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise DecodeError("malformed JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"message must be a JSON object, got {_type_name(obj)}")
    return obj


def _op(obj: dict[str, Any]) -> str:
    """The ``op`` of an upsert-or-delete record."""
    op = obj.get("op")
    if op is None:
        raise DecodeError("missing required field 'op' (\"upsert\" or \"delete\")")
    if op not in ("upsert", "delete"):
        shown = op if isinstance(op, str) else _type_name(op)
        raise DecodeError(f"unknown op {str(shown)[:40]!r}; expected \"upsert\" or \"delete\"")
    return str(op)


def _currency(obj: dict[str, Any]) -> str | None:
    """The optional ISO-4217 ``currency``."""
    currency = _string(obj, "currency", 3)
    if currency is not None and not _CURRENCY_PATTERN.match(currency):
        raise DecodeError(f"field 'currency' must be an ISO-4217 code such as \"USD\", got {currency!r}")
    return currency


# --- decoders ------------------------------------------------------------------------------


def decode_product_change(
    raw: bytes | str,
    *,
    kafka_ts: float | None = None,
    max_bytes: int = 1_000_000,
    now: float | None = None,
) -> ProductChangeRecord:
    """Decode and check one ``product-changes`` value; raise ``DecodeError`` with the reason."""
    now = datetime.now(UTC).timestamp() if now is None else now
    obj = _load_object(raw, max_bytes)
    op = _op(obj)
    product_id = _identifier(obj, "product_id", required=True)
    ts = _timestamp(obj, kafka_ts, now)
    if op == "delete":
        return ProductChangeRecord(op="delete", product_id=product_id, ts=ts)

    category = obj.get("category")
    if category is not None:
        if isinstance(category, str):
            category = [category]
        if not isinstance(category, list) or not all(isinstance(c, str) for c in category):
            raise DecodeError("field 'category' must be an array of strings, root first")
        if len(category) > MAX_CATEGORY_DEPTH or any(len(c) > MAX_SHORT_CHARS for c in category):
            raise DecodeError(f"field 'category' allows {MAX_CATEGORY_DEPTH} levels of {MAX_SHORT_CHARS} characters")
        category = [c.strip() for c in category if c.strip()]

    in_stock = obj.get("in_stock")
    if in_stock is not None and not isinstance(in_stock, bool):
        raise DecodeError(f"field 'in_stock' must be true or false, got {_type_name(in_stock)}")

    attributes = obj.get("attributes")
    if attributes is not None:
        if not isinstance(attributes, dict):
            raise DecodeError(f"field 'attributes' must be an object, got {_type_name(attributes)}")
        if len(attributes) > MAX_ATTRIBUTES:
            raise DecodeError(f"field 'attributes' has {len(attributes)} entries, over the limit of {MAX_ATTRIBUTES}")
        checked: dict[str, str] = {}
        for key, value in attributes.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, int | float) and math.isfinite(value):
                value = f"{value:g}"
            if not isinstance(value, str) or len(key) > MAX_SHORT_CHARS or len(value) > MAX_SHORT_CHARS:
                raise DecodeError(f"attribute {key[:40]!r} must be a short string, number or boolean")
            checked[key] = value
        attributes = checked

    currency = _currency(obj)

    title = _string(obj, "title", MAX_TITLE_CHARS)
    if title is not None and not title.strip():
        raise DecodeError("field 'title' is blank")

    return ProductChangeRecord(
        op="upsert",
        product_id=product_id,
        ts=ts,
        title=title.strip() if title is not None else None,
        description=_string(obj, "description", MAX_DESCRIPTION_CHARS),
        brand=_string(obj, "brand", MAX_SHORT_CHARS),
        category=category,
        price=_number(obj, "price", low=0.0, high=MAX_PRICE),
        currency=currency,
        in_stock=in_stock,
        group_id=_identifier(obj, "group_id", required=False),
        attributes=attributes,
        image_url=_string(obj, "image_url", MAX_URL_CHARS),
    )


def decode_user_event(
    raw: bytes | str,
    *,
    kafka_ts: float | None = None,
    max_bytes: int = 1_000_000,
    now: float | None = None,
) -> UserEventRecord:
    """Decode and check one ``user-events`` value; raise ``DecodeError`` with the reason."""
    now = datetime.now(UTC).timestamp() if now is None else now
    obj = _load_object(raw, max_bytes)
    event_type = obj.get("type")
    if event_type is None:
        raise DecodeError("missing required field 'type'")
    valid_types = [t.value for t in UserEventType]
    if event_type not in valid_types:
        shown = event_type if isinstance(event_type, str) else _type_name(event_type)
        raise DecodeError(f"unknown event type {str(shown)[:40]!r}; expected one of {', '.join(valid_types)}")
    user_id = _identifier(obj, "user_id", required=True)
    product_id = _identifier(obj, "product_id", required=event_type != UserEventType.FORGET)
    return UserEventRecord(
        user_id=user_id,
        type=event_type,
        ts=_timestamp(obj, kafka_ts, now),
        product_id=product_id,
        session_id=_identifier(obj, "session_id", required=False),
    )


def decode_product_label(
    raw: bytes | str,
    *,
    kafka_ts: float | None = None,
    max_bytes: int = 1_000_000,
    now: float | None = None,
) -> ProductLabelRecord:
    """Decode and check one ``product-labels`` value; raise ``DecodeError`` with the reason.

    ``label`` is 1 / ``true`` (the two are the same product, or belong in each other's lists)
    or 0 / ``false`` (they do not: a negative the training uses as a hard negative).
    """
    now = datetime.now(UTC).timestamp() if now is None else now
    obj = _load_object(raw, max_bytes)
    left = _identifier(obj, "left_id", required=True)
    right = _identifier(obj, "right_id", required=True)
    assert left is not None and right is not None
    if left == right:
        raise DecodeError(f"left_id and right_id are both {left[:40]!r}; a label pairs two different products")
    label = obj.get("label")
    if label is None:
        raise DecodeError("missing required field 'label' (1 or true: a match; 0 or false: not a match)")
    if isinstance(label, bool):
        value = int(label)
    elif isinstance(label, int) and label in (0, 1):
        value = label
    else:
        raise DecodeError(f"field 'label' must be 0, 1, true or false, got {str(label)[:40] if isinstance(label, int | float) else _type_name(label)}")
    return ProductLabelRecord(left_id=left, right_id=right, label=value, ts=_timestamp(obj, kafka_ts, now),
                              source=_string(obj, "source", MAX_SHORT_CHARS))


#: Cheapest and dearest price an offer may carry; anything else is a producer bug (a price in
#: cents, a placeholder 0 or -1) and is dead-lettered rather than matched with an absurd gap.
MIN_OFFER_PRICE = 0.01


def decode_competitor_offer(
    raw: bytes | str,
    *,
    kafka_ts: float | None = None,
    max_bytes: int = 1_000_000,
    now: float | None = None,
) -> CompetitorOfferRecord:
    """Decode and check one ``competitor-offers`` value; raise ``DecodeError`` with the reason.

    An upsert is the whole offer (fields left out are absent, not kept): ``title`` is required
    and ``price``, when given, is from 0.01 to 1e9. ``competitor`` may not contain ``|``, which
    separates it from ``offer_id`` in the record key.
    """
    now = datetime.now(UTC).timestamp() if now is None else now
    obj = _load_object(raw, max_bytes)
    op = _op(obj)
    competitor = _identifier(obj, "competitor", required=True)
    offer_id = _identifier(obj, "offer_id", required=True)
    assert competitor is not None and offer_id is not None
    if KEY_SEPARATOR in competitor:
        raise DecodeError(f"field 'competitor' may not contain {KEY_SEPARATOR!r} (it separates the key's parts)")
    ts = _timestamp(obj, kafka_ts, now)
    if op == "delete":
        return CompetitorOfferRecord(op="delete", competitor=competitor, offer_id=offer_id, ts=ts)
    title = _string(obj, "title", MAX_TITLE_CHARS, required=True)
    assert title is not None
    if not title.strip():
        raise DecodeError("field 'title' is blank")
    currency = _currency(obj)
    return CompetitorOfferRecord(
        op="upsert", competitor=competitor, offer_id=offer_id, ts=ts, title=title.strip(),
        brand=_string(obj, "brand", MAX_SHORT_CHARS),
        price=_number(obj, "price", low=MIN_OFFER_PRICE, high=MAX_PRICE),
        currency=currency,
        url=_string(obj, "url", MAX_URL_CHARS),
    )


# --- encoding of what simstream writes ----------------------------------------------------------


def iso(ts: float) -> str:
    """Unix seconds as an ISO-8601 UTC string with milliseconds and a ``Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def product_to_wire(product: Product) -> dict[str, Any]:
    """The merged product as JSON (the ``simstream-products`` value and the read API's shape)."""
    return {
        "product_id": product.product_id,
        "title": product.title,
        "description": product.description,
        "brand": product.brand,
        "category": list(product.category),
        "price": product.price,
        "currency": product.currency,
        "in_stock": product.in_stock,
        "group_id": product.group_id,
        "attributes": product.attribute_map,
        "image_url": product.image_url,
        "ts": iso(product.ts),
    }


def product_from_wire(obj: Mapping[str, Any]) -> Product:
    """Inverse of ``product_to_wire`` (for rebuilding the catalog from ``simstream-products``)."""
    record = decode_product_change(json.dumps({**obj, "op": "upsert"}), now=float("inf"))
    change = record.to_core()
    assert isinstance(change, ProductUpsert) and change.title is not None
    return Product(
        product_id=change.product_id,
        title=change.title,
        ts=change.ts,
        description=change.description or "",
        brand=change.brand,
        category=change.category or (),
        price=change.price,
        currency=change.currency,
        in_stock=True if change.in_stock is None else change.in_stock,
        group_id=change.group_id,
        attributes=change.attributes or (),
        image_url=change.image_url,
    )


MAX_DEAD_LETTER_PAYLOAD = 64 * 1024


def dead_letter(
    *,
    source_topic: str,
    partition: int | None,
    offset: int | None,
    key: bytes | str | None,
    payload: bytes | str | None,
    error: str,
    at: float,
) -> dict[str, Any]:
    """The ``simstream-dead-letters`` value. Payloads over 64 KiB are cut, with their size kept."""
    if isinstance(payload, bytes):
        payload_text = payload[:MAX_DEAD_LETTER_PAYLOAD].decode("utf-8", errors="replace")
        size = len(payload)
    else:
        payload_text = (payload or "")[:MAX_DEAD_LETTER_PAYLOAD]
        size = len((payload or "").encode("utf-8"))
    return {
        "source_topic": source_topic,
        "partition": partition,
        "offset": offset,
        "key": key.decode("utf-8", errors="replace") if isinstance(key, bytes) else key,
        "error": error.splitlines()[0][:1000] if error else "unknown error",
        "payload": payload_text,
        "payload_bytes": size,
        "payload_truncated": size > MAX_DEAD_LETTER_PAYLOAD,
        "at": iso(at),
    }
