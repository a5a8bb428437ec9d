"""Shared pieces of the end-to-end tests on Kafka: the scripted churn, waiting, the invariant.

Used by ``test_end_to_end_kafka.py`` (one worker) and ``test_scaleout_kafka.py`` (several).
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.catalog import Product
from serving.lexical import LexicalModel
from serving.recommender import Kind, exact_lists
from streams.kafka_io import latest_by_key, producer, read_topic
from streams.records import product_from_wire
from streams.settings import Settings
from streams.wire import embedding_from_wire
from streams.worker import recommender_config
from tests.support import WorkerProcess, encoder_server

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "data" / "amazon-software" / "catalog.jsonl"
N_PRODUCTS = 300
BASE_TS = time.time() - 3600


@pytest.fixture(scope="module")
def grpc_encoder(model_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``simstream serve-encoder``: a real gRPC PredictionService over the same SavedModel."""
    with encoder_server(model_base, tmp_path_factory.mktemp("serve") / "serve-encoder.log") as target:
        yield target


def iso(offset_s: float) -> str:
    from streams.records import iso as to_iso

    return to_iso(BASE_TS + offset_s)


class Scenario:
    """A scripted, seeded churn over real products, and what the final catalog should be."""

    def __init__(self, seed: int = 7) -> None:
        rows = [json.loads(line) for line in CATALOG.read_text(encoding="utf-8").splitlines()[:N_PRODUCTS]]
        self.rng = random.Random(seed)
        self.products = {r["product_id"]: r for r in rows}
        self.events: list[tuple[str, dict[str, Any] | bytes]] = []
        self.deleted: set[str] = set()
        self.bad = 0
        self.tick = 0.0

    def emit(self, event: dict[str, Any]) -> None:
        self.tick += 1.0
        self.events.append((event["product_id"], {**event, "ts": iso(self.tick)}))

    def emit_bad(self, key: str, raw: bytes) -> None:
        self.events.append((key, raw))
        self.bad += 1

    def load(self) -> None:
        for product in self.products.values():
            self.emit({**product, "price": product.get("price", round(self.rng.uniform(10, 200), 2))})

    def churn(self, rounds: int = 1) -> None:
        ids = sorted(self.products)
        for _ in range(rounds):
            for pid in self.rng.sample(ids, 30):  # title edits, some moving far away
                if pid in self.deleted:
                    continue
                other = self.products[self.rng.choice(ids)]["title"]
                title = other if self.rng.random() < 0.5 else self.products[pid]["title"] + " deluxe edition"
                self.emit({"op": "upsert", "product_id": pid, "title": title})
            for pid in self.rng.sample(ids, 12):
                if pid not in self.deleted:
                    self.deleted.add(pid)
                    self.emit({"op": "delete", "product_id": pid})
            for pid in self.rng.sample(sorted(self.deleted), min(5, len(self.deleted))):
                self.deleted.discard(pid)
                self.emit({**self.products[pid], "op": "upsert", "title": self.products[pid]["title"] + " v2"})
            for pid in self.rng.sample(ids, 30):
                if pid not in self.deleted:
                    self.emit({"op": "upsert", "product_id": pid, "in_stock": self.rng.random() < 0.5})
            for pid in self.rng.sample(ids, 15):
                if pid not in self.deleted:
                    self.emit({"op": "upsert", "product_id": pid, "price": round(self.rng.uniform(10, 300), 2)})
            self.emit_bad("bad1", b"{not json")
            self.emit_bad("bad2", b'["an", "array"]')
            self.emit_bad("bad3", json.dumps({"op": "upsert", "title": "no id", "ts": iso(1)}).encode())
            self.emit_bad("bad4", json.dumps({"op": "upsert", "product_id": "bad4", "title": "x", "price": "9",
                                              "ts": iso(1)}).encode())
            self.emit_bad("bad5", json.dumps({"op": "warp", "product_id": "bad5", "ts": iso(1)}).encode())
            self.emit_bad("bad6", json.dumps({"op": "upsert", "product_id": "bad6", "title": "x", "price": -2,
                                              "ts": iso(1)}).encode())

    def send(self, settings: Settings, events: list[tuple[str, dict[str, Any] | bytes]]) -> None:
        kafka = producer(settings)
        for key, event in events:
            value = event if isinstance(event, bytes) else json.dumps(event).encode()
            kafka.send(settings.topic_product_changes, key=key.encode(), value=value)
        kafka.flush()
        kafka.close()


def wait_quiet(worker: WorkerProcess, expected_events: int, timeout: float = 240.0) -> dict[str, Any]:
    """Until the worker has consumed every event and published what followed."""
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert worker.alive, worker.log_tail()
        status, stats = worker.get("/stats")
        if status == 200 and stats["events"] >= expected_events:
            time.sleep(2.0)  # the last batch's publications are acknowledged before the next poll
            return worker.get("/stats")[1]
        time.sleep(0.5)
    raise AssertionError(f"worker consumed {stats.get('events')} of {expected_events} events:\n{worker.log_tail()}")


def check_invariant(settings: Settings, worker: WorkerProcess, scenario: Scenario) -> None:
    products = {k: product_from_wire(v) for k, v in latest_by_key(read_topic(settings, settings.topic_products)).items()}
    live = set(scenario.products) - scenario.deleted
    assert set(products) == live

    vectors = {k: embedding_from_wire(v).vector
               for k, v in latest_by_key(read_topic(settings, settings.topic_embeddings)).items()}
    assert set(vectors) == live

    similar_records = list(read_topic(settings, settings.topic_similar_items))
    substitute_records = list(read_topic(settings, settings.topic_substitutes))
    similar = latest_by_key(iter(similar_records))
    substitutes = latest_by_key(iter(substitute_records))
    assert set(similar) == live, "every live product has a list, and no deleted one does"
    assert set(substitutes) == live

    # A tombstone is the last word for every deleted product that had lists (one added and
    # deleted within a bulk catch-up never had any).
    last_similar = {r.key: r.value for r in similar_records}
    for pid in scenario.deleted:
        assert last_similar.get(pid) is None, pid

    lexical_body = worker.get("/debug/lexical")[1]
    idf = None if lexical_body["idf"] is None else np.frombuffer(base64.b64decode(lexical_body["idf"]), "<f4")
    lexical = LexicalModel(idf, lexical_body["n_docs"])
    config = recommender_config(settings)
    exact = exact_lists(products.values(), vectors, config, lexical)

    overlaps = []
    for pid in live:
        published = [i["product_id"] for i in similar[pid]["items"]]
        expected = [i.product_id for i in exact[Kind.SIMILAR][pid]]
        assert not set(published) - live, f"{pid} names a deleted product"
        overlaps.append(len(set(published) & set(expected)) / max(len(expected), 1))
    mean_overlap = float(np.mean(overlaps))
    assert mean_overlap >= 0.95, f"mean overlap with the exact top-k is {mean_overlap:.3f}"

    for pid in live:
        owner: Product = products[pid]
        for item in substitutes[pid]["items"]:
            candidate = products[item["product_id"]]
            assert candidate.in_stock, f"{pid}: out-of-stock substitute {candidate.product_id}"
            if owner.price and candidate.price:
                assert abs(candidate.price - owner.price) <= config.price_band * owner.price + 1e-9
            if owner.leaf_category and candidate.leaf_category:
                assert owner.leaf_category == candidate.leaf_category
            if owner.group_id:
                assert candidate.group_id != owner.group_id
