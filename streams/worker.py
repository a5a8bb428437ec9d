"""One simstream worker as a plain service: what the Faust agents, timers and rebalance
handlers of ``streams/app.py`` call, one method each. Nothing here imports Faust.

The worker owns the engine (``streams/engine.py``), the behaviour pipeline, this worker's
share of the products (``Ownership``), the replica of the other workers' changes, the model
rollover, and readiness. Records leave through ``sink`` (the app's Kafka producer): always
via ``publish``, which lets only this worker's lists through (``Ownership.gate``) and retries
a broker outage until every record is acknowledged.

Ordering: ``batch_lock`` is held while a batch of product changes (or a replica batch, a
behaviour flush step, a handover, a snapshot) is applied and published, so none of them
sees another half done; ``behavior_lock`` does the same for user events and pair updates.
A graceful stop takes both and keeps them (``drain``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.factory import create_encoder
from serving.config import RecommenderConfig
from serving.errors import EncoderUnavailable, SnapshotError
from serving.kinds import CONTENT_KINDS, LIST_KINDS
from serving.recommender import Recommender
from serving.snapshot import ChildSave
from streams.backoff import retry_forever
from streams.behavior_stream import FLUSH_CHUNK, BehaviorPipeline
from streams.engine import Engine, bulk_catch_up_due, needs_refit, release_free_heap
from streams.kafka_io import committed_offsets, end_offsets, input_offsets, partition_count
from streams.live import LiveFeed
from streams.metrics import Metrics
from streams.offers import OfferStream
from streams.outputs import Inbound, Outbound, Send
from streams.readiness import CatchUp, InputProgress, input_progress
from streams.replica import Replica
from streams.restore import StateReader
from streams.rollover import ModelRollover, RolloverBusy, blend_for
from streams.scaleout import Handovers, Ownership, owns_nothing, saved_ownership
from streams.settings import Settings

log = logging.getLogger(__name__)

GC_FREEZE_INTERVAL_S = 5.0
#: Product changes taken from the stream at once, in encoder batches: enough for the encoder
#: to embed one batch while the core applies the previous (``Engine.apply``).
TAKE_EMBED_BATCHES = 4


def recommender_config(settings: Settings) -> RecommenderConfig:
    """The core's configuration, taken from the settings."""
    return RecommenderConfig(
        k=settings.k,
        candidate_depth=max(settings.candidate_depth, settings.k),
        lexical_weight=settings.lexical_weight,
        lexical_floor=settings.lexical_floor,
        behavior_weight=settings.behavior_weight,
        collapse_duplicates=settings.collapse_duplicates,
        duplicate_threshold=settings.duplicate_threshold,
        duplicate_max_items=settings.duplicate_max_items,
        price_band=settings.price_band,
        hnsw_ef=settings.hnsw_ef,
        hnsw_m=settings.hnsw_m,
        exact_build_limit=settings.exact_build_limit,
        join_in_child=settings.join_in_child,
        index=settings.index,
    )


@dataclass(frozen=True)
class Health:
    """What ``/health`` answers: 200 only when ``ok``."""

    ok: bool
    body: dict[str, Any]


class Worker:
    """One worker: the engine, behaviour, ownership, replica, rollover and readiness."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, *, sink: Send | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        encoder = create_encoder(settings.encoder, **settings.encoder_options())
        core = Recommender(recommender_config(settings))
        self.engine = Engine(settings, self.metrics, recommender=core, encoder=encoder, send=self.publish)
        self.users = BehaviorPipeline(settings, self.metrics, core=lambda: self.engine.core)
        self.engine.on_gone = self.users.feeds_without
        #: List records wait until the worker has consumed the input it found at start.
        self.ownership = Ownership(settings, catching_up=True)
        self.catch_up = CatchUp(settings.topic_product_changes)
        self.progress: InputProgress | None = None
        self.progress_mark = (time.monotonic(), 0)
        #: Since when the settle waits for the shared IDF (``awaiting_shared_idf``).
        self.idf_wait_since: float | None = None
        self.idf_wait_expired = False
        #: ``core.lexical_adoptions`` when the current bulk catch-up began: any IDF adopted
        #: since is the one the settle waits for.
        self.bulk_lexical_adoptions: int | None = None
        self.state = StateReader(settings)
        self.replica: Replica | None = None
        self.sink = sink
        #: The page's live stream (GET /live): what the broker acknowledged, by the change behind it.
        self.live = LiveFeed({settings.list_topic(spec.kind): str(spec.kind) for spec in LIST_KINDS})
        self.ready = asyncio.Event()
        self.batch_lock = asyncio.Lock()
        self.behavior_lock = asyncio.Lock()
        #: Competitor offers: matched on the worker that holds ``competitor-offers``.
        self.offers = OfferStream(settings, self.metrics, engine=self.engine, publish=self.publish,
                                  lock=self.batch_lock, ready=self.ready)
        self.engine.on_changed = self.offers.on_products_changed
        self.rollover = ModelRollover(settings, self.metrics, self.engine, self.batch_lock, self.ready,
                                      self.publish, on_swap=self.mark_dirty)
        self.draining = False
        self.started_at = time.time()
        self.last_event_at: float | None = None
        self.last_product_event_at: float | None = None
        self.restored_from: str | None = None  # "snapshot" or "topics"
        #: Next offset per partition of the state topics this worker wrote, acknowledged:
        #: what a snapshot covers when there is no replica yet.
        self.written: dict[str, dict[int, int]] = {}
        self.last_snapshot_at = time.monotonic()
        self.dirty = False
        self.background: set[asyncio.Future[Any]] = set()
        self.snapshot_task: asyncio.Future[Path | None] | None = None
        #: One snapshot at a time (a timer's and an admin's would otherwise prune each other's).
        self.snapshot_lock = asyncio.Lock()
        #: Operations the admin endpoints run: name -> coroutine returning a JSON-able result.
        self.actions: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
            "snapshot": self.snapshot_now, "rebuild-index": self.rebuild_index, "learn": self.learn_now}
        self.learn_task: asyncio.Future[dict[str, Any] | None] | None = None
        self.last_learn_at = time.monotonic()
        #: The ``simstream-models`` record of the last learning run this worker started.
        self.last_learn: dict[str, Any] | None = None

    # ------------------------------------------------------------------ publishing

    def mark_dirty(self) -> None:
        """The core changed outside a batch (a swap): the next snapshot must be taken."""
        self.dirty = True

    def acked(self, record: Outbound, partition: int, offset: int) -> None:
        """The sink reports each acknowledged record: state records advance what a snapshot covers."""
        if record.topic in self.settings.state_topics:
            parts = self.written.setdefault(record.topic, {})
            parts[partition] = max(parts.get(partition, 0), offset + 1)
            self.dirty = True

    async def publish(self, records: Iterable[Outbound]) -> None:
        """Publish this worker's records, retrying a broker outage with backoff until acknowledged."""
        owned = self.ownership.gate(records)  # lists of owned products only; held in a rebalance
        if not owned or self.sink is None:
            return
        sink = self.sink
        # The broker is down or refusing: try again, the batch is never skipped.
        await retry_forever(lambda: sink(owned), f"publishing {len(owned)} records")
        self.live.observe(owned)

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Start the encoder, restore (snapshot + replay, or the topics), then open the gates."""
        if self.settings.log_level != "debug":
            # kafka-python logs every short-lived metadata client (partition counts, end
            # offsets, topic reads) at INFO: a dozen lines per rebalance that bury the worker's own.
            logging.getLogger("kafka").setLevel(logging.WARNING)
            # aiokafka, faust and mode are left at DEBUG under faust's worker: each send and
            # fetch built a log record that no handler printed (8% of the event loop's time in
            # a py-spy profile of a 100k bootstrap).
            for name in ("aiokafka", "faust", "mode"):
                if logging.getLogger(name).getEffectiveLevel() < logging.INFO:
                    logging.getLogger(name).setLevel(logging.INFO)
        settings, engine = self.settings, self.engine
        loop = asyncio.get_running_loop()
        # A worker owns nothing until the consumer group assigns it partitions (scaleout.py).
        await engine.in_core(engine.core.set_ownership, owns_nothing)
        # What "caught up" means for this start: the input there is now.
        offsets = await retry_forever(
            lambda: loop.run_in_executor(None, input_offsets, settings, settings.topic_product_changes),
            f"reading the input offsets of {settings.topic_product_changes}", Exception)
        self.catch_up.start(offsets.ends, offsets.positions)
        # Pins the encoder to the configured (or newest) version that passes verification.
        await retry_forever(self.rollover.start_live_encoder, "starting the encoder", EncoderUnavailable)
        engine.encoder_ok = True
        if (config := self.core_config()) != engine.core.config:  # the live version carries its own blend
            log.info("model %s carries its own blend: lexical weight %g, floor %g, behaviour weight %g",
                     engine.model_version, config.lexical_weight, config.lexical_floor, config.behavior_weight)
            engine.swap(Recommender(config))
            await engine.in_core(engine.core.set_ownership, owns_nothing)
        started = time.monotonic()
        snapshot = await engine.in_core(self.load_snapshot)
        if snapshot is not None:
            # The snapshot keeps maintaining the partitions it was saved under (their buffers
            # and lists are in it) while nothing is published: the first handover drops what
            # the group does not give back, builds what it gives anew, and republishes only
            # the lists that differ from their topics (a rebuild took minutes at 100k).
            total = await retry_forever(
                lambda: loop.run_in_executor(None, partition_count, settings, settings.topic_product_changes),
                f"reading the partition count of {settings.topic_product_changes}", Exception)
            await engine.in_core(snapshot.set_ownership, saved_ownership(snapshot, total))
            engine.swap(snapshot)
            self.written = {t: dict(p) for t, p in snapshot.offsets.items()}
            products, embeddings, lexical = await asyncio.gather(
                loop.run_in_executor(None, self.state.read, settings.topic_products,
                                     snapshot.offsets.get(settings.topic_products, {})),
                loop.run_in_executor(None, self.state.read, settings.topic_embeddings,
                                     snapshot.offsets.get(settings.topic_embeddings, {})),
                loop.run_in_executor(None, self.state.shared_lexical))
            outputs = await engine.restore(products, embeddings, None, from_snapshot=True, lexical=lexical)
            self.restored_from = "snapshot"
        else:
            outputs = await self.restore_from_topics(engine)
            self.restored_from = "topics"
        # The lists go nowhere yet (this worker owns no partition until the first handover,
        # which compares every list with its topic and publishes what differs).
        await self.publish(outputs.records())
        log.info("restored %d products from %s (%d embedded again, %d state records published, %d lists "
                 "recomputed for the first handover to compare) in %.1f s",
                 len(engine.core.catalog), self.restored_from, engine.embedded_texts,
                 len(outputs.state) + len(outputs.dead_letters), len(outputs.lists), time.monotonic() - started)
        # Everything restored is long-lived: keep it out of the collector's young generations,
        # whose scans over ~10^6 objects otherwise show up as 10+ ms pauses in apply().
        gc.collect()
        gc.freeze()
        self.ready.set()
        # Follow every worker's changes from where the restore stopped reading.
        self.replica = Replica(self.settings, self.metrics, engine, self.ownership, self.batch_lock,
                               start=self.state.reached)
        self.spawn(self.replica.run())
        handovers = Handovers(self.settings, self.metrics, engine, self.users, self.ownership, self.batch_lock,
                              self.publish, replica=lambda: self.replica)
        self.spawn(handovers.run())

    def core_config(self) -> RecommenderConfig:
        """The core's configuration under the live model version (its blend: ``blend_for``)."""
        return blend_for(self.settings, self.rollover.live).apply(recommender_config(self.settings))

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def restore_from_topics(self, engine: Engine) -> Any:
        """Load ``engine`` from the whole state and list topics; return what must be republished."""
        loop = asyncio.get_running_loop()
        s = self.settings
        products, embeddings, lexical, *published = await asyncio.gather(
            loop.run_in_executor(None, self.state.read, s.topic_products),
            loop.run_in_executor(None, self.state.read, s.topic_embeddings),
            loop.run_in_executor(None, self.state.shared_lexical),
            *(loop.run_in_executor(None, self.state.read, s.list_topic(kind)) for kind in CONTENT_KINDS))
        return await engine.restore(products, embeddings, dict(zip(CONTENT_KINDS, published, strict=True)),
                                    lexical=lexical)

    # ------------------------------------------------------------------ the agents

    async def on_product_changes(self, batch: list[Inbound]) -> None:
        """A batch of ``product-changes``: apply, publish, acknowledge, track the catch-up."""
        self.last_event_at = self.last_product_event_at = time.time()
        async with self.batch_lock:
            await self.settled_under(self.batch_lock)
            # Events taken before a rebalance that moved their partition away are the new
            # owner's to apply (it re-reads them from the committed offset); never acked here.
            batch = [m for m in batch if self.ownership.owns_partition(m.partition)]
            defer = self.far_behind()
            if defer and not self.engine.core.unsettled:
                self.bulk_lexical_adoptions = self.engine.core.lexical_adoptions
            self.engine.defer_propagation = defer
            outputs = await self.engine.handle(batch)
            # Acknowledged inside the lock: a graceful stop that takes the lock next finds
            # every finished batch acknowledged, so its offsets are committed at the stop.
            await acknowledge(outputs.done)
            for message in batch:
                self.catch_up.consumed(message.partition, message.offset)
            if not self.far_behind():
                await self.settle_bulk()
            await self.end_catch_up_if_reached()

    def far_behind(self) -> bool:
        """Whether the ``product-changes`` backlog calls for a bulk catch-up
        (``SIMSTREAM_BULK_CATCH_UP_MIN``).

        One starts when the backlog's text changes (estimated from the recent share of
        them, ``Engine.text_share``) are at least that many and at least a quarter of the
        catalog: rebuilding every list once then costs less than updating them change by
        change (``bulk_catch_up_due``). A backlog of stock and price changes never starts
        one. Once started it goes on until the backlog is down to a batch, since the
        rebuild is due anyway and every change until then is cheaper deferred.
        """
        least = self.settings.bulk_catch_up_min
        if least <= 0 or self.progress is None:
            return False
        # The lag at the last progress report, less what was consumed since.
        behind = self.progress.lag - (self.catch_up.taken - self.progress_mark[1])
        if self.engine.core.unsettled:
            return behind > self.settings.embed_batch_size or self.awaiting_shared_idf()
        return bulk_catch_up_due(behind, len(self.engine.core.catalog), least, self.engine.text_share)

    def awaiting_shared_idf(self) -> bool:
        """Whether this worker's settle waits for the IDF another worker is about to share.

        The owner of ``product-changes`` partition 0 refits the shared IDF just before its own
        settle (``settle_bulk``); the others read it from ``simstream-lexical`` through their
        replica. A worker that settled first, with the stale IDF, would rebuild every list
        again when it arrives (``Recommender.use_lexical``), and its duplicates join is
        several times slower without IDF weights. So, while the IDF is stale and another
        worker refits it, the settle waits, up to ``SIMSTREAM_IDF_WAIT_S`` from the moment
        this worker's backlog was gone, or until any IDF is adopted after the bulk catch-up
        began; changes keep arriving deferred meanwhile.
        """
        core = self.engine.core
        # Whether the IDF that arrived is fitted on the whole catalog does not matter: the
        # refitter fits on what it holds at the end of its own catch-up (its partitions and
        # the replica so far, about 1/N of a group's catalog), so waiting for ``needs_refit``
        # to clear would wait out the whole ``idf_wait_s``.
        arrived = self.bulk_lexical_adoptions is not None and core.lexical_adoptions != self.bulk_lexical_adoptions
        waiting = (self.settings.idf_wait_s > 0 and self.settings.lexical_refit_quiet_s > 0 and core.unsettled
                   and 0 not in self.ownership.allowed and not arrived
                   and needs_refit(core.lexical, len(core.catalog)))
        if not waiting:
            self.idf_wait_since, self.idf_wait_expired = None, False
            return False
        now = time.monotonic()
        if self.idf_wait_since is None:
            self.idf_wait_since = now
            log.info("bulk catch-up: waiting up to %.0f s for the shared IDF before settling", self.settings.idf_wait_s)
        if now - self.idf_wait_since <= self.settings.idf_wait_s:
            return True
        if not self.idf_wait_expired:
            self.idf_wait_expired = True
            log.warning("bulk catch-up: no shared IDF after %.0f s (is the owner of product-changes partition 0 "
                        "running?); settling with the one at hand", self.settings.idf_wait_s)
        return False

    async def settle_bulk(self) -> None:
        """With the batch lock held: end a bulk catch-up. When the shared IDF is due for a
        refit (``needs_refit``) and this worker is the one that refits it, the refit comes
        first: the settle then rebuilds every list once, with the new IDF, instead of a
        refit rebuilding them all again at the next quiet moment."""
        engine = self.engine
        if not engine.core.unsettled:
            return
        if self.refit_due():
            outputs = await engine.refit_lexical()
            await self.publish(outputs.records())
            log.info("lexical IDF refitted on %d products at the end of a bulk catch-up",
                     len(engine.core.catalog))
        await engine.settle()

    async def settle_tick(self) -> None:
        """Timer: settles a bulk catch-up once the backlog is gone, when no batch comes to do it."""
        if self.engine.core.unsettled and not self.batch_lock.locked() and not self.far_behind():
            async with self.batch_lock:
                await self.settle_bulk()

    async def settled_under(self, lock: asyncio.Lock) -> None:
        """With ``lock`` held: until no handover is pending (released while waiting)."""
        while not self.ownership.settled.is_set():  # a rebalance: let its handover run first
            lock.release()
            try:
                await self.ownership.settled.wait()
            finally:
                await lock.acquire()

    async def on_user_events(self, batch: list[Inbound]) -> None:
        """A batch of ``user-events``: pair updates, feeds; acknowledged once published."""
        self.last_event_at = time.time()
        async with self.behavior_lock:
            await self.ownership.settled.wait()  # a rebalance: the handover rebuilds behaviour state first
            # A partition that moved away in a rebalance: its new owner reads these.
            batch = [m for m in batch if self.ownership.holds(self.settings.topic_user_events, m.partition)]
            await self.publish(self.users.handle_batch(batch))
            await acknowledge(batch)

    async def on_pair_updates(self, batch: list[Inbound]) -> None:
        """A batch of ``simstream-pair-updates``: applied (dirty items), then acknowledged."""
        async with self.behavior_lock:
            await self.ownership.settled.wait()
            batch = [m for m in batch if self.ownership.holds(self.settings.topic_pair_updates, m.partition)]
            rejected = self.users.apply_pairs(batch)
            if rejected:
                await self.publish(rejected)
            await acknowledge(batch)
        self.metrics.behavior_dirty.set(len(self.users.dirty))

    # ------------------------------------------------------------------ readiness

    async def end_catch_up_if_reached(self) -> None:
        """With the batch lock held: once the input seen at start is consumed, publish the
        lists held back meanwhile; ``/health`` says ready from then on."""
        if self.catch_up.done or not self.ready.is_set() or not self.ownership.settled.is_set():
            return
        if not self.catch_up.reached(self.ownership.allowed):
            return
        held = self.ownership.caught_up()
        self.catch_up.done = True
        await self.publish(held)
        log.info("caught up with the input seen at start (%d held lists published, %.1f s after start)",
                 len(held), time.time() - self.started_at)

    async def catch_up_tick(self) -> None:
        """Timer: ends the catch-up when nothing (more) was left to consume after the handover."""
        if not self.catch_up.done and self.ready.is_set() and not self.batch_lock.locked():
            async with self.batch_lock:
                await self.end_catch_up_if_reached()

    def health(self) -> Health:
        """Readiness: restored, caught up with the input seen at start, the encoder answering."""
        ready = self.ready.is_set()
        engine = self.engine
        stats = engine.core.stats()
        caught_up = self.catch_up.done
        ok = ready and caught_up and engine.encoder_ok and not engine.pending
        status = ("ok" if ok else "starting" if not ready else "catching_up" if not caught_up else "degraded")
        body = {
            "status": status,
            "catalog_loaded": ready,
            **self.catch_up.health(self.ownership.allowed),
            "encoder_reachable": engine.encoder_ok,
            "pending_text_changes": len(engine.pending),
            "model_version": engine.model_version if engine.encoder_ok and engine.encoder else None,
            "products": stats.products,
            "index_live": stats.index_live,
            "index_deleted": stats.index_deleted,
            "stale_events": stats.stale_events,
            "restored_from": self.restored_from,
            "uptime_s": round(time.time() - self.started_at, 1),
            **self.status_parts(),
        }
        return Health(ok, body)

    def status_parts(self) -> dict[str, Any]:
        """The rollover, scale-out and replica parts of ``/health`` and ``/stats``."""
        return {**self.rollover.health(), **self.ownership.health(),
                **(self.replica.health() if self.replica is not None else {}),
                "input": None if self.progress is None else self.progress.as_json(),
                "bulk_catch_up": self.engine.core.unsettled,
                "learn": None if self.last_learn is None else {
                    k: self.last_learn.get(k) for k in ("decision", "reason", "version", "at")}
                | {"running": self.learn_task is not None and not self.learn_task.done()}}

    async def report_progress(self) -> None:
        """Timer: how far behind ``product-changes`` this worker is, at what pace, and when it
        will have caught up: in ``/stats`` (``input``), and a log line while it is behind by more
        than a batch (a bootstrap, a burst)."""
        if not self.ready.is_set():
            return
        topic = self.settings.topic_product_changes
        loop = asyncio.get_running_loop()
        ends = (await loop.run_in_executor(None, end_offsets, self.settings, [topic])).get(topic, {})
        owned = self.ownership.allowed
        if any(ends.get(p, 0) > self.catch_up.positions.get(p, 0) for p in owned):
            # A partition gained in a rebalance goes on from the group's committed offset.
            committed = await loop.run_in_executor(None, committed_offsets, self.settings)
            self.catch_up.gained(committed.get(topic, {}))
        now, taken = time.monotonic(), self.catch_up.taken
        last_at, last_taken = self.progress_mark
        self.progress_mark = (now, taken)
        self.progress = input_progress(ends, self.catch_up.positions, owned, taken - last_taken, now - last_at)
        if self.progress.lag > self.settings.embed_batch_size:
            log.info("input %s", self.progress.line(topic))

    # ------------------------------------------------------------------ timers

    async def retry_deferred(self) -> None:
        """Retry text changes deferred by an encoder outage, even when no new event arrives."""
        if self.engine.pending and not self.batch_lock.locked():
            async with self.batch_lock:
                outputs = await self.engine.retry_pending()
                await acknowledge(outputs.done)

    async def flush_behavior(self) -> None:
        """Publish the lists of items whose behaviour changed, at most once per debounce interval."""
        users = self.users
        if not users.dirty or not self.ready.is_set():
            return
        now = time.monotonic()
        # In small steps, each under the batch lock: one flush of a few hundred hot items is
        # a few hundred ms of core time, and in one piece it stalled every feed behind it (the
        # core thread holds the GIL). Bounded by what is dirty now, so the flush always ends.
        left = len(users.dirty)
        while left > 0:
            async with self.batch_lock:
                rows = users.due(now, limit=min(left, FLUSH_CHUNK))
                if not rows:
                    break
                left -= len(rows)
                engine = self.engine
                try:
                    pubs = await engine.in_core(users.publish_rows, rows)
                except Exception as exc:  # the timer must keep running for the other items
                    log.error("behaviour rows of %d items could not be applied (dropped until their next "
                              "update): %s", len(rows), exc, exc_info=True)
                    continue
                await self.publish(engine.lists_to_records(pubs))
        self.metrics.behavior_dirty.set(len(users.dirty))

    async def freeze_survivors(self) -> None:
        """Move long-lived objects out of the collector's reach.

        The core holds about 45 Python objects per product; with 20k products a full
        collection takes ~0.4 s, and list churn triggers one every few tens of seconds,
        which showed as the p99 of freshness. Frozen objects are still freed by reference
        counting; only cycles among them wait for the next snapshot's full collection.
        """
        if self.ready.is_set():
            gc.freeze()

    def refit_due(self) -> bool:
        """Whether this worker should refit the shared IDF now (quiet or not): stream refits
        are on (``SIMSTREAM_LEXICAL_REFIT_QUIET_S`` > 0), it owns ``product-changes``
        partition 0, it is not stopping, and the IDF is stale (``needs_refit``)."""
        return (self.settings.lexical_refit_quiet_s > 0 and 0 in self.ownership.allowed and not self.draining
                and needs_refit(self.engine.core.lexical, len(self.engine.core.catalog)))

    async def refit_lexical_when_quiet(self) -> None:
        """Timer: refit the shared IDF once the catalog has more than doubled since its fit and
        the product stream has been quiet for ``lexical_refit_quiet_s``.

        One worker does it: the owner of ``product-changes`` partition 0. Its record goes to
        ``simstream-lexical``, which every worker's replica adopts in log order. A refit moves
        every list, so it waits for a quiet stream (after a bootstrap, say) rather than
        happening at a restart, where it would republish lists that no input changed.
        """
        quiet = self.settings.lexical_refit_quiet_s
        if not self.catch_up.done or time.time() - (self.last_product_event_at or self.started_at) < quiet:
            return
        engine = self.engine
        if not self.refit_due() or self.batch_lock.locked():
            return
        async with self.batch_lock:
            started = time.monotonic()
            outputs = await engine.refit_lexical()
            await self.publish(outputs.records())
        log.info("lexical IDF refitted on %d products after %.0f s without product changes (%d lists "
                 "republished) in %.1f s", len(engine.core.catalog), quiet, len(outputs.lists),
                 time.monotonic() - started)

    async def learn_tick(self) -> None:
        """Timer: the learning loop every ``learn_interval_s``, on the owner of product-changes partition 0.

        It runs as ``simstream learn`` in a process of its own: training must not take the
        worker's event loop, its core thread or its TensorFlow thread pools. A promoted
        version reaches this worker (and every other) through the model poll's rollover.
        """
        interval = self.settings.learn_interval_s
        if interval <= 0 or not self.ready.is_set() or self.draining or 0 not in self.ownership.allowed:
            return
        if self.learn_task is not None and not self.learn_task.done():
            return
        if time.monotonic() - self.last_learn_at < interval:
            return
        self.last_learn_at = time.monotonic()
        self.learn_task = asyncio.ensure_future(self.run_learn_process())

    async def learn_now(self) -> dict[str, Any]:
        """The admin action: start a learning run now (in the background; its outcome goes to the
        log, ``/metrics``, ``/health`` and ``simstream-models``)."""
        if self.learn_task is not None and not self.learn_task.done():
            return {"learn": "already running"}
        self.last_learn_at = time.monotonic()
        self.learn_task = asyncio.ensure_future(self.run_learn_process())
        return {"learn": "started"}

    async def run_learn_process(self) -> dict[str, Any] | None:
        """``simstream learn`` in a child process; its last stdout line is the run's record."""
        log_path = self.settings.data_dir / "learn.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("learning loop: starting `simstream learn` (its log: %s)", log_path)
        with log_path.open("ab") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streams.cli", "learn", "--freeze-layers", str(self.settings.learn_freeze_layers),
                stdout=asyncio.subprocess.PIPE, stderr=err)
            out, _ = await process.communicate()
        lines = out.decode("utf-8", errors="replace").strip().splitlines()
        try:
            record = json.loads(lines[-1]) if lines else None
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self.metrics.learn_runs.labels("failed").inc()
            log.error("learning loop: `simstream learn` exited with %s and no record; see %s", process.returncode,
                      log_path)
            return None
        self.note_learn(record)
        return record

    def note_learn(self, record: dict[str, Any]) -> None:
        """A learning run's record: one log line, the metrics, ``/health``."""
        self.last_learn = record
        decision = str(record.get("decision"))
        self.metrics.learn_runs.labels(decision).inc()
        for source, count in ((record.get("pairs") or {}).get("by_source") or {}).items():
            self.metrics.learn_pairs.labels(source).set(count)
        heldout = record.get("heldout") or {}
        for model, scores in (("live", (heldout.get("live") or {}).get("hybrid")),
                              ("candidate", (heldout.get("candidate") or {}).get("hybrid")),
                              ("tfidf_char", heldout.get("tfidf-char"))):
            if isinstance(scores, dict) and "hit@1" in scores:
                self.metrics.learn_heldout_hit1.labels(model).set(scores["hit@1"])
        level = logging.ERROR if decision == "failed" else logging.INFO
        log.log(level, "learning loop: %s%s: %s", decision,
                f" version {record['version']}" if record.get("version") else "", record.get("reason"))

    async def follow_model_version(self) -> None:
        """Roll over when a newer model version is on offer (SIMSTREAM_MODEL_VERSION unset)."""
        await self.rollover.poll()

    # ------------------------------------------------------------------ snapshots

    @property
    def snapshot_root(self) -> Path:
        """One snapshot directory per model version: vectors of two models never mix."""
        version = re.sub(r"[^A-Za-z0-9._-]", "-", self.engine.model_version)
        return self.settings.data_dir / "snapshots" / version

    def load_snapshot(self) -> Recommender | None:
        root = self.snapshot_root
        if not (root / "CURRENT").exists():
            return None
        try:
            return Recommender.load(root, self.core_config())
        except SnapshotError as exc:
            log.error("not using the snapshot, rebuilding from the topics instead: %s", exc)
            return None

    def covered_offsets(self) -> Mapping[str, Mapping[int, int]]:
        """The state-topic offsets the core covers now: with a replica, what it read (every
        worker's records), else what this worker wrote."""
        return self.replica.covered() if self.replica is not None else self.written

    def take_snapshot(self) -> Path | None:
        """Save the core with the offsets it covers (on the core's thread, between batches)."""
        covered = self.covered_offsets()
        started = time.monotonic()
        try:
            path = self.engine.save_snapshot(self.snapshot_root, covered)
        except Exception as exc:  # noqa: BLE001 - a failed snapshot must not stop the stream
            log.error("snapshot failed, the previous one is kept: %s", exc)
            return None
        finally:
            # A snapshot builds a few hundred MB of temporary arrays at 20k products; glibc kept
            # the freed pages, and the soak saw RSS step up after each snapshot.
            release_free_heap()
        self.dirty = False
        log.info("snapshot %s written in %.2f s", path, time.monotonic() - started)
        return path

    def fork_snapshot(self) -> ChildSave | None:
        """Start a snapshot of the core as it is now in a forked child (on the core's thread,
        between batches); ``None`` when the fork failed (logged; the stream goes on)."""
        covered = self.covered_offsets()
        try:
            child = self.engine.fork_snapshot(self.snapshot_root, covered)
        except OSError as exc:
            log.error("snapshot failed, the previous one is kept: could not fork (%s)", exc)
            return None
        self.dirty = False
        return child

    async def snapshot_between_batches(self) -> Path | None:
        """A snapshot between two batches: written by a forked child while the stream goes on
        (``SIMSTREAM_SNAPSHOT_FORK``), or on the core's thread."""
        async with self.snapshot_lock:
            if not (self.settings.snapshot_fork and hasattr(os, "fork")):
                async with self.batch_lock:
                    await self.settle_bulk()
                    held = time.monotonic()
                    try:
                        return await self.engine.in_core(self.take_snapshot)
                    finally:
                        self.metrics.snapshot_pause.observe(time.monotonic() - held)
            started = time.monotonic()
            async with self.batch_lock:
                await self.settle_bulk()
                # The pause is what the stream waits for: from the batch lock taken (the batch
                # in flight has ended) to the fork returned, not the wait for that batch.
                held = time.monotonic()
                child = await self.engine.in_core(self.fork_snapshot)
                paused = time.monotonic() - held
            self.metrics.snapshot_pause.observe(paused)
            if child is None:
                return None
            try:
                path = await asyncio.get_running_loop().run_in_executor(None, child.wait)
            except SnapshotError as exc:
                self.dirty = True
                log.error("snapshot failed, the previous one is kept: %s", exc)
                return None
            log.info("snapshot %s written in %.2f s by a child process (the stream paused %.3f s for the fork)",
                     path, time.monotonic() - started, paused)
            return path

    async def snapshot_now(self) -> dict[str, Any]:
        """The admin action: a snapshot now."""
        path = await self.snapshot_between_batches()
        if path is None:
            raise SnapshotError("the snapshot could not be written; see the worker log")
        return {"snapshot": str(path)}

    async def snapshot_tick(self) -> None:
        """Timer: a snapshot on the configured interval, between batches, when something changed."""
        interval = self.settings.snapshot_interval_s
        if interval <= 0 or not self.ready.is_set() or not self.dirty or self.draining:
            return
        if self.engine.core.unsettled:  # a bulk catch-up: its buffers are stale until it settles
            return
        if time.monotonic() - self.last_snapshot_at < interval:
            return
        if self.snapshot_task is not None and not self.snapshot_task.done():
            return
        self.last_snapshot_at = time.monotonic()
        # In a task of its own: the timer must not wait for a batch to finish.
        self.snapshot_task = asyncio.ensure_future(self.snapshot_between_batches())

    async def rebuild_index(self) -> dict[str, Any]:
        """Rebuild the core from the compacted topics beside the live one, then swap atomically.

        Ingestion pauses for the rebuild (the batch lock); the read API keeps answering from
        the old core until the swap, and lists that differ afterwards are republished.
        """
        if self.rollover.running:
            raise RolloverBusy("a model rollover is running; rebuild the index once it is done (see /health)")
        started = time.monotonic()
        async with self.batch_lock:
            live = self.engine
            fresh = Engine(self.settings, self.metrics,
                           recommender=Recommender(self.core_config(), owns=live.core.owns),
                           encoder=live.encoder, executor=live.executor, encoder_ok=live.encoder_ok)
            outputs = await self.restore_from_topics(fresh)
            await self.publish(outputs.records())
            live.swap(fresh.core, embeddings=fresh.embeddings)
            self.dirty = True
        return {"products": len(live.core.catalog), "republished": len(outputs.records()),
                "embedded": fresh.embedded_texts, "seconds": round(time.monotonic() - started, 2)}

    # ------------------------------------------------------------------ rebalances and stop

    def on_revoked(self) -> None:
        """Partitions are being revoked (called with the batch lock held)."""
        self.ownership.on_revoked()

    def on_assigned(self, assigned: Mapping[str, Iterable[int]]) -> None:
        """The group assigned ``assigned`` (topic -> partitions); the next handover applies it."""
        s = self.settings

        def of(topic: str) -> frozenset[int]:
            return frozenset(assigned.get(topic, ()))

        self.ownership.on_assigned(of(s.topic_product_changes),
                                   {topic: of(topic) for topic in (s.topic_user_events, s.topic_pair_updates)})
        self.offers.on_assigned(of(s.topic_competitor_offers))

    async def drain(self, timeout_s: float) -> bool:
        """Let the batches in flight finish (publish, acknowledgements, input acks) and start no
        new one: the locks are taken and kept. ``False`` when ``timeout_s`` ran out first."""
        self.draining = True
        started = time.monotonic()

        async def take_locks() -> None:
            await self.batch_lock.acquire()
            await self.behavior_lock.acquire()

        try:
            await asyncio.wait_for(take_locks(), timeout_s)
        except TimeoutError:
            log.warning("stopping with a batch still in flight after %.1f s: its input is not committed, "
                        "so the next start consumes it again", timeout_s)
            return False
        log.info("drained: the batches in flight were published and acknowledged in %.2f s",
                 time.monotonic() - started)
        return True


async def acknowledge(messages: Iterable[Inbound]) -> None:
    """Acknowledge consumed records whose outputs are on the broker."""
    for message in messages:
        if message.ack is not None:
            await message.ack()

