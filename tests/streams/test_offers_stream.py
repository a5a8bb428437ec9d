"""Competitor offers in the stream without Kafka: the decoder, the offer agent's batch (dead
letters, matches, price lists), the re-match an own product's change triggers through the
engine, a model rollover, the restore from the topics' values, and the read view."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from encoders.hashing import HashingEncoder
from serving.offers import Offer, OfferDelete
from streams.engine import Engine
from streams.offers import OfferStream, match_to_wire, offer_from_wire, offer_to_wire
from streams.outputs import Inbound, Outbound
from streams.records import DecodeError, decode_competitor_offer
from tests.streams.test_engine import NOW, make_pipeline, upsert

OFFERS = "competitor-offers"


class Sent:
    """A fake ``Send``: every record, in order."""

    def __init__(self) -> None:
        self.records: list[Outbound] = []

    async def __call__(self, records: Sequence[Outbound], /) -> None:
        self.records += records

    def on(self, topic: str) -> dict[str, Any]:
        """The last value per key of ``topic`` (what a compacted topic holds)."""
        return {r.key: r.value for r in self.records if r.topic == topic}


def offer(competitor: str, offer_id: str, title: str, ts: float = NOW - 50, *, key: str | None = None,
          offset: int = 0, **fields: Any) -> Inbound:
    value = {"op": "upsert", "competitor": competitor, "offer_id": offer_id, "title": title, "ts": ts, **fields}
    return Inbound(OFFERS, 0, offset, (key or f"{competitor}|{offer_id}").encode(), json.dumps(value).encode(),
                   timestamp=NOW - 10)


def raw_offer(raw: bytes, key: str = "x|1", offset: int = 9) -> Inbound:
    return Inbound(OFFERS, 0, offset, key.encode(), raw, timestamp=NOW - 10)


async def shop(sent: Sent) -> tuple[Engine, OfferStream]:
    engine = make_pipeline()
    engine.send = sent
    stream = OfferStream(engine.settings, engine.metrics, clock=lambda: NOW, engine=engine, publish=sent)
    engine.on_changed = stream.on_products_changed
    stream.on_assigned(frozenset({0}))
    stream.restored = True  # nothing on the topics to restore here
    stream.model_version = engine.model_version
    await engine.handle([
        upsert("H1", NOW - 100, title="Sony WH-1000XM4 wireless headphones", brand="Sony", price=278.0, currency="USD"),
        upsert("K1", NOW - 100, title="Logitech MX Keys wireless keyboard", brand="Logitech", price=99.0),
    ])
    return engine, stream


async def test_offers_are_matched_published_and_bad_ones_dead_lettered() -> None:
    sent = Sent()
    engine, stream = await shop(sent)
    sent.records.clear()
    acked: list[int] = []

    def acking(message: Inbound) -> Inbound:
        async def ack() -> None:
            acked.append(message.offset)
        return Inbound(message.topic, message.partition, message.offset, message.key, message.value,
                       message.timestamp, ack=ack)

    batch = [offer("rival", "1", "Sony WH-1000XM4 wireless headphones", brand="Sony", price=250.0, currency="USD",
                   url="https://rival.example/1", offset=1),
             raw_offer(b"{not json", offset=2),
             offer("rival", "2", "Sony headphones", price=-5, offset=3),
             offer("rival", "3", "Sony headphones", key="rival|other", offset=4)]
    await stream.on_batch([acking(m) for m in batch])
    assert sorted(acked) == [1, 2, 3, 4]
    dead = [r.value for r in sent.records if r.topic == engine.settings.topic_dead_letters]
    assert [d["offset"] for d in dead if d] == [2, 3, 4]
    errors = [d["error"] for d in dead if d]
    assert errors[0].startswith("malformed JSON") and "outside the allowed range" in errors[1]
    assert "differs from 'rival|3'" in errors[2]
    match = sent.on(engine.settings.topic_offer_matches)["rival|1"]
    assert match["product_id"] == "H1" and match["no_match"] is False and match["version"] == 1
    assert match["price_gap"] == {"amount": -28.0, "percent": -10.1, "currency": "USD"}
    assert match["offer"]["url"] == "https://rival.example/1" and match["model_version"] == "hashing/1"
    prices = sent.on(engine.settings.topic_competitor_prices)["H1"]
    assert prices["price"] == 278.0 and [o["offer_id"] for o in prices["offers"]] == ["1"]
    view = await stream.product_offers("H1")
    assert view is not None and view["offers"] == prices["offers"] and view["version"] == prices["version"]
    assert await stream.product_offers("nope") is None

    # An own product's change re-matches through the engine's hook, with the lists of its batch.
    sent.records.clear()
    await engine.handle([upsert("H1", NOW - 40, price=300.0)])
    again = sent.on(engine.settings.topic_offer_matches)["rival|1"]
    assert again["version"] == 2 and again["price_gap"]["amount"] == -50.0
    assert sent.on(engine.settings.topic_competitor_prices)["H1"]["price"] == 300.0
    # Deleted: the offer falls to the next best product or no match; H1's price list is a tombstone.
    sent.records.clear()
    await engine.handle([upsert("H1", NOW - 30, op="delete")])
    after = sent.on(engine.settings.topic_offer_matches)["rival|1"]
    assert after["product_id"] != "H1" and after["version"] == 3
    assert sent.on(engine.settings.topic_competitor_prices)["H1"] is None


async def test_a_withdrawn_offer_is_a_tombstone_and_a_stale_one_is_ignored() -> None:
    sent = Sent()
    engine, stream = await shop(sent)
    await stream.on_batch([offer("rival", "1", "Logitech MX Keys keyboard", ts=NOW - 50)])
    await stream.on_batch([offer("rival", "1", "Sony headphones", ts=NOW - 60)])  # older: ignored
    assert stream.offers.stale_events == 1
    delete = {"op": "delete", "competitor": "rival", "offer_id": "1", "ts": NOW - 20}
    await stream.on_batch([raw_offer(json.dumps(delete).encode(), key="rival|1")])
    assert sent.on(engine.settings.topic_offer_matches)["rival|1"] is None
    assert sent.on(engine.settings.topic_competitor_prices)["K1"] is None


async def test_a_rollover_re_embeds_the_offers_and_a_restore_republishes_only_changes() -> None:
    sent = Sent()
    engine, stream = await shop(sent)
    await stream.on_batch([offer("rival", "1", "Sony WH-1000XM4 wireless headphones", price=250.0)])
    topic = engine.settings.topic_offer_matches
    before = sent.on(topic)["rival|1"]
    engine.encoder = HashingEncoder(version="hashing/2")
    sent.records.clear()
    assert await stream.on_products_changed({"H1"}) == []  # held back until the offers are re-embedded
    await stream.follow_model()
    assert stream.model_version == "hashing/2"
    # Re-embedded and re-matched; the hashing "models" embed alike, so no match moved: nothing is sent.
    assert sent.on(topic) == {}
    assert await stream.on_products_changed({"H1"}) == []  # the hook runs again (and nothing moves)

    # What a restore compares: a value the topic holds already is not sent again; the next one is.
    stream.on_topics[(topic, "rival|1")] = {k: v for k, v in before.items()
                                            if k not in ("version", "updated_at", "model_version")}
    match = stream.offers.matches["rival|1"]
    assert stream.unless_on_topic(topic, "rival|1", match_to_wire(match, threshold=stream.offers.calibration.threshold), 9, "t", None) == []
    assert stream.unless_on_topic(topic, "rival|1", match_to_wire(match, threshold=stream.offers.calibration.threshold), 9, "t", None) != []


class RefusingEncoder(HashingEncoder):
    """Refuses any batch that holds a text with "poison" in it."""

    async def encode(self, texts: Any) -> Any:
        if any("poison" in t for t in texts):
            raise ValueError("token limit exceeded")
        return await super().encode(texts)


async def test_an_offer_text_the_encoder_refuses_fails_only_that_offer() -> None:
    sent = Sent()
    engine, stream = await shop(sent)
    engine.encoder = RefusingEncoder()
    stream.model_version = engine.model_version
    await stream.on_batch([offer("rival", "1", "Sony WH-1000XM4 wireless headphones", offset=1),
                           offer("rival", "2", "poison pill", offset=2)])
    assert sent.on(engine.settings.topic_offer_matches)["rival|1"]["product_id"] == "H1"
    dead = [r.value for r in sent.records if r.topic == engine.settings.topic_dead_letters and r.value]
    assert [d["offset"] for d in dead] == [2]
    assert dead[0]["error"] == "the encoder refused this offer's text: token limit exceeded"


async def test_a_new_model_that_refuses_an_offer_text_keeps_the_offers_on_the_old_one() -> None:
    sent = Sent()
    engine, stream = await shop(sent)
    await stream.on_batch([offer("rival", "1", "poison Sony headphones")])
    engine.encoder = RefusingEncoder(version="hashing/2")
    await stream.tick()  # not ready: nothing happens
    stream.ready.set()
    await stream.tick()
    assert stream.model_version == "hashing/1" and "refused 1 offer texts" in (stream.follow_error or "")
    assert await stream.on_products_changed({"H1"}) == []  # re-matching waits for the re-embedding


def test_the_offer_decoder_is_strict() -> None:
    good = decode_competitor_offer(json.dumps({"op": "upsert", "competitor": "rival", "offer_id": "A|1",
                                               "title": " Sony XM4 ", "price": 12, "currency": "EUR",
                                               "ts": "2026-11-01T00:00:00Z"}), now=NOW)
    assert good.to_core() == Offer("rival", "A|1", "Sony XM4", good.ts, price=12.0, currency="EUR")
    gone = decode_competitor_offer(json.dumps({"op": "delete", "competitor": "rival", "offer_id": "1"}),
                                   kafka_ts=NOW - 5, now=NOW)
    assert gone.to_core() == OfferDelete("rival", "1", NOW - 5)
    base = {"op": "upsert", "competitor": "rival", "offer_id": "1", "title": "x", "ts": NOW - 5}
    for change, reason in (({"op": "replace"}, "unknown op"), ({"competitor": None}, "missing required field 'competitor'"),
                           ({"competitor": "a|b"}, "may not contain '|'"), ({"title": None}, "missing required field 'title'"),
                           ({"title": "  "}, "blank"), ({"price": 0}, "outside the allowed range"),
                           ({"price": 2e9}, "outside the allowed range"), ({"price": "12"}, "must be a number"),
                           ({"currency": "usd"}, "ISO-4217"), ({"url": 5}, "must be a string"),
                           ({"ts": NOW + 90_000}, "future")):
        with pytest.raises(DecodeError, match=reason):
            decode_competitor_offer(json.dumps({**base, **change}), now=NOW)


def test_an_offer_round_trips_through_its_wire_shape() -> None:
    o = Offer("rival", "1", "Sony XM4", 1_700_000_000.0, brand="Sony", price=9.5, currency="USD", url="https://x")
    assert offer_from_wire(offer_to_wire(o)) == o
