"""The Faust app: topics and thin agents. Built by ``create_app``; nothing connects at import.

Agents translate Faust events into ``Inbound`` records, call the pipeline, and publish the
``Outbound`` records it returns. They wait for the broker's acknowledgement of what they
publish before taking the next batch, so Faust only commits an input offset once its
outputs are on the broker: a crash replays events, it never loses them (the core is
idempotent under replay, see ``serving/catalog.py``).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust

from encoders.factory import create_encoder
from serving.config import RecommenderConfig
from serving.errors import ConfigurationError, EncoderUnavailable, SimstreamError, SnapshotError
from serving.lexical import LexicalModel
from serving.recommender import Kind, Recommender
from streams.behavior_stream import FLUSH_CHUNK, BehaviorPipeline
from streams.kafka_io import last_values, latest_by_key, read_topic, ssl_context
from streams.metrics import Metrics
from streams.pipeline import Inbound, Lanes, Outbound, ProductPipeline
from streams.rollover import ModelRollover, RolloverBusy, register_rollover_views
from streams.scaleout import Ownership, Replica, owns_nothing, partition_count, run_handovers
from streams.settings import Settings
from streams.wire import LEXICAL_KEY, lexical_from_wire

log = logging.getLogger(__name__)

GC_FREEZE_INTERVAL_S = 5.0
GC_FULL_INTERVAL_S = 900.0


@dataclass
class Runtime:
    """What one worker holds: settings, metrics, the pipelines and the readiness flags."""

    settings: Settings
    metrics: Metrics
    products: ProductPipeline
    users: BehaviorPipeline
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = field(default_factory=time.time)
    last_event_at: float | None = None
    restored_from: str | None = None  # "snapshot" or "topics"
    #: Next offset per partition of the state topics this worker wrote, acknowledged:
    #: what a snapshot covers.
    written: dict[str, dict[int, int]] = field(default_factory=dict)
    last_snapshot_at: float = field(default_factory=time.monotonic)
    dirty: bool = False
    #: Held while a batch is applied and published, so a snapshot never sees a half-done batch.
    batch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Operations the admin endpoints run: name -> coroutine returning a JSON-able result.
    actions: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = field(default_factory=dict)
    #: The live model version and its rollovers (``streams/rollover.py``).
    rollover: ModelRollover | None = None
    #: Scale-out (``streams/scaleout.py``): this worker's share of the products, and the
    #: follower of the state topics that replicates the other workers' changes.
    ownership: Ownership | None = None
    replica: Replica | None = None

    @property
    def encoder_ok(self) -> bool:
        return self.products.encoder_ok

    @property
    def snapshot_root(self) -> Path:
        """One snapshot directory per model version: vectors of two models never mix."""
        assert self.products.encoder is not None
        version = re.sub(r"[^A-Za-z0-9._-]", "-", self.products.encoder.model_version)
        return self.settings.data_dir / "snapshots" / version

    def take_snapshot(self) -> Path | None:
        """Save the core with the offsets it covers (run on the core's executor, between batches)."""
        core = self.products.core
        # With a replica, what is applied here is what it read (every worker's records).
        covered = self.replica.covered() if self.replica is not None else self.written
        core.offsets = {topic: dict(parts) for topic, parts in covered.items()}
        started = time.monotonic()
        try:
            path = core.save(self.snapshot_root)
        except Exception as exc:  # noqa: BLE001 - a failed snapshot must not stop the stream
            log.error("snapshot failed, the previous one is kept: %s", exc)
            return None
        finally:
            trim_heap()
        self.dirty = False
        log.info("snapshot %s written in %.2f s", path, time.monotonic() - started)
        return path


def trim_heap() -> None:
    """Give the heap pages freed by a snapshot back to the OS (glibc ``malloc_trim``).

    A snapshot builds a few hundred MB of temporary arrays at 20k products; glibc keeps the
    freed pages in its arenas, so without this the soak saw RSS step up after each snapshot
    (+52, +22, +17 MB) although nothing lived on. A no-op where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def recommender_config(settings: Settings) -> RecommenderConfig:
    """The core's configuration, taken from the settings."""
    return RecommenderConfig(
        k=settings.k,
        candidate_depth=max(settings.candidate_depth, settings.k),
        lexical_weight=settings.lexical_weight,
        behavior_weight=settings.behavior_weight,
        price_band=settings.price_band,
        hnsw_ef=settings.hnsw_ef,
        hnsw_m=settings.hnsw_m,
    )


def build_runtime(settings: Settings) -> Runtime:
    """Wire settings, metrics, encoder and core together (no I/O happens here)."""
    metrics = Metrics()
    encoder = create_encoder(settings.encoder, **settings.encoder_options())
    products = ProductPipeline(settings, metrics, recommender=Recommender(recommender_config(settings)),
                               encoder=encoder)
    holder: list[Runtime] = []
    # The behaviour side reads whichever core is live (rebuild-index swaps it).
    users = BehaviorPipeline(settings, metrics, products=lambda: holder[0].products)
    runtime = Runtime(settings=settings, metrics=metrics, products=products, users=users)
    holder.append(runtime)
    runtime.rollover = ModelRollover(runtime)
    return runtime


def _credentials(settings: Settings) -> Any:
    protocol = settings.kafka_security_protocol
    context = ssl_context(settings)
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
            ssl_context=context,
            mechanism=settings.kafka_sasl_mechanism,
        )
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return None


def _inbound(event: Any) -> Inbound:
    message = event.message
    return Inbound(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        timestamp=message.timestamp,
    )


def create_app(settings: Settings) -> faust.App:
    """Build the worker's Faust app from settings. Run it with ``simstream worker``."""
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        broker_credentials=_credentials(settings),
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_request_size=max(settings.max_message_bytes * 6, 1_048_576),
        consumer_max_fetch_size=max(settings.max_message_bytes * 6, 4_194_304),
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        broker_commit_every=100,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_commit_interval=1.0,
        # Deferred (unacknowledged) events must not block a rebalance or a commit; they are
        # simply not committed, so another owner re-reads them.
        stream_wait_empty=False,
        loghandlers=[],
    )
    runtime = build_runtime(settings)
    # A worker owns nothing until the consumer group assigns it partitions (streams/scaleout.py).
    runtime.products.core.set_ownership(owns_nothing)
    app.simstream = runtime  # type: ignore[attr-defined]
    metrics = runtime.metrics

    def raw_topic(name: str) -> Any:
        # Bytes in, bytes out: decoding is ours, so a bad payload becomes a dead letter
        # instead of a Faust decode error that would skip it.
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    product_changes = raw_topic(settings.topic_product_changes)
    user_events = raw_topic(settings.topic_user_events)
    pair_updates = raw_topic(settings.topic_pair_updates)
    outputs: dict[str, Any] = {}

    state_topics = {settings.topic_products, settings.topic_embeddings, settings.topic_lexical}
    ownership = runtime.ownership = Ownership(settings)
    #: Where the start-up restore stopped reading the state topics: the replica goes on from there.
    replica_start: dict[str, dict[int, int]] = {}
    background: set[asyncio.Future[None]] = set()

    @app.on_partitions_revoked.connect
    async def on_revoked(_app: Any, /, *args: Any, signal: Any, **_: Any) -> None:
        revoked: set[Any] = args[0] if args else _.get("revoked", set())
        if revoked:
            async with runtime.batch_lock:  # the batch in flight finishes and publishes first
                ownership.on_revoked()

    @app.on_partitions_assigned.connect
    async def on_assigned(_app: Any, /, *args: Any, signal: Any, **_: Any) -> None:
        assigned: set[Any] = args[0] if args else _.get("assigned", set())

        def of(topic: str) -> frozenset[int]:
            return frozenset(tp.partition for tp in assigned if tp.topic == topic)

        ownership.on_assigned(of(settings.topic_product_changes),
                              {topic: of(topic) for topic in (settings.topic_user_events, settings.topic_pair_updates)})

    async def publish(records: Iterable[Outbound]) -> None:
        pending = []
        assert runtime.ownership is not None
        for record in runtime.ownership.gate(records):  # lists of owned products only
            topic = outputs.get(record.topic)
            if topic is None:
                topic = outputs[record.topic] = raw_topic(record.topic)
            key, value = record.encoded()
            pending.append((record, await topic.send(key=key, value=value)))
            metrics.published.labels(record.topic).inc()
        # Wait for the broker's acks before the input offset may be committed.
        acks = await asyncio.gather(*(future for _, future in pending))
        now = time.time()
        for (record, _), meta in zip(pending, acks, strict=True):
            if record.event_ts is not None:
                metrics.freshness.labels(record.topic).observe(max(0.0, now - record.event_ts))
            if record.topic in state_topics:
                parts = runtime.written.setdefault(record.topic, {})
                parts[meta.partition] = max(parts.get(meta.partition, 0), meta.offset + 1)
                runtime.dirty = True

    def read_state(topic: str, offsets: dict[int, int] | None = None) -> dict[str, Any]:
        reached = replica_start.setdefault(topic, {}) if topic in state_topics else None
        records = read_topic(settings, topic, from_offsets=offsets, timeout_s=300, reached=reached)
        return last_values(records) if offsets is not None else latest_by_key(records)

    def shared_lexical() -> LexicalModel | None:
        """The IDF on ``simstream-lexical`` (blocking), or ``None`` when no worker has fitted one."""
        try:
            partition_count(settings, settings.topic_lexical, timeout_s=30.0)
        except TimeoutError as exc:
            raise ConfigurationError(
                f"topic {settings.topic_lexical} does not exist: run `simstream topics create` "
                "(it holds the lexical IDF every worker shares)") from exc
        value = read_state(settings.topic_lexical).get(LEXICAL_KEY)
        if value is None:
            return None
        try:
            return lexical_from_wire(value)
        except SimstreamError as exc:
            log.error("ignoring the %s record (it will be fitted anew): %s", settings.topic_lexical, exc)
            return None

    async def rebuild_from_topics(pipeline: ProductPipeline) -> list[Outbound]:
        """Load ``pipeline`` from the whole state and list topics; return what must be republished."""
        loop = asyncio.get_running_loop()
        products, embeddings, similar, substitutes = await asyncio.gather(*(
            loop.run_in_executor(None, read_state, topic)
            for topic in (settings.topic_products, settings.topic_embeddings,
                          settings.topic_similar_items, settings.topic_substitutes)
        ))
        lexical = await loop.run_in_executor(None, shared_lexical)
        return await pipeline.restore(products, embeddings, {Kind.SIMILAR: similar, Kind.SUBSTITUTES: substitutes},
                                      lexical=lexical)

    async def snapshot_now() -> dict[str, Any]:
        async with runtime.batch_lock:
            path = await asyncio.get_running_loop().run_in_executor(runtime.products.executor, runtime.take_snapshot)
        if path is None:
            raise SnapshotError("the snapshot could not be written; see the worker log")
        return {"snapshot": str(path)}

    async def rebuild_index() -> dict[str, Any]:
        """Rebuild the core from the compacted topics beside the live one, then swap atomically.

        Ingestion pauses for the rebuild (the batch lock); the read API keeps answering from
        the old core until the swap, and lists that differ afterwards are republished.
        """
        if runtime.rollover is not None and runtime.rollover.running:
            raise RolloverBusy("a model rollover is running; rebuild the index once it is done (see /health)")
        started = time.monotonic()
        async with runtime.batch_lock:
            old = runtime.products
            fresh = ProductPipeline(settings, metrics,
                                    recommender=Recommender(recommender_config(settings), owns=old.core.owns),
                                    encoder=old.encoder, executor=old.executor)
            fresh.encoder_ok = old.encoder_ok
            # Changes deferred by an encoder outage were never applied nor published: keep them.
            fresh.pending = old.pending
            records = await rebuild_from_topics(fresh)
            await publish(records)
            runtime.products = fresh
            runtime.dirty = True
        return {"products": len(fresh.core.catalog), "republished": len(records),
                "embedded": fresh.embedded_texts, "seconds": round(time.monotonic() - started, 2)}

    runtime.actions.update({"snapshot": snapshot_now, "rebuild-index": rebuild_index})

    def load_snapshot() -> Recommender | None:
        root = runtime.snapshot_root
        if not (root / "CURRENT").exists():
            return None
        try:
            return Recommender.load(root, recommender_config(settings))
        except SnapshotError as exc:
            log.error("not using the snapshot, rebuilding from the topics instead: %s", exc)
            return None

    @app.task
    async def restore() -> None:
        """Start the encoder, rebuild state (snapshot + replay, or the topics), then open the gates."""
        if settings.log_level != "debug":
            # kafka-python logs every short-lived metadata client (partition counts, end
            # offsets, topic reads) at INFO: a dozen lines per rebalance that bury the worker's own.
            logging.getLogger("kafka").setLevel(logging.WARNING)
        pipeline = runtime.products
        assert pipeline.encoder is not None and runtime.rollover is not None
        delay = 0.5
        while True:
            try:
                # Pins the encoder to the configured (or newest) version that passes verification.
                await runtime.rollover.start_live_encoder()
                break
            except EncoderUnavailable as exc:
                log.error("encoder unavailable at start-up, retrying in %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        pipeline.encoder_ok = True
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        snapshot = await loop.run_in_executor(pipeline.executor, load_snapshot)

        if snapshot is not None:
            # Lists are built once the group assigns partitions; the snapshot's owner may differ.
            await loop.run_in_executor(pipeline.executor, snapshot.set_ownership, owns_nothing)
            pipeline.recommender = snapshot
            runtime.written = {t: dict(p) for t, p in snapshot.offsets.items()}
            products, embeddings = await asyncio.gather(*(
                loop.run_in_executor(None, read_state, topic, snapshot.offsets.get(topic, {}))
                for topic in (settings.topic_products, settings.topic_embeddings)))
            lexical = await loop.run_in_executor(None, shared_lexical)
            records = await pipeline.restore(products, embeddings, None, from_snapshot=True, lexical=lexical)
            runtime.restored_from = "snapshot"
        else:
            records = await rebuild_from_topics(pipeline)
            runtime.restored_from = "topics"
        await publish(records)
        log.info("restored %d products from %s (%d embedded again, %d records republished) in %.1f s",
                 len(pipeline.core.catalog), runtime.restored_from, pipeline.embedded_texts, len(records),
                 time.monotonic() - started)
        # Everything restored is long-lived: keep it out of the collector's young generations,
        # whose scans over ~10^6 objects otherwise show up as 10+ ms pauses in apply().
        gc.collect()
        gc.freeze()
        runtime.ready.set()
        # Follow every worker's changes from where the restore stopped reading.
        replica = runtime.replica = Replica(runtime, publish_until_acked, start=replica_start)
        background.add(asyncio.ensure_future(replica.run()))
        background.add(asyncio.ensure_future(run_handovers(runtime, ownership, publish_until_acked)))

    async def periodic_snapshot() -> None:
        async with runtime.batch_lock:
            await asyncio.get_running_loop().run_in_executor(runtime.products.executor, runtime.take_snapshot)

    @app.timer(interval=GC_FREEZE_INTERVAL_S)
    async def freeze_survivors() -> None:
        """Move long-lived objects out of the collector's reach.

        The core holds about 45 Python objects per product; with 20k products a full
        collection takes ~0.4 s, and list churn triggers one every few tens of seconds,
        which showed as the p99 of freshness. Frozen objects are still freed by reference
        counting; only cycles among them wait for the next snapshot's full collection.
        """
        if runtime.ready.is_set():
            gc.freeze()

    snapshots: set[asyncio.Task[None]] = set()

    @app.timer(interval=1.0)
    async def snapshot_timer() -> None:
        """Snapshot on the configured interval, between batches, when something changed."""
        interval = settings.snapshot_interval_s
        if interval <= 0 or not runtime.ready.is_set() or not runtime.dirty or snapshots:
            return
        if time.monotonic() - runtime.last_snapshot_at < interval:
            return
        runtime.last_snapshot_at = time.monotonic()
        # In a task of its own: the timer must not wait for a batch to finish.
        task = asyncio.ensure_future(periodic_snapshot())
        snapshots.add(task)
        task.add_done_callback(snapshots.discard)

    #: Events of slow-lane changes deferred during an encoder outage, by (topic, partition,
    #: offset); acknowledged once their changes are applied and published.
    waiting: dict[tuple[str, int, int], tuple[Any, Any]] = {}

    def position(message: Inbound) -> tuple[str, int, int]:
        return (message.topic, message.partition, message.offset)

    async def run_slow_lane(lanes: Lanes) -> None:
        """Apply (or defer) the slow lane, publish, and acknowledge what is done."""
        result = await runtime.products.apply_slow(lanes)
        await publish_products(result.records)
        for message in result.done:
            stream_and_event = waiting.pop(position(message), None)
            if stream_and_event is not None:
                stream, event = stream_and_event
                await stream.ack(event)

    async def settled_under(lock: asyncio.Lock) -> None:
        """With ``lock`` held: until no handover is pending (released while waiting)."""
        while not ownership.settled.is_set():  # a rebalance: let its handover run first
            lock.release()
            try:
                await ownership.settled.wait()
            finally:
                await lock.acquire()

    @app.agent(product_changes, name="product-changes")
    async def on_product_changes(stream: Any) -> None:
        await runtime.ready.wait()
        # noack_take: an event is acknowledged (its offset may be committed) only after the
        # records it produced are on the broker. With take_events, Faust would ack a batch
        # even when its processing was cancelled halfway, on shutdown.
        async for events in stream.noack_take(settings.embed_batch_size, within=settings.embed_batch_within_s):
            runtime.last_event_at = time.time()
            async with runtime.batch_lock:
                await settled_under(runtime.batch_lock)
                # Events taken before a rebalance that moved their partition away are the new
                # owner's to apply (it re-reads them from the committed offset); never acked here.
                events = [e for e in events if ownership.owns_partition(e.message.partition)]
                by_position = {(e.message.topic, e.message.partition, e.message.offset): e for e in events}
                pipeline = runtime.products
                lanes = pipeline.split([_inbound(e) for e in events])
                await publish_products(await pipeline.apply_fast(lanes))
                slow = {position(message) for message, _ in lanes.slow}
                for key in slow:
                    waiting[key] = (stream, by_position[key])
                await run_slow_lane(lanes)
            for key, event in by_position.items():
                if key not in slow:
                    await stream.ack(event)

    async def publish_products(records: list[Outbound]) -> None:
        """Publish a product batch's records, then the feeds that listed what went out of stock."""
        await publish_until_acked(records)
        feeds = runtime.users.feeds_after_products(records)
        if feeds:
            await publish_until_acked(feeds)

    @app.timer(interval=1.0)
    async def retry_deferred() -> None:
        """Retry text changes deferred by an encoder outage, even when no new event arrives."""
        if runtime.products.pending and not runtime.batch_lock.locked():
            async with runtime.batch_lock:
                await run_slow_lane(Lanes())

    async def publish_until_acked(records: list[Outbound]) -> None:
        """Publish, retrying a broker outage with backoff: the batch is never skipped."""
        delay = 0.5
        while True:
            try:
                await publish(records)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker is down or refusing; try again
                log.error("publishing %d records failed, retrying in %.1f s: %s", len(records), delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    @app.agent(user_events, name="user-events")
    async def on_user_events(stream: Any) -> None:
        await runtime.ready.wait()
        # In batches: one wait for the broker's acks per batch, not per event (a per-event
        # round trip capped the stream near 100 events/s). Acked after their outputs are.
        async for events in stream.noack_take(256, within=0.005):
            runtime.last_event_at = time.time()
            await ownership.settled.wait()  # a rebalance: the handover rebuilds behaviour state first
            # A partition that moved away in a rebalance: its new owner reads these.
            events = [e for e in events if ownership.holds(settings.topic_user_events, e.message.partition)]
            await publish_until_acked(runtime.users.handle_batch([_inbound(e) for e in events]))
            for event in events:
                await stream.ack(event)

    @app.agent(pair_updates, name="pair-updates")
    async def on_pair_updates(stream: Any) -> None:
        await runtime.ready.wait()
        # Acknowledged after they are applied, so a crash replays pair updates, never skips them.
        async for events in stream.noack_take(500, within=0.05):
            await ownership.settled.wait()
            events = [e for e in events if ownership.holds(settings.topic_pair_updates, e.message.partition)]
            rejected = runtime.users.apply_pairs([_inbound(e) for e in events])
            if rejected:
                await publish_until_acked(rejected)
            for event in events:
                await stream.ack(event)
            metrics.behavior_dirty.set(len(runtime.users.dirty))

    @app.timer(interval=max(0.05, settings.behavior_debounce_ms / 2000.0))
    async def flush_behavior() -> None:
        """Publish the lists of items whose behaviour changed, at most once per debounce interval."""
        users = runtime.users
        if not users.dirty or not runtime.ready.is_set():
            return
        now = time.monotonic()
        # In small steps, each under the batch lock: one flush of a few hundred hot items is
        # a few hundred ms of core time, and in one piece it stalled every feed behind it (the
        # core thread holds the GIL). Bounded by what is dirty now, so the flush always ends.
        left = len(users.dirty)
        while left > 0:
            async with runtime.batch_lock:
                rows = users.due(now, limit=min(left, FLUSH_CHUNK))
                if not rows:
                    break
                left -= len(rows)
                pipeline = runtime.products
                try:
                    pubs = await pipeline._in_core(users.publish_rows, rows)
                except Exception as exc:  # the timer must keep running for the other items
                    log.error("behaviour rows of %d items could not be applied (dropped until their next "
                              "update): %s", len(rows), exc, exc_info=True)
                    continue
                await publish_until_acked(pipeline.publications_to_records(pubs))
        metrics.behavior_dirty.set(len(users.dirty))

    @app.timer(interval=1.0)
    async def follow_model_version() -> None:
        """Roll over when a newer model version is on offer (SIMSTREAM_MODEL_VERSION unset)."""
        assert runtime.rollover is not None
        await runtime.rollover.poll()

    assert runtime.rollover is not None
    runtime.rollover.publish = publish_until_acked

    from streams.web import register_views

    register_views(app, runtime)
    register_rollover_views(app, runtime)
    return app
