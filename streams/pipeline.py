"""The edge between Kafka messages and the core: decode, apply, say what to publish.

Nothing here touches Kafka. ``Inbound`` is one consumed record, ``Outbound`` one record to
produce; the Faust agents in ``streams/app.py`` only translate to and from these and send.
That keeps every decision testable list-in, list-out.

Failure rule: one bad event becomes one dead letter and one log line (with topic, partition
and offset), and processing goes on with the next event.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serving.catalog import Catalog, CatalogUpdate, Outcome
from serving.errors import SimstreamError
from streams.metrics import Metrics
from streams.records import (
    DecodeError,
    ProductChangeRecord,
    UserEventRecord,
    dead_letter,
    decode_product_change,
    decode_user_event,
    product_to_wire,
)
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Inbound:
    """One consumed Kafka record, as the pipeline sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None = None  # the record's Kafka timestamp, unix seconds

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class Outbound:
    """One record to produce. ``value=None`` is a tombstone."""

    topic: str
    key: str
    value: dict[str, Any] | None

    def encoded(self) -> tuple[bytes, bytes | None]:
        value = None if self.value is None else json.dumps(self.value, ensure_ascii=False).encode("utf-8")
        return self.key.encode("utf-8"), value


@dataclass
class CatalogPipeline:
    """Applies ``product-changes`` to the catalog and persists merged products.

    The merged product goes to the compacted ``simstream-products`` topic (a tombstone on
    delete), which is what a restarted worker rebuilds its catalog from.
    """

    settings: Settings
    metrics: Metrics
    catalog: Catalog = field(default_factory=Catalog)
    clock: Callable[[], float] = time.time

    def decode_product(self, message: Inbound) -> ProductChangeRecord:
        """Decode one ``product-changes`` record; raises ``DecodeError`` with the reason."""
        if message.value is None:
            raise DecodeError("null value; a delete is {\"op\": \"delete\", \"product_id\": ...}")
        record = decode_product_change(
            message.value, kafka_ts=message.timestamp, max_bytes=self.settings.max_message_bytes, now=self.clock()
        )
        if message.key is not None and message.key.decode("utf-8", errors="replace") != record.product_id:
            raise DecodeError(
                f"record key {message.key[:60]!r} differs from product_id {record.product_id!r}; "
                "key product changes by product_id so each product stays on one partition"
            )
        return record

    def handle_product_message(self, message: Inbound) -> list[Outbound]:
        """Decode and apply one product change; return the records to publish."""
        try:
            record = self.decode_product(message)
            update = self.catalog.apply(record.to_core())
        except Exception as exc:  # noqa: BLE001 - every failure must become a dead letter
            return [self.reject(message, exc)]
        self.metrics.events.labels(message.topic, update.outcome.value).inc()
        self.metrics.catalog_size.set(len(self.catalog))
        if update.outcome is Outcome.STALE:
            log.info("stale product change ignored at %s (product %s)", message.where, update.product_id)
        return self.persist(update)

    def persist(self, update: CatalogUpdate) -> list[Outbound]:
        """The ``simstream-products`` record for an applied update (none for a no-op)."""
        topic = self.settings.topic_products
        if update.outcome is Outcome.DELETED:
            return [Outbound(topic, update.product_id, None)]
        if update.outcome in (Outcome.CREATED, Outcome.UPDATED):
            assert update.after is not None
            return [Outbound(topic, update.product_id, product_to_wire(update.after))]
        return []

    def decode_user(self, message: Inbound) -> UserEventRecord:
        if message.value is None:
            raise DecodeError("null value on user-events")
        return decode_user_event(
            message.value, kafka_ts=message.timestamp, max_bytes=self.settings.max_message_bytes, now=self.clock()
        )

    def handle_user_message(self, message: Inbound) -> list[Outbound]:
        """Decode one user event. Behaviour signals and feeds arrive with the behaviour issue."""
        try:
            record = self.decode_user(message)
            record.to_core()
        except Exception as exc:  # noqa: BLE001
            return [self.reject(message, exc)]
        self.metrics.events.labels(message.topic, "accepted").inc()
        return []

    def reject(self, message: Inbound, exc: BaseException) -> Outbound:
        """Turn a failure into a dead letter and one log line that says where it happened."""
        if isinstance(exc, SimstreamError):
            reason = str(exc)
            log.warning("dead-lettered %s: %s", message.where, reason)
        else:
            reason = f"internal error ({type(exc).__name__}): {exc}"
            log.error("dead-lettered %s after an unexpected error", message.where, exc_info=exc)
        self.metrics.events.labels(message.topic, "dead_letter").inc()
        self.metrics.dead_letters.labels(message.topic).inc()
        value = dead_letter(
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            payload=message.value,
            error=reason,
            at=self.clock(),
        )
        key = f"{message.topic}:{message.partition}:{message.offset}"
        return Outbound(self.settings.topic_dead_letters, key, value)

