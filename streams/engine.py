"""The engine: one live recommender, its embedding cache, and the one path that applies changes.

Nothing here touches Kafka or Faust. Records leave through the injected ``Send`` port
(``streams/outputs.py``); the Faust app (``streams/app.py``) and the worker service
(``streams/worker.py``) only adapt events to ``Inbound`` and call in.

Every change, whatever its source, goes through ``Engine.apply``:

* the stream's own product changes (``handle``: decode, fast lane, slow lane);
* the replica's changes of other workers' products (``Change(from_state=True)``);
* a restore from the compacted topics (``restore``);
* a model rollover's build and catch-up (a second engine beside the live one, then ``swap``).

Threading rule: the recommender is not thread-safe, so every call that reads or mutates it
runs on one single-thread executor (``in_core``), in order. The event loop stays free for
Kafka, the web server and the encoder's own I/O. Readers use ``read``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from encoders.base import Encoder
from serving.catalog import Outcome, Product, ProductChange, ProductDelete, ProductUpsert
from serving.errors import EncoderUnavailable, SimstreamError
from serving.lexical import LexicalModel
from serving.recommender import CONTENT_KINDS, Kind, Publication, Recommender
from serving.snapshot import ChildSave, save_in_child
from serving.text import product_text
from streams.backoff import Backoff
from streams.edge import Edge
from streams.embeddings import Embeddings
from streams.outputs import Inbound, Outbound, Outputs, Send, last_list_per_key
from streams.records import iso, product_from_wire, product_to_wire
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


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``); false where
    there is no glibc (musl, macOS), which is harmless: memory is only held longer."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False

MAX_OUTAGE_BACKOFF_S = 10.0
T = TypeVar("T")


class PoisonText(SimstreamError):  # noqa: N818 (public name)
    """The encoder refused this product's text; fix the text (or the encoder) and send it again."""


@dataclass(frozen=True)
class Change:
    """One product change for the engine, and where it came from.

    ``source`` is the consumed record (dead letters name it; it is acknowledged once done).
    ``vector`` is a vector known to belong to the change's text (a replica or a restore read
    it from ``simstream-embeddings``). ``from_state`` marks a change read back from the state
    topics: its state records are there already, and a product already held as it is is a
    no-op, as is an older one.
    """

    change: ProductChange
    source: Inbound | None = None
    vector: np.ndarray | None = None
    from_state: bool = False
    #: With ``from_state``: the whole product as the state topic holds it.
    product: Product | None = None

    @classmethod
    def of_product(cls, product: Product, vector: np.ndarray | None = None) -> Change:
        """A product read from ``simstream-products``, as a change to apply."""
        return cls(as_upsert(product), vector=vector, from_state=True, product=product)

    @classmethod
    def tombstone(cls, product_id: str) -> Change:
        """A tombstone read from ``simstream-products``: the product held then is deleted."""
        return cls(ProductDelete(product_id, 0.0), from_state=True)


@dataclass
class Lanes:
    """One decoded batch: dead letters, and the changes by lane (see ``Engine.split``)."""

    #: The dead letters of records that could not be decoded, and those records (done).
    rejected: Outputs = field(default_factory=Outputs)
    fast: list[Change] = field(default_factory=list)
    slow: list[Change] = field(default_factory=list)


@dataclass
class EmbedAhead:
    """The first encoder call of a batch's slow lane, started before its fast lane is applied
    (``Engine.embed_ahead``), so that the encoder and the core work at the same time."""

    #: Texts the encoder refused, with why (filled by the call; see ``embed_one_by_one``).
    poison: dict[str, str]
    task: asyncio.Future[dict[str, np.ndarray]]

    def discard(self) -> None:
        """Cancel the call if it is still running, and consume its outcome if it ended (an
        outage or a refusal is reported where the vectors are used, not as an unread error)."""
        if not self.task.done():
            self.task.cancel()
        elif not self.task.cancelled():
            self.task.exception()


def as_upsert(product: Product) -> ProductUpsert:
    """The upsert that recreates ``product`` (restore, replica, rollover build)."""
    return ProductUpsert(
        product_id=product.product_id, ts=product.ts, title=product.title, description=product.description,
        brand=product.brand, category=product.category, price=product.price, currency=product.currency,
        in_stock=product.in_stock, group_id=product.group_id, attributes=product.attributes,
        image_url=product.image_url,
    )


#: Weight of the latest batch in ``Engine.text_share`` (a moving average over batches).
TEXT_SHARE_WEIGHT = 0.2


def bulk_catch_up_due(behind: float, catalog_size: int, least: int, text_share: float | None) -> bool:
    """Whether a backlog of ``behind`` product changes calls for a bulk catch-up (see
    ``Worker.far_behind``): its text changes, estimated from the recent ``text_share``, are
    at least ``least`` and at least a quarter of the catalog. Before a first batch has told
    the share (``None``), an empty catalog's backlog is all text (every product is new),
    and a restored one's is not assumed to be: one batch applied change by change costs little.

    A full rebuild costs about as much as a quarter of the catalog's text changes (each
    searches the index and updates the lists near it). A stock or price change costs a
    small part of one (its lists are patched, ``serving.patching``), so a backlog of them
    is cheaper worked off change by change than by rebuilding every list.
    """
    if least <= 0:
        return False
    if text_share is None:
        text_share = 1.0 if catalog_size == 0 else 0.0
    return behind * text_share >= max(least, catalog_size / 4)


def needs_refit(model: LexicalModel, catalog_size: int) -> bool:
    """Whether the stream should fit the IDF anew (``Worker.refit_lexical_when_quiet``): never
    fitted, or fitted on under half the catalog. A restore never refits."""
    return catalog_size > 0 and (not model.fitted or model.n_docs * 2 < catalog_size)


@dataclass
class Engine(Edge):
    """The live recommender and everything that changes it (see the module docstring)."""

    recommender: Recommender | None = None
    encoder: Encoder | None = None
    #: Where records go; ``None`` for an engine that only builds (a rollover's new core).
    send: Send | None = None
    #: Extra records for products that went away (the feeds that list them).
    on_gone: Callable[[set[str]], list[Outbound]] | None = None
    #: Extra records for products a change was applied to (the competitor offers re-matched).
    on_changed: Callable[[set[str]], Awaitable[list[Outbound]]] | None = None
    #: product_id -> the embedding it was last indexed with; lets a restart or a redelivery
    #: reuse a vector instead of re-embedding unchanged text (the vector itself is read
    #: back from the core once applied: ``streams.embeddings``).
    embeddings: Embeddings = field(default_factory=Embeddings)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="simstream-core")
    )
    embedded_texts: int = 0
    encoder_ok: bool = False
    #: Slow-lane changes deferred while the encoder is unreachable, in arrival order.
    pending: list[Change] = field(default_factory=list)
    max_pending: int = 10_000
    #: While a model rollover runs (``streams.rollover``): every change applied to this core,
    #: in order, so the new core can catch up with them. ``None`` otherwise.
    journal: list[ProductChange] | None = None
    #: Increases with every ``swap``: a long task can tell that the core it started on is gone.
    generation: int = 0
    #: Apply with ``defer`` (``Recommender.apply``): lists wait for ``settle``. The worker
    #: sets it while far behind its input.
    defer_propagation: bool = False
    #: Texts of the batch in flight whose vectors the core was primed with (``Recommender.prime``).
    primed_texts: set[str] = field(default_factory=set)
    #: The share of recent product changes that needed the encoder (slow lane), a moving
    #: average over batches; ``None`` before the first batch.
    text_share: float | None = None

    @property
    def core(self) -> Recommender:
        assert self.recommender is not None, "Engine needs a recommender"
        return self.recommender

    @property
    def model_version(self) -> str:
        assert self.encoder is not None, "Engine needs an encoder"
        return self.encoder.model_version

    async def in_core(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the core's thread, after everything queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def read(self, fn: Callable[[Recommender], T]) -> T:
        """A consistent read of the live core (the web views): never interleaved with a write."""
        core = self.core
        return await self.in_core(fn, core)

    def swap(self, core: Recommender, *, encoder: Encoder | None = None,
             embeddings: Embeddings | None = None) -> None:
        """Make ``core`` (built beside this one) the live core: readers and the next batch see it.

        Call it between batches (the worker's batch lock): it is one assignment on the event
        loop, so no change is applied half to the old core and half to the new.
        """
        self.recommender = core
        if encoder is not None:
            self.encoder = encoder
        if embeddings is not None:
            self.embeddings = embeddings
        self.generation += 1
        self.update_gauges()

    # ------------------------------------------------------------------ encoding

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
        backoff = Backoff(cap=MAX_OUTAGE_BACKOFF_S)
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
                await backoff.sleep()
        if not self.encoder_ok:
            log.info("encoder answers again")
        self.encoder_ok = True
        self.metrics.encoder_latency.observe(time.perf_counter() - started)
        self.metrics.encoder_batch_size.observe(len(texts))
        self.embedded_texts += len(texts)
        return dict(zip(texts, result.vectors, strict=True))

    def has_vector(self, product: Product) -> bool:
        """Whether ``product``'s text has a vector already (held, or in the core)."""
        return self.embeddings.covers(product, self.model_version)

    def cached_vector(self, product: Product) -> np.ndarray | None:
        """The vector ``product``'s current text already has, or ``None`` (on the core thread:
        it may read the core's index)."""
        if not self.has_vector(product):
            return None
        held = self.embeddings.held(product.product_id)
        return held if held is not None else self.core.indexed_vector(product.product_id)

    def texts_to_embed(self, changes: Iterable[Change]) -> list[str]:
        """The texts ``changes`` will need that no cache or given vector covers, in the order
        the changes need them."""
        texts: dict[str, None] = {}
        for item in changes:
            if item.vector is not None:
                continue
            try:
                product = self.core.needs_embedding(item.change)
            except Exception:  # noqa: BLE001 - reported, per change, when it is applied
                continue
            if product is not None and not self.has_vector(product):
                texts[product_text(product)] = None
        return list(texts)

    # ------------------------------------------------------------------ the stream

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
        slow_products: set[str] = {item.change.product_id for item in self.pending}
        for message in messages:
            try:
                change = self.decode_product(message).to_core()
            except Exception as exc:  # noqa: BLE001 - every failure must become a dead letter
                lanes.rejected.dead_letters.append(self.reject(message, exc))
                lanes.rejected.done.append(message)
                continue
            try:
                needs_text = self.core.needs_embedding(change) is not None
            except Exception:  # noqa: BLE001 - reported, per event, when the change is applied
                needs_text = False
            item = Change(change, source=message)
            if needs_text or change.product_id in slow_products:
                slow_products.add(change.product_id)
                lanes.slow.append(item)
            else:
                lanes.fast.append(item)
        return lanes

    async def handle(self, messages: Sequence[Inbound]) -> Outputs:
        """The stream's batch of product changes: decode, apply, publish; return what was done.

        The fast lane and the dead letters are applied and published first, then the slow
        lane is embedded in one encoder call, applied and published. When the encoder is
        unreachable the slow lane is deferred (``pending``); its records are then not in
        ``done`` and must not be acknowledged (``retry_pending`` finishes them later).
        """
        lanes = self.split(messages)
        decoded = len(lanes.fast) + len(lanes.slow)
        if decoded:
            share = len(lanes.slow) / decoded
            self.text_share = share if self.text_share is None else \
                self.text_share + TEXT_SHARE_WEIGHT * (share - self.text_share)
        # The slow lane's first encoder call runs while the core applies the fast lane: the
        # fast lane touches none of the slow lane's products, so the texts it plans hold.
        ahead = self.embed_ahead([*self.pending, *lanes.slow])
        try:
            fast = lanes.rejected.extend(await self.apply(lanes.fast))
            await self.publish(fast)
            slow = await self.apply_slow(lanes.slow, ahead=ahead)
        finally:
            if ahead is not None:
                ahead.discard()
        await self.publish(slow)
        return fast.extend(slow)

    def embed_ahead(self, work: Sequence[Change]) -> EmbedAhead | None:
        """Start embedding the first chunk of texts ``work`` needs, without waiting for it;
        ``None`` when it needs none. ``apply(work, ahead=...)`` takes the vectors over, and
        an unreachable encoder is reported there as if ``apply`` had called it (waiting for
        it only when ``work`` fills ``max_pending``, as ``apply_slow`` does)."""
        if not work or self.builds_from_scratch(work):
            return None
        texts = self.texts_to_embed(work)[: self.settings.embed_batch_size]
        if not texts:
            return None
        poison: dict[str, str] = {}
        task = asyncio.ensure_future(
            self.embed_chunk_or_one_by_one(texts, poison, wait=len(work) >= self.max_pending))
        return EmbedAhead(poison, task)

    async def apply_slow(self, slow: Sequence[Change], *, ahead: EmbedAhead | None = None) -> Outputs:
        """Embed and apply deferred and new slow-lane changes, or defer them all again.

        Changes deferred by an earlier outage go first. When the encoder is unreachable and
        fewer than ``max_pending`` changes wait, they are deferred: their input stays
        unacknowledged (a crash loses nothing) and later fast-lane changes of other products
        keep flowing. With ``max_pending`` reached, the call waits for the encoder. ``ahead``:
        the first encoder call, already started (``embed_ahead`` of the same work).
        """
        work = [*self.pending, *slow]
        if not work:
            return Outputs()
        try:
            out = await self.apply(work, wait_for_encoder=len(work) >= self.max_pending, ahead=ahead)
        except EncoderUnavailable:
            self.pending = work
            self.metrics.pending_changes.set(len(work))
            return Outputs()
        self.pending = []
        self.metrics.pending_changes.set(0)
        return out

    async def retry_pending(self) -> Outputs:
        """Retry changes deferred by an encoder outage (a timer calls it); publish what is done."""
        out = await self.apply_slow([])
        await self.publish(out)
        return out

    async def publish(self, outputs: Outputs) -> None:
        """Send ``outputs`` and the feeds that listed products that went away."""
        if self.send is None:
            return
        records = outputs.records()
        if outputs.gone and self.on_gone is not None:
            records += self.on_gone(outputs.gone)
        if outputs.changed and self.on_changed is not None:
            records += await self.on_changed(outputs.changed)
        if records:
            await self.send(records)

    # ------------------------------------------------------------------ the one apply path

    async def apply(self, changes: Sequence[Change], *, wait_for_encoder: bool = True,
                    ahead: EmbedAhead | None = None) -> Outputs:
        """Apply ``changes`` in order and say what to publish; nothing is sent here.

        Texts without a vector are embedded in encoder calls of ``embed_batch_size`` texts, in the
        order the changes need them; while the core applies the changes of one chunk, the
        encoder embeds the next. An unreachable encoder raises ``EncoderUnavailable`` without
        ``wait_for_encoder`` when the first chunk is embedded (nothing is applied then); later
        chunks wait for it. A text the encoder refuses fails only the changes that need it:
        one text at a time finds it, and those changes become dead letters. ``ahead`` is that
        first chunk's call when it was started earlier (``embed_ahead``).
        """
        if not changes:
            return Outputs()
        if self.builds_from_scratch(changes):
            return await self.in_core(self.bulk_load, changes)
        out = Outputs()
        self.primed_texts = set()
        poison: dict[str, str] = {} if ahead is None else ahead.poison
        # The first chunk decides whether the encoder answers (nothing is applied before);
        # once the batch has started, later chunks wait for it rather than split the batch.
        vectors: dict[str, np.ndarray] = {} if ahead is None else dict(await ahead.task)
        texts = [t for t in self.texts_to_embed(changes) if t not in vectors and t not in poison]
        size = self.settings.embed_batch_size
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        next_chunk = 0
        if ahead is None and chunks:
            vectors = await self.embed_chunk_or_one_by_one(chunks[0], poison, wait=wait_for_encoder)
            next_chunk = 1
        embedding: asyncio.Future[dict[str, np.ndarray]] | None = None
        start = 0
        try:
            while start < len(changes):
                if embedding is None and next_chunk < len(chunks):
                    embedding = asyncio.ensure_future(self.embed_chunk_or_one_by_one(chunks[next_chunk], poison))
                    next_chunk += 1
                part, start, missing = await self.in_core(self.apply_in_core, changes, start, vectors, poison)
                out.extend(part)
                if missing is None:
                    continue
                if embedding is not None:
                    vectors.update(await embedding)
                    embedding = None
                if missing not in vectors and missing not in poison:
                    # An earlier change of the batch altered the text planned for this one.
                    vectors.update(await self.embed_one_by_one([missing], poison))
        finally:
            if embedding is not None:
                embedding.cancel()
        out.lists = last_list_per_key(out.lists)
        self.update_gauges()
        return out

    async def settle(self) -> Outputs:
        """Propagate the changes applied with ``defer_propagation``: every list rebuilt at
        once (``Recommender.settle``), and the ones that changed published, step by step;
        returns what was published."""
        if not self.core.unsettled:
            return Outputs()
        started = time.monotonic()
        out = Outputs()
        # One step per call on the core thread: the web views' reads get in between, and
        # each step's lists go out before the next, rather than all of them at the end. The
        # next step is computed while this one is sent: a step only reads what the previous
        # ones left, and sending reads nothing of the core.
        steps = self.core.settle_steps()
        computing = asyncio.ensure_future(self.in_core(next, steps, None))
        try:
            while (pubs := await computing) is not None:
                step = Outputs(lists=self.lists_to_records(pubs))
                computing = asyncio.ensure_future(self.in_core(next, steps, None))
                await self.publish(step)
                out.lists += step.lists
        finally:
            if not computing.done():  # a send failed: let the step in flight end before anything else
                await asyncio.wait([computing])
                if not computing.cancelled() and computing.exception() is not None:
                    log.error("a settle step failed after a failed send: %s", computing.exception())
        # The settle's working arrays (the duplicates join: about 1 GB at 100k products) are
        # free now, but glibc keeps the pages of its heap: hand them back to the system. On
        # the core's thread: trimming a heap of GBs takes a while, and the event loop must
        # keep consuming and sending meanwhile.
        trimmed = await self.in_core(release_free_heap)
        if not self.core.unsettled:
            # The bulk catch-up is over. The flag was set by the last batch of the worker's own
            # input; left on, it would defer the next changes that do not set it themselves (the
            # replica's, of the other workers' products) and start a whole new settle for them.
            self.defer_propagation = False
        log.info("bulk catch-up settled: %d products, %d lists to publish, %.1f s%s",
                 len(self.core.catalog), len(out.lists), time.monotonic() - started,
                 "; free heap returned to the system" if trimmed else "")
        self.update_gauges()
        return out

    def builds_from_scratch(self, changes: Sequence[Change]) -> bool:
        """Whether ``changes`` fill an empty core with whole products and their vectors (a
        restore, a rollover's new core): then one batched build replaces per-change updates."""
        return (len(changes) > 1 and not len(self.core.catalog)
                and all(c.from_state and c.product is not None and c.vector is not None for c in changes)
                and len({c.change.product_id for c in changes}) == len(changes))

    def bulk_load(self, changes: Sequence[Change]) -> Outputs:
        """The batched build of ``builds_from_scratch`` (on the core thread)."""
        upserts = [c.change for c in changes if isinstance(c.change, ProductUpsert)]
        matrix = np.stack([np.asarray(c.vector, dtype=np.float32) for c in changes])
        pubs = self.core.bulk_load(upserts, matrix)
        for c in changes:
            assert c.product is not None
            self.embeddings.applied(c.product.product_id, self.model_version, c.product.content_hash)
        if self.journal is not None:
            self.journal.extend(upserts)
        return Outputs(lists=self.lists_to_records(pubs), changed={u.product_id for u in upserts})

    async def embed_chunk_or_one_by_one(
        self, texts: list[str], poison: dict[str, str], *, wait: bool = True
    ) -> dict[str, np.ndarray]:
        """``embed``; when the encoder refuses the chunk, one text at a time (``poison``)."""
        try:
            return await self.embed(texts, wait=wait)
        except EncoderUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a poison text must not stall the partition
            log.warning("batch embedding failed (%s); embedding the batch one text at a time", exc)
            return await self.embed_one_by_one(texts, poison)

    async def embed_one_by_one(self, texts: Sequence[str], poison: dict[str, str]) -> dict[str, np.ndarray]:
        """Embed texts one at a time; a text the encoder refuses goes to ``poison`` with why."""
        vectors: dict[str, np.ndarray] = {}
        for text in texts:
            try:
                vectors.update(await self.embed([text]))
            except EncoderUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - reported on the changes that need it
                poison[text] = f"the encoder refused this product's text: {exc}"
        return vectors

    def apply_in_core(self, changes: Sequence[Change], start: int, vectors: Mapping[str, np.ndarray],
                      poison: Mapping[str, str]) -> tuple[Outputs, int, str | None]:
        """Apply ``changes[start:]`` on the core thread; stop before a change whose text has no
        vector yet and return (outputs, where it stopped, that text)."""
        out = Outputs()
        core = self.core
        stopped = False
        fresh = [v for t, v in vectors.items() if t not in self.primed_texts]
        if len(fresh) > 1 and not self.defer_propagation:
            # One matrix product for the reverse checks of every text change to come.
            core.prime(np.stack(fresh))
            self.primed_texts.update(vectors)
        for i in range(start, len(changes)):
            item = changes[i]
            change = item.change
            pid = change.product_id
            try:
                if item.from_state and isinstance(change, ProductDelete):
                    # A tombstone on the state topic: delete whatever is held now (an earlier
                    # change of the same batch may have just added it).
                    held = core.catalog.get(pid)
                    if held is None:
                        continue
                    change = ProductDelete(pid, held.ts)
                elif item.from_state and self.already_applied(item):
                    continue
                product = core.needs_embedding(change)
                vector: np.ndarray | None = None
                if product is not None:
                    vector = item.vector if item.vector is not None else self.cached_vector(product)
                    if vector is None:
                        text = product_text(product)
                        if text in poison:
                            raise PoisonText(poison[text])
                        if text not in vectors:
                            stopped = True
                            return out, i, text
                        vector = vectors[text]
                before = core.catalog.get(pid)
                stale_before = core.catalog.stale_events
                publications = core.apply(change, vector, defer=self.defer_propagation)
                out.changed.add(pid)
                if self.journal is not None:
                    self.journal.append(change)
                after = core.catalog.get(pid)
                if before is not None and before.in_stock and (after is None or not after.in_stock):
                    out.gone.add(pid)
                self.state_records(out, item, before, after, product, vector)
                out.lists += self.lists_to_records(
                    publications, own=None if item.from_state else pid,
                    event_ts=None if item.from_state else change.ts)
                if item.source is not None:
                    stale = core.catalog.stale_events > stale_before
                    if stale:
                        log.info("stale product change ignored at %s (product %s)", item.source.where, pid)
                    self.metrics.events.labels(item.source.topic, "stale" if stale else "applied").inc()
            except Exception as exc:  # noqa: BLE001 - one bad change must not stop the others
                if item.source is not None:
                    out.dead_letters.append(self.reject(item.source, exc))
                else:
                    log.error("could not apply a change of %s read back from the state topics: %s", pid, exc)
            finally:
                # A change left for later (its text has no vector yet) is not done.
                if item.source is not None and not stopped:
                    out.done.append(item.source)
        core.unprime()
        return out, len(changes), None

    def already_applied(self, item: Change) -> bool:
        """An upsert read back from the state topics that the core already holds (or has newer)."""
        change = item.change
        current = self.core.catalog.get(change.product_id)
        if current is not None and current == item.product:
            return True  # this worker's own change, or a replay
        return self.core.catalog.preview(change).outcome is Outcome.STALE

    def state_records(self, out: Outputs, item: Change, before: Product | None, after: Product | None,
                      embedded: Product | None, vector: np.ndarray | None) -> None:
        """The state records of one applied change (none for a change read from the state)."""
        s = self.settings
        pid = item.change.product_id
        if isinstance(item.change, ProductDelete) and before is not None and after is None:
            self.embeddings.discard(pid)
            if not item.from_state:
                out.state += [Outbound(s.topic_embeddings, pid, None), Outbound(s.topic_products, pid, None)]
            return
        if after is None or after == before:
            return
        if embedded is not None and vector is not None:
            # A vector reused from the cache (a redelivered event) is already on the topic.
            if not item.from_state and not self.has_vector(embedded):
                stored = StoredEmbedding(pid, np.asarray(vector, dtype=np.float32), self.model_version,
                                         embedded.content_hash)
                out.state.append(Outbound(s.topic_embeddings, pid, embedding_to_wire(stored)))
            self.embeddings.applied(pid, self.model_version, embedded.content_hash)
        if not item.from_state:
            out.state.append(Outbound(s.topic_products, pid, product_to_wire(after)))

    def lists_to_records(
        self, publications: Iterable[Publication], *, own: str | None = None, event_ts: float | None = None
    ) -> list[Outbound]:
        """Wire records for publications. ``own`` and ``event_ts`` name the change that caused them.

        Each list then carries ``caused_by`` (the product and event time of that change), so
        an operator can trace why a list moved, and freshness can be measured per event.
        """
        publications = list(publications)
        if not publications:
            return []
        now = iso(self.clock())
        cause = {"product_id": own, "event_ts": iso(event_ts)} if own is not None and event_ts is not None else None
        records = []
        for pub in publications:
            value = publication_to_wire(pub, model_version=self.model_version, at=now)
            if value is not None and cause is not None:
                value["caused_by"] = cause
            records.append(Outbound(self.settings.list_topic(pub.kind), pub.product_id, value,
                                    event_ts=event_ts if pub.product_id == own else None,
                                    trigger=None if pub.trigger is None else str(pub.trigger)))
        return records

    def update_gauges(self) -> None:
        stats = self.core.stats()
        self.metrics.catalog_size.set(stats.products)
        self.metrics.index_live.set(stats.index_live)
        self.metrics.index_deleted.set(stats.index_deleted)

    # ------------------------------------------------------------------ restore and snapshots

    async def restore(
        self,
        products: Mapping[str, Mapping[str, Any] | None],
        embeddings: Mapping[str, Mapping[str, Any] | None],
        published: Mapping[Kind, Mapping[str, Mapping[str, Any]]] | None,
        *,
        from_snapshot: bool = False,
        batch_size: int = 256,
        lexical: LexicalModel | None = None,
    ) -> Outputs:
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
        the recommender's. A restore never fits one: a restart with no new input must
        publish nothing new, and a refit moves every list. Where none is shared yet, the
        recommender's own (fitted from a snapshot, or none yet) is returned as the record
        for that topic, so every worker and every later start weigh n-grams alike. Refits
        happen in the stream (``Worker.refit_lexical_when_quiet``) or on
        ``simstream refit-lexical``.
        """
        if from_snapshot:
            await self.in_core(self.embeddings_from_index)
        for key, value in embeddings.items():
            if value is None:
                self.embeddings.discard(key)
                continue
            try:
                self.embeddings.hold(embedding_from_wire(value))
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
        missing = [p for p in catalog if not self.has_vector(p)]
        vectors: dict[str, np.ndarray] = {}
        for start in range(0, len(missing), batch_size):
            vectors.update(await self.embed([product_text(p) for p in missing[start : start + batch_size]]))
        out = Outputs()
        for product in missing:
            stored = StoredEmbedding(product.product_id, vectors[product_text(product)], self.model_version,
                                     product.content_hash)
            self.embeddings.hold(stored)
            out.state.append(Outbound(self.settings.topic_embeddings, product.product_id, embedding_to_wire(stored)))
        adopted = await self.in_core(self.core.use_lexical, lexical) if lexical is not None else []
        ordered = sorted(catalog, key=lambda p: p.product_id)
        replayed = await self.apply_from_state(deleted, ordered)
        # Records of products the snapshot already held as they are were skipped, not applied.
        self.embeddings.release_applied(self.core.catalog)
        if lexical is None:
            out.state.append(self.lexical_record())
        if from_snapshot:
            out.lists = last_list_per_key([*self.lists_to_records(adopted), *replayed.lists])
        else:
            out.lists = await self.in_core(self.reconcile, published or {})
        self.update_gauges()
        return out

    async def apply_from_state(self, deleted: Sequence[str], products: Sequence[Product]) -> Outputs:
        """Apply products (and deletes) read from the state topics, through ``apply`` (an empty
        core takes them in one batched build). Nothing is sent: the caller decides."""
        changes = [Change.tombstone(pid) for pid in deleted] if len(self.core.catalog) else []
        # A vector the core holds already (after a snapshot) is read from it when applied.
        changes += [Change.of_product(p, self.embeddings.held(p.product_id)) for p in products]
        return await self.apply(changes)

    def lexical_record(self) -> Outbound:
        """The IDF in use, as a ``simstream-lexical`` record."""
        return Outbound(self.settings.topic_lexical, LEXICAL_KEY, lexical_to_wire(self.core.lexical, at=self.clock()))

    async def refit_lexical(self) -> Outputs:
        """Fit the IDF on the catalog now: its record and every list that changed."""
        pubs = await self.in_core(self.core.refit_lexical)
        return Outputs(state=[self.lexical_record()], lists=self.lists_to_records(pubs))

    def embeddings_from_index(self) -> None:
        """After a snapshot load, the index holds each product's vector for its current text."""
        index = self.core.index
        for product in self.core.catalog:
            if product.product_id in index:
                self.embeddings.applied(product.product_id, self.model_version, product.content_hash)

    def stored_embeddings(self, ids: Iterable[str]) -> list[StoredEmbedding]:
        """The ``simstream-embeddings`` values of ``ids`` that have one (on the core thread)."""
        out = []
        for pid in ids:
            known = self.embeddings.get(pid)
            vector = None if known is None else (known.vector if known.vector is not None
                                                 else self.core.indexed_vector(pid))
            if known is not None and vector is not None:
                out.append(StoredEmbedding(pid, vector, known.model_version, known.content_hash))
        return out

    def reconcile(self, published: Mapping[Kind, Mapping[str, Mapping[str, Any]]]) -> list[Outbound]:
        """Lists that differ from the last ones on their topics, with versions continued."""
        core = self.core
        pubs: list[Publication] = []
        for kind in CONTENT_KINDS:
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
        return self.lists_to_records(pubs)

    def save_snapshot(self, root: Path, offsets: Mapping[str, Mapping[int, int]]) -> Path:
        """Write the core with the state-topic offsets it covers (on the core thread)."""
        core = self.core
        core.offsets = {topic: dict(parts) for topic, parts in offsets.items()}
        return core.save(root)

    def fork_snapshot(self, root: Path, offsets: Mapping[str, Mapping[int, int]]) -> ChildSave:
        """``save_snapshot`` in a forked child (``serving.snapshot.save_in_child``), on the
        core thread, between batches: the snapshot is of this instant, and the core goes on
        as soon as the fork returns."""
        return save_in_child(lambda: self.save_snapshot(root, offsets))

