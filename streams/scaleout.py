"""Scale-out: several ``simstream worker`` processes share one app id (one consumer group).

* **Ownership** is Kafka's: a worker owns the products whose key falls, under Kafka's
  default partitioner (murmur2, the one aiokafka and kafka-python producers use), into a
  ``product-changes`` partition assigned to it. It embeds and applies those products'
  changes, and it alone publishes their lists.
* **Replica**: every worker follows ``simstream-products`` and ``simstream-embeddings`` on
  all partitions, outside the group (``Replica`` in ``streams/replica.py``), and applies the other workers' changes
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka.partitioner.default import murmur2

from serving.recommender import CONTENT_KINDS, BehaviorRow, Kind, Publication, Recommender
from streams.backoff import Backoff
from streams.behavior_stream import BehaviorPipeline
from streams.engine import Engine
from streams.kafka_io import (
    client_options,
    committed_offsets,
    end_offsets,
    partition_count,
    read_latest,
)
from streams.metrics import Metrics
from streams.outputs import Inbound, Outbound, Send
from streams.settings import Settings
from streams.wire import same_items

log = logging.getLogger(__name__)




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


def saved_ownership(core: Recommender, total: int) -> PartitionOwnership:
    """The partitions a restored core maintained when it was saved: those of the products it
    holds buffers for (every product of an owned partition has one)."""
    return PartitionOwnership(frozenset(partition_for(pid, total) for pid in core.maintained()), total)


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
    #: From the start until the worker has consumed its input up to the end offsets it saw
    #: then (``streams/readiness.py``): list records are held back, one per key, so no list
    #: built from a partly restored catalog is ever published.
    catching_up: bool = False

    @property
    def list_topics(self) -> tuple[str, ...]:
        return tuple(self.settings.list_topic(kind) for kind in Kind)

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
            if self.holding or self.catching_up:
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
        """Held records of partitions kept across the rebalance, in the order they were held.

        While catching up they stay held (those of ``keep`` only) until ``caught_up``.
        """
        kept = {key: r for key, r in self.held.items() if partition_for(r.key, self.total) in keep}
        if self.catching_up:
            self.held = kept
            return []
        self.held.clear()
        return list(kept.values())

    def caught_up(self) -> list[Outbound]:
        """End the start-up hold: the held list records of owned partitions, to publish now."""
        self.catching_up = False
        if self.holding:
            return []  # a rebalance is under way: its handover releases them
        return self.release(self.allowed)

    def health(self) -> dict[str, Any]:
        return {"owned_partitions": sorted(self.allowed), "product_partitions": self.total,
                "rebalances": self.rebalances, "handover_pending": not self.settled.is_set(),
                "last_handover": self.last_handover}


def read_lists(settings: Settings, partitions: frozenset[int], total: int) -> dict[Kind, dict[str, Any]]:
    """Last list per key on the given partitions of every list topic (blocking)."""
    out: dict[Kind, dict[str, Any]] = {}
    for kind in Kind:
        topic = settings.list_topic(kind)
        # List topics are keyed by product id like product-changes; with the same partition
        # count a product's lists sit on its own partition number, otherwise read them all.
        same = partition_count(settings, topic) == total
        values = read_latest(settings, topic, partitions=partitions if same else None, timeout_s=300)
        out[kind] = {k: v for k, v in values.items() if isinstance(v, dict)
                     and partition_for(k, total) in partitions}
    return out


def hand_over(core: Recommender, owns: Callable[[str], bool], gained_lists: dict[Kind, dict[str, Any]],
              model_version: str, behavior: dict[str, BehaviorRow] | None = None,
              gained: Callable[[str], bool] | None = None) -> list[Publication]:
    """Move the core to ``owns`` and say what to publish for the lists it gained (core thread);
    ``behavior`` holds the rebuilt behaviour rows of gained products.

    ``gained``: the products whose lists this worker starts publishing (those of its gained
    partitions). Those the core already maintains, a snapshot restored under the partitions
    it is given back, keep their buffers and lists instead of being rebuilt: at 100k products
    the rebuild took minutes at every restart. Each of their lists that differs from its topic
    (changes replayed since the snapshot, a crash before a publish) is republished.
    """
    for kind, values in gained_lists.items():
        for pid, value in values.items():
            version = value.get("version")
            if isinstance(version, int):
                core.seed_version(kind, pid, version)
    reclaimed = [p for p in core.maintained() if owns(p) and gained(p)] if gained is not None else []
    out: list[Publication] = []
    for pub in core.set_ownership(owns, behavior, reclaim=gained):
        if pub.kind is not Kind.COMPLEMENTS and pub.items is not None:
            on_topic = gained_lists.get(pub.kind, {}).get(pub.product_id)
            if on_topic is not None and same_items(on_topic, pub.items) \
                    and on_topic.get("model_version") == model_version:
                continue  # the previous owner already published exactly this
        out.append(pub)
    published = {pub.key for pub in out}
    for kind in Kind:
        on_kind = gained_lists.get(kind, {})
        for pid in reclaimed:
            items = core.list_of(kind, pid)
            if items is None or (kind, pid) in published:
                continue  # no list: a tombstone below if the topic holds one
            on_topic = on_kind.get(pid)
            if on_topic is not None and same_items(on_topic, items) and on_topic.get("model_version") == model_version:
                continue
            if on_topic is None and not items and kind is Kind.COMPLEMENTS:
                continue  # an empty complements list is published only once one was
            out.append(core.republish(kind, pid))
    for kind in CONTENT_KINDS:
        held = core.lists(kind)
        for pid in gained_lists.get(kind, {}).keys() - held.keys():
            if owns(pid):  # its product is gone: the list's last word is a tombstone
                out.append(core.republish(kind, pid))
    return out


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

    tps = [TopicPartition(topic, p) for topic, parts in gained.items() for p in sorted(parts)]
    out: dict[str, list[Inbound]] = {topic: [] for topic in gained}
    if not tps:
        return out
    committed = committed_offsets(settings)
    stops = {tp: committed[tp.topic][tp.partition] for tp in tps
             if committed.get(tp.topic, {}).get(tp.partition, 0) > 0}
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


class Reaches(Protocol):
    """What a handover needs of the replica: the state topics it follows, and a way to wait
    until it has applied everything up to given offsets."""

    @property
    def topics(self) -> tuple[str, ...]: ...

    async def reach(self, ends: dict[str, dict[int, int]]) -> None: ...


@dataclass
class Handovers:
    """Applies each new assignment to the core, between batches (runs for the worker's life).

    A gained product's last state was written by its previous owner before that owner let
    the partition go, so before taking over, the replica reads up to the end offsets the
    state topics have now; only then does the core build the gained lists and the stream
    apply their changes.
    """

    settings: Settings
    metrics: Metrics
    engine: Engine
    users: BehaviorPipeline
    ownership: Ownership
    batch_lock: asyncio.Lock
    publish: Send
    replica: Callable[[], Reaches | None]

    async def run(self) -> None:
        backoff = Backoff()
        ownership = self.ownership
        while True:
            await ownership.changed.wait()
            ownership.changed.clear()
            try:
                await self.hand_over_once()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker is away: the stream waits for the handover, never skips
                log.error("handover failed, retrying in %.1f s: %s", backoff.delay, exc, exc_info=True)
                await backoff.sleep()
                ownership.changed.set()

    async def hand_over_once(self) -> None:
        settings, ownership = self.settings, self.ownership
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
        replica = self.replica()
        if replica is not None:
            ends = await loop.run_in_executor(None, end_offsets, settings, replica.topics)
            await replica.reach(ends)
        behavior_target = ownership.behavior_target
        gained_behavior = {topic: parts - ownership.behavior_held.get(topic, frozenset())
                           for topic, parts in behavior_target.items()}
        handed = await loop.run_in_executor(None, read_handed_over, settings, gained_behavior)
        async with self.batch_lock:
            # The target is cleared only once the handover is done, so a failure is retried.
            target = ownership.target
            if target is None:
                return
            before = ownership.allowed
            gained = target - before
            lists = (await loop.run_in_executor(None, read_lists, settings, gained, ownership.total)
                     if gained else {})
            engine = self.engine
            owns = PartitionOwnership(target, ownership.total)
            # Text changes deferred by an encoder outage on partitions now lost: the new owner
            # re-reads them (they were never acknowledged) and applies them itself.
            engine.pending = [item for item in engine.pending if owns(item.change.product_id)]
            rows = self.rebuild_behavior(behavior_target, gained_behavior, handed, owns)
            anew = PartitionOwnership(gained, ownership.total)
            core = engine.core
            kept = await engine.in_core(lambda: sum(1 for p in core.maintained() if owns(p) and anew(p)))
            pubs = await engine.in_core(hand_over, core, owns, lists, engine.model_version, rows, anew)
            ownership.behavior_held = behavior_target
            ownership.allowed = target
            ownership.skip = target
            release = ownership.release(target & before)
            ownership.holding = False
            records = release + engine.lists_to_records(pubs)
            await self.publish(records)
            if ownership.target is target:  # no newer assignment arrived meanwhile
                ownership.target = None
                ownership.settled.set()
        ownership.last_handover = {
            "gained": sorted(gained), "lost": sorted(before - target), "published": len(records),
            "kept_from_snapshot": kept,
            "released": len(release), "seconds": round(time.monotonic() - started, 3)}
        self.metrics.owned_partitions.set(len(target))
        log.info("handover: own partitions %s of %d (gained %s, lost %s, %d products kept from the snapshot), "
                 "%d records published in %.2f s", sorted(target), ownership.total, sorted(gained),
                 sorted(before - target), kept, len(records), time.monotonic() - started)

    def rebuild_behavior(self, target: dict[str, frozenset[int]], gained: dict[str, frozenset[int]],
                         handed: dict[str, list[Inbound]], owns: Callable[[str], bool]) -> dict[str, BehaviorRow]:
        """Keep the behaviour state of the partitions kept, rebuild the gained ones from their
        records, and return the rebuilt rows of the products this worker owns now."""
        settings, ownership, users = self.settings, self.ownership, self.users
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
