"""The replica: every worker follows the state topics on all partitions and applies the
other workers' changes to its own core, through the engine's one apply path.

Records this worker wrote itself are skipped while it owns their partition (it applied them
first). A product record whose embedding record has not arrived is held for up to
``EMBED_PENDING_AFTER_S`` before this worker embeds it itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from serving.catalog import Product
from serving.errors import EncoderUnavailable, SimstreamError
from serving.text import product_text
from streams.engine import Change, Engine, as_upsert
from streams.kafka_io import aiokafka_options, partition_count
from streams.metrics import Metrics
from streams.outputs import Outputs
from streams.records import product_from_wire
from streams.scaleout import Ownership
from streams.settings import Settings
from streams.wire import LEXICAL_KEY, StoredEmbedding, embedding_from_wire, lexical_from_wire

log = logging.getLogger(__name__)

#: A product record whose embedding has not shown up after this long is embedded here
#: (its writer used another model version, or its embedding record was lost).
EMBED_PENDING_AFTER_S = 10.0

Record = tuple[str, int, int, bytes | None, bytes | None]


@dataclass
class Replica:
    """Follow the state topics on every partition and apply the other workers' changes."""

    settings: Settings
    metrics: Metrics
    engine: Engine
    ownership: Ownership
    batch_lock: asyncio.Lock
    #: topic -> partition -> next offset to read (where the start-up restore stopped).
    start: dict[str, dict[int, int]] = field(default_factory=dict)
    #: Product records waiting for their embedding: pid -> (product, first seen, partition, offset).
    pending: dict[str, tuple[Product, float, int, int]] = field(default_factory=dict)
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    applied: int = 0
    skipped_own: int = 0
    #: Set whenever a batch of records has been applied (``reach`` waits on it).
    progressed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def topics(self) -> tuple[str, str, str]:
        return self.settings.state_topics

    def reached(self, ends: dict[str, dict[int, int]]) -> bool:
        """Whether every record before ``ends`` (topic -> partition -> offset) is applied here."""
        return all(self.start.get(topic, {}).get(partition, 0) >= end
                   for topic, parts in ends.items() for partition, end in parts.items() if end > 0)

    async def reach(self, ends: dict[str, dict[int, int]]) -> None:
        """Until the replica has applied everything before ``ends``."""
        while not self.reached(ends):
            self.progressed.clear()
            try:
                await asyncio.wait_for(self.progressed.wait(), timeout=1.0)
            except TimeoutError:
                continue

    def covered(self) -> dict[str, dict[int, int]]:
        """Next offset per partition of the state topics up to which everything is applied here
        (what a snapshot covers): the replica's position, held back by records still pending."""
        covered = {topic: dict(parts) for topic, parts in list(self.start.items())}
        products = covered.setdefault(self.settings.topic_products, {})
        for _, _, partition, offset in list(self.pending.values()):
            products[partition] = min(products.get(partition, offset), offset)
        return covered

    def health(self) -> dict[str, Any]:
        by_topic: dict[str, int] = {}
        for (topic, _), lag in self.lag.items():
            by_topic[topic] = by_topic.get(topic, 0) + lag
        return {"replica_lag": by_topic, "replica_applied": self.applied,
                "replica_pending_embeddings": len(self.pending)}

    def _consumer(self) -> Any:
        from aiokafka import AIOKafkaConsumer

        s = self.settings
        return AIOKafkaConsumer(
            **aiokafka_options(s, f"{s.app_id}-replica"), group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=max(s.max_message_bytes * 6, 4 * 1024 * 1024))

    async def run(self) -> None:
        """Read both state topics from where the restore stopped, for the worker's life."""
        from aiokafka import TopicPartition

        s = self.settings
        topics = self.topics
        while True:
            consumer = self._consumer()
            try:
                await consumer.start()
                tps = []
                loop = asyncio.get_running_loop()
                for topic in topics:
                    count = await loop.run_in_executor(None, partition_count, s, topic, 300.0)
                    tps += [TopicPartition(topic, p) for p in range(count)]
                consumer.assign(tps)
                for tp in tps:
                    offset = self.start.get(tp.topic, {}).get(tp.partition)
                    if offset is None:
                        await consumer.seek_to_beginning(tp)
                    else:
                        consumer.seek(tp, offset)
                await self._follow(consumer, tps)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("replica consumer failed, restarting it: %s", exc, exc_info=True)
                await asyncio.sleep(1.0)
            finally:
                await consumer.stop()

    async def _follow(self, consumer: Any, tps: list[Any]) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            records = []
            read: dict[tuple[str, int], int] = {}
            for tp, messages in batch.items():
                for m in messages:
                    read[(tp.topic, tp.partition)] = m.offset + 1
                    records.append((tp.topic, tp.partition, m.offset, m.key, m.value))
            if records or self.overdue():
                await self.apply(records)
            # Advanced only once applied: a handover waits on these positions.
            for (topic, partition), offset in read.items():
                self.start.setdefault(topic, {})[partition] = offset
            if read:
                self.progressed.set()
            for tp in tps:
                high = consumer.highwater(tp)
                position = self.start.get(tp.topic, {}).get(tp.partition)
                if high is not None and position is not None:
                    self.lag[(tp.topic, tp.partition)] = max(0, high - position)
            metrics = self.metrics
            for topic in (self.settings.topic_products, self.settings.topic_embeddings):
                metrics.replica_lag.labels(topic).set(
                    sum(v for (t, _), v in self.lag.items() if t == topic))
            metrics.replica_pending.set(len(self.pending))

    def overdue(self) -> list[Product]:
        now = time.monotonic()
        return [p for p, seen, _, _ in self.pending.values() if now - seen > EMBED_PENDING_AFTER_S]

    async def apply(self, records: list[Record]) -> None:
        """Apply a batch of state records read from the topics (between batches of the stream)."""
        async with self.batch_lock:
            engine = self.engine
            out = Outputs()
            changes = await self.embed_overdue()
            for topic, partition, offset, raw_key, raw_value in records:
                if raw_key is None:
                    continue
                pid = raw_key.decode("utf-8", errors="replace")
                try:
                    if topic == self.settings.topic_lexical:
                        # Every worker adopts each IDF record in log order, its own too, so all
                        # end on the last one even when two fitted at once.
                        if raw_value is not None and pid == LEXICAL_KEY:
                            out.extend(await self.apply_changes(changes))
                            changes = []
                            model = lexical_from_wire(json.loads(raw_value))
                            if model is None:  # another lexical scheme (an older worker's): not mixed in
                                log.warning("replica: ignoring an IDF record of another lexical scheme")
                                continue
                            out.lists += engine.lists_to_records(await engine.in_core(engine.core.use_lexical, model))
                        continue
                    if self.ownership.replica_skips(pid):
                        self.skipped_own += 1  # this worker wrote it, and applied it first
                        continue
                    value = None if raw_value is None else json.loads(raw_value)
                    if topic == self.settings.topic_embeddings:
                        changes += self.on_embedding(pid, None if value is None else embedding_from_wire(value))
                    elif value is None:
                        self.pending.pop(pid, None)
                        changes.append(Change.tombstone(pid))
                    else:
                        changes += self.on_product(product_from_wire(value), partition, offset)
                except (ValueError, SimstreamError) as exc:  # one unreadable record must not stop the replica
                    log.error("replica: ignoring unreadable %s record for %s: %s", topic, pid, exc)
            out.extend(await self.apply_changes(changes))
            await engine.publish(out)

    async def apply_changes(self, changes: list[Change]) -> Outputs:
        self.applied += len(changes)
        return await self.engine.apply(changes)

    async def embed_overdue(self) -> list[Change]:
        """Embed here the products whose embedding record is overdue; they can be applied now."""
        overdue = self.overdue()
        if not overdue:
            return []
        engine = self.engine
        try:
            vectors = await engine.embed([product_text(p) for p in overdue], wait=False)
        except EncoderUnavailable:
            return []
        ready = []
        for product in overdue:
            vector = vectors.get(product_text(product))
            if vector is not None:
                engine.embeddings.hold(StoredEmbedding(
                    product.product_id, vector, engine.model_version, product.content_hash))
                del self.pending[product.product_id]
                ready.append(Change.of_product(product))
        return ready

    def on_embedding(self, pid: str, stored: StoredEmbedding | None) -> list[Change]:
        """An embedding record: cache it; the product waiting for it can now be applied."""
        if stored is None:
            return []  # its product's tombstone is the delete
        engine = self.engine
        if stored.model_version == engine.model_version:
            engine.embeddings.hold(stored, engine.core.catalog.get(pid))
        waiting = self.pending.get(pid)
        if waiting is not None and waiting[0].content_hash == stored.content_hash:
            product = self.pending.pop(pid)[0]
            return [Change.of_product(product)]
        return []

    def on_product(self, product: Product, partition: int, offset: int) -> list[Change]:
        """A product record: apply it, or hold it until its embedding record arrives."""
        engine = self.engine
        pid = product.product_id
        self.pending.pop(pid, None)
        change = Change.of_product(product)
        if engine.already_applied(change):
            return []  # already here (this worker's own change, or a replay), or something newer

        try:
            needed = engine.core.needs_embedding(as_upsert(product))
        except SimstreamError:
            needed = None  # stale or invalid: the engine decides, and says why
        if needed is not None and not engine.has_vector(needed):
            self.pending[pid] = (product, time.monotonic(), partition, offset)
            return []
        return [change]
