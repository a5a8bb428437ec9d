"""``/search`` behind the view, without Kafka: the query cache (an LRU keyed by model version and
normalised text) and ``run_search`` on an engine that applied real product-changes records."""

from __future__ import annotations

from typing import Any

import pytest

from encoders.hashing import HashingEncoder
from serving.errors import EncoderUnavailable
from serving.search import SearchFilters, SearchRequest, parse_search_params
from streams.engine import Engine
from streams.search import QueryVectors, SearchUnavailable, run_search
from tests.streams.test_engine import CountingEncoder, load, make_pipeline


async def test_the_cache_keeps_recent_queries_per_model_and_evicts_the_least_recent() -> None:
    encoder = CountingEncoder()
    cache = QueryVectors(size=2)
    first = await cache.vector(encoder, "sony headphones")
    assert (await cache.vector(encoder, "sony headphones")) is first
    await cache.vector(encoder, "keyboard")
    await cache.vector(encoder, "sony headphones")  # now the most recent
    await cache.vector(encoder, "cable")  # evicts "keyboard"
    assert len(cache) == 2 and (cache.hits, cache.misses) == (2, 3)
    await cache.vector(encoder, "keyboard")
    assert encoder.calls == [["sony headphones"], ["keyboard"], ["cable"], ["keyboard"]]
    # Another model version is another key: its vector is never served for this one.
    other = HashingEncoder(version="hashing/2")
    await cache.vector(other, "cable")
    assert cache.misses == 5


async def test_size_zero_embeds_every_query() -> None:
    encoder = CountingEncoder()
    cache = QueryVectors(size=0)
    for _ in range(3):
        await cache.vector(encoder, "sony")
    assert len(encoder.calls) == 3 and len(cache) == 0


async def test_run_search_answers_hits_with_product_fields_and_reasons() -> None:
    engine = make_pipeline()
    await load(engine)
    cache = QueryVectors(size=8)
    body = await run_search(engine, cache, parse_search_params({"q": "Sony WH-1000XM5", "k": "3"}))
    assert body["query"] == "sony wh-1000xm5" and body["k"] == 3 and body["model_version"] == "hashing/1"
    top = body["hits"][0]
    assert top["product_id"] == "H2" and top["title"] == "Sony WH-1000XM5 wireless noise cancelling headphones"
    assert top["price"] == 329.0 and top["in_stock"] is True and top["category"] == ["Audio"]
    assert top["matched"] == ["dense", "lexical"] and top["reasons"][0].startswith("dense ")
    keys = await run_search(engine, cache, SearchRequest("wireless", 5, SearchFilters(category="keys")))
    assert [h["product_id"] for h in keys["hits"]] == ["K1", "K2"]  # the wireless one first, both within Keys
    assert all(h["filters"] == ["category: Keys"] for h in keys["hits"])
    assert keys["filters"] == {"category": "keys", "in_stock": None, "price_min": None, "price_max": None}
    blank = await run_search(engine, cache, parse_search_params({"q": "  "}))
    assert blank["hits"] == [] and cache.misses == 2  # a blank query is never embedded


class AwayEncoder(HashingEncoder):
    async def encode(self, texts: Any) -> Any:
        raise EncoderUnavailable("TF Serving at grpc://127.0.0.1:1 did not answer")


async def test_an_unreachable_encoder_is_a_clear_error() -> None:
    engine: Engine = make_pipeline()
    await load(engine)
    engine.encoder = AwayEncoder()
    with pytest.raises(SearchUnavailable, match=r"could not embed the query .* try again shortly"):
        await run_search(engine, QueryVectors(size=8), parse_search_params({"q": "sony"}))
