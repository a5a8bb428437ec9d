"""The engine, list-in list-out: consumed records become embeddings, catalog state, lists or dead letters.

The deterministic encoder and the exact index stand in for MiniLM and HNSW; the Kafka and
TF Serving paths are covered by the integration tests.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from encoders.hashing import HashingEncoder
from serving.config import RecommenderConfig
from serving.index import ExactIndex
from serving.lexical import LexicalModel
from serving.recommender import Kind, Recommender
from streams.engine import Engine, bulk_catch_up_due
from streams.metrics import Metrics
from streams.outputs import Inbound, Outbound
from streams.settings import Settings
from streams.wire import embedding_from_wire, lexical_from_wire

NOW = 1_795_000_000.0


class CountingEncoder(HashingEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    async def encode(self, texts: Any) -> Any:
        self.calls.append(list(texts))
        return await super().encode(texts)


def make_pipeline(encoder: HashingEncoder | None = None) -> Engine:
    config = RecommenderConfig(k=3, candidate_depth=5)
    return Engine(Settings(), Metrics(), clock=lambda: NOW,
                  recommender=Recommender(config, ExactIndex(config.dim)),
                  encoder=encoder or CountingEncoder())


async def handled(engine: Engine, batch: list[Inbound]) -> list[Outbound]:
    """Every record one batch produced (the engine has no Send here: nothing leaves)."""
    return (await engine.handle(batch)).records()


@pytest.fixture
def pipeline() -> Engine:
    return make_pipeline()


def message(value: Any, *, key: str | None = "B1", offset: int = 0, topic: str = "product-changes") -> Inbound:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return Inbound(topic, 0, offset, key.encode() if key else None, raw, timestamp=NOW - 10)


def upsert(pid: str, ts: float, **fields: Any) -> Inbound:
    return message({"op": "upsert", "product_id": pid, "ts": ts, **fields}, key=pid)


def by_topic(out: list[Outbound]) -> dict[str, list[Outbound]]:
    grouped: dict[str, list[Outbound]] = {}
    for record in out:
        grouped.setdefault(record.topic, []).append(record)
    return grouped


CATALOG = [
    ("H1", "Sony WH-1000XM4 wireless noise cancelling headphones", "Sony", 278.0),
    ("H2", "Sony WH-1000XM5 wireless noise cancelling headphones", "Sony", 329.0),
    ("H3", "Bose QuietComfort 45 wireless noise cancelling headphones", "Bose", 299.0),
    ("K1", "Logitech MX Keys wireless keyboard", "Logitech", 99.0),
    ("K2", "Logitech K380 bluetooth keyboard", "Logitech", 39.0),
]


async def load(pipeline: Engine) -> list[Outbound]:
    return await handled(pipeline, [
        upsert(pid, NOW - 100, title=title, brand=brand, price=price, category=["Audio" if pid[0] == "H" else "Keys"])
        for pid, title, brand, price in CATALOG
    ])


async def test_a_batch_is_embedded_in_one_call_and_every_list_is_published(pipeline: Engine) -> None:
    out = by_topic(await load(pipeline))
    assert isinstance(pipeline.encoder, CountingEncoder) and len(pipeline.encoder.calls) == 1
    assert len(pipeline.encoder.calls[0]) == 5
    assert {r.key for r in out["simstream-embeddings"]} == {pid for pid, *_ in CATALOG}
    assert {r.key for r in out["simstream-products"]} == {pid for pid, *_ in CATALOG}
    similar = {r.key: r.value for r in out["similar-items"]}
    assert set(similar) == {pid for pid, *_ in CATALOG}
    first = similar["H1"]
    assert first is not None and first["items"][0]["product_id"] == "H2"
    assert first["model_version"] == "hashing/1" and first["updated_at"] == "2026-11-18T11:06:40.000Z"
    assert first["caused_by"]["event_ts"] == "2026-11-18T11:05:00.000Z"
    assert first["caused_by"]["product_id"] in {pid for pid, *_ in CATALOG}
    assert {"score", "content", "dense", "lexical", "behavior", "reasons"} <= set(first["items"][0])
    stored = embedding_from_wire(out["simstream-embeddings"][0].value or {})
    assert stored.vector.shape == (384,) and stored.model_version == "hashing/1"


async def test_price_and_stock_changes_never_reach_the_encoder(pipeline: Engine) -> None:
    await load(pipeline)
    assert isinstance(pipeline.encoder, CountingEncoder)
    calls = len(pipeline.encoder.calls)
    out = by_topic(await handled(pipeline, [upsert("H2", NOW - 50, price=270.0, in_stock=False)]))
    assert len(pipeline.encoder.calls) == calls
    assert "simstream-embeddings" not in out
    subs = [r for r in out["substitutes"] if r.key == "H2"]
    assert subs and subs[0].value is not None and subs[0].value["trigger"] == "out_of_stock"
    assert subs[0].event_ts == NOW - 50
    assert all(i["product_id"] != "H2" for r in out["substitutes"] if r.value for i in r.value["items"])


async def test_a_title_edit_is_re_embedded_and_republished(pipeline: Engine) -> None:
    await load(pipeline)
    out = by_topic(await handled(pipeline, [upsert("K2", NOW - 50, title="Logitech K380 multi-device keyboard")]))
    assert [r.key for r in out["simstream-embeddings"]] == ["K2"]
    assert any(r.key == "K2" for r in out["similar-items"])


async def test_a_delete_tombstones_its_lists_and_leaves_no_trace(pipeline: Engine) -> None:
    await load(pipeline)
    out = await handled(pipeline, [message({"op": "delete", "product_id": "H2", "ts": NOW - 50}, key="H2")])
    tombstones = {(r.topic, r.key) for r in out if r.value is None}
    assert {("similar-items", "H2"), ("substitutes", "H2"), ("simstream-products", "H2"),
            ("simstream-embeddings", "H2")} <= tombstones
    for kind in (Kind.SIMILAR, Kind.SUBSTITUTES):
        for items in pipeline.core.lists(kind).values():
            assert all(i.product_id != "H2" for i in items)


async def test_two_edits_of_one_product_in_one_batch_are_applied_in_order(pipeline: Engine) -> None:
    await load(pipeline)
    await handled(pipeline, [upsert("K1", NOW - 50, title="Logitech MX Keys S"),
                                 upsert("K1", NOW - 40, brand="Logi")])
    product = pipeline.core.catalog.get("K1")
    assert product is not None and (product.title, product.brand) == ("Logitech MX Keys S", "Logi")
    known = pipeline.embeddings.get("K1")
    assert known is not None and known.content_hash == product.content_hash


async def test_an_older_event_is_ignored_and_counted(pipeline: Engine) -> None:
    await load(pipeline)
    out = await handled(pipeline, [upsert("H1", NOW - 1000, price=1.0)])
    assert out == []
    assert pipeline.core.catalog.stale_events == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{oops", "malformed JSON"),
        ([1], "must be a JSON object"),
        ({"op": "upsert", "title": "x", "ts": NOW}, "missing required field 'product_id'"),
        ({"op": "upsert", "product_id": "B1", "title": 7, "ts": NOW}, "'title' must be a string"),
        ({"op": "explode", "product_id": "B1", "ts": NOW}, "unknown op"),
        ({"op": "upsert", "product_id": "B1", "title": "x", "price": -3, "ts": NOW}, "outside the allowed range"),
        ({"op": "upsert", "product_id": "B1", "title": "x" * 5_000_000, "ts": NOW}, "over the 1,000,000-byte limit"),
        ({"op": "upsert", "product_id": "B1", "price": 3.0, "ts": NOW}, "is new, so its upsert needs a non-empty 'title'"),
    ],
)
async def test_bad_input_becomes_one_dead_letter_and_the_rest_of_the_batch_goes_on(
    pipeline: Engine, value: Any, reason: str
) -> None:
    out = await handled(pipeline, [message(value, offset=17), upsert("OK", NOW, title="fine product")])
    letters = [r for r in out if r.topic == "simstream-dead-letters"]
    assert len(letters) == 1
    letter = letters[0].value
    assert letter is not None and reason in letter["error"]
    assert (letter["source_topic"], letter["partition"], letter["offset"], letter["key"]) == (
        "product-changes", 0, 17, "B1")
    assert pipeline.core.catalog.get("OK") is not None and pipeline.core.catalog.get("B1") is None


async def test_a_key_that_is_not_the_product_id_is_refused(pipeline: Engine) -> None:
    out = await handled(pipeline, [message({"op": "upsert", "product_id": "B1", "title": "x", "ts": NOW}, key="B2")])
    assert out[0].topic == "simstream-dead-letters" and "differs from product_id" in (out[0].value or {})["error"]


async def test_restore_reuses_stored_vectors_and_republishes_only_what_differs(pipeline: Engine) -> None:
    out = await load(pipeline)
    latest: dict[str, dict[str, Any]] = {}
    for record in out:
        if record.value is not None:
            latest.setdefault(record.topic, {})[record.key] = record.value
    # A list that never reached the topic (say, a crash before the send) must be republished.
    del latest["similar-items"]["K2"]

    encoder = CountingEncoder()
    fresh = make_pipeline(encoder)
    records = (await fresh.restore(latest["simstream-products"], latest["simstream-embeddings"],
                                  {Kind.SIMILAR: latest["similar-items"], Kind.SUBSTITUTES: latest["substitutes"],
                                   Kind.DUPLICATES: latest["duplicates"]})
               ).records()
    assert encoder.calls == []  # nothing embedded again
    assert len(fresh.core.catalog) == 5
    republished = {(r.topic, r.key) for r in records}
    assert ("similar-items", "K2") in republished
    # The IDF is refitted on the restored catalog, so lists may move; whatever is republished
    # carries a version above the one on the topic.
    for r in records:
        if r.value is not None and r.key in latest.get(r.topic, {}):
            assert r.value["version"] > latest[r.topic][r.key]["version"]


async def test_restore_from_a_snapshot_replays_only_what_came_after(pipeline: Engine, tmp_path: Any) -> None:
    await load(pipeline)
    pipeline.core.save(tmp_path)
    after = await handled(pipeline, [
        upsert("K2", NOW - 50, title="Logitech K380 multi-device keyboard"),
        message({"op": "delete", "product_id": "H3", "ts": NOW - 40}, key="H3"),
    ])
    changes: dict[str, dict[str, Any]] = {}
    for record in after:
        if record.topic in ("simstream-products", "simstream-embeddings"):
            changes.setdefault(record.topic, {})[record.key] = record.value  # type: ignore[assignment]

    encoder = CountingEncoder()
    fresh = make_pipeline(encoder)
    fresh.recommender = Recommender.load(tmp_path, pipeline.core.config)
    records = (await fresh.restore(changes["simstream-products"], changes["simstream-embeddings"], None,
                                  from_snapshot=True)).records()
    assert encoder.calls == []  # the edit's vector came from the embeddings topic, the rest from the snapshot
    assert fresh.core.catalog.get("H3") is None
    k2 = fresh.core.catalog.get("K2")
    assert k2 is not None and k2.title == "Logitech K380 multi-device keyboard"
    # The streamed catalog never had an IDF fitted; the restore shares that (it fits none).
    assert [r.key for r in records if r.topic == "simstream-lexical"] == ["idf"]
    pipeline.core.use_lexical(fresh.core.lexical)
    for kind in (Kind.SIMILAR, Kind.SUBSTITUTES):
        assert fresh.core.lists(kind) == pipeline.core.lists(kind)
    assert any(r.topic == "similar-items" and r.key == "H3" and r.value is None for r in records)


async def test_the_engine_keeps_no_second_copy_of_the_vectors_the_core_holds(pipeline: Engine) -> None:
    """Each product's embedding is known by model version and content hash; its vector is
    the core's own. A redelivered text change reuses that vector, bit for bit, and embeds
    nothing."""
    out = by_topic(await load(pipeline))
    assert len(pipeline.embeddings) == 5 and pipeline.embeddings.held_count() == 0
    assert isinstance(pipeline.encoder, CountingEncoder)
    calls = len(pipeline.encoder.calls)
    first = {r.key: embedding_from_wire(r.value or {}) for r in out["simstream-embeddings"]}
    redelivered = await handled(pipeline, [upsert("K1", NOW - 100, title=CATALOG[3][1], brand="Logitech",
                                                  price=99.0, category=["Keys"])])
    assert len(pipeline.encoder.calls) == calls
    assert all(r.topic != "simstream-embeddings" for r in redelivered)
    product = pipeline.core.catalog.get("K1")
    assert product is not None
    cached = await pipeline.in_core(pipeline.cached_vector, product)
    assert cached is not None and cached.tobytes() == first["K1"].vector.tobytes()
    assert [e.vector.tobytes() for e in await pipeline.in_core(pipeline.stored_embeddings, ["K1", "gone"])] \
        == [first["K1"].vector.tobytes()]


async def test_a_restore_holds_vectors_only_until_their_products_are_applied(pipeline: Engine, tmp_path: Any) -> None:
    await load(pipeline)
    pipeline.core.save(tmp_path)
    after = await handled(pipeline, [upsert("K2", NOW - 50, title="Logitech K380 multi-device keyboard")])
    latest = state_of(after)
    # The snapshot's own product comes back too (a replay from before the snapshot's offsets).
    h1 = pipeline.core.catalog.get("H1")
    assert h1 is not None
    embedded = await pipeline.in_core(pipeline.stored_embeddings, ["H1"])
    from streams.records import product_to_wire
    from streams.wire import embedding_to_wire

    latest["simstream-products"]["H1"] = product_to_wire(h1)
    latest["simstream-embeddings"]["H1"] = embedding_to_wire(embedded[0])

    fresh = make_pipeline(CountingEncoder())
    fresh.recommender = Recommender.load(tmp_path, pipeline.core.config)
    await fresh.restore(latest["simstream-products"], latest["simstream-embeddings"], None, from_snapshot=True)
    assert len(fresh.embeddings) == 5 and fresh.embeddings.held_count() == 0
    for pid in ("H1", "K2"):
        known = fresh.embeddings.get(pid)
        product = fresh.core.catalog.get(pid)
        assert known is not None and product is not None and known.content_hash == product.content_hash


def state_of(records: list[Outbound]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.value is not None:
            latest.setdefault(record.topic, {})[record.key] = record.value
    return latest


async def test_a_restore_adopts_the_shared_idf_instead_of_fitting_its_own(pipeline: Engine) -> None:
    latest = state_of(await load(pipeline))
    shared = LexicalModel.fit(f"a catalog this worker never saw, item {i}" for i in range(10))
    fresh = make_pipeline()
    records = (await fresh.restore(latest["simstream-products"], latest["simstream-embeddings"], {},
                                  lexical=shared)).records()
    assert fresh.core.lexical is shared  # fitted on 10 docs, the catalog has 5: still current
    assert not [r for r in records if r.topic == "simstream-lexical"]


async def test_a_restore_without_a_shared_idf_shares_the_one_it_has_and_fits_none(pipeline: Engine) -> None:
    # A restart must publish nothing new: it never refits (a refit moves every list). With no
    # IDF shared yet, it shares the weights it scores with (here: none fitted yet).
    latest = state_of(await load(pipeline))
    fresh = make_pipeline()
    records = (await fresh.restore(latest["simstream-products"], latest["simstream-embeddings"], {})).records()
    shared = [r for r in records if r.topic == "simstream-lexical"]
    assert [r.key for r in shared] == ["idf"]
    assert not fresh.core.lexical.fitted and fresh.core.lexical.same_as(pipeline.core.lexical)
    assert lexical_from_wire(shared[0].value).same_as(fresh.core.lexical)  # type: ignore[arg-type]


async def test_a_stale_shared_idf_is_adopted_at_a_restore_and_refitted_in_the_stream(pipeline: Engine) -> None:
    latest = state_of(await load(pipeline))
    stale = LexicalModel.fit(["one product", "another product"])  # 2 docs, the catalog has 5
    fresh = make_pipeline()
    records = (await fresh.restore(latest["simstream-products"], latest["simstream-embeddings"], {}, lexical=stale)).records()
    assert fresh.core.lexical is stale and not [r for r in records if r.topic == "simstream-lexical"]
    refit = await fresh.refit_lexical()
    assert fresh.core.lexical.n_docs == 5
    assert [r.key for r in refit.state] == ["idf"] and refit.lists


class FlakyEncoder(HashingEncoder):
    """Unavailable for the first ``failures`` calls, like a TF Serving restart."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def encode(self, texts: Any) -> Any:
        from serving.errors import EncoderUnavailable

        if self.failures:
            self.failures -= 1
            raise EncoderUnavailable("connection refused")
        return await super().encode(texts)


async def test_an_encoder_outage_defers_the_batch_and_loses_nothing() -> None:
    encoder = FlakyEncoder(failures=2)
    pipeline = make_pipeline(encoder)
    pipeline.encoder_ok = True
    out = await load(pipeline)
    assert not [r for r in out if r.topic == "simstream-dead-letters"]
    assert len(pipeline.pending) == len(CATALOG) and not pipeline.encoder_ok
    assert (await pipeline.apply_slow([])).done == []  # still down
    result = await pipeline.apply_slow([])
    assert len(result.done) == len(CATALOG) and pipeline.encoder_ok and not pipeline.pending
    assert len(pipeline.core.catalog) == len(CATALOG)
    assert pipeline.metrics.encoder_outages._value.get() == 2


class PickyEncoder(HashingEncoder):
    """Refuses any batch holding a poison text, as a server answering INVALID_ARGUMENT would."""

    async def encode(self, texts: Any) -> Any:
        from serving.errors import EncoderError

        if any("POISON" in t for t in texts):
            raise EncoderError("INVALID_ARGUMENT: the model refused the input")
        return await super().encode(texts)


async def test_a_text_the_encoder_refuses_dead_letters_only_its_event() -> None:
    pipeline = make_pipeline(PickyEncoder())
    out = await handled(pipeline, [upsert("A", NOW, title="good headphones"),
                                       upsert("B", NOW, title="POISON pill"),
                                       upsert("C", NOW, title="good keyboard")])
    letters = [r for r in out if r.topic == "simstream-dead-letters"]
    assert [letter.value["key"] for letter in letters if letter.value] == ["B"]
    assert "INVALID_ARGUMENT" in (letters[0].value or {})["error"]
    assert {p.product_id for p in pipeline.core.catalog} == {"A", "C"}


async def test_stock_changes_take_the_fast_lane_and_per_product_order_holds(pipeline: Engine) -> None:
    await load(pipeline)
    assert isinstance(pipeline.encoder, CountingEncoder)
    calls = len(pipeline.encoder.calls)
    lanes = pipeline.split([
        upsert("K1", NOW - 50, title="Logitech MX Keys S wireless keyboard"),
        upsert("H2", NOW - 49, in_stock=False),
        upsert("K1", NOW - 48, in_stock=False),
    ])
    assert [item.change.product_id for item in lanes.fast] == ["H2"]
    assert [item.change.product_id for item in lanes.slow] == ["K1", "K1"]
    fast = (await pipeline.apply(lanes.fast)).records()
    assert len(pipeline.encoder.calls) == calls  # published before any embedding
    assert any(r.topic == "substitutes" and r.key == "H2" and (r.value or {}).get("trigger") == "out_of_stock"
               for r in fast)
    await pipeline.apply_slow(lanes.slow)
    k1 = pipeline.core.catalog.get("K1")
    assert k1 is not None and k1.title == "Logitech MX Keys S wireless keyboard" and not k1.in_stock


async def test_an_outage_defers_text_changes_while_stock_changes_keep_flowing() -> None:
    encoder = FlakyEncoder(failures=0)
    pipeline = make_pipeline(encoder)
    await load(pipeline)
    encoder.failures = 1  # TF Serving goes away

    first = pipeline.split([upsert("K1", NOW - 50, title="Logitech MX Keys S"), upsert("H2", NOW - 49, in_stock=False)])
    fast = (await pipeline.apply(first.fast)).records()
    assert any(r.topic == "substitutes" and r.key == "H2" for r in fast)
    deferred = await pipeline.apply_slow(first.slow)
    assert deferred.records() == [] and deferred.done == []
    assert [item.change.product_id for item in pipeline.pending] == ["K1"] and not pipeline.encoder_ok

    # K1's later stock change queues behind its deferred title; H3's goes straight through.
    second = pipeline.split([upsert("K1", NOW - 40, in_stock=False), upsert("H3", NOW - 39, price=250.0)])
    assert [item.change.product_id for item in second.fast] == ["H3"]
    await pipeline.apply(second.fast)
    done = await pipeline.apply_slow(second.slow)  # the encoder is back
    assert [m.offset for m in done.done] == [0, 0] and pipeline.pending == [] and pipeline.encoder_ok
    k1 = pipeline.core.catalog.get("K1")
    assert k1 is not None and k1.title == "Logitech MX Keys S" and not k1.in_stock
    assert not [r for r in fast + done.records() if r.topic == "simstream-dead-letters"]


def hold_first_apply(engine: Engine, started: Any) -> list[bool]:
    """Hold the core on its first change until ``started`` (a ``threading.Event``) is set or 10 s
    pass; the list returned then says whether it was set while the core waited."""
    seen_while_applying: list[bool] = []
    apply = engine.core.apply

    def held_apply(*args: Any, **kwargs: Any) -> Any:
        if not seen_while_applying:
            seen_while_applying.append(started.wait(timeout=10))
        return apply(*args, **kwargs)

    engine.core.apply = held_apply  # type: ignore[method-assign]
    return seen_while_applying


async def test_a_big_batch_is_embedded_chunk_by_chunk_each_while_the_core_applies_the_previous() -> None:
    """The encoder embeds chunk k+1 while the core applies the changes of chunk k: the core,
    held on its first change until the second encoder call has started, sees it start."""
    import threading

    second_call = threading.Event()

    class Recording(CountingEncoder):
        async def encode(self, texts: Any) -> Any:
            if self.calls:
                second_call.set()
            return await super().encode(texts)

    encoder = Recording()
    config = RecommenderConfig(k=3, candidate_depth=5)
    engine = Engine(Settings(embed_batch_size=4), Metrics(), clock=lambda: NOW,
                    recommender=Recommender(config, ExactIndex(config.dim)), encoder=encoder)
    seen_while_applying = hold_first_apply(engine, second_call)
    batch = [upsert(f"P{i}", NOW - 100 + i, title=f"product number {i} cable") for i in range(10)]
    out = await engine.handle(batch)
    assert [len(call) for call in encoder.calls] == [4, 4, 2]
    assert encoder.calls[0] == [f"product number {i} cable" for i in range(4)], "in the order the changes need them"
    assert seen_while_applying == [True]
    assert len(engine.core.catalog) == 10 and len(out.done) == 10 and not out.dead_letters


async def test_the_slow_lanes_encoder_call_runs_while_the_fast_lane_is_applied(pipeline: Engine) -> None:
    """A batch's text edits are embedded while the core applies its stock and price changes,
    not after: the core, held on the fast lane's first change until the encoder call for the
    slow lane has started, sees it start; both lanes are then applied in full."""
    import threading

    await load(pipeline)
    encoder = pipeline.encoder
    assert isinstance(encoder, CountingEncoder)
    calls_before = len(encoder.calls)
    slow_call = threading.Event()

    class Signalling(CountingEncoder):
        async def encode(self, texts: Any) -> Any:
            slow_call.set()
            return await super().encode(texts)

    pipeline.encoder = Signalling()
    seen_while_applying = hold_first_apply(pipeline, slow_call)
    out = await pipeline.handle([
        upsert("H2", NOW - 50, in_stock=False),
        upsert("K1", NOW - 49, title="Logitech MX Keys S wireless keyboard"),
        upsert("H3", NOW - 48, price=250.0),
    ])
    assert seen_while_applying == [True]
    assert len(pipeline.encoder.calls) == 1, "one encoder call for the batch"
    assert len(encoder.calls) == calls_before
    assert len(out.done) == 3 and not out.dead_letters
    k1, h2, h3 = (pipeline.core.catalog.get(pid) for pid in ("K1", "H2", "H3"))
    assert k1 is not None and k1.title == "Logitech MX Keys S wireless keyboard"
    assert h2 is not None and not h2.in_stock and h3 is not None and h3.price == 250.0


async def test_an_outage_found_by_the_early_encoder_call_defers_only_the_slow_lane() -> None:
    """The slow lane's call starts before the fast lane; when it finds the encoder down, the
    fast lane is still applied and published, and the text edit waits (unacknowledged)."""
    encoder = FlakyEncoder(failures=0)
    pipeline = make_pipeline(encoder)
    await load(pipeline)
    encoder.failures = 1
    out = await pipeline.handle([upsert("K1", NOW - 50, title="Logitech MX Keys S"),
                                 upsert("H2", NOW - 49, in_stock=False)])
    assert [m.key for m in out.done] == [b"H2"]
    assert any(r.topic == "substitutes" and r.key == "H2" for r in out.records())
    assert [item.change.product_id for item in pipeline.pending] == ["K1"] and not pipeline.encoder_ok
    retried = await pipeline.retry_pending()
    assert [m.key for m in retried.done] == [b"K1"] and pipeline.encoder_ok
    k1 = pipeline.core.catalog.get("K1")
    assert k1 is not None and k1.title == "Logitech MX Keys S"


#: Owners per settle step in the tests of stepping (the worker's steps, ``SETTLE_CHUNK``,
#: are of 1000: the same code, 25 times the test's time).
STEP = 40


async def test_reads_get_in_between_the_steps_of_a_settle() -> None:
    """A settle of a big catalog takes minutes; the web views read on the core thread, so
    the settle goes in steps and a read waits for one step, not for all of them."""
    import asyncio

    engine = make_pipeline()
    engine.defer_propagation = True
    n = 2 * STEP + 1
    await engine.handle([upsert(f"P{i:05d}", NOW - 10_000 + i, title=f"product {i} cable") for i in range(n)])
    engine.defer_propagation = False
    assert engine.core.unsettled and engine.core.lists(Kind.SIMILAR) == {}
    real_steps = engine.core.settle_steps
    engine.core.settle_steps = lambda: real_steps(STEP)  # type: ignore[assignment,method-assign]
    seen: list[bool] = []

    async def read() -> None:
        await asyncio.sleep(0)  # once the settle's first step is on the core thread
        seen.append(await engine.read(lambda core: core.unsettled))

    settle = asyncio.ensure_future(engine.settle())
    reader = asyncio.ensure_future(read())
    out = await settle
    await reader
    assert seen == [True], "the read ran between two steps of the settle"
    assert not engine.core.unsettled
    assert len({r.key for r in out.lists if r.topic == engine.settings.topic_similar_items}) == n


async def test_a_settle_ends_the_deferral_so_the_replicas_next_changes_propagate() -> None:
    """A bulk catch-up's last batch may leave ``defer_propagation`` on (the worker sets it per
    batch of its own input); the replica's changes do not set it. After the settle they must
    propagate at once: deferred, they would start a whole new settle (a 100k scale-out run
    spent minutes in one while its input waited)."""
    from dataclasses import replace

    from streams.engine import Change

    engine = make_pipeline()
    engine.defer_propagation = True
    await engine.handle([upsert(f"P{i:02d}", NOW - 1000 + i, title=f"product {i} cable") for i in range(12)])
    await engine.settle()
    assert not engine.core.unsettled and not engine.defer_propagation
    held = engine.core.catalog.get("P03")
    assert held is not None
    other = replace(held, product_id="R01", title="product 3 cable, another worker's")
    out = await engine.apply([Change.of_product(other)])
    assert not engine.core.unsettled, "the replica's change was deferred"
    assert "R01" in {r.key for r in out.lists if r.topic == engine.settings.topic_similar_items}


async def test_a_settle_computes_its_next_step_while_the_previous_one_is_sent() -> None:
    """Sending a step's lists and computing the next one overlap: at 100k products each takes
    minutes, and neither needs the other."""
    import asyncio
    from collections.abc import Iterator

    from serving.recommender import Publication

    engine = make_pipeline()
    engine.defer_propagation = True
    n = 2 * STEP + 1
    await engine.handle([upsert(f"P{i:05d}", NOW - 10_000 + i, title=f"product {i} cable") for i in range(n)])
    engine.defer_propagation = False
    loop = asyncio.get_running_loop()
    second_computed = asyncio.Event()
    real_steps = engine.core.settle_steps

    def observed_steps() -> Iterator[list[Publication]]:
        for i, step in enumerate(real_steps(STEP)):
            if i == 1:
                loop.call_soon_threadsafe(second_computed.set)
            yield step

    engine.core.settle_steps = observed_steps  # type: ignore[method-assign]
    sent: list[int] = []

    async def send(records: list[Outbound]) -> None:
        if not sent:  # the first step's records: the second step is computed meanwhile
            await asyncio.wait_for(second_computed.wait(), timeout=60)
        sent.append(len(records))

    engine.send = send
    out = await engine.settle()
    assert len(sent) == 3 and sum(sent) == len(out.lists)
    assert not engine.core.unsettled


async def test_a_settle_returns_the_free_heap_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """``malloc_trim`` of a heap of GBs takes a while: the settle runs it on the core's thread,
    so the event loop goes on consuming and sending."""
    import threading

    import streams.engine

    engine = make_pipeline()
    engine.defer_propagation = True
    await engine.handle([upsert(f"P{i}", NOW - 100 + i, title=f"product {i} cable") for i in range(5)])
    engine.defer_propagation = False
    threads: list[str] = []

    def trim() -> bool:
        threads.append(threading.current_thread().name)
        return True

    monkeypatch.setattr(streams.engine, "release_free_heap", trim)
    await engine.settle()
    assert len(threads) == 1 and threads[0].startswith("simstream-core")


def test_free_heap_pages_go_back_to_the_system_after_a_settle() -> None:
    """glibc keeps freed heap pages that live objects pin in between; ``malloc_trim`` (called
    at the end of a settle) hands them back."""
    import os

    from streams.engine import release_free_heap

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    blocks = [bytes(2000) + bytes([i % 256]) for i in range(100_000)]  # past pymalloc: the C heap
    pinned = blocks[::100]  # live blocks spread over the heap: free() alone cannot shrink it
    del blocks
    before = rss()
    assert release_free_heap()
    assert rss() < before - 100 * 2**20, "the ~200 MB freed in between went back"
    assert len(pinned) == 1000


def test_a_bulk_catch_up_is_due_for_a_backlog_of_text_changes_not_of_stock_and_price() -> None:
    """A full rebuild costs about a quarter of the catalog's text changes; stock and price
    changes are patched, so their backlog is worked off change by change."""
    assert bulk_catch_up_due(30_000, 100_000, 2000, text_share=1.0)
    assert not bulk_catch_up_due(30_000, 100_000, 2000, text_share=0.0)
    assert not bulk_catch_up_due(30_000, 100_000, 2000, text_share=0.5)  # 15k text: under a quarter
    assert bulk_catch_up_due(60_000, 100_000, 2000, text_share=0.5)
    assert not bulk_catch_up_due(1500, 0, 2000, text_share=1.0)  # under the least
    # No batch seen yet: a bootstrap's backlog is all new products, a restart's is unknown.
    assert bulk_catch_up_due(30_000, 0, 2000, text_share=None)
    assert not bulk_catch_up_due(30_000, 100_000, 2000, text_share=None)
    assert not bulk_catch_up_due(30_000, 100_000, 0, text_share=1.0)  # disabled


async def test_the_engine_tracks_the_share_of_changes_that_need_the_encoder(pipeline: Engine) -> None:
    assert pipeline.text_share is None
    await load(pipeline)
    assert pipeline.text_share == 1.0
    for step in range(10):
        await handled(pipeline, [upsert(pid, NOW - 50 + step, in_stock=step % 2 == 0) for pid, *_ in CATALOG])
    assert pipeline.text_share is not None and pipeline.text_share < 0.15


def test_a_list_record_names_every_field_of_its_items() -> None:
    """The entries are unpacked positionally for speed: they must still carry each field
    under its own name, in JSON as in the read API."""
    from serving.recommender import Publication, ScoredItem
    from streams.wire import item_to_wire, items_to_wire, publication_to_wire

    items = (ScoredItem("B1", 0.9, 0.8, 0.7, 0.6, 0.1, ("same brand", "price -3%")),
             ScoredItem("B2", 0.5, 0.4, 0.3, 0.2, 0.0, ()))
    value = publication_to_wire(Publication(Kind.SIMILAR, "A", items, None, 3), model_version="m/1", at=0.0)
    assert value is not None
    record = Outbound("similar-items", "A", value)
    decoded = json.loads(record.encoded()[1] or b"")
    assert decoded["items"] == [{**i._asdict(), "reasons": list(i.reasons)} for i in items]
    assert [item_to_wire(i) for i in items] == items_to_wire(items) == value["items"]
