"""Scale-out: several ``simstream worker`` processes share one app id (one consumer group).

* **Ownership** is Kafka's: a worker owns the products whose key falls, under Kafka's
  default partitioner (murmur2, the one aiokafka and kafka-python producers use), into a
  ``product-changes`` partition assigned to it. It embeds and applies those products'
  changes, and it alone publishes their lists.
* **Replica**: every worker follows ``simstream-products`` and ``simstream-embeddings`` on
  all partitions, outside the group (``Replica``), and applies the other workers' changes
  to its own core, so its index and catalog cover the whole catalog; the lists it owns
  move when another worker's product enters or leaves them.
* **Rebalances** (``Ownership``): on revocation the worker finishes its batch and holds back
  every list record (the "gate"); on assignment, under the batch lock, it releases what it
  held for partitions it keeps, drops what belongs to partitions it lost (never a
  tombstone: the new owner publishes them), and builds the lists of the products it gained
  from its replica (``Recommender.set_ownership``), after continuing the versions the list
  topics hold for those partitions. A gained list already on its topic unchanged is not
  republished; a list on a gained partition whose product is gone gets its tombstone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kafka.partitioner.default import murmur2

from serving.catalog import Outcome, Product, ProductDelete, ProductUpsert
from serving.errors import EncoderUnavailable, SimstreamError
from serving.recommender import BehaviorRow, Kind, Publication, Recommender, last_per_key
from serving.text import product_text
from streams.kafka_io import client_options, latest_by_key, read_topic, ssl_context
from streams.pipeline import Inbound, Outbound, _as_upsert
from streams.records import product_from_wire
from streams.settings import Settings
from streams.wire import LEXICAL_KEY, StoredEmbedding, embedding_from_wire, lexical_from_wire, same_items

if TYPE_CHECKING:
    from streams.app import Runtime

log = logging.getLogger(__name__)

#: A product record whose embedding has not shown up after this long is embedded here
#: (its writer used another model version, or its embedding record was lost).
EMBED_PENDING_AFTER_S = 10.0

Publish = Callable[[list[Outbound]], Awaitable[None]]


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key`` (murmur2 of its UTF-8 bytes)."""
    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions


def owns_nothing(_pid: str) -> bool:
    return False


@dataclass(frozen=True)
class PartitionOwnership:
    """``owns(pid)``: the product's ``product-changes`` partition is one of ``partitions``."""

    partitions: frozenset[int]
    total: int

    def __call__(self, pid: str) -> bool:
        return bool(self.partitions) and partition_for(pid, self.total) in self.partitions


def _partitions(consumer: Any, topic: str, timeout_s: float) -> set[int]:
    """Partitions of ``topic`` as ``consumer`` sees them, waiting for a topic just created."""
    deadline = time.monotonic() + timeout_s
    while not (parts := consumer.partitions_for_topic(topic)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic} has no partitions after {timeout_s:.0f} s")
        time.sleep(0.2)
    return set(parts)


def partition_count(settings: Settings, topic: str, timeout_s: float = 30.0) -> int:
    """Partitions of ``topic`` as the brokers report them (blocking; run it in an executor)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False)
    try:
        return len(_partitions(consumer, topic, timeout_s))
    finally:
        consumer.close()


@dataclass
class Ownership:
    """This worker's share of the products, kept in step with the consumer group."""

    settings: Settings
    #: Partitions of ``product-changes`` whose lists this worker publishes now.
    allowed: frozenset[int] = frozenset()
    #: The latest assignment, applied to the core by the next handover.
    target: frozenset[int] | None = None
    total: int = 0
    #: Between a revocation and the handover that follows: list records are held back.
    holding: bool = False
    held: dict[tuple[str, str], Outbound] = field(default_factory=dict)
    rebalances: int = 0
    last_handover: dict[str, Any] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set while no handover is pending: only then may the stream apply changes.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    #: Partitions of ``user-events`` and ``simstream-pair-updates`` whose behaviour state
    #: (sessions, histories, rows) this worker holds, and the latest assignment of them.
    behavior_held: dict[str, frozenset[int]] = field(default_factory=dict)
    behavior_target: dict[str, frozenset[int]] = field(default_factory=dict)
    #: Partition counts of the input topics (murmur2 needs them to place a key).
    totals: dict[str, int] = field(default_factory=dict)
    #: Partitions whose state records the replica skips: this worker wrote them (it is their
    #: only writer while it owns them). Empty from a revocation until the next handover, so
    #: the replica then applies every record in log order, its own echoes included.
    skip: frozenset[int] = frozenset()

    @property
    def list_topics(self) -> tuple[str, str, str]:
        s = self.settings
        return (s.topic_similar_items, s.topic_substitutes, s.topic_complements)

    def gate(self, records: Iterable[Outbound]) -> list[Outbound]:
        """Let through list records of owned partitions only; hold them during a rebalance."""
        out: list[Outbound] = []
        topics = self.list_topics
        for record in records:
            if record.topic not in topics:
                out.append(record)
                continue
            mine = self.total > 0 and partition_for(record.key, self.total) in self.allowed
            if not mine:
                continue  # another worker publishes it (or nobody yet: the next owner builds it)
            if self.holding:
                self.held[(record.topic, record.key)] = record
            else:
                out.append(record)
        return out

    def on_revoked(self) -> None:
        self.holding = True
        self.settled.clear()
        self.skip = frozenset()

    def on_assigned(self, partitions: frozenset[int], behavior: dict[str, frozenset[int]] | None = None) -> None:
        self.behavior_target = dict(behavior or {})
        self.target = partitions
        self.rebalances += 1
        self.settled.clear()
        self.changed.set()

    def owns_partition(self, partition: int) -> bool:
        """Whether events of this ``product-changes`` partition are this worker's to apply now."""
        return self.settled.is_set() and partition in self.allowed

    def holds(self, topic: str, partition: int) -> bool:
        """Whether events of this behaviour-topic partition are this worker's to apply now."""
        return self.settled.is_set() and partition in self.behavior_held.get(topic, frozenset())

    def replica_skips(self, pid: str) -> bool:
        """Whether the replica skips a state record of ``pid`` (this worker is its writer)."""
        return self.total > 0 and bool(self.skip) and partition_for(pid, self.total) in self.skip

    def release(self, keep: frozenset[int]) -> list[Outbound]:
        """Held records of partitions kept across the rebalance, in the order they were held."""
        released = [r for r in self.held.values() if partition_for(r.key, self.total) in keep]
        self.held.clear()
        return released

    def health(self) -> dict[str, Any]:
        return {"owned_partitions": sorted(self.allowed), "product_partitions": self.total,
                "rebalances": self.rebalances, "handover_pending": not self.settled.is_set(),
                "last_handover": self.last_handover}


def _read_lists(settings: Settings, partitions: frozenset[int], total: int) -> dict[Kind, dict[str, Any]]:
    """Last list per key on the given partitions of the three list topics (blocking)."""
    out: dict[Kind, dict[str, Any]] = {}
    for kind, topic in ((Kind.SIMILAR, settings.topic_similar_items), (Kind.SUBSTITUTES, settings.topic_substitutes),
                        (Kind.COMPLEMENTS, settings.topic_complements)):
        # List topics are keyed by product id like product-changes; with the same partition
        # count a product's lists sit on its own partition number, otherwise read them all.
        same = partition_count(settings, topic) == total
        values = latest_by_key(read_topic(settings, topic, partitions=partitions if same else None, timeout_s=300))
        out[kind] = {k: v for k, v in values.items() if isinstance(v, dict)
                     and partition_for(k, total) in partitions}
    return out


def hand_over(core: Recommender, owns: Callable[[str], bool], gained_lists: dict[Kind, dict[str, Any]],
              model_version: str, behavior: dict[str, BehaviorRow] | None = None) -> list[Publication]:
    """Move the core to ``owns`` and say what to publish for the lists it gained (core thread);
    ``behavior`` holds the rebuilt behaviour rows of gained products."""
    for kind, values in gained_lists.items():
        for pid, value in values.items():
            version = value.get("version")
            if isinstance(version, int):
                core.seed_version(kind, pid, version)
    out: list[Publication] = []
    for pub in core.set_ownership(owns, behavior):
        if pub.kind is not Kind.COMPLEMENTS and pub.items is not None:
            on_topic = gained_lists.get(pub.kind, {}).get(pub.product_id)
            if on_topic is not None and same_items(on_topic, pub.items) \
                    and on_topic.get("model_version") == model_version:
                continue  # the previous owner already published exactly this
        out.append(pub)
    for kind in (Kind.SIMILAR, Kind.SUBSTITUTES):
        held = core.lists(kind)
        for pid in gained_lists.get(kind, {}).keys() - held.keys():
            if owns(pid):  # its product is gone: the list's last word is a tombstone
                out.append(core.republish(kind, pid))
    return out


def end_offsets(settings: Settings, topics: Iterable[str]) -> dict[str, dict[int, int]]:
    """The end offset of every partition of ``topics`` now (blocking; run it in an executor)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for topic in topics for p in sorted(_partitions(consumer, topic, 300.0))]
        return _group(consumer.end_offsets(tps))
    finally:
        consumer.close()


def _group(offsets: dict[Any, int]) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for tp, offset in offsets.items():
        out.setdefault(tp.topic, {})[tp.partition] = offset
    return out


async def run_handovers(runtime: Runtime, ownership: Ownership, publish: Publish) -> None:
    """Apply each new assignment to the core, between batches (runs for the worker's life).

    A gained product's last state was written by its previous owner before that owner let
    the partition go, so before taking over, the replica reads up to the end offsets the
    state topics have now; only then does the core build the gained lists and the stream
    apply their changes.
    """
    await runtime.ready.wait()
    delay = 0.5
    while True:
        await ownership.changed.wait()
        ownership.changed.clear()
        try:
            await _hand_over_once(runtime, ownership, publish)
            delay = 0.5
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker is away: the stream waits for the handover, never skips
            log.error("handover failed, retrying in %.1f s: %s", delay, exc, exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            ownership.changed.set()


def replay_window_s(settings: Settings, topic: str) -> float:
    """How far back a new owner reads a behaviour topic: what still weighs in its state
    (history within its TTL, open sessions; counts decayed to 1/256 after 8 half-lives)."""
    if topic == settings.topic_user_events:
        return max(settings.feed_history_ttl_s, settings.session_gap_s)
    return 8 * settings.behavior_half_life_s


def read_handed_over(settings: Settings, gained: dict[str, frozenset[int]]) -> dict[str, list[Inbound]]:
    """The records of gained behaviour partitions that their previous owner already applied:
    from the start of the replay window up to the group's committed offset (blocking).

    The stream goes on from the committed offset, so nothing is applied twice; where the
    group committed nothing, the stream reads the partition from its start and there is
    nothing to replay.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import KafkaAdminClient

    tps = [TopicPartition(topic, p) for topic, parts in gained.items() for p in sorted(parts)]
    out: dict[str, list[Inbound]] = {topic: [] for topic in gained}
    if not tps:
        return out
    admin = KafkaAdminClient(**client_options(settings))
    try:
        committed = admin.list_group_offsets({settings.app_id: None}).get(settings.app_id, {})
    finally:
        admin.close()
    stops = {tp: committed[tp].offset for tp in tps if tp in committed and committed[tp].offset > 0}
    if not stops:
        return out
    consumer = KafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False,
                             max_partition_fetch_bytes=max(settings.max_message_bytes * 6, 4 * 1024 * 1024))
    try:
        consumer.assign(list(stops))
        now_ms = int(time.time() * 1000)
        starts = consumer.offsets_for_times(
            {tp: max(0, now_ms - int(replay_window_s(settings, tp.topic) * 1000)) for tp in stops})
        remaining = set()
        for tp, stop in stops.items():
            found = starts.get(tp)
            if found is None or found.offset >= stop:
                continue
            consumer.seek(tp, found.offset)
            remaining.add(tp)
        deadline = time.monotonic() + 300
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading the handed-over behaviour partitions took over 300 s: {remaining}")
            for tp, messages in consumer.poll(timeout_ms=500, max_records=5000).items():
                for m in messages:
                    if m.offset < stops[tp]:
                        out[tp.topic].append(Inbound(tp.topic, tp.partition, m.offset, m.key, m.value,
                                                     timestamp=m.timestamp / 1000.0))
            remaining = {tp for tp in remaining if consumer.position(tp) < stops[tp]}
        return out
    finally:
        consumer.close()


async def _hand_over_once(runtime: Runtime, ownership: Ownership, publish: Publish) -> None:
    settings = runtime.settings
    loop = asyncio.get_running_loop()
    if ownership.target is None:
        return
    started = time.monotonic()
    for topic in (settings.topic_product_changes, settings.topic_user_events, settings.topic_pair_updates):
        if topic not in ownership.totals:
            ownership.totals[topic] = await loop.run_in_executor(None, partition_count, settings, topic, 300.0)
    ownership.total = ownership.totals[settings.topic_product_changes]
    if len(set(ownership.totals.values())) > 1:
        log.warning("the input topics have different partition counts %s: a product's behaviour row and its "
                    "lists may then sit on different workers; give them the same count", ownership.totals)
    replica = runtime.replica
    if replica is not None:
        ends = await loop.run_in_executor(None, end_offsets, settings, replica.topics)
        await replica.reach(ends)
    behavior_target = ownership.behavior_target
    gained_behavior = {topic: parts - ownership.behavior_held.get(topic, frozenset())
                       for topic, parts in behavior_target.items()}
    handed = await loop.run_in_executor(None, read_handed_over, settings, gained_behavior)
    async with runtime.batch_lock:
        # The target is cleared only once the handover is done, so a failure is retried.
        target = ownership.target
        if target is None:
            return
        before = ownership.allowed
        gained = target - before
        lists = (await loop.run_in_executor(None, _read_lists, settings, gained, ownership.total)
                 if gained else {})
        pipeline = runtime.products
        owns = PartitionOwnership(target, ownership.total)
        # Text changes deferred by an encoder outage on partitions now lost: the new owner
        # re-reads them (they were never acknowledged) and applies them itself.
        pipeline.pending = [(m, c) for m, c in pipeline.pending if owns(c.product_id)]
        rows = _rebuild_behavior(runtime, ownership, behavior_target, gained_behavior, handed, owns)
        pubs = await pipeline._in_core(hand_over, pipeline.core, owns, lists, pipeline.model_version, rows)
        ownership.behavior_held = behavior_target
        ownership.allowed = target
        ownership.skip = target
        release = ownership.release(target & before)
        ownership.holding = False
        records = release + pipeline.publications_to_records(pubs)
        await publish(records)
        if ownership.target is target:  # no newer assignment arrived meanwhile
            ownership.target = None
            ownership.settled.set()
    ownership.last_handover = {
        "gained": sorted(gained), "lost": sorted(before - target), "published": len(records),
        "released": len(release), "seconds": round(time.monotonic() - started, 3)}
    runtime.metrics.owned_partitions.set(len(target))
    log.info("handover: own partitions %s of %d (gained %s, lost %s), %d records published in %.2f s",
             sorted(target), ownership.total, sorted(gained), sorted(before - target), len(records),
             time.monotonic() - started)


def _rebuild_behavior(runtime: Runtime, ownership: Ownership, target: dict[str, frozenset[int]],
                      gained: dict[str, frozenset[int]], handed: dict[str, list[Inbound]],
                      owns: Callable[[str], bool]) -> dict[str, BehaviorRow]:
    """Keep the behaviour state of the partitions kept, rebuild the gained ones from their
    records, and return the rebuilt rows of the products this worker owns now."""
    settings = runtime.settings
    users = runtime.users
    user_topic, pair_topic = settings.topic_user_events, settings.topic_pair_updates
    kept_users = target.get(user_topic, frozenset()) - gained.get(user_topic, frozenset())
    kept_items = target.get(pair_topic, frozenset()) - gained.get(pair_topic, frozenset())
    user_total = ownership.totals[user_topic]
    item_total = ownership.totals[pair_topic]
    users.keep_only(lambda u: partition_for(u, user_total) in kept_users,
                    lambda i: partition_for(i, item_total) in kept_items)
    items = users.replay(handed.get(user_topic, []), handed.get(pair_topic, []))
    if items or handed.get(user_topic):
        log.info("handover: behaviour rebuilt from %d user events and %d pair-update records (%d items)",
                 len(handed.get(user_topic, [])), len(handed.get(pair_topic, [])), len(items))
    return users.rows_of(i for i in items if owns(i))


# ---------------------------------------------------------------------- replica


@dataclass
class Replica:
    """Follow the state topics on every partition and apply the other workers' changes."""

    runtime: Runtime
    publish: Publish
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
        s = self.runtime.settings
        return (s.topic_products, s.topic_embeddings, s.topic_lexical)

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
        products = covered.setdefault(self.runtime.settings.topic_products, {})
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

        s = self.runtime.settings
        options: dict[str, Any] = {
            "bootstrap_servers": s.bootstrap_servers, "security_protocol": s.kafka_security_protocol,
            "client_id": f"{s.app_id}-replica", "group_id": None, "enable_auto_commit": False,
            "auto_offset_reset": "earliest", "fetch_max_bytes": 64 * 1024 * 1024,
            "max_partition_fetch_bytes": max(s.max_message_bytes * 6, 4 * 1024 * 1024),
        }
        if "SSL" in s.kafka_security_protocol:
            options["ssl_context"] = ssl_context(s)
        if s.kafka_security_protocol.startswith("SASL"):
            options.update(sasl_mechanism=s.kafka_sasl_mechanism, sasl_plain_username=s.kafka_sasl_username,
                           sasl_plain_password=(s.kafka_sasl_password.get_secret_value()
                                                if s.kafka_sasl_password else None))
        return AIOKafkaConsumer(**options)

    async def run(self) -> None:
        """Read both state topics from where the restore stopped, for the worker's life."""
        from aiokafka import TopicPartition

        s = self.runtime.settings
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
            if records or self._overdue():
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
            metrics = self.runtime.metrics
            for topic in (self.runtime.settings.topic_products, self.runtime.settings.topic_embeddings):
                metrics.replica_lag.labels(topic).set(
                    sum(v for (t, _), v in self.lag.items() if t == topic))
            metrics.replica_pending.set(len(self.pending))

    def _overdue(self) -> list[Product]:
        now = time.monotonic()
        return [p for p, seen, _, _ in self.pending.values() if now - seen > EMBED_PENDING_AFTER_S]

    async def apply(self, records: list[tuple[str, int, int, bytes | None, bytes | None]]) -> None:
        """Apply a batch of state records read from the topics (between batches of the stream)."""
        import json

        s = self.runtime.settings
        ownership = self.runtime.ownership
        actions: list[tuple[str, Any]] = []
        for topic, partition, offset, raw_key, raw_value in records:
            if raw_key is None:
                continue
            pid = raw_key.decode("utf-8", errors="replace")
            if topic == s.topic_lexical:
                # Every worker adopts each IDF record in log order, its own too, so all end on
                # the last one even when two fitted at once.
                try:
                    if raw_value is not None and pid == LEXICAL_KEY:
                        actions.append(("lexical", lexical_from_wire(json.loads(raw_value))))
                except (ValueError, SimstreamError) as exc:
                    log.error("replica: ignoring unreadable %s record: %s", topic, exc)
                continue
            if ownership is not None and ownership.replica_skips(pid):
                self.skipped_own += 1  # this worker wrote it, and applied it first
                continue
            try:
                value = None if raw_value is None else json.loads(raw_value)
                if topic == s.topic_embeddings:
                    actions.append(("embedding", (pid, None if value is None else embedding_from_wire(value))))
                elif value is None:
                    actions.append(("delete", pid))
                else:
                    actions.append(("upsert", (product_from_wire(value), partition, offset)))
            except Exception as exc:  # noqa: BLE001 - one unreadable record must not stop the replica
                log.error("replica: ignoring unreadable %s record for %s: %s", topic, pid, exc)
        async with self.runtime.batch_lock:
            pipeline = self.runtime.products
            overdue = self._overdue()
            if overdue:
                try:
                    vectors = await pipeline.embed([product_text(p) for p in overdue], wait=False)
                except EncoderUnavailable:
                    vectors = {}
                for product in overdue:
                    vector = vectors.get(product_text(product))
                    if vector is not None:
                        pipeline.embeddings[product.product_id] = StoredEmbedding(
                            product.product_id, vector, pipeline.model_version, product.content_hash)
                        actions.append(("retry", product.product_id))
            gone: set[str] = set()
            pubs = await pipeline._in_core(self._apply_in_core, pipeline, actions, gone)
            if pubs:
                await self.publish(pipeline.publications_to_records(last_per_key(pubs)))
            # Feeds held here that list another worker's product which just went away.
            feeds = self.runtime.users.feeds_without(gone) if gone else []
            if feeds:
                await self.publish(feeds)

    def _apply_in_core(self, pipeline: Any, actions: list[tuple[str, Any]], gone: set[str]) -> list[Publication]:
        """Apply the replicated changes; ``gone`` receives the products that went out of
        stock or were deleted."""
        core: Recommender = pipeline.core
        pubs: list[Publication] = []
        for action, payload in actions:
            try:
                if action == "lexical":
                    pubs += core.use_lexical(payload)
                elif action == "embedding":
                    pid, stored = payload
                    if stored is None:
                        continue  # its product's tombstone is the delete
                    if stored.model_version == pipeline.model_version:
                        pipeline.embeddings[pid] = stored
                    waiting = self.pending.get(pid)
                    if waiting is not None and waiting[0].content_hash == stored.content_hash:
                        product, _, partition, offset = self.pending.pop(pid)
                        pubs += self._upsert(pipeline, core, product, partition, offset, gone)
                elif action == "retry":
                    waiting = self.pending.pop(payload, None)
                    if waiting is not None:
                        pubs += self._upsert(pipeline, core, waiting[0], waiting[2], waiting[3], gone)
                elif action == "delete":
                    self.pending.pop(payload, None)
                    current = core.catalog.get(payload)
                    if current is not None:
                        gone.add(payload)
                        change = ProductDelete(payload, current.ts)
                        pubs += core.apply(change)
                        self._journal(pipeline, change)
                        self.applied += 1
                else:
                    product, partition, offset = payload
                    self.pending.pop(product.product_id, None)
                    pubs += self._upsert(pipeline, core, product, partition, offset, gone)
            except Exception as exc:  # noqa: BLE001
                log.error("replica: could not apply %s: %s", action, exc)
        return pubs

    def _upsert(self, pipeline: Any, core: Recommender, product: Product, partition: int,
                offset: int, gone: set[str]) -> list[Publication]:
        current = core.catalog.get(product.product_id)
        if current == product:
            return []  # already here (this worker's own change, or a replay)
        if current is not None and current.in_stock and not product.in_stock:
            gone.add(product.product_id)
        change: ProductUpsert = _as_upsert(product)
        if core.catalog.preview(change).outcome is Outcome.STALE:
            return []  # something newer is already applied; not counted as a stale event
        vector = None
        needed = core.needs_embedding(change)
        if needed is not None:
            vector = pipeline.cached_vector(needed)
            if vector is None:
                self.pending[product.product_id] = (product, time.monotonic(), partition, offset)
                return []
        pubs = core.apply(change, vector)
        self._journal(pipeline, change)
        self.applied += 1
        return pubs

    @staticmethod
    def _journal(pipeline: Any, change: Any) -> None:
        if pipeline.journal is not None:  # a model rollover catches up with it
            pipeline.journal.append(change)
