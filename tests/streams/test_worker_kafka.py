"""The worker on a real broker: events are applied, bad input is dead-lettered, nothing stops it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from streams.kafka_io import create_topics, latest_by_key, producer, read_topic
from tests.support import wait_for

pytestmark = pytest.mark.integration

TS = "2026-11-28T03:00:00Z"


def test_valid_events_are_applied_and_bad_ones_dead_lettered(
    settings_for: Callable[..., Any], worker_factory: Callable[..., Any]
) -> None:
    settings = settings_for()
    create_topics(settings)
    worker = worker_factory()
    worker.wait_ready()

    topic = settings.topic_product_changes
    good = {"op": "upsert", "product_id": "B1", "title": "Sony WH-1000XM4 Wireless Headphones",
            "brand": "Sony", "category": ["Electronics", "Audio", "Headphones"], "price": 278.0,
            "currency": "USD", "in_stock": True, "ts": TS}
    bad: list[tuple[bytes, bytes | None, str]] = [
        (b"{this is not json", b"X1", "malformed JSON"),
        (b'[{"op": "upsert"}]', b"X2", "must be a JSON object, got array"),
        (json.dumps({"op": "upsert", "title": "no id", "ts": TS}).encode(), b"X3", "missing required field 'product_id'"),
        (json.dumps({"op": "upsert", "product_id": "X4", "title": "x", "price": "cheap", "ts": TS}).encode(), b"X4",
         "'price' must be a number, got string"),
        (json.dumps({"op": "teleport", "product_id": "X5", "ts": TS}).encode(), b"X5", "unknown op 'teleport'"),
        (json.dumps({"op": "upsert", "product_id": "X6", "title": "x", "price": -1, "ts": TS}).encode(), b"X6",
         "outside the allowed range"),
        (json.dumps({"op": "upsert", "product_id": "X7", "title": "t" * 5_000_000, "ts": TS}).encode(), b"X7",
         "over the 1,000,000-byte limit"),
    ]
    kafka = producer(settings, max_request_size=8 * 1024 * 1024)
    kafka.send(topic, key=b"B1", value=json.dumps(good).encode())
    for raw, key, _ in bad:
        kafka.send(topic, key=key, value=raw)
    # Sent after the bad ones: a later price change, a stale one, and a second product.
    kafka.send(topic, key=b"B1", value=json.dumps({"op": "upsert", "product_id": "B1", "price": 250.0,
                                                  "ts": "2026-11-28T03:05:00Z"}).encode())
    kafka.send(topic, key=b"B1", value=json.dumps({"op": "upsert", "product_id": "B1", "price": 1.0,
                                                  "ts": "2026-11-28T02:00:00Z"}).encode())
    kafka.send(topic, key=b"B2", value=json.dumps({"op": "upsert", "product_id": "B2", "title": "Bose QC45",
                                                  "ts": TS}).encode())
    kafka.flush()
    kafka.close()

    letters = wait_for(
        lambda: (lambda ls: ls if len(ls) >= len(bad) else None)(
            [r.value for r in read_topic(settings, settings.topic_dead_letters)]),
        what="dead letters",
    )
    assert len(letters) == len(bad)
    by_key = {letter["key"]: letter for letter in letters}
    for raw, key, reason in bad:
        letter = by_key[key.decode()]
        assert reason in letter["error"], letter["error"]
        assert "\n" not in letter["error"]
        assert letter["source_topic"] == topic and isinstance(letter["offset"], int)
        assert letter["partition"] is not None
        assert letter["payload"] == raw[: 64 * 1024].decode()

    products = wait_for(
        lambda: (lambda s: s if len(s) == 2 and s["B1"]["price"] == 250.0 else None)(
            latest_by_key(read_topic(settings, settings.topic_products))),
        what="both products applied",
    )
    assert products["B1"]["title"] == "Sony WH-1000XM4 Wireless Headphones"
    assert products["B1"]["category"] == ["Electronics", "Audio", "Headphones"]
    assert products["B2"]["title"] == "Bose QC45"

    status, body = worker.get("/products/B1")
    assert status == 200 and body["price"] == 250.0
    status, health = worker.get("/health")
    assert status == 200 and health["products"] == 2 and health["stale_events"] == 1
    status, body = worker.get("/products/nope")
    assert status == 404 and "unknown product" in body["error"]
    assert worker.alive


def test_a_restarted_worker_gets_its_catalog_back(
    settings_for: Callable[..., Any], worker_factory: Callable[..., Any], simstream_cli: str,
    isolated_env: dict[str, str], tmp_path: Any,
) -> None:
    settings = settings_for()
    create_topics(settings)
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(
        json.dumps({"op": "upsert", "product_id": f"P{i}", "title": f"Product {i}", "price": 10.0 + i, "ts": TS}) + "\n"
        for i in range(20)) + "not json\n" + json.dumps({"op": "upsert", "product_id": "P99", "ts": TS}) + "\n")
    env = {**__import__("os").environ, **isolated_env}
    loaded = subprocess.run([simstream_cli, "load-catalog", str(catalog)], env=env, capture_output=True,
                            text=True, check=True)
    assert "sent 20 products" in loaded.stdout and "rejected 2" in loaded.stdout
    assert "malformed JSON" in loaded.stdout and "needs a 'title'" in loaded.stdout

    first = worker_factory()
    first.wait_ready()
    wait_for(lambda: first.get("/health")[1]["products"] == 20, what="20 products applied")
    first.stop()

    second = worker_factory()
    second.wait_ready()
    status, health = second.get("/health")
    assert health["products"] == 20
    status, body = second.get("/products/P7")
    assert status == 200 and body["price"] == 17.0


def test_read_api_validates_ids_and_guards_with_a_token(
    settings_for: Callable[..., Any], worker_factory: Callable[..., Any]
) -> None:
    import urllib.request

    settings = settings_for()
    create_topics(settings)
    worker = worker_factory(SIMSTREAM_WEB_TOKEN="s3cret")
    worker.wait_ready()
    kafka = producer(settings)
    for pid, title in (("A1", "Sony WH-1000XM4 headphones"), ("A2", "Sony WH-1000XM5 headphones")):
        kafka.send(settings.topic_product_changes, key=pid.encode(),
                   value=json.dumps({"op": "upsert", "product_id": pid, "title": title, "ts": TS}).encode())
    kafka.flush()
    kafka.close()

    def get(path: str, token: str | None = "s3cret") -> tuple[int, Any]:
        request = urllib.request.Request(worker.web + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                body = response.read()
                return response.status, body if path == "/metrics" else json.loads(body)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    wait_for(lambda: get("/similar/A1")[0] == 200 and get("/similar/A1")[1]["items"], what="A1's list")
    status, body = get("/similar/A1")
    assert [i["product_id"] for i in body["items"]] == ["A2"] and body["version"] >= 1
    assert get("/substitutes/A1")[0] == 200
    product = get("/products/A1")[1]
    assert product["title"] == "Sony WH-1000XM4 headphones" and product["similar"][0]["product_id"] == "A2"
    assert get("/search?q=xm5")[1]["hits"][0]["product_id"] == "A2"

    assert get("/similar/nope")[0] == 404 and "unknown product" in get("/similar/nope")[1]["error"]
    assert get("/similar/bad%01id")[0] == 400
    assert get("/products/" + "x" * 300)[0] == 400
    assert get("/search?q=" + "x" * 300)[0] == 400
    assert [get(f"/search?q=xm5&limit={n}")[0] for n in ("0", "51", "-1", "ten", "50")] == [400] * 4 + [200]
    assert get("/similar/A1", token=None)[0] == 401
    assert get("/similar/A1", token="wrong")[0] == 401
    assert get("/metrics", token=None)[0] == 401
    assert worker.get("/health")[0] == 200  # health stays open for probes

    status, metrics = get("/metrics")
    assert status == 200
    text = metrics.decode()
    for name in ("simstream_events_total", "simstream_published_total", "simstream_freshness_seconds_bucket",
                 "simstream_encoder_batch_size_bucket", "simstream_index_live", "simstream_dead_letters_total"):
        assert name in text, name


def test_the_idf_is_fitted_once_the_stream_is_quiet_and_shared(
    settings_for: Callable[..., Any], worker_factory: Callable[..., Any]
) -> None:
    settings = settings_for()
    create_topics(settings)
    worker = worker_factory(SIMSTREAM_LEXICAL_REFIT_QUIET_S="2")
    worker.wait_ready()
    assert worker.get("/debug/lexical")[1]["n_docs"] == 0  # nothing to fit on yet
    kafka = producer(settings)
    for i in range(20):
        kafka.send(settings.topic_product_changes, key=f"Q{i}".encode(), value=json.dumps(
            {"op": "upsert", "product_id": f"Q{i}", "title": f"usb-c charging cable {i} m", "ts": TS}).encode())
    kafka.flush()
    kafka.close()
    wait_for(lambda: worker.get("/debug/lexical")[1]["n_docs"] == 20, what="the quiet-time refit", worker=worker)
    shared = latest_by_key(read_topic(settings, settings.topic_lexical))
    assert shared["idf"]["n_docs"] == 20  # every worker of the group adopts this one
    assert "lexical IDF refitted on 20 products" in worker.log_tail(200)


def test_a_worker_behind_its_input_reports_lag_rate_and_time_to_catch_up(
    settings_for: Callable[..., Any], worker_factory: Callable[..., Any]
) -> None:
    settings = settings_for()
    create_topics(settings)
    kafka = producer(settings)
    for i in range(1000):  # a catalog already waiting when the worker starts: a bootstrap
        kafka.send(settings.topic_product_changes, key=f"R{i}".encode(), value=json.dumps(
            {"op": "upsert", "product_id": f"R{i}", "title": f"hdmi cable {i}", "ts": TS}).encode())
    kafka.flush()
    kafka.close()
    worker = worker_factory(SIMSTREAM_PROGRESS_INTERVAL_S="0.5")
    worker.wait_ready(timeout=180)
    assert "records behind, consuming" in worker.log_tail(500), worker.log_tail()
    # /stats shows the last report, taken up to an interval ago: the next ones say caught up.
    stats = wait_for(lambda: (s := worker.get("/stats")[1])["input"] is not None and s["input"]["lag"] == 0 and s,
                     what="a report with no lag left", worker=worker)
    assert stats["products"] == 1000 and stats["input"]["eta_s"] == 0.0
