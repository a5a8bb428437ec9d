"""The replica, list-in list-out: other workers' state records go through the engine's one
apply path, in log order, and a product waits for its embedding record."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from encoders.hashing import HashingEncoder
from serving.catalog import Product
from serving.config import RecommenderConfig
from serving.index import ExactIndex
from serving.lexical import LexicalModel
from serving.recommender import Recommender
from serving.text import product_text
from streams.engine import Engine
from streams.metrics import Metrics
from streams.outputs import Outbound
from streams.records import product_to_wire
from streams.replica import Replica
from streams.scaleout import Ownership
from streams.settings import Settings
from streams.wire import LEXICAL_KEY, StoredEmbedding, embedding_to_wire, lexical_to_wire

NOW = 1_795_000_000.0
S = Settings()


def replica() -> tuple[Replica, list[Outbound]]:
    sent: list[Outbound] = []

    async def send(records: Any) -> None:
        sent.extend(records)

    config = RecommenderConfig(k=3, candidate_depth=5)
    engine = Engine(S, Metrics(), clock=lambda: NOW, recommender=Recommender(config, ExactIndex(config.dim)),
                    encoder=HashingEncoder(), send=send)
    return Replica(S, Metrics(), engine, Ownership(S), asyncio.Lock()), sent


async def vector_of(product: Product) -> np.ndarray:
    return (await HashingEncoder().encode([product_text(product)])).vectors[0]


def product(pid: str, title: str, ts: float = NOW - 100, **fields: Any) -> Product:
    return Product(product_id=pid, title=title, ts=ts, **fields)


async def records_for(*products: Product) -> list[tuple[str, int, int, bytes | None, bytes | None]]:
    out = []
    for offset, p in enumerate(products):
        stored = StoredEmbedding(p.product_id, await vector_of(p), "hashing/1", p.content_hash)
        out.append((S.topic_embeddings, 0, offset, p.product_id.encode(), json.dumps(embedding_to_wire(stored)).encode()))
        out.append((S.topic_products, 0, offset, p.product_id.encode(), json.dumps(product_to_wire(p)).encode()))
    return out


async def test_a_tombstone_after_an_upsert_in_the_same_batch_deletes_it() -> None:
    rep, _ = replica()
    a, b = product("A", "usb-c cable 1 m"), product("B", "usb-c cable 2 m")
    batch = await records_for(a, b)
    batch.append((S.topic_products, 0, 9, b"B", None))
    await rep.apply(batch)
    assert {p.product_id for p in rep.engine.core.catalog} == {"A"}


async def test_a_product_waits_for_its_embedding_record_and_is_never_embedded_here() -> None:
    rep, _ = replica()
    a = product("A", "usb-c cable 1 m")
    embedding, record = await records_for(a)
    await rep.apply([record])
    assert "A" in rep.pending and rep.engine.core.catalog.get("A") is None
    await rep.apply([embedding])
    assert rep.engine.core.catalog.get("A") == a and not rep.pending
    assert rep.engine.embedded_texts == 0


async def test_replicated_changes_publish_lists_but_no_state_records() -> None:
    rep, sent = replica()
    await rep.apply(await records_for(product("A", "usb-c cable 1 m"), product("B", "usb-c cable 2 m")))
    topics = {r.topic for r in sent}
    assert S.topic_similar_items in topics
    assert not topics & {S.topic_products, S.topic_embeddings}
    sent.clear()
    await rep.apply(await records_for(product("A", "usb-c cable 1 m")))  # already held: a no-op
    assert sent == []


async def test_an_idf_record_of_another_lexical_scheme_is_skipped_one_of_this_scheme_adopted() -> None:
    """A worker of an older version (another ``serving.lexical.SCHEME``) may still write the
    shared IDF during a rolling upgrade: its weights belong to other features, so the
    replica keeps the IDF it has rather than mixing them in."""
    rep, _ = replica()
    products = [product(p, f"usb-c cable {i} m") for i, p in enumerate("ABCD")]
    await rep.apply(await records_for(*products))
    fitted = LexicalModel.fit(product_text(p) for p in products)
    value = lexical_to_wire(fitted, at=NOW)
    foreign = {k: v for k, v in value.items() if k != "scheme"}  # written before schemes were named
    await rep.apply([(S.topic_lexical, 0, 0, LEXICAL_KEY.encode(), json.dumps(foreign).encode())])
    assert not rep.engine.core.lexical.fitted
    await rep.apply([(S.topic_lexical, 0, 1, LEXICAL_KEY.encode(), json.dumps(value).encode())])
    assert rep.engine.core.lexical.same_as(fitted)
