"""kafka-python plumbing shared by the CLI and the worker: client options, topics, reading back.

The Faust worker uses aiokafka under the hood; the CLI and start-up restore use kafka-python.
Both take their connection and security options from the same ``Settings``.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from serving.kinds import LIST_KINDS
from streams.settings import Settings

log = logging.getLogger(__name__)


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection and security options for any kafka-python client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        "client_id": f"{settings.app_id}-cli",
    }
    if "SSL" in settings.kafka_security_protocol:
        options.update(
            ssl_cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
            ssl_certfile=str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
            ssl_keyfile=str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
            ssl_check_hostname=settings.kafka_ssl_check_hostname,
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=(
                settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
            ),
        )
    return options


def aiokafka_options(settings: Settings, client_id: str) -> dict[str, Any]:
    """Connection and security options for an aiokafka client of this worker."""
    options: dict[str, Any] = {"bootstrap_servers": settings.bootstrap_servers,
                               "security_protocol": settings.kafka_security_protocol, "client_id": client_id}
    if "SSL" in settings.kafka_security_protocol:
        options["ssl_context"] = ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=(settings.kafka_sasl_password.get_secret_value()
                                            if settings.kafka_sasl_password else None))
    return options


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for aiokafka (Faust), or ``None`` without TLS."""
    if "SSL" not in settings.kafka_security_protocol:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    )
    context.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(
            str(settings.kafka_ssl_certfile),
            str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
        )
    return context


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool
    #: Fixed partition count (else ``topic_partitions``); largest message (else the broker's).
    partitions: int | None = None
    max_message_bytes: int | None = None


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic simstream reads or writes. Per-key state topics are compacted."""
    return [
        TopicSpec(settings.topic_product_changes, False),
        TopicSpec(settings.topic_user_events, False),
        *(TopicSpec(settings.list_topic(spec.kind), True) for spec in LIST_KINDS),
        TopicSpec(settings.topic_user_recommendations, False),
        TopicSpec(settings.topic_dead_letters, False),
        TopicSpec(settings.topic_products, True),
        TopicSpec(settings.topic_embeddings, True),
        TopicSpec(settings.topic_pair_updates, False),
        TopicSpec(settings.topic_product_labels, True),
        TopicSpec(settings.topic_models, True, partitions=1),
        # One record, read in one order by every worker; the IDF is a few hundred KB.
        TopicSpec(settings.topic_lexical, True, partitions=1, max_message_bytes=8 * 1024 * 1024),
        # One partition: its one owner holds every offer, so competitor-prices (an aggregate per
        # own product over all offers) is complete (streams/offers.py).
        TopicSpec(settings.topic_competitor_offers, False, partitions=1),
        TopicSpec(settings.topic_offer_matches, True),
        TopicSpec(settings.topic_competitor_prices, True),
    ]


def create_topics(settings: Settings, *, partitions: int | None = None) -> dict[str, str]:
    """Create missing topics and make sure compaction is set; safe to run any number of times.

    Returns topic name -> "created" or "exists". An existing topic keeps its partition
    count (Kafka cannot shrink it), but its ``cleanup.policy`` is corrected.
    """
    partitions = partitions or settings.topic_partitions
    admin = KafkaAdminClient(**client_options(settings))
    try:
        existing = set(admin.list_topics())
        result: dict[str, str] = {}
        for spec in topic_specs(settings):
            configs = {"cleanup.policy": "compact" if spec.compacted else "delete"}
            if spec.compacted:
                # Keep tombstones long enough for every replica to see a delete.
                configs["delete.retention.ms"] = str(24 * 3600 * 1000)
            if spec.max_message_bytes:
                configs["max.message.bytes"] = str(spec.max_message_bytes)
            if spec.name in existing:
                result[spec.name] = "exists"
                admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, spec.name, configs=configs)])
                continue
            try:
                admin.create_topics(
                    [NewTopic(spec.name, spec.partitions or partitions, settings.topic_replication, topic_configs=configs)]
                )
                result[spec.name] = "created"
            except TopicAlreadyExistsError:  # a concurrent `topics create`
                result[spec.name] = "exists"
        return result
    finally:
        admin.close()


def describe_cleanup_policy(settings: Settings, topics: list[str]) -> dict[str, str]:
    """topic -> cleanup.policy, as the broker reports it."""
    admin = KafkaAdminClient(**client_options(settings))
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        # kafka-python 3 answers {"topic": {name: {config: {"value": ...}}}}.
        response = admin.describe_configs(resources)
        policies: dict[str, str] = {}
        for name, configs in response.get("topic", {}).items():
            policies[name] = configs["cleanup.policy"]["value"]
        return policies
    finally:
        admin.close()


def producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A kafka-python producer with safe defaults: acks=all, idempotent-sized batches."""
    options: dict[str, Any] = {
        **client_options(settings),
        "acks": "all",
        "linger_ms": 5,
        "max_request_size": max(settings.max_message_bytes * 6, 1_048_576),
        "retries": 5,
    }
    options.update(overrides)
    return KafkaProducer(**options)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: Any  # parsed JSON, or None for a tombstone, or the raw text when not JSON
    timestamp: float


def read_topic(
    settings: Settings,
    topic: str,
    *,
    from_offsets: dict[int, int] | None = None,
    until_end: bool = True,
    timeout_s: float = 30.0,
    follow: bool = False,
    partitions: Collection[int] | None = None,
    reached: dict[int, int] | None = None,
    parse: bool = True,
) -> Iterator[Record]:
    """Read every partition of a topic outside any consumer group, from the start (or offsets).

    With ``until_end`` the iterator stops once it has reached the end offsets seen at the
    start; with ``follow`` it keeps reading until ``timeout_s`` passes without a record.
    ``partitions`` restricts the read to those partitions. ``reached``, when given, is
    filled with the next offset per partition once the iterator is exhausted: where a
    follower must continue so that it misses nothing (``streams/scaleout.py``). Without
    ``parse`` each value is the record's bytes (``read_latest`` parses only the survivors).
    """
    consumer = KafkaConsumer(
        **client_options(settings),
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=int(timeout_s * 1000) if follow else 1000,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + timeout_s
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(topic) or set()
        if partitions is not None:
            parts = set(parts) & set(partitions)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return
        consumer.assign(tps)
        for tp in tps:
            start = (from_offsets or {}).get(tp.partition)
            if start is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, start)
        end = consumer.end_offsets(tps)
        remaining = {tp for tp in tps if consumer.position(tp) < end[tp]}
        if until_end and not follow and not remaining:
            return
        while True:
            batch = consumer.poll(timeout_ms=500, max_records=2000)
            if not batch:
                if until_end and not follow and not remaining:
                    return
                if time.monotonic() > deadline and not follow:
                    raise TimeoutError(f"reading {topic} did not reach its end within {timeout_s:.0f} s")
                if follow and time.monotonic() > deadline:
                    return
                continue
            if follow:
                deadline = time.monotonic() + timeout_s
            for tp, messages in batch.items():
                for m in messages:
                    yield Record(tp.topic, tp.partition, m.offset, text_of(m.key),
                                 parse_value(m.value) if parse else m.value, m.timestamp / 1000)
                if until_end and consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
            if until_end and not follow and not remaining:
                return
    finally:
        if reached is not None:
            for tp in consumer.assignment():
                try:
                    reached[tp.partition] = consumer.position(tp)
                except Exception:  # noqa: BLE001 - a closed or failed consumer reports nothing
                    log.debug("no position for %s", tp)
        consumer.close()


def text_of(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def parse_value(raw: bytes | None) -> Any:
    """A record's value as JSON (orjson; the stdlib's parser for what orjson refuses, such as
    ``NaN``), or its text when it is not JSON."""
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw.decode("utf-8", errors="replace")


def last_values(records: Iterator[Record]) -> dict[str, Any]:
    """The last value per key, keeping tombstones as ``None`` (a change log since some offset)."""
    return {r.key: r.value for r in records if r.key is not None}


def read_latest(settings: Settings, topic: str, *, keep_tombstones: bool = False, **read: Any) -> dict[str, Any]:
    """The last value per key of ``topic`` (``read_topic`` with ``read``), parsed: each key's
    value is parsed once, older values of a key are skipped as bytes. At a restart a list
    topic holds several versions of many lists, and parsing them all cost most of the read.
    Tombstones remove their key, or with ``keep_tombstones`` stay as ``None`` (a change log
    since some offsets: ``last_values``)."""
    records = read_topic(settings, topic, parse=False, **read)
    raw = last_values(records) if keep_tombstones else latest_by_key(records)
    return {key: parse_value(value) for key, value in raw.items()}


def latest_by_key(records: Iterator[Record]) -> dict[str, Any]:
    """The last value per key (a compacted view); tombstones remove the key."""
    state: dict[str, Any] = {}
    for r in records:
        if r.key is None:
            continue
        if r.value is None:
            state.pop(r.key, None)
        else:
            state[r.key] = r.value
    return state


def committed_offsets(settings: Settings) -> dict[str, dict[int, int]]:
    """The consumer group's committed offsets, by topic and partition (blocking)."""
    admin = KafkaAdminClient(**client_options(settings))
    try:
        committed = admin.list_group_offsets({settings.app_id: None}).get(settings.app_id, {})
    finally:
        admin.close()
    out: dict[str, dict[int, int]] = {}
    for tp, meta in committed.items():
        offset = meta.offset if hasattr(meta, "offset") else int(meta)
        if offset >= 0:
            out.setdefault(tp.topic, {})[tp.partition] = offset
    return out


@dataclass(frozen=True)
class InputOffsets:
    """Where the group stands on one input topic when a worker starts."""

    ends: dict[int, int]
    #: Per partition, the offset the group goes on from: committed, else the log start.
    positions: dict[int, int]


def input_offsets(settings: Settings, topic: str, timeout_s: float = 300.0) -> InputOffsets:
    """End offsets of ``topic`` now and where the consumer group will resume (blocking)."""
    consumer = KafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(wait_for_partitions(consumer, topic, timeout_s))]
        ends = {tp.partition: offset for tp, offset in consumer.end_offsets(tps).items()}
        starts = {tp.partition: offset for tp, offset in consumer.beginning_offsets(tps).items()}
    finally:
        consumer.close()
    committed = committed_offsets(settings).get(topic, {})
    positions = {p: max(starts.get(p, 0), committed.get(p, 0)) for p in ends}
    return InputOffsets(ends=ends, positions=positions)


def wait_for_partitions(consumer: KafkaConsumer, topic: str, timeout_s: float) -> set[int]:
    """Partitions of ``topic`` as ``consumer`` sees them, waiting for a topic just created."""
    deadline = time.monotonic() + timeout_s
    while not (parts := consumer.partitions_for_topic(topic)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic} has no partitions after {timeout_s:.0f} s")
        time.sleep(0.2)
    return set(parts)


def partition_count(settings: Settings, topic: str, timeout_s: float = 30.0) -> int:
    """Partitions of ``topic`` as the brokers report them (blocking; run it in an executor)."""
    consumer = KafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False)
    try:
        return len(wait_for_partitions(consumer, topic, timeout_s))
    finally:
        consumer.close()


def end_offsets(settings: Settings, topics: Collection[str]) -> dict[str, dict[int, int]]:
    """The end offset of every partition of ``topics`` now (blocking; run it in an executor)."""
    consumer = KafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for topic in topics
               for p in sorted(wait_for_partitions(consumer, topic, 300.0))]
        out: dict[str, dict[int, int]] = {}
        for tp, offset in consumer.end_offsets(tps).items():
            out.setdefault(tp.topic, {})[tp.partition] = offset
        return out
    finally:
        consumer.close()
