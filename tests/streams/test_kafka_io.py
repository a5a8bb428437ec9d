"""The blocking Kafka reads (``streams/kafka_io.py``): what they need to be fast enough at scale."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from kafka.record import util
from kafka.record._crc32c import crc as pure_python_crc


def test_fetched_batches_are_checked_with_the_c_crc32c() -> None:
    """kafka-python checks every fetched batch's CRC-32C. Its pure-Python fallback reads about
    8 MB/s, which made a restart at 100k products spend minutes reading the list topics; the
    ``crc32c`` dependency is what it uses instead, with the same checksums."""
    assert util.calc_crc32c.__defaults__ is not None
    used = util.calc_crc32c.__defaults__[0]
    assert used is not pure_python_crc, "install crc32c (pyproject.toml): kafka-python fell back to Python"
    data = os.urandom(4096)
    assert used(memoryview(data)) == pure_python_crc(memoryview(data))


@pytest.mark.integration
def test_read_latest_parses_only_the_last_value_of_each_key(settings_for: Callable[..., Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart reads every list topic back; most keys hold several versions there, and only
    the last one of each is parsed. Tombstones remove their key, or stay as ``None`` when
    asked (a change log since some offsets)."""
    from streams import kafka_io
    from streams.kafka_io import create_topics, producer, read_latest

    settings = settings_for()
    create_topics(settings)
    topic = settings.topic_similar_items
    kafka = producer(settings)
    for key, value in [("A", b'{"version": 1}'), ("B", b'{"version": 1}'), ("A", b'{"version": 2}'),
                       ("B", None), ("C", b"not json"), ("A", b'{"version": 3, "score": NaN}')]:
        kafka.send(topic, key=key.encode(), value=value)
    kafka.flush()
    kafka.close()

    parsed: list[bytes] = []
    parse = kafka_io.parse_value

    def counting(raw: bytes | None) -> Any:
        parsed.append(raw or b"")
        return parse(raw)

    monkeypatch.setattr(kafka_io, "parse_value", counting)
    latest = read_latest(settings, topic)
    assert latest.keys() == {"A", "C"} and latest["A"]["version"] == 3 and latest["C"] == "not json"
    assert latest["A"]["score"] != latest["A"]["score"], "NaN, which orjson refuses, still parses"
    assert len(parsed) == 2, "superseded values are never parsed"
    with_tombstones = read_latest(settings, topic, keep_tombstones=True)
    assert with_tombstones.keys() == {"A", "B", "C"} and with_tombstones["B"] is None
    assert with_tombstones["A"]["version"] == 3
