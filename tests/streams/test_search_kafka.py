"""Semantic search end to end: a worker process with the real encoder (MiniLM, in-process) on
a real broker. Products are published to ``product-changes``; ``GET /search`` finds them by
meaning, applies its filters, follows stock changes and deletes, and guards like the rest of
the read API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streams.kafka_io import create_topics
from streams.settings import Settings
from tests.support import WorkerProcess, send_products, wait_for

pytestmark = pytest.mark.integration

TOKEN = "s3arch"
PRODUCTS = [
    ("KINDLE", "Kindle Paperwhite 16 GB e-reader", "Amazon", ["Electronics", "E-readers"], 149.0),
    ("POT", "Instant Pot Duo 7-in-1 electric pressure cooker", "Instant Pot", ["Home", "Kitchen"], 89.0),
    ("MAT", "Manduka PRO yoga mat 6 mm", "Manduka", ["Sports", "Fitness"], 120.0),
    ("SONY", "Sony WH-1000XM4 wireless noise cancelling headphones", "Sony", ["Electronics", "Audio", "Headphones"],
     348.0),
    ("BOSE", "Bose QuietComfort 45 wireless headphones", "Bose", ["Electronics", "Audio", "Headphones"], 279.0),
    ("KEYS", "Logitech MX Keys wireless keyboard", "Logitech", ["Electronics", "Computers", "Keyboards"], 99.0),
]


def test_search_finds_by_meaning_filters_and_follows_changes(
    model_base: Path, settings_for: Callable[..., Settings], worker_factory: Callable[..., WorkerProcess],
) -> None:
    env = {"SIMSTREAM_ENCODER": "local", "SIMSTREAM_MODEL_BASE": str(model_base), "SIMSTREAM_WEB_TOKEN": TOKEN}
    settings = settings_for(encoder="local", model_base=str(model_base))
    create_topics(settings)
    worker = worker_factory(**env)
    worker.wait_ready(timeout=180)

    def get(path: str, token: str | None = TOKEN) -> tuple[int, Any]:
        request = urllib.request.Request(worker.web + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def search(q: str, **params: str) -> list[dict[str, Any]]:
        status, body = get("/search?" + urllib.parse.urlencode({"q": q, **params}))
        assert status == 200, body
        hits: list[dict[str, Any]] = body["hits"]
        return hits

    now = time.time()
    send_products(settings, [{"op": "upsert", "product_id": pid, "title": title, "brand": brand, "category": category,
                     "price": price, "currency": "USD", "ts": now - 10}
                    for pid, title, brand, category, price in PRODUCTS])
    wait_for(lambda: get("/stats")[1]["index_live"] == len(PRODUCTS), what="every product indexed", worker=worker)

    # By meaning: no word of these queries is in the product's text.
    for query, expected in (("something to read books on", "KINDLE"), ("cook a stew fast", "POT"),
                            ("exercise on the floor", "MAT"), ("typing on my computer", "KEYS")):
        hits = search(query)
        assert hits[0]["product_id"] == expected, (query, [h["product_id"] for h in hits])
        assert "dense" in hits[0]["matched"] and hits[0]["reasons"][0].startswith("dense ")
    # And by words: a model number.
    top = search("wh-1000xm4")[0]
    assert top["product_id"] == "SONY" and top["matched"] == ["dense", "lexical"]
    assert top["title"] == "Sony WH-1000XM4 wireless noise cancelling headphones" and top["price"] == 348.0

    # Filters: a category at any level, a price range; each hit names the filters it passed.
    audio = search("listen to music on a plane", category="audio")
    assert {h["product_id"] for h in audio} == {"SONY", "BOSE"}
    assert all(h["filters"] == ["category: Audio"] for h in audio)
    pricey = search("listen to music on a plane", category="Electronics", price_min="300")
    assert [h["product_id"] for h in pricey] == ["SONY"]
    assert pricey[0]["filters"] == ["category: Electronics", "price 348 in [300, ∞]"]
    assert search("headphones", category="Garden") == []

    # The second identical query is served from the LRU (no second encoder call).
    before = get("/stats")[1]["search_cache"]
    search("listen to music on a plane", category="audio")
    after = get("/stats")[1]["search_cache"]
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]

    # Changes show in the next search: out of stock, then a delete.
    send_products(settings, [{"op": "upsert", "product_id": "BOSE", "in_stock": False, "ts": now}])
    wait_for(lambda: [h["product_id"] for h in search("bose headphones", in_stock="true")][:1] == ["SONY"],
             what="BOSE out of stock in search", worker=worker)
    gone = search("bose headphones", in_stock="false")
    assert [h["product_id"] for h in gone] == ["BOSE"] and gone[0]["in_stock"] is False
    send_products(settings, [{"op": "delete", "product_id": "KINDLE", "ts": now + 1}])
    wait_for(lambda: "KINDLE" not in {h["product_id"] for h in search("something to read books on")},
             what="KINDLE deleted from search", worker=worker)

    # Bad parameters are a 400 with a one-line error; the token guards /search like the rest.
    for path, message in (("/search?q=x&k=0", "k must be an integer from 1 to 50"),
                          ("/search?q=x&price_min=5&price_max=1", "price_min (5) is above price_max (1)"),
                          ("/search?q=x&in_stock=maybe", "in_stock must be true or false"),
                          ("/search?q=" + "x" * 201, "q is limited to 200 characters")):
        status, body = get(path)
        assert status == 400 and message in body["error"] and "\n" not in body["error"], (path, body)
    assert get("/search?q=headphones", token=None)[0] == 401
    assert get("/search?q=")[1]["hits"] == []
