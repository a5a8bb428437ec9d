"""The worker's Kafka sink on a real broker: batches per partition, every record acknowledged
where the default partitioner puts it, in order, with the offset the broker gave it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from streams.kafka_io import create_topics, partition_count, read_topic
from streams.metrics import Metrics
from streams.outputs import Outbound
from streams.scaleout import partition_for
from streams.sink import KafkaSink

pytestmark = [pytest.mark.integration]


async def test_every_record_lands_on_its_key_partition_in_order_with_the_offset_reported(
    settings_for: Callable[..., Any],
) -> None:
    settings = settings_for()
    create_topics(settings)
    lists, products = settings.topic_similar_items, settings.topic_products
    records = [Outbound(lists, f"P{i % 37}", {"n": i, "items": []}, event_ts=time.time()) for i in range(3000)]
    records.append(Outbound(products, "P1", {"n": 3000, "blob": "x" * 300_000}))  # bigger than a default batch
    records.append(Outbound(products, "P2", None))  # a tombstone
    acked: list[tuple[Outbound, int, int]] = []
    metrics = Metrics()
    sink = KafkaSink(settings, metrics, lambda record, partition, offset: acked.append((record, partition, offset)))
    try:
        await sink(records[:1000])
        await sink(records[1000:])
    finally:
        await sink.stop()

    assert sorted(id(r) for r, _, _ in acked) == sorted(id(r) for r in records), "each record acknowledged once"
    on_broker = {(r.topic, r.partition, r.offset): (r.key, r.value)
                 for topic in (lists, products) for r in read_topic(settings, topic)}
    assert len(on_broker) == len(records)
    counts = {topic: partition_count(settings, topic) for topic in (lists, products)}
    for record, partition, offset in acked:
        assert partition == partition_for(record.key, counts[record.topic])
        assert on_broker[(record.topic, partition, offset)] == (record.key, record.value)
    by_key: dict[str, list[tuple[int, int]]] = {}
    for record, _, offset in acked:
        if record.topic == lists and record.value is not None:
            by_key.setdefault(record.key, []).append((offset, record.value["n"]))
    for key, seen in by_key.items():
        assert [n for _, n in sorted(seen)] == sorted(n for _, n in seen), f"{key} out of order"
    assert metrics.published.labels(lists)._value.get() == 3000
