"""The edge every input topic shares: decoding into frozen records, and dead letters.

Failure rule: one bad event becomes one dead letter and one log line (with topic, partition
and offset), and processing goes on with the next event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving.errors import SimstreamError
from streams.metrics import Metrics
from streams.outputs import Inbound, Outbound
from streams.records import (
    DecodeError,
    ProductChangeRecord,
    UserEventRecord,
    dead_letter,
    decode_product_change,
    decode_user_event,
)
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Edge:
    """Decoding and dead-lettering, shared by every input topic."""

    settings: Settings
    metrics: Metrics
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

    def decode_user(self, message: Inbound) -> UserEventRecord:
        if message.value is None:
            raise DecodeError("null value on user-events")
        return decode_user_event(
            message.value, kafka_ts=message.timestamp, max_bytes=self.settings.max_message_bytes, now=self.clock()
        )

    def reject(self, message: Inbound, exc: BaseException) -> Outbound:
        """Turn a failure into a dead letter and one log line that says where it happened."""
        reason = str(exc) if isinstance(exc, SimstreamError) else f"internal error ({type(exc).__name__}): {exc}"
        if message.topic == self.settings.topic_user_events:
            # A reason may quote the event, and user ids must never reach a log line: the
            # reason is on the dead-letter topic only.
            log.warning("dead-lettered %s (%s); the reason is on %s", message.where, type(exc).__name__,
                        self.settings.topic_dead_letters)
        elif isinstance(exc, SimstreamError):
            log.warning("dead-lettered %s: %s", message.where, reason)
        else:
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
