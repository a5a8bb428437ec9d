"""Live model rollover on a real broker, with ``simstream serve-encoder`` serving versions 1 and 2.

Version 1 is the exported MiniLM. Version 2 is a tiny SavedModel with the same signature
whose vectors are unrelated to MiniLM's (a bag of token features), so a list built from a
mix of the two, or a v1 score under a v2 label, cannot pass for a v2 list. Version 3 has the
wrong dimension and must be refused, at rollover and at start-up, with the old version live.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.lexical import LexicalModel
from serving.recommender import Kind, exact_lists
from serving.text import product_text
from streams.kafka_io import create_topics, latest_by_key, read_topic
from streams.records import product_from_wire
from streams.settings import Settings
from streams.wire import embedding_from_wire
from streams.worker import recommender_config
from tests.support import WorkerProcess, send_products, write_toy_model
from tests.support import encoder_server as serve_encoder

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "data" / "amazon-software" / "catalog.jsonl"
N_PRODUCTS = 100
BASE_TS = time.time() - 3600


@pytest.fixture
def models(model_base: Path, tmp_path: Path) -> Path:
    """A model base of the test's own: version 1 links to the exported MiniLM (never written to)."""
    base = tmp_path / "models" / "minilm"
    base.mkdir(parents=True)
    (base / "1").symlink_to(model_base / "1", target_is_directory=True)
    return base


@pytest.fixture
def encoder_server(models: Path, tmp_path: Path) -> Iterator[str]:
    with serve_encoder(models, tmp_path / "serve-encoder.log") as target:
        yield target


def iso(offset_s: float) -> str:
    from streams.records import iso as to_iso

    return to_iso(BASE_TS + offset_s)


def post(worker: WorkerProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(worker.web + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_for(what: str, check: Callable[[], bool], worker: WorkerProcess, timeout: float = 60.0,
             every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.alive, worker.log_tail()
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}:\n{worker.log_tail()}")


class Reader(threading.Thread):
    """Polls ``/similar/{id}`` the whole time: every answer must be a 200 with a model version."""

    def __init__(self, worker: WorkerProcess, product_id: str) -> None:
        super().__init__(daemon=True)
        self.worker, self.product_id = worker, product_id
        self.answers: list[tuple[int, str | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body = self.worker.get(f"/similar/{self.product_id}", timeout=5)
                self.answers.append((status, body.get("model_version") if isinstance(body, dict) else None))
            except OSError as exc:
                self.answers.append((0, str(exc)))
            time.sleep(0.05)


def test_rollover_to_a_new_version_under_churn_never_mixes_vectors(
    models: Path, encoder_server: str, settings_for: Callable[..., Settings],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    from encoders.local import LocalEncoder

    env = {"SIMSTREAM_ENCODER": encoder_server, "SIMSTREAM_MODEL_BASE": str(models),
           "SIMSTREAM_MODEL_POLL_INTERVAL_S": "0.5", "SIMSTREAM_ROLLOVER_BATCH_SIZE": "8",
           "SIMSTREAM_ROLLOVER_PAUSE_S": "0.5", "SIMSTREAM_SNAPSHOT_INTERVAL_S": "0"}
    settings = settings_for(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    worker = worker_factory(**env)
    worker.wait_ready(timeout=180)
    assert worker.get("/health")[1]["model_version"] == "minilm/1"

    rows = [json.loads(line) for line in CATALOG.read_text(encoding="utf-8").splitlines()[:N_PRODUCTS]]
    products = {r["product_id"]: r for r in rows}
    ids = sorted(products)
    send_products(settings, [{**r, "price": r.get("price") or 20.0, "ts": iso(i)} for i, r in enumerate(rows)])
    wait_for("the catalog", lambda: worker.get("/stats")[1]["events"] >= N_PRODUCTS, worker, timeout=120, every=0.5)
    reader = Reader(worker, ids[0])
    reader.start()

    # Version 2 appears under the base: the server loads it, GetModelStatus reports it, the worker rolls.
    write_toy_model(models / "2")
    wait_for("the rollover to start", lambda: worker.get("/health")[1]["rollover"]["phase"] == "embedding",
             worker, timeout=30)

    # Changes streamed during the rollover: title edits, deletes, a new product, stock flips.
    edited = {pid: products[pid]["title"] + " refurbished bundle" for pid in ids[1:6]}
    deleted = set(ids[6:9])
    churn: list[dict[str, Any]] = [{"op": "upsert", "product_id": pid, "title": t, "ts": iso(1000 + i)}
                                   for i, (pid, t) in enumerate(edited.items())]
    churn += [{"op": "delete", "product_id": pid, "ts": iso(1100)} for pid in sorted(deleted)]
    churn += [{**rows[0], "product_id": "NEW-1", "title": rows[0]["title"] + " starter pack", "price": 25.0,
               "ts": iso(1200)}]
    churn += [{"op": "upsert", "product_id": pid, "in_stock": False, "ts": iso(1300)} for pid in ids[10:14]]
    send_products(settings, churn)
    expected_events = N_PRODUCTS + len(churn)

    wait_for("the swap", lambda: worker.get("/health")[1]["rollover"]["phase"] in ("done", "failed"),
             worker, timeout=90, every=0.3)
    health = worker.get("/health")[1]
    assert health["rollover"]["phase"] == "done", health
    assert health["model_version"] == "minilm/2" and health["model_error"] is None
    assert health["rollover"]["progress"] == 1.0 and health["rollover"]["caught_up"] > 0, health
    wait_for("the churn", lambda: worker.get("/stats")[1]["events"] >= expected_events, worker, timeout=60)
    time.sleep(2.0)
    reader.stop.set()
    reader.join(10)
    metrics = urllib.request.urlopen(worker.web + "/metrics", timeout=5).read().decode()
    assert "simstream_rollover_progress 1.0" in metrics
    assert 'simstream_rollovers_total{outcome="swapped"} 1.0' in metrics

    # The read API answered throughout, first from version 1, then from version 2, never back.
    assert reader.answers and all(status == 200 for status, _ in reader.answers), reader.answers[:5]
    seen = [version or "" for _, version in reader.answers]
    assert seen[0] == "minilm/1" and seen[-1] == "minilm/2"
    assert seen == sorted(seen), "the read API went back to version 1"

    # Final state: the changes made during the rollover are there.
    live = (set(ids) - deleted) | {"NEW-1"}
    final = {k: product_from_wire(v) for k, v in latest_by_key(read_topic(settings, settings.topic_products)).items()}
    assert set(final) == live
    for pid, title in edited.items():
        assert final[pid].title == title
        assert worker.get(f"/products/{pid}")[1]["title"] == title
    for pid in deleted:
        assert worker.get(f"/similar/{pid}")[0] == 404

    # Every vector on simstream-embeddings is version 2's vector of the product's final text.
    stored = {k: embedding_from_wire(v) for k, v in latest_by_key(read_topic(settings, settings.topic_embeddings)).items()}
    assert set(stored) == live
    assert {e.model_version for e in stored.values()} == {"minilm/2"}
    v2 = LocalEncoder(models, model_version=2)
    texts = {pid: product_text(final[pid]) for pid in sorted(live)}
    own = v2.encode_blocking(list(texts.values())).vectors
    v2_vectors = dict(zip(texts, own, strict=True))
    for pid, vector in v2_vectors.items():
        assert np.allclose(stored[pid].vector, vector, atol=1e-5), pid

    # Every list published after the swap says version 2 (per partition, no version 1 after a 2),
    # every version-2 list scores with version-2 vectors, and the last lists are the exact ones.
    lexical_body = worker.get("/debug/lexical")[1]
    idf = None if lexical_body["idf"] is None else np.frombuffer(base64.b64decode(lexical_body["idf"]), "<f4")
    config = recommender_config(settings)
    exact = exact_lists(final.values(), v2_vectors, config, LexicalModel(idf, lexical_body["n_docs"]))
    unchanged = live - set(edited) - {"NEW-1"}
    for topic, kind in ((settings.topic_similar_items, Kind.SIMILAR), (settings.topic_substitutes, Kind.SUBSTITUTES)):
        records = list(read_topic(settings, topic))
        after_swap: set[int] = set()
        for r in records:
            if r.value is None:
                continue
            if r.value["model_version"] == "minilm/2":
                after_swap.add(r.partition)
                if r.key in unchanged:
                    for item in r.value["items"]:
                        if item["product_id"] in unchanged:
                            dense = float(np.dot(v2_vectors[r.key].astype(np.float64), v2_vectors[item["product_id"]]))
                            assert abs(item["dense"] - dense) < 1e-4, (topic, r.key, item, dense)
            else:
                assert r.value["model_version"] == "minilm/1"
                assert r.partition not in after_swap, f"{topic}: a version-1 list after a version-2 one"
        last = latest_by_key(iter(records))
        assert set(last) == live
        assert {v["model_version"] for v in last.values()} == {"minilm/2"}
        agree = [[i["product_id"] for i in last[pid]["items"]] == [i.product_id for i in exact[kind][pid]]
                 for pid in live]
        assert np.mean(agree) >= 0.95, f"{topic}: {np.mean(agree):.3f} of the lists equal the exact ones"
        for pid in live:
            for item, want in zip(last[pid]["items"], exact[kind][pid], strict=False):
                if item["product_id"] == want.product_id:
                    assert abs(item["dense"] - want.dense) < 1e-4

    # Version 3 has the wrong dimension: refused at rollover, version 2 stays live.
    write_toy_model(models / "3", dim=8)
    status, body = post(worker, "/admin/model-version", {"version": 3})
    assert status == 422 and "version 3 refused" in body["error"], body
    health = worker.get("/health")[1]
    assert health["model_version"] == "minilm/2" and "version 3 refused" in health["model_error"]
    assert "384" in health["model_error"]
    assert worker.get(f"/similar/{ids[0]}")[1]["model_version"] == "minilm/2"

    # ... and at start-up: a restart pinned to version 3 keeps version 2, restored without embedding.
    worker.stop()
    restarted = worker_factory(**{**env, "SIMSTREAM_MODEL_VERSION": "3"})
    restarted.wait_ready(timeout=120)
    health = restarted.get("/health")[1]
    assert health["model_version"] == "minilm/2", health
    assert "model version 3 refused" in health["model_error"] and "version 2 is live" in health["model_error"]
    assert restarted.get("/stats")[1]["embedded_texts"] == 0
    assert restarted.get(f"/similar/{ids[0]}")[1]["model_version"] == "minilm/2"
    log_lines = [line for line in restarted.log_path.read_text().splitlines() if "model version 3 refused" in line]
    assert log_lines, restarted.log_tail()


def test_a_bad_latest_version_is_refused_at_start_up_and_the_previous_one_serves(
    models: Path, settings_for: Callable[..., Settings], worker_factory: Callable[..., WorkerProcess],
) -> None:
    write_toy_model(models / "2", dim=8)  # wrong dimension, and the latest
    env = {"SIMSTREAM_ENCODER": "local", "SIMSTREAM_MODEL_BASE": str(models), "SIMSTREAM_MODEL_POLL_INTERVAL_S": "0.5"}
    create_topics(settings_for(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()}))
    worker = worker_factory(**env)
    worker.wait_ready(timeout=120)
    time.sleep(1.5)  # a few polls: the refused version is not tried again
    health = worker.get("/health")[1]
    assert health["model_version"] == "minilm/1", health
    assert "model version 2 refused" in health["model_error"] and "384" in health["model_error"]
    assert health["rollover"]["phase"] == "idle"
    assert worker.log_tail(5000).count("model version 2 refused") == 2  # the refusal, then what is live
