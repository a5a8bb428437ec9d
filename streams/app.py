"""The Faust app: topics, thin agents and web views. Built by ``create_app``; nothing connects at import.

Agents translate Faust events into ``Inbound`` records, call the pipeline, and publish the
``Outbound`` records it returns. They wait for delivery of what they publish before taking
the next event, so Faust only commits an input offset once its outputs are on the broker:
a crash replays events, it never loses them (the core is idempotent under replay, see
``serving/catalog.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import faust
from faust.web import Request, Response, View

from serving.catalog import Catalog
from streams.kafka_io import ssl_context
from streams.metrics import Metrics
from streams.pipeline import CatalogPipeline, Inbound, Outbound
from streams.records import product_from_wire, product_to_wire
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What one worker holds: settings, metrics, the pipeline and the readiness flag."""

    settings: Settings
    metrics: Metrics
    pipeline: CatalogPipeline
    ready: asyncio.Event
    started_at: float


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
    """Build the worker's Faust app from settings. Call ``.main()`` or use ``simstream worker``."""
    scheme = "kafka"
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"{scheme}://{server}" for server in settings.bootstrap_servers],
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
        broker_commit_interval=1.0,
        stream_wait_empty=True,
        loghandlers=[],
    )
    metrics = Metrics()
    runtime = Runtime(
        settings=settings,
        metrics=metrics,
        pipeline=CatalogPipeline(settings, metrics, Catalog()),
        ready=asyncio.Event(),
        started_at=time.time(),
    )
    app.simstream = runtime  # type: ignore[attr-defined]

    def raw_topic(name: str) -> Any:
        # Bytes in, bytes out: decoding is ours, so a bad payload becomes a dead letter
        # instead of a Faust decode error that would skip it.
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    product_changes = raw_topic(settings.topic_product_changes)
    user_events = raw_topic(settings.topic_user_events)
    outputs = {
        name: raw_topic(name)
        for name in (
            settings.topic_products,
            settings.topic_dead_letters,
            settings.topic_similar_items,
            settings.topic_substitutes,
            settings.topic_embeddings,
        )
    }

    async def publish(records: Iterable[Outbound]) -> None:
        pending = []
        for record in records:
            topic = outputs.get(record.topic) or raw_topic(record.topic)
            key, value = record.encoded()
            pending.append(await topic.send(key=key, value=value))
            metrics.published.labels(record.topic).inc()
        # Wait for the broker's acks before the input offset may be committed.
        if pending:
            await asyncio.gather(*pending)

    @app.task
    async def restore_catalog() -> None:
        """Rebuild the catalog from the compacted products topic before taking new events."""
        loop = asyncio.get_running_loop()
        count = await loop.run_in_executor(None, _restore_catalog, runtime)
        log.info("catalog restored: %d products from %s", count, settings.topic_products)
        runtime.ready.set()

    @app.agent(product_changes, name="product-changes")
    async def on_product_changes(stream: Any) -> None:
        await runtime.ready.wait()
        async for event in stream.events():
            await publish(runtime.pipeline.handle_product_message(_inbound(event)))

    @app.agent(user_events, name="user-events")
    async def on_user_events(stream: Any) -> None:
        await runtime.ready.wait()
        async for event in stream.events():
            await publish(runtime.pipeline.handle_user_message(_inbound(event)))

    _register_views(app, runtime)
    return app


def _restore_catalog(runtime: Runtime) -> int:
    from streams.kafka_io import latest_by_key, read_topic

    state = latest_by_key(read_topic(runtime.settings, runtime.settings.topic_products, timeout_s=120))
    catalog = runtime.pipeline.catalog
    for key, value in state.items():
        try:
            catalog.restore(product_from_wire(value))
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop a restart
            log.error("skipping unreadable %s record for key %s: %s", runtime.settings.topic_products, key, exc)
    runtime.metrics.catalog_size.set(len(catalog))
    return len(catalog)


def _register_views(app: faust.App, runtime: Runtime) -> None:
    @app.page("/health")
    class Health(View):
        """Readiness: 200 once the catalog is restored, 503 before."""

        async def get(self, request: Request) -> Response:
            ready = runtime.ready.is_set()
            body = {
                "status": "ok" if ready else "starting",
                "catalog_loaded": ready,
                "products": len(runtime.pipeline.catalog),
                "stale_events": runtime.pipeline.catalog.stale_events,
                "uptime_s": round(time.time() - runtime.started_at, 1),
            }
            return self.json(body, status=200 if ready else 503)

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(runtime.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/products/{product_id}")
    class ProductView(View):
        async def get(self, request: Request, product_id: str) -> Response:
            product = runtime.pipeline.catalog.get(product_id)
            if product is None:
                return self.json({"error": f"unknown product {product_id[:100]!r}"}, status=404)
            return self.json(product_to_wire(product))
