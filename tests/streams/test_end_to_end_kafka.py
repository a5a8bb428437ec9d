"""End to end on a real broker with the real encoder: the propagation invariant holds.

A worker gets ~300 real products (the Amazon software catalog), then a scripted churn of
title edits, deletes, re-inserts, stock flips and price changes, with bad events mixed in.
Once it is quiet, the last published list per key must agree with a from-scratch
recomputation over the final state (exact dense top-C, same hybrid blend, the worker's
frozen IDF), computed from vectors read back from ``simstream-embeddings``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streams.kafka_io import create_topics, latest_by_key, read_topic
from streams.settings import Settings
from tests.streams.kafka_e2e import Scenario, check_invariant, grpc_encoder, iso, wait_quiet
from tests.support import WorkerProcess, wait_for

pytestmark = pytest.mark.integration

__all__ = ["grpc_encoder"]  # the fixture, shared with the scale-out test


def run_worker(worker_factory: Callable[..., WorkerProcess], **env: str) -> WorkerProcess:
    worker = worker_factory(**env)
    worker.wait_ready(timeout=180)
    return worker


def test_catalog_churn_keeps_every_list_exact(
    grpc_encoder: str, model_base: Path,
    settings_for: Callable[..., Settings], worker_factory: Callable[..., WorkerProcess],
) -> None:
    """Through TF Serving's gRPC API. The in-process encoder runs the same churn and invariant
    in the restart tests below (a variant of this one with it repeated them: 47 s)."""
    env = {"SIMSTREAM_ENCODER": grpc_encoder, "SIMSTREAM_MODEL_BASE": str(model_base)}
    settings = settings_for(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    worker = run_worker(worker_factory, **env)

    scenario = Scenario()
    scenario.load()
    scenario.churn(rounds=2)
    scenario.send(settings, scenario.events)
    stats = wait_quiet(worker, len(scenario.events))
    assert stats["dead_letters"] == scenario.bad
    check_invariant(settings, worker, scenario)

    # Out of stock: the product's substitutes are published at once, with the trigger.
    live = sorted(set(scenario.products) - scenario.deleted)
    target_id = next(pid for pid in live if worker.get(f"/products/{pid}")[1]["in_stock"]
                     and worker.get(f"/substitutes/{pid}")[1]["items"])
    version_before = worker.get(f"/substitutes/{target_id}")[1]["version"]
    scenario.send(settings, [(target_id, {"op": "upsert", "product_id": target_id, "in_stock": False,
                                          "ts": iso(10_000)})])
    deadline = time.monotonic() + 30
    published: list[Any] = []
    while time.monotonic() < deadline and not published:
        published = [r.value for r in read_topic(settings, settings.topic_substitutes)
                     if r.key == target_id and r.value and r.value["version"] > version_before
                     and r.value["trigger"] == "out_of_stock"]
        time.sleep(0.3)
    assert published, "no out_of_stock publication"
    owner = worker.get(f"/products/{target_id}")[1]
    assert owner["in_stock"] is False
    for item in published[0]["items"]:
        candidate = worker.get(f"/products/{item['product_id']}")[1]
        assert candidate["in_stock"] is True
        if owner["price"] and candidate["price"]:
            assert abs(candidate["price"] - owner["price"]) <= settings.price_band * owner["price"] + 1e-9


@pytest.mark.parametrize("restore_from", ["topics", "snapshot"])
def test_a_restarted_worker_loses_nothing_and_embeds_nothing_twice(
    restore_from: str, model_base: Path, settings_for: Callable[..., Settings],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    env = {"SIMSTREAM_ENCODER": "local", "SIMSTREAM_MODEL_BASE": str(model_base),
           "SIMSTREAM_SNAPSHOT_INTERVAL_S": "1" if restore_from == "snapshot" else "0"}
    settings = settings_for(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    scenario = Scenario(seed=11)
    scenario.load()
    first_half = list(scenario.events)
    scenario.churn(rounds=1)
    second_half = scenario.events[len(first_half):]

    env_dir = settings.data_dir
    first = run_worker(worker_factory, **env)
    scenario.send(settings, first_half + second_half[: len(second_half) // 2])
    if restore_from == "snapshot":  # let it snapshot the catalog, then stop it mid-churn
        wait_for(lambda: first.get("/stats")[1]["events"] >= len(first_half), what="the catalog applied",
                 worker=first, timeout=120)
        loaded_at = time.time()

        def snapshot_of_the_catalog() -> bool:
            return any(p.stat().st_mtime > loaded_at for p in Path(env_dir).glob("snapshots/*/CURRENT"))

        wait_for(snapshot_of_the_catalog, what="a snapshot taken after the catalog", worker=first, timeout=120)
    else:
        time.sleep(1.0)  # stop it mid-stream, while it is still working through the churn
    first.stop()

    second = run_worker(worker_factory, **env)
    health = second.get("/health")[1]
    assert health["restored_from"] == restore_from
    if restore_from == "snapshot":  # its buffers and lists are taken over, not rebuilt at the handover
        assert health["last_handover"]["kept_from_snapshot"] > 0, health
    scenario.send(settings, second_half[len(second_half) // 2:])
    wait_quiet(second, 1)  # events counts only what the second worker consumed
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        products = latest_by_key(read_topic(settings, settings.topic_products))
        if set(products) == set(scenario.products) - scenario.deleted and all(
            products[pid]["ts"] == max(e["ts"] for k, e in scenario.events
                                      if k == pid and isinstance(e, dict))
            for pid in products
        ):
            break
        time.sleep(1.0)
    time.sleep(2.0)
    check_invariant(settings, second, scenario)

    # Nothing already embedded was embedded again: each (product, text) was written once.
    pairs = [(r.key, r.value["content_hash"]) for r in read_topic(settings, settings.topic_embeddings)
             if r.value is not None]
    assert len(pairs) == len(set(pairs)), "a product text was embedded twice"


def test_a_bulk_catch_up_publishes_each_list_about_once_and_ends_exact(
    model_base: Path, settings_for: Callable[..., Settings], worker_factory: Callable[..., WorkerProcess],
) -> None:
    """A worker that starts far behind (the whole scenario waiting on the topic) merges the
    backlog without updating lists and settles once, with the IDF refitted first: the lists
    end as exact as when every change propagates, with about one publication each."""
    # A refit is due (the IDF was never fitted): it comes with the settle, not after it.
    env = {"SIMSTREAM_MODEL_BASE": str(model_base), "SIMSTREAM_BULK_CATCH_UP_MIN": "20",
           "SIMSTREAM_PROGRESS_INTERVAL_S": "0.2", "SIMSTREAM_LEXICAL_REFIT_QUIET_S": "600"}
    settings = settings_for(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    scenario = Scenario()
    scenario.load()
    scenario.churn(rounds=2)
    scenario.send(settings, scenario.events)
    worker = run_worker(worker_factory, **env)
    stats = wait_quiet(worker, len(scenario.events))
    assert stats["dead_letters"] == scenario.bad
    log = worker.log_tail(200)
    assert "bulk catch-up settled" in log and "refitted on" in log and "end of a bulk catch-up" in log, log
    check_invariant(settings, worker, scenario)
    records = list(read_topic(settings, settings.topic_similar_items))
    lists = {r.key for r in records}
    print(f"{len(records)} similar-items records for {len(lists)} lists")
    assert len(records) <= 1.5 * len(lists), f"{len(records)} records for {len(lists)} lists"
