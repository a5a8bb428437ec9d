"""The Faust app: topics, agents and timers, each one call into the worker service.

Built by ``create_app``; nothing connects at import. Every decision is in ``streams/worker.py``
and ``streams/engine.py`` (Faust-free, unit-tested): an agent here turns Faust events into
``Inbound`` records and hands the batch over. Events are taken with ``noack_take`` and
acknowledged by the worker only after the broker has acknowledged what they produced, so
Faust only commits an input offset once its outputs are on the broker: a crash replays
events, it never loses them (the core is idempotent under replay, see ``serving/catalog.py``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from streams.kafka_io import ssl_context
from streams.outputs import Inbound
from streams.settings import Settings
from streams.sink import KafkaSink
from streams.worker import GC_FREEZE_INTERVAL_S, TAKE_EMBED_BATCHES, Worker


def credentials(settings: Settings) -> Any:
    """Faust's broker credentials for the configured security protocol (``None`` for plaintext)."""
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


def inbound(event: Any, stream: Any) -> Inbound:
    """A Faust event as an ``Inbound`` record that knows how to acknowledge itself."""
    message = event.message
    return Inbound(message.topic, message.partition, message.offset, message.key, message.value,
                   timestamp=message.timestamp, ack=functools.partial(stream.ack, event))


def raw_topic(app: faust.App, name: str) -> Any:
    # Bytes in, bytes out: decoding is ours, so a bad payload becomes a dead letter instead of
    # a Faust decode error that would skip it.
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


async def consume(ready: asyncio.Event, handle: Callable[[list[Inbound]], Awaitable[None]], size: int,
                  within: float, stream: Any) -> None:
    """An agent body (bound with ``functools.partial``): batches of events to ``handle``."""
    await ready.wait()
    async for events in stream.noack_take(size, within=within):
        await handle([inbound(event, stream) for event in events])


async def on_partitions_revoked(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    """Revocation: the batch in flight finishes and publishes first; list records are held."""
    worker: Worker = app.simstream
    revoked = args[0] if args else kwargs.get("revoked", set())
    if revoked:
        async with worker.batch_lock:
            worker.on_revoked()


async def on_partitions_assigned(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    """Assignment: the worker's next handover applies it."""
    worker: Worker = app.simstream
    assigned = args[0] if args else kwargs.get("assigned", set())
    by_topic: dict[str, set[int]] = {}
    for tp in assigned:
        by_topic.setdefault(tp.topic, set()).add(tp.partition)
    worker.on_assigned(by_topic)


def create_app(settings: Settings) -> faust.App:
    """Build the worker's Faust app from settings. Run it with ``simstream worker``."""
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        broker_credentials=credentials(settings),
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
    worker = Worker(settings)
    sink = KafkaSink(settings, worker.metrics, worker.acked)
    worker.sink = sink
    app.on_before_shutdown.connect(sink.stop)
    app.simstream = worker  # type: ignore[attr-defined]

    app.on_partitions_revoked.connect(on_partitions_revoked)
    app.on_partitions_assigned.connect(on_partitions_assigned)
    app.task(worker.start)

    def agent(topic: str, name: str, handle: Callable[[list[Inbound]], Awaitable[None]], size: int,
              within: float) -> None:
        app.agent(raw_topic(app, topic), name=name)(functools.partial(consume, worker.ready, handle, size, within))

    agent(settings.topic_product_changes, "product-changes", worker.on_product_changes,
          TAKE_EMBED_BATCHES * settings.embed_batch_size, settings.embed_batch_within_s)
    # In batches: one wait for the broker's acks per batch, not per event (a per-event round
    # trip capped the stream near 100 events/s).
    agent(settings.topic_user_events, "user-events", worker.on_user_events, 256, 0.005)
    agent(settings.topic_pair_updates, "pair-updates", worker.on_pair_updates, 500, 0.05)
    agent(settings.topic_competitor_offers, "competitor-offers", worker.offers.on_batch, 256, 0.05)

    app.timer(interval=GC_FREEZE_INTERVAL_S)(worker.freeze_survivors)
    app.timer(interval=1.0)(worker.snapshot_tick)
    app.timer(interval=1.0)(worker.retry_deferred)
    app.timer(interval=0.2)(worker.catch_up_tick)
    app.timer(interval=1.0)(worker.settle_tick)
    app.timer(interval=max(0.05, settings.behavior_debounce_ms / 2000.0))(worker.flush_behavior)
    app.timer(interval=1.0)(worker.follow_model_version)
    app.timer(interval=1.0)(worker.refit_lexical_when_quiet)
    app.timer(interval=5.0)(worker.learn_tick)
    app.timer(interval=1.0)(worker.offers.tick)
    app.timer(interval=settings.progress_interval_s)(worker.report_progress)

    from streams.web import register_views

    register_views(app, worker)
    return app


class GracefulWorker(faust.Worker):
    """Faust's worker, but SIGTERM and SIGINT first drain the batches in flight.

    Faust alone cancels the agents wherever they are: a batch applied but not yet published
    was lost to the state topics (its input was not committed, so it came back, but only
    after the restarted worker had published lists from the partial catalog). Here the
    batch finishes, its records are acknowledged and its input acknowledged; the consumer
    commits those offsets as it stops. A second signal stops at once.
    """

    def __init__(self, app: faust.App, *args: Any, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        self.simstream: Worker = app.simstream  # type: ignore[attr-defined]
        self.drain_requested = False
        self.drain_task: asyncio.Future[None] | None = None

    def _on_sigterm(self) -> None:
        self.drain_then(super()._on_sigterm)

    def _on_sigint(self) -> None:
        self.drain_then(super()._on_sigint)

    def drain_then(self, stop: Callable[[], None]) -> None:
        if self.drain_requested:
            stop()
            return
        self.drain_requested = True
        worker = self.simstream

        async def drain_and_stop() -> None:
            try:
                await worker.drain(worker.settings.shutdown_drain_s)
            finally:
                stop()

        self.drain_task = asyncio.ensure_future(drain_and_stop())
