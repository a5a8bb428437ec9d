"""The edge between Kafka messages and the core: decode, embed, apply, say what to publish.

Nothing here touches Kafka. ``Inbound`` is one consumed record, ``Outbound`` one record to
produce; the Faust agents in ``streams/app.py`` only translate to and from these and send.
That keeps every decision testable list-in, list-out, with the deterministic encoder and
the exact index standing in for the real ones.

Failure rule: one bad event becomes one dead letter and one log line (with topic, partition
and offset), and processing goes on with the next event.

Threading rule: the recommender is not thread-safe, so every call that mutates it runs on
one single-thread executor, in event order. The event loop stays free for Kafka, the web
server and the encoder's own I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encoders.base import Encoder
from serving.catalog import Product, ProductChange, ProductDelete, ProductUpsert
from serving.errors import EncoderUnavailable, SimstreamError
from serving.lexical import LexicalModel
from serving.recommender import Kind, Publication, Recommender, last_per_key
from serving.text import product_text
from streams.metrics import Metrics
from streams.records import (
    DecodeError,
    ProductChangeRecord,
    UserEventRecord,
    dead_letter,
    decode_product_change,
    decode_user_event,
    iso,
    product_from_wire,
    product_to_wire,
)
from streams.settings import Settings
from streams.wire import (
    LEXICAL_KEY,
    StoredEmbedding,
    embedding_from_wire,
    embedding_to_wire,
    lexical_to_wire,
    publication_to_wire,
    same_items,
)

log = logging.getLogger(__name__)

MAX_OUTAGE_BACKOFF_S = 10.0


@dataclass(frozen=True, slots=True)
class Inbound:
    """One consumed Kafka record, as the pipeline sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None = None  # the record's Kafka timestamp, unix seconds

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class Outbound:
    """One record to produce. ``value=None`` is a tombstone.

    ``event_ts`` is set on a changed product's own lists, so the publisher can measure
    freshness (event time to acknowledged publication).
    """

    topic: str
    key: str
    value: dict[str, Any] | None
    event_ts: float | None = None

    def encoded(self) -> tuple[bytes, bytes | None]:
        value = None if self.value is None else json.dumps(self.value, ensure_ascii=False).encode("utf-8")
        return self.key.encode("utf-8"), value


@dataclass
class Edge:
    """Decoding and dead-lettering, shared by every input topic."""

    settings: Settings
    metrics: Metrics
    clock: Callable[[], float] = time.time

    def decode_product(self, message: Inbound) -> ProductChangeRecord:
        """Decode one ``product-changes`` record; raises ``DecodeError`` with the reason."""
        if message.value is None:
            raise DecodeError("null value; a delete is {\"op\": \"delete\", \"product_id\": ...}")
        record = decode_product_change(
            message.value, kafka_ts=message.timestamp, max_bytes=self.settings.max_message_bytes, now=self.clock()
        )
        if message.key is not None and message.key.decode("utf-8", errors="replace") != record.product_id:
            raise DecodeError(
                f"record key {message.key[:60]!r} differs from product_id {record.product_id!r}; "
                "key product changes by product_id so each product stays on one partition"
            )
        return record

    def decode_user(self, message: Inbound) -> UserEventRecord:
        if message.value is None:
            raise DecodeError("null value on user-events")
        return decode_user_event(
            message.value, kafka_ts=message.timestamp, max_bytes=self.settings.max_message_bytes, now=self.clock()
        )

    def reject(self, message: Inbound, exc: BaseException) -> Outbound:
        """Turn a failure into a dead letter and one log line that says where it happened."""
        reason = str(exc) if isinstance(exc, SimstreamError) else f"internal error ({type(exc).__name__}): {exc}"
        if message.topic == self.settings.topic_user_events:
            # A reason may quote the event, and user ids must never reach a log line: the
            # reason is on the dead-letter topic only.
            log.warning("dead-lettered %s (%s); the reason is on %s", message.where, type(exc).__name__,
                        self.settings.topic_dead_letters)
        elif isinstance(exc, SimstreamError):
            log.warning("dead-lettered %s: %s", message.where, reason)
        else:
            log.error("dead-lettered %s after an unexpected error", message.where, exc_info=exc)
        self.metrics.events.labels(message.topic, "dead_letter").inc()
        self.metrics.dead_letters.labels(message.topic).inc()
        value = dead_letter(
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            payload=message.value,
            error=reason,
            at=self.clock(),
        )
        key = f"{message.topic}:{message.partition}:{message.offset}"
        return Outbound(self.settings.topic_dead_letters, key, value)


@dataclass
class Lanes:
    """One decoded batch: dead letters, and the changes by lane (see ``ProductPipeline.split``)."""

    rejected: list[Outbound] = field(default_factory=list)
    fast: list[tuple[Inbound, ProductChange]] = field(default_factory=list)
    slow: list[tuple[Inbound, ProductChange]] = field(default_factory=list)


@dataclass(frozen=True)
class SlowResult:
    """What the slow lane produced, and which input records are now fully handled."""

    records: list[Outbound]
    done: list[Inbound]


@dataclass
class ProductPipeline(Edge):
    """``product-changes`` to embeddings, catalog state and republished lists.

    Per batch: decode every record, embed the texts that changed in one encoder call
    (sorted and bucketed by the encoder), then apply the changes one by one in order and
    collect, for each, its embedding record, its merged product record and every list the
    core says to republish.
    """

    recommender: Recommender | None = None
    encoder: Encoder | None = None
    #: product_id -> the embedding it was last indexed with; lets a restart or a redelivery
    #: reuse a vector instead of re-embedding unchanged text.
    embeddings: dict[str, StoredEmbedding] = field(default_factory=dict)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="simstream-core")
    )
    embedded_texts: int = 0
    encoder_ok: bool = False
    #: Slow-lane changes deferred while the encoder is unreachable, in arrival order.
    pending: list[tuple[Inbound, ProductChange]] = field(default_factory=list)
    max_pending: int = 10_000
    #: While a model rollover runs (``streams.rollover``): every change applied to this core,
    #: in order, so the new core can catch up with them. ``None`` otherwise.
    journal: list[ProductChange] | None = None

    @property
    def core(self) -> Recommender:
        assert self.recommender is not None, "ProductPipeline needs a recommender"
        return self.recommender

    @property
    def model_version(self) -> str:
        assert self.encoder is not None, "ProductPipeline needs an encoder"
        return self.encoder.model_version

    async def _in_core(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def embed(self, texts: list[str], *, wait: bool = True) -> dict[str, np.ndarray]:
        """text -> unit vector, in one encoder call.

        An unreachable encoder is an outage, not bad input. With ``wait`` the call is retried
        with exponential backoff (capped at ``MAX_OUTAGE_BACKOFF_S``) until it answers;
        without it, ``EncoderUnavailable`` is raised at once so the caller can defer the
        work. Either way ``encoder_ok`` is false meanwhile, and nothing is dead-lettered.
        """
        if not texts:
            return {}
        assert self.encoder is not None
        delay = 0.5
        while True:
            started = time.perf_counter()
            try:
                result = await self.encoder.encode(texts)
                break
            except EncoderUnavailable as exc:
                if self.encoder_ok:
                    log.error("encoder unavailable, holding text changes until it answers: %s", exc)
                self.encoder_ok = False
                self.metrics.encoder_outages.inc()
                if not wait:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_OUTAGE_BACKOFF_S)
        if not self.encoder_ok:
            log.info("encoder answers again")
        self.encoder_ok = True
        self.metrics.encoder_latency.observe(time.perf_counter() - started)
        self.metrics.encoder_batch_size.observe(len(texts))
        self.embedded_texts += len(texts)
        return dict(zip(texts, result.vectors, strict=True))

    def cached_vector(self, product: Product) -> np.ndarray | None:
        stored = self.embeddings.get(product.product_id)
        if (
            stored is not None
            and stored.content_hash == product.content_hash
            and stored.model_version == self.model_version
        ):
            return stored.vector
        return None

    def split(self, messages: Iterable[Inbound]) -> Lanes:
        """Decode a batch and sort it into a fast lane and a slow lane.

        The fast lane holds changes that need no embedding (stock, price, deletes, ...) of
        products with no text change earlier in the batch; they can be applied and published
        before the encoder is called, which keeps a stock-out's substitutes from waiting
        behind other products' embeddings. Everything else, in order, is the slow lane.
        Per product, order is kept: once a product has a change in the slow lane, its later
        changes follow it there.
        """
        lanes = Lanes()
        slow_products: set[str] = {change.product_id for _, change in self.pending}
        for message in messages:
            try:
                change = self.decode_product(message).to_core()
            except Exception as exc:  # noqa: BLE001 - every failure must become a dead letter
                lanes.rejected.append(self.reject(message, exc))
                continue
            try:
                needs_text = self.core.needs_embedding(change) is not None
            except Exception:  # noqa: BLE001 - reported, per event, when the change is applied
                needs_text = False
            if needs_text or change.product_id in slow_products:
                slow_products.add(change.product_id)
                lanes.slow.append((message, change))
            else:
                lanes.fast.append((message, change))
        return lanes

    async def apply_fast(self, lanes: Lanes) -> list[Outbound]:
        """Apply the fast lane; return its records and the batch's dead letters."""
        out = list(lanes.rejected)
        for message, change in lanes.fast:
            out.extend(await self._apply_reporting(message, change, {}))
        self._update_gauges()
        return self._last_list_per_key(out)

    async def apply_slow(self, lanes: Lanes) -> SlowResult:
        """Embed the slow lane's texts in one encoder call, then apply it in order.

        Changes deferred by an earlier outage go first. When the encoder is unreachable
        and fewer than ``max_pending`` changes wait, the lane is deferred instead: it joins
        ``pending``, its events stay unacknowledged (their offsets are not committed, so a
        crash loses nothing), and later fast-lane changes of other products keep flowing.
        With ``max_pending`` reached, the call waits for the encoder (backpressure).
        """
        work = self.pending + lanes.slow
        if not work:
            return SlowResult([], [])
        texts = sorted(self._texts_to_embed(change for _, change in work))
        try:
            vectors = await self.embed(texts, wait=len(work) >= self.max_pending)
        except EncoderUnavailable:
            self.pending = work
            self.metrics.pending_changes.set(len(work))
            return SlowResult([], [])
        except Exception as exc:  # noqa: BLE001 - a poison text must not stall the partition
            # One text the encoder refuses fails the whole call; embed one at a time below,
            # so that only the events behind that text are dead-lettered.
            log.warning("batch embedding failed (%s); embedding the batch one text at a time", exc)
            vectors = {}
        self.pending = []
        self.metrics.pending_changes.set(0)
        out: list[Outbound] = []
        for message, change in work:
            out.extend(await self._apply_reporting(message, change, vectors))
        self._update_gauges()
        return SlowResult(self._last_list_per_key(out), [message for message, _ in work])

    async def handle_batch(self, messages: Iterable[Inbound]) -> list[Outbound]:
        """Decode, embed and apply a batch of product changes; return everything to publish."""
        lanes = self.split(messages)
        return await self.apply_fast(lanes) + (await self.apply_slow(lanes)).records

    async def _apply_reporting(
        self, message: Inbound, change: ProductChange, vectors: dict[str, np.ndarray]
    ) -> list[Outbound]:
        stale_before = self.core.catalog.stale_events
        try:
            records = await self._apply_one(change, vectors)
        except Exception as exc:  # noqa: BLE001
            return [self.reject(message, exc)]
        stale = self.core.catalog.stale_events > stale_before
        if stale:
            log.info("stale product change ignored at %s (product %s)", message.where, change.product_id)
        self.metrics.events.labels(message.topic, "stale" if stale else "applied").inc()
        return records

    def _last_list_per_key(self, records: list[Outbound]) -> list[Outbound]:
        """Within one batch only the last version of a list matters on a compacted topic.

        A bulk of inserts republishes the same neighbour lists many times over; sending each
        once cuts the traffic by an order of magnitude. An ``out_of_stock`` publication is
        always kept, since its trigger is an event of its own.
        """
        list_topics = (self.settings.topic_similar_items, self.settings.topic_substitutes)
        last: dict[tuple[str, str], int] = {}
        for i, record in enumerate(records):
            if record.topic in list_topics:
                last[(record.topic, record.key)] = i
        kept = []
        for i, record in enumerate(records):
            latest = record.topic not in list_topics or last[(record.topic, record.key)] == i
            out_of_stock = record.value is not None and record.value.get("trigger") == "out_of_stock"
            if latest or out_of_stock:
                kept.append(record)
        return kept

    def _texts_to_embed(self, changes: Iterable[ProductChange]) -> set[str]:
        texts: set[str] = set()
        for change in changes:
            try:
                product = self.core.needs_embedding(change)
            except Exception:  # noqa: BLE001 - reported, per event, when the change is applied
                continue
            if product is not None and self.cached_vector(product) is None:
                texts.add(product_text(product))
        return texts

    async def _apply_one(self, change: ProductChange, vectors: dict[str, np.ndarray]) -> list[Outbound]:
        product = self.core.needs_embedding(change)
        vector: np.ndarray | None = None
        if product is not None:
            vector = self.cached_vector(product)
            if vector is None:
                text = product_text(product)
                # An earlier change in the same batch may have altered the text we planned for.
                vector = vectors[text] if text in vectors else (await self.embed([text]))[text]
        before = self.core.catalog.get(change.product_id)
        publications: list[Publication] = await self._in_core(self.core.apply, change, vector)
        if self.journal is not None:
            self.journal.append(change)
        after = self.core.catalog.get(change.product_id)
        return self._records_for(change, before, after, product, vector, publications)

    def _records_for(
        self,
        change: ProductChange,
        before: Product | None,
        after: Product | None,
        embedded: Product | None,
        vector: np.ndarray | None,
        publications: list[Publication],
    ) -> list[Outbound]:
        s = self.settings
        pid = change.product_id
        out: list[Outbound] = []
        if isinstance(change, ProductDelete) and before is not None and after is None:
            self.embeddings.pop(pid, None)
            out += [Outbound(s.topic_embeddings, pid, None), Outbound(s.topic_products, pid, None)]
        elif after is not None and after != before:
            if embedded is not None and vector is not None:
                stored = StoredEmbedding(pid, np.asarray(vector, dtype=np.float32), self.model_version,
                                         embedded.content_hash)
                known = self.embeddings.get(pid)
                # A vector reused from the cache (a redelivered event) is already on the topic.
                if known is None or known.content_hash != stored.content_hash or known.model_version != stored.model_version:
                    self.embeddings[pid] = stored
                    out.append(Outbound(s.topic_embeddings, pid, embedding_to_wire(stored)))
            out.append(Outbound(s.topic_products, pid, product_to_wire(after)))
        out += self.publications_to_records(publications, own=pid, event_ts=change.ts)
        return out

    def publications_to_records(
        self, publications: Iterable[Publication], *, own: str | None = None, event_ts: float | None = None
    ) -> list[Outbound]:
        """Wire records for publications. ``own`` and ``event_ts`` name the change that caused them.

        Each list then carries ``caused_by`` (the product and event time of that change), so
        an operator can trace why a list moved, and freshness can be measured per event.
        """
        now = self.clock()
        topics = {Kind.SIMILAR: self.settings.topic_similar_items, Kind.SUBSTITUTES: self.settings.topic_substitutes,
                  Kind.COMPLEMENTS: self.settings.topic_complements}
        cause = {"product_id": own, "event_ts": iso(event_ts)} if own is not None and event_ts is not None else None
        records = []
        for pub in publications:
            value = publication_to_wire(pub, model_version=self.model_version, at=now)
            if value is not None and cause is not None:
                value["caused_by"] = cause
            records.append(Outbound(topics[pub.kind], pub.product_id, value,
                                    event_ts=event_ts if pub.product_id == own else None))
        return records

    def _update_gauges(self) -> None:
        stats = self.core.stats()
        self.metrics.catalog_size.set(stats.products)
        self.metrics.index_live.set(stats.index_live)
        self.metrics.index_deleted.set(stats.index_deleted)

    # ------------------------------------------------------------------ restore

    async def restore(
        self,
        products: Mapping[str, Mapping[str, Any] | None],
        embeddings: Mapping[str, Mapping[str, Any] | None],
        published: Mapping[Kind, Mapping[str, Mapping[str, Any]]] | None,
        *,
        from_snapshot: bool = False,
        batch_size: int = 256,
        lexical: LexicalModel | None = None,
    ) -> list[Outbound]:
        """Rebuild state from the compacted topics and return only what must be republished.

        ``products`` and ``embeddings`` are the last value per key of ``simstream-products``
        and ``simstream-embeddings`` (``None`` for a tombstone): the whole topics for a
        rebuild, or what came after the snapshot's offsets when the recommender was loaded
        from a snapshot. Vectors whose content hash and model version still match are
        reused, so nothing already embedded is embedded again.

        For a rebuild, ``published`` holds the last value per key of the two list topics:
        their versions seed the per-key counters (so ``version`` keeps increasing across
        restarts), and a list that differs from what is on its topic (a crash between apply
        and publish, a model change, the IDF refit) is republished; a list whose product is
        gone gets a tombstone. After a snapshot, the snapshot's lists and versions are the
        published ones, and the replayed changes publish what they change.

        ``lexical`` is the IDF on ``simstream-lexical``, shared by every worker: it replaces
        the recommender's. The IDF is fitted here (and returned as a record for that topic)
        only when there is none yet or the catalog has more than doubled since its fit
        (``needs_refit``), so workers that start at different times score alike.
        """
        if from_snapshot:
            self._embeddings_from_index()
        for key, value in embeddings.items():
            if value is None:
                self.embeddings.pop(key, None)
                continue
            try:
                self.embeddings[key] = embedding_from_wire(value)
            except SimstreamError as exc:
                log.error("ignoring embedding record for %s: %s", key, exc)
        catalog: list[Product] = []
        deleted: list[str] = []
        for key, value in products.items():
            if value is None:
                deleted.append(key)
                continue
            try:
                catalog.append(product_from_wire(value))
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop a restart
                log.error("ignoring unreadable %s record for key %s: %s", self.settings.topic_products, key, exc)
        missing = [p for p in catalog if self.cached_vector(p) is None]
        vectors: dict[str, np.ndarray] = {}
        for start in range(0, len(missing), batch_size):
            vectors.update(await self.embed([product_text(p) for p in missing[start : start + batch_size]]))

        refitted: list[LexicalModel] = []

        def rebuild() -> list[Publication]:
            pubs: list[Publication] = []
            core = self.core
            if lexical is not None:
                pubs += core.use_lexical(lexical)
            for pid in deleted:
                current = core.catalog.get(pid)
                if current is not None:
                    pubs += core.apply(ProductDelete(pid, current.ts))
            ordered = sorted(catalog, key=lambda p: p.product_id)
            for product in ordered:
                if self.cached_vector(product) is None:
                    self.embeddings[product.product_id] = StoredEmbedding(
                        product.product_id, vectors[product_text(product)], self.model_version,
                        product.content_hash)
            if not len(core.catalog) and ordered:
                # An empty core takes the whole catalog in one batched build.
                matrix = np.stack([self.embeddings[p.product_id].vector for p in ordered])
                pubs += core.bulk_load([_as_upsert(p) for p in ordered], matrix)
            else:
                for product in ordered:
                    pubs += core.apply(_as_upsert(product), self.embeddings[product.product_id].vector)
            if needs_refit(core.lexical, len(core.catalog)):
                pubs += core.refit_lexical()
                refitted.append(core.lexical)
            return pubs

        replayed = await self._in_core(rebuild)
        out = [Outbound(self.settings.topic_embeddings, p.product_id,
                        embedding_to_wire(self.embeddings[p.product_id])) for p in missing]
        out += [Outbound(self.settings.topic_lexical, LEXICAL_KEY, lexical_to_wire(model, at=self.clock()))
                for model in refitted]
        if from_snapshot:
            out += self.publications_to_records(last_per_key(replayed))
        else:
            out += await self._in_core(self._reconcile, published or {})
        self._update_gauges()
        return out

    def _embeddings_from_index(self) -> None:
        """After a snapshot load, the index holds each product's vector for its current text."""
        vectors = self.core.vectors()
        for product in self.core.catalog:
            vector = vectors.get(product.product_id)
            if vector is not None:
                self.embeddings[product.product_id] = StoredEmbedding(
                    product.product_id, np.asarray(vector, dtype=np.float32), self.model_version,
                    product.content_hash)

    def _reconcile(self, published: Mapping[Kind, Mapping[str, Mapping[str, Any]]]) -> list[Outbound]:
        core = self.core
        pubs: list[Publication] = []
        for kind in (Kind.SIMILAR, Kind.SUBSTITUTES):
            on_topic = published.get(kind, {})
            for pid, value in on_topic.items():
                version = value.get("version")
                if isinstance(version, int):
                    core.seed_version(kind, pid, version)
            current = core.lists(kind)
            for pid, items in current.items():
                if not same_items(on_topic.get(pid), items) or on_topic[pid].get("model_version") != self.model_version:
                    pubs.append(core.republish(kind, pid))
            for pid in on_topic.keys() - current.keys():
                if core.owns(pid):
                    pubs.append(core.republish(kind, pid))
        return self.publications_to_records(pubs)


def needs_refit(model: LexicalModel, catalog_size: int) -> bool:
    """Whether a restore should fit the IDF anew: never fitted, or fitted on under half the catalog."""
    return catalog_size > 0 and (not model.fitted or model.n_docs * 2 < catalog_size)


def _as_upsert(product: Product) -> ProductUpsert:
    return ProductUpsert(
        product_id=product.product_id, ts=product.ts, title=product.title, description=product.description,
        brand=product.brand, category=product.category, price=product.price, currency=product.currency,
        in_stock=product.in_stock, group_id=product.group_id, attributes=product.attributes,
        image_url=product.image_url,
    )
