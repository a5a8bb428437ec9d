"""The worker's ``Send`` port on Kafka: records packed into one producer batch per partition.

A settle or a stock flip at 100k products publishes thousands of list records at once.
Sent one by one through Faust's ``Topic.send`` and aiokafka's ``send``, each record cost
tens of microseconds of the event loop (41% of it in a profile of the attribute-only
stream), and the event loop shares one interpreter with the core. Here the records of one
call are grouped by topic and partition (Kafka's default partitioner: murmur2 of the key,
so a product's records land where any producer would put them) and appended to aiokafka
batches, whose record encoding is compiled: a few microseconds each. Every batch is then
awaited, so the caller returns only once the broker has acknowledged all of them; the input
offsets are committed after that (at-least-once). Records of one partition keep their order.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from kafka.partitioner.default import murmur2

from serving.errors import SimstreamError
from streams.kafka_io import aiokafka_options
from streams.metrics import Metrics
from streams.outputs import Outbound
from streams.settings import Settings

#: Records encoded between two turns given to the rest of the event loop: publishing a whole
#: settle's lists (100k+ records) must not hold /health and /stats for seconds.
YIELD_EVERY = 2048
#: Upper bound on one producer batch; a batch is also one produce request's share of a
#: partition, so it stays well under the broker's message.max.bytes default (1 MB).
BATCH_BYTES = 512 * 1024


class RecordTooLargeError(SimstreamError):
    """One record does not fit in a producer batch: raise ``SIMSTREAM_MAX_MESSAGE_BYTES``
    (and the topics' ``max.message.bytes``) or publish shorter lists."""


@functools.lru_cache(maxsize=1 << 16)
def _key_hash(key: bytes) -> int:
    # kafka-python's murmur2 is pure Python, about 5 us a key, and a stock flip publishes a
    # dozen lists whose keys come back again and again.
    return murmur2(key) & 0x7FFFFFFF


def partition_of(key: bytes, partitions: Sequence[int]) -> int:
    """The partition Kafka's default partitioner picks for ``key`` among ``partitions`` (sorted)."""
    return partitions[_key_hash(key) % len(partitions)]


class KafkaSink:
    """Publish records in per-partition batches and wait for every acknowledgement.

    ``acked(record, partition, offset)`` is called for each record once the broker has it.
    The producer starts at the first call and stops with ``stop``.
    """

    def __init__(self, settings: Settings, metrics: Metrics,
                 acked: Callable[[Outbound, int, int], None] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.acked = acked
        self.producer: Any = None
        self._round_robin = itertools.count()
        self._starting: asyncio.Lock | None = None

    async def start(self) -> Any:
        """The started producer (created on first use, inside the running loop)."""
        if self.producer is not None:
            return self.producer
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.producer is None:
                from aiokafka import AIOKafkaProducer

                s = self.settings
                producer = AIOKafkaProducer(
                    **aiokafka_options(s, f"{s.app_id}-sink"), acks="all", linger_ms=0,
                    max_batch_size=max(BATCH_BYTES, s.max_message_bytes + 1024),
                    max_request_size=max(s.max_message_bytes * 6, 1_048_576))
                await producer.start()
                self.producer = producer
        return self.producer

    async def stop(self, *_args: Any, **_kwargs: Any) -> None:
        """Flush and close the producer (a Faust shutdown signal calls it)."""
        producer, self.producer = self.producer, None
        if producer is not None:
            await producer.stop()

    async def __call__(self, records: Sequence[Outbound], /) -> None:
        producer = await self.start()
        published = self.metrics.published
        # Read from the producer's metadata once per call (it refreshes it), so a topic that
        # gained partitions is spread as every other producer spreads it.
        partitions: dict[str, list[int]] = {}
        groups: dict[tuple[str, int], list[tuple[Outbound, bytes | None, bytes | None]]] = {}
        for i, record in enumerate(records, 1):
            key, value = record.encoded()
            parts = partitions.get(record.topic)
            if parts is None:
                parts = partitions[record.topic] = sorted(await producer.partitions_for(record.topic))
            part = partition_of(key, parts) if key else parts[next(self._round_robin) % len(parts)]
            groups.setdefault((record.topic, part), []).append((record, key, value))
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        # Counted per topic, not per record: a labelled counter costs microseconds a call.
        for topic, count in Counter(record.topic for record in records).items():
            published.labels(topic).inc(count)
        sent: list[tuple[list[tuple[Outbound, bytes | None, bytes | None]], Any]] = []
        for (topic, part), entries in groups.items():
            start = 0
            while start < len(entries):
                batch = producer.create_batch()
                end = start
                while end < len(entries):
                    _, raw_key, raw_value = entries[end]
                    if batch.append(key=raw_key, value=raw_value, timestamp=None) is None:
                        break
                    end += 1
                if end == start:
                    record = entries[start][0]
                    raise RecordTooLargeError(f"a {record.topic} record for {record.key} does not fit in a producer batch")
                sent.append((entries[start:end], await producer.send_batch(batch, topic, partition=part)))
                start = end
        # The broker's acks before the input offsets may be committed.
        acks = await asyncio.gather(*(future for _, future in sent))
        now = time.time()
        freshness = self.metrics.freshness
        for (entries, _), meta in zip(sent, acks, strict=True):
            for i, (record, _, _) in enumerate(entries):
                if record.event_ts is not None:
                    freshness.labels(record.topic).observe(max(0.0, now - record.event_ts))
                if self.acked is not None:
                    self.acked(record, meta.partition, meta.offset + i)
