"""Competitor offers in the stream: ``competitor-offers`` in, ``offer-matches`` and
``competitor-prices`` out, ``GET /products/{id}/offers``. The matching is ``serving.offers``.

``OfferStream`` is what the worker's offer agent, its timer and the engine's hook call:

* ``on_batch``: a batch of ``competitor-offers``, decoded strictly (a bad offer is a dead
  letter, the batch goes on), new or changed offer texts embedded in one encoder call (the
  encoder of the products: the same model, the same template), applied on the core thread,
  the changed matches and price lists published, then the input acknowledged;
* ``on_products_changed`` (``Engine.on_changed``): after any batch of own-product changes,
  every offer whose match they could move is re-matched (``OfferMatcher.on_products_changed``)
  and its records go out with the lists of that batch;
* ``tick``: an IDF refit or a swapped core re-matches every offer, and a model rollover
  re-embeds them first (a vector of one model is never scored against another's).

**Ownership.** ``competitor-offers`` has one partition (``simstream topics create``): the
worker the group assigns it to holds every offer, so ``competitor-prices`` (an aggregate per
own product over all offers) is complete, and it alone publishes offer records. Offers are
not in the index snapshots: when a worker gains the partition (at start too) it restores
them from ``offer-matches`` (each record carries its offer), embeds them, re-matches them and
publishes only what differs from the topics, with versions continued. A worker that loses
the partition drops its offers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.errors import InvalidInput, SimstreamError
from serving.offers import (
    Calibration,
    Offer,
    OfferChange,
    OfferMatch,
    OfferMatcher,
    OfferUpdate,
    PriceGap,
    PricePublication,
)
from streams.edge import Edge
from streams.outputs import Inbound, Outbound
from streams.records import DecodeError, decode_competitor_offer, iso
from streams.restore import StateReader
from streams.settings import Settings

if TYPE_CHECKING:
    import faust

    from streams.engine import Engine

log = logging.getLogger(__name__)

#: Fields of a published record that change with every publication, not with its content.
_VOLATILE = ("version", "updated_at", "model_version")


def calibration_of(settings: Settings) -> Calibration:
    """The offer confidence curve and threshold from the settings."""
    return Calibration(settings.offer_confidence_slope, settings.offer_confidence_intercept,
                       settings.offer_match_threshold, price_weight=settings.offer_confidence_price_weight,
                       unknown_price_gap=settings.offer_unknown_price_gap)


def offer_to_wire(offer: Offer) -> dict[str, Any]:
    """An offer as ``offer-matches`` carries it (the ``competitor-offers`` shape, without ``op``)."""
    return {"competitor": offer.competitor, "offer_id": offer.offer_id, "title": offer.title, "brand": offer.brand,
            "price": offer.price, "currency": offer.currency, "url": offer.url, "ts": iso(offer.ts)}


def offer_from_wire(obj: Mapping[str, Any]) -> Offer:
    """Inverse of ``offer_to_wire`` (a restore from ``offer-matches``); raises ``DecodeError``."""
    change = decode_competitor_offer(json.dumps({**obj, "op": "upsert"}), now=math.inf).to_core()
    assert isinstance(change, Offer)
    return change


def _gap(gap: PriceGap | None) -> dict[str, Any] | None:
    return None if gap is None else {"amount": gap.amount, "percent": gap.percent, "currency": gap.currency}


def offer_entry(match: OfferMatch) -> dict[str, Any]:
    """One matched offer on a ``competitor-prices`` list and in ``GET /products/{id}/offers``."""
    offer = match.offer
    return {"competitor": offer.competitor, "offer_id": offer.offer_id, "title": offer.title,
            "price": offer.price, "currency": offer.currency, "url": offer.url, "ts": iso(offer.ts),
            "confidence": round(match.confidence, 4), "price_gap": _gap(match.price_gap)}


def match_to_wire(match: OfferMatch, *, threshold: float) -> dict[str, Any]:
    """The ``offer-matches`` value of a match, without ``version``, ``updated_at``, ``model_version``."""
    c = match.candidate
    finite = c.product_id is not None
    return {"offer": offer_to_wire(match.offer), "product_id": match.product_id, "candidate_id": c.product_id,
            "confidence": round(match.confidence, 4), "score": round(c.score, 4) if finite else None,
            "dense": round(c.dense, 4) if finite else None, "lexical": round(c.lexical, 4) if finite else None,
            "price_gap": _gap(match.price_gap), "reasons": list(match.reasons), "no_match": match.no_match,
            "threshold": threshold}


def prices_to_wire(pub: PricePublication) -> dict[str, Any] | None:
    """The ``competitor-prices`` value (``None``, a tombstone, when no offer is matched)."""
    if not pub.offers:
        return None
    return {"product_id": pub.product_id, "price": pub.price, "currency": pub.currency,
            "offers": [offer_entry(m) for m in pub.offers]}


def _content(value: Mapping[str, Any] | None) -> Any:
    """What a published value says, without the fields that change with every publication."""
    if value is None:
        return None
    return json.loads(json.dumps({k: v for k, v in value.items() if k not in _VOLATILE}))


@dataclass
class OfferStream(Edge):
    """The offers of this worker (see the module docstring)."""

    engine: Engine | None = None
    #: Where records go: the worker's ``publish`` (its broker retries).
    publish: Callable[[list[Outbound]], Awaitable[None]] | None = None
    #: The worker's batch lock: offers and product batches never interleave.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Set once the worker has restored and consumed its start-up input.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    matcher: OfferMatcher | None = None
    #: Whether this worker holds the ``competitor-offers`` partition, and restored its offers.
    owned: bool = False
    restored: bool = False
    #: The model version the offers' vectors come from.
    model_version: str | None = None
    #: ``(topic, key)`` -> the restored value's content, until a publication replaces it.
    on_topics: dict[tuple[str, str], Any] = field(default_factory=dict)
    #: The last failure to follow a model rollover (logged once), or ``None``.
    follow_error: str | None = None

    def __post_init__(self) -> None:
        if self.matcher is None:
            self.matcher = self.new_matcher()

    def new_matcher(self) -> OfferMatcher:
        return OfferMatcher(calibration_of(self.settings))

    @property
    def offers(self) -> OfferMatcher:
        assert self.matcher is not None
        return self.matcher

    @property
    def live(self) -> Engine:
        assert self.engine is not None, "OfferStream needs the engine"
        return self.engine

    # ------------------------------------------------------------------ ownership

    def on_assigned(self, partitions: frozenset[int]) -> None:
        """The group's assignment of ``competitor-offers``: gaining partition 0 restores the
        offers at the next batch or tick; losing it drops them."""
        owned = 0 in partitions
        if partitions - {0}:
            log.error("%s has more than one partition (this worker got %s): each worker then holds only some "
                      "offers and competitor-prices is incomplete; recreate it with `simstream topics create`",
                      self.settings.topic_competitor_offers, sorted(partitions))
        if owned and not self.owned:
            self.restored = False
        if not owned and self.owned:
            self.matcher = self.new_matcher()
            self.on_topics.clear()
            log.info("competitor-offers moved to another worker: its offers are dropped here")
        self.owned = owned

    async def ensure_restored(self) -> None:
        """With the lock held: load the offers from ``offer-matches`` once after gaining them."""
        if self.restored or not self.owned:
            return
        s = self.settings
        reader = StateReader(s)
        loop = asyncio.get_running_loop()
        matches, prices = await asyncio.gather(loop.run_in_executor(None, reader.read, s.topic_offer_matches),
                                               loop.run_in_executor(None, reader.read, s.topic_competitor_prices))
        self.matcher = self.new_matcher()
        offers: list[Offer] = []
        for key, value in matches.items():
            self.on_topics[(s.topic_offer_matches, key)] = _content(value)
            if value is None:
                continue
            try:
                offers.append(offer_from_wire(value["offer"]))
                self.offers.seed_version(key, int(value.get("version", 0)))
            except (SimstreamError, KeyError, TypeError, ValueError) as exc:
                log.error("ignoring the unreadable %s record of %s: %s", s.topic_offer_matches, key, exc)
        for pid, value in prices.items():
            self.on_topics[(s.topic_competitor_prices, pid)] = _content(value)
            if value is not None and isinstance(value.get("version"), int):
                self.offers.seed_price_version(pid, value["version"])
        engine = self.live
        poison: dict[str, str] = {}
        vectors = await engine.embed_chunk_or_one_by_one(list(dict.fromkeys(o.text for o in offers)), poison)
        for o in offers:
            if o.text in poison:
                log.error("not restoring offer %s: %s", o.key, poison[o.text])
        self.model_version = engine.model_version
        update = await engine.in_core(self.offers.apply, engine.core,
                                      [(o, vectors[o.text]) for o in offers if o.text in vectors])
        records = self.records(update)
        # A price list on the topic that no restored offer is matched to any more: a tombstone.
        for (topic, key), content in self.on_topics.items():
            if topic == s.topic_competitor_prices and content is not None:
                records.append(Outbound(topic, key, None))
        self.on_topics.clear()
        await self.send(records)
        self.restored = True
        log.info("restored %d competitor offers from %s (%d records republished)", len(offers),
                 s.topic_offer_matches, len(records))

    # ------------------------------------------------------------------ the agent

    def decode(self, message: Inbound) -> OfferChange:
        """One ``competitor-offers`` record as a core change; raises ``DecodeError``."""
        if message.value is None:
            raise DecodeError('null value; a withdrawn offer is {"op": "delete", "competitor": ..., "offer_id": ...}')
        record = decode_competitor_offer(message.value, kafka_ts=message.timestamp,
                                         max_bytes=self.settings.max_message_bytes, now=self.clock())
        change = record.to_core()
        if message.key is not None and message.key.decode("utf-8", errors="replace") != change.key:
            raise DecodeError(f"record key {message.key[:60]!r} differs from {change.key!r}; key offers by "
                              "competitor|offer_id")
        return change

    async def on_batch(self, batch: list[Inbound]) -> None:
        """A batch of ``competitor-offers``: decode, embed, match, publish, acknowledge.

        The texts are embedded before the batch lock is taken, so an encoder outage holds this
        agent only, never the product changes (whose own outage handling defers them); a text
        the encoder refuses fails only its offer (a dead letter with the reason).
        """
        engine = self.live
        dead: list[Outbound] = []
        decoded: list[tuple[Inbound, OfferChange]] = []
        for message in batch:
            try:
                decoded.append((message, self.decode(message)))
            except Exception as exc:  # noqa: BLE001 - every failure must become a dead letter
                dead.append(self.reject(message, exc))
        poison: dict[str, str] = {}
        version = engine.model_version
        vectors = await engine.embed_chunk_or_one_by_one(self.texts_to_embed(decoded), poison)
        async with self.lock:
            await self.ensure_restored()
            await self.follow()
            if engine.model_version != version:  # a rollover meanwhile: these vectors are the old model's
                vectors = {}
            missing = [t for t in self.texts_to_embed(decoded) if t not in vectors and t not in poison]
            if missing:
                vectors.update(await engine.embed_chunk_or_one_by_one(missing, poison))
            update, failed = await engine.in_core(self.apply_each, decoded, vectors, poison)
            dead += [self.reject(message, exc) for message, exc in failed]
            await self.send(dead + self.records(update))
            for message in batch:
                if message.ack is not None:
                    await message.ack()

    def texts_to_embed(self, decoded: Sequence[tuple[Inbound, OfferChange]]) -> list[str]:
        """The distinct texts of the new or changed offers of a batch."""
        return list(dict.fromkeys(c.text for _, c in decoded if isinstance(c, Offer) and self.offers.needs_embedding(c)))

    def apply_each(self, decoded: Sequence[tuple[Inbound, OfferChange]], vectors: Mapping[str, np.ndarray],
                   poison: Mapping[str, str]) -> tuple[OfferUpdate, list[tuple[Inbound, Exception]]]:
        """On the core thread: apply the offers one by one, so one failure fails only its record."""
        core = self.live.core
        total = OfferUpdate()
        failed: list[tuple[Inbound, Exception]] = []
        for message, change in decoded:
            vector = vectors.get(change.text) if isinstance(change, Offer) else None
            if isinstance(change, Offer) and change.text in poison and self.offers.needs_embedding(change):
                reason = poison[change.text].split(": ", 1)[-1]
                failed.append((message, InvalidInput(f"the encoder refused this offer's text: {reason}")))
                continue
            try:
                update = self.offers.apply(core, [(change, vector)])
            except Exception as exc:  # noqa: BLE001 - one bad offer must not stop the others
                failed.append((message, exc))
                continue
            outcome = "stale" if update.stale else "applied"
            self.metrics.events.labels(message.topic, outcome).inc()
            total.matches += update.matches
            total.prices += update.prices
        return total, failed

    # ------------------------------------------------------------------ own products and timers

    async def on_products_changed(self, changed: set[str]) -> list[Outbound]:
        """``Engine.on_changed``: the records of the offers these product changes re-match."""
        engine = self.live
        if not self.owned or not self.restored or not len(self.offers) or self.model_version != engine.model_version:
            return []  # nothing held here, or the tick re-embeds them first
        update = await engine.in_core(self.offers.on_products_changed, engine.core, changed)
        return self.records(update)

    async def follow_model(self) -> None:
        """With the lock held: after a model rollover, re-embed every offer with the live model;
        after an IDF refit or a rebuilt core, re-match them all."""
        engine = self.live
        if self.model_version != engine.model_version:
            offers = dict(self.offers.offers)
            poison: dict[str, str] = {}
            vectors = await engine.embed_chunk_or_one_by_one(list(dict.fromkeys(o.text for o in offers.values())),
                                                             poison)
            if poison:
                # The offers keep the old model's vectors and re-matching waits (on_products_changed
                # is off while the versions differ): this is retried at every tick, and said once.
                text, reason = next(iter(poison.items()))
                raise SimstreamError(f"model {engine.model_version} refused {len(poison)} offer texts (e.g. "
                                     f"{text[:60]!r}: {reason}); the offers stay on {self.model_version}")
            update = await engine.in_core(self.offers.use_vectors, engine.core,
                                          {k: vectors[o.text] for k, o in offers.items()})
            self.model_version = engine.model_version
            log.info("%d competitor offers re-embedded with model %s", len(offers), self.model_version)
        else:
            update = await engine.in_core(self.offers.sync, engine.core)
        await self.send(self.records(update))

    async def tick(self) -> None:
        """Timer: restore after gaining the offers, and follow refits and rollovers, between batches."""
        if not self.owned or not self.ready.is_set() or self.lock.locked():
            return
        async with self.lock:
            await self.ensure_restored()
            await self.follow()

    async def follow(self) -> None:
        """``follow_model``, reporting a failure once rather than ending the agent or the timer."""
        try:
            await self.follow_model()
        except SimstreamError as exc:
            if str(exc) != self.follow_error:
                log.error("competitor offers: %s", exc)
            self.follow_error = str(exc)
        else:
            self.follow_error = None

    # ------------------------------------------------------------------ records and reads

    def records(self, update: OfferUpdate) -> list[Outbound]:
        """Wire records of an update: offer matches, then price lists; a value the topic holds
        already (restored, unchanged) is not sent again."""
        s = self.settings
        now = iso(self.clock())
        engine = self.live
        out: list[Outbound] = []
        threshold = self.offers.calibration.threshold
        for pub in update.matches:
            value = None if pub.match is None else match_to_wire(pub.match, threshold=threshold)
            out += self.unless_on_topic(s.topic_offer_matches, pub.key, value, pub.version, now, engine.model_version)
        for pp in update.prices:
            out += self.unless_on_topic(s.topic_competitor_prices, pp.product_id, prices_to_wire(pp), pp.version, now, None)
        return out

    def unless_on_topic(self, topic: str, key: str, value: dict[str, Any] | None, version: int, now: str,
                        model_version: str | None) -> list[Outbound]:
        """The record of ``value`` (stamped with its version, time and model), or none when
        ``topic`` already holds the same content for ``key`` (restored, unchanged)."""
        known = self.on_topics.pop((topic, key), ...)
        if known is not ... and known == _content(value):
            return []
        if value is not None:
            value["version"] = version
            value["updated_at"] = now
            if model_version is not None:
                value["model_version"] = model_version
        return [Outbound(topic, key, value)]

    async def send(self, records: list[Outbound]) -> None:
        if records and self.publish is not None:
            await self.publish(records)

    async def product_offers(self, product_id: str) -> dict[str, Any] | None:
        """``GET /products/{id}/offers``: the product's matched competitor offers, as on
        ``competitor-prices`` (``None`` for an unknown product)."""
        matcher = self.offers

        def read(core: Any) -> dict[str, Any] | None:
            product = core.catalog.get(product_id)
            if product is None:
                return None
            offers = matcher.offers_of(product_id)
            return {"product_id": product_id, "title": product.title, "price": product.price,
                    "currency": product.currency, "offers": [offer_entry(m) for m in offers],
                    "version": matcher.price_versions.get(product_id, 0) if offers else 0,
                    "offers_held_here": self.owned, "threshold": matcher.calibration.threshold}

        return await self.live.read(read)


def register_offer_views(app: faust.App, offers: OfferStream, authorized: Callable[[Any], bool],
                         valid_id: Callable[[str], bool]) -> None:
    """``GET /products/{product_id}/offers`` (token-guarded like the read API)."""
    from faust.web import Request, Response, View

    @app.page("/products/{product_id}/offers")
    class ProductOffers(View):
        """The competitors' offers matched to one own product, with their prices and gaps."""

        async def get(self, request: Request, product_id: str) -> Response:
            if not authorized(request):
                return self.json({"error": "missing or wrong bearer token"}, status=401)
            if not valid_id(product_id):
                return self.json({"error": "invalid product id"}, status=400)
            body = await offers.product_offers(product_id)
            if body is None:
                return self.json({"error": f"unknown product {product_id!r}"}, status=404)
            return self.json(body)
