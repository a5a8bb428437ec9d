"""Scale-out on a real broker: several workers in one consumer group keep every list exact.

Two workers share four partitions and run the end-to-end churn; then one is killed with
SIGKILL while changes flow, and the survivor takes its partitions over; then a third worker
joins. After each step, once quiet, every live product's lists on the topics agree with the
exact recomputation, and deleted products end with tombstones (``kafka_e2e.check_invariant``).
The workers share one ``simstream serve-encoder`` (gRPC) to keep the test light.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streams.kafka_io import create_topics, latest_by_key, producer, read_topic
from streams.scaleout import partition_for
from streams.settings import Settings
from tests.streams.kafka_e2e import Scenario, check_invariant, grpc_encoder
from tests.support import WorkerProcess, free_port, wait_for

pytestmark = pytest.mark.integration

__all__ = ["grpc_encoder"]

PARTITIONS = 4


def owned(worker: WorkerProcess) -> set[int] | None:
    status, body = worker.get("/health")
    if status != 200 or body.get("handover_pending"):
        return None
    return set(body["owned_partitions"])


def wait_owned(workers: list[WorkerProcess], timeout: float = 90.0) -> list[set[int]]:
    """Until the live workers split every partition between them, each handover done."""
    deadline = time.monotonic() + timeout
    shares: list[set[int] | None] = []
    while time.monotonic() < deadline:
        shares = [owned(w) for w in workers]
        if all(s is not None for s in shares):
            sets = [s for s in shares if s is not None]
            if set().union(*sets) == set(range(PARTITIONS)) and sum(map(len, sets)) == PARTITIONS \
                    and all(sets):
                return sets
        time.sleep(0.5)
    raise AssertionError(f"partitions not split: {shares}\n" + "\n".join(w.log_tail(20) for w in workers))


def expected_ts(scenario: Scenario) -> dict[str, str]:
    last: dict[str, str] = {}
    for key, event in scenario.events:
        if isinstance(event, dict) and key in scenario.products:
            last[key] = max(last.get(key, ""), event["ts"])
    return {pid: ts for pid, ts in last.items() if pid not in scenario.deleted}


def wait_settled(settings: Settings, workers: list[WorkerProcess], scenario: Scenario,
                 timeout: float = 180.0) -> None:
    """Until the state topics hold the scenario's final catalog and every replica has caught up,
    then until the invariant holds (lists follow their replicas by a moment)."""
    want = expected_ts(scenario)
    deadline = time.monotonic() + timeout
    while True:
        assert all(w.alive for w in workers), "\n".join(w.log_tail() for w in workers)
        products = latest_by_key(read_topic(settings, settings.topic_products))
        if {k: v["ts"] for k, v in products.items()} == want:
            break
        assert time.monotonic() < deadline, f"{len(products)} products on the topic, want {len(want)}"
        time.sleep(1.0)
    while True:
        healths = [w.get("/health")[1] for w in workers]
        if all(sum(h["replica_lag"].values()) == 0 and not h["replica_pending_embeddings"]
               and h["products"] == len(want) for h in healths):
            break
        assert time.monotonic() < deadline, [
            {k: h.get(k) for k in ("products", "replica_lag", "replica_applied", "replica_pending_embeddings",
                                   "owned_partitions")} for h in healths]
        time.sleep(0.5)
    while True:
        time.sleep(2.0)
        try:
            check_invariant(settings, workers[0], scenario)
            return
        except AssertionError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{exc}\n" + "\n".join(w.log_tail(40) for w in workers)) from exc


SHOPPERS = [f"shopper-{i}" for i in range(12)]


def shopping(settings: Settings, scenario: Scenario) -> list[tuple[str, str]]:
    """Every shopper carts and buys one of four baskets of two products; wait for complements."""
    live = sorted(set(scenario.products) - scenario.deleted)
    baskets = [(live[i], live[i + 1]) for i in range(0, 8, 2)]
    kafka = producer(settings)
    t0 = time.time() - 60
    for n, user in enumerate(SHOPPERS):
        a, b = baskets[n % len(baskets)]
        for i, (kind, item) in enumerate([("add_to_cart", a), ("add_to_cart", b), ("purchase", a), ("purchase", b)]):
            kafka.send(settings.topic_user_events, key=user.encode(), value=json.dumps(
                {"user_id": user, "type": kind, "product_id": item, "ts": t0 + n + i / 10}).encode())
    kafka.flush()
    kafka.close()
    wait_for(lambda: check_complements(settings, baskets, quiet=True), timeout=60)
    return baskets


def check_complements(settings: Settings, baskets: list[tuple[str, str]], quiet: bool = False) -> bool:
    """Each basket item whose partner is live and in stock lists that partner as a complement."""
    products = latest_by_key(read_topic(settings, settings.topic_products))
    complements = latest_by_key(read_topic(settings, settings.topic_complements))
    for a, b in baskets:
        for item, partner in ((a, b), (b, a)):
            if item not in products or not products.get(partner, {}).get("in_stock", False):
                continue
            listed = [i["product_id"] for i in (complements.get(item) or {}).get("items", [])]
            if partner not in listed:
                if quiet:
                    return False
                raise AssertionError(f"complements of {item} lack {partner}: {listed}")
    return True


def group(grpc_encoder: str, model_base: Path, settings_for: Callable[..., Settings],
          **extra: str) -> tuple[dict[str, str], Settings]:
    """The environment of a group's workers (one shared gRPC encoder, ``PARTITIONS``
    partitions, no snapshots) with ``extra``, and its settings, topics created."""
    env = {"SIMSTREAM_ENCODER": grpc_encoder, "SIMSTREAM_MODEL_BASE": str(model_base),
           "SIMSTREAM_TOPIC_PARTITIONS": str(PARTITIONS), "SIMSTREAM_KAFKA_SESSION_TIMEOUT_S": "10",
           "SIMSTREAM_SNAPSHOT_INTERVAL_S": "0", **extra}
    settings = settings_for(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    return env, settings


def test_workers_share_partitions_and_survive_a_kill_and_a_join(
    grpc_encoder: str, model_base: Path, settings_for: Callable[..., Settings],
    worker_factory: Callable[..., WorkerProcess], tmp_path: Path,
) -> None:
    # The owner of partition 0 fits the group's IDF once the first load is quiet.
    env, settings = group(grpc_encoder, model_base, settings_for, SIMSTREAM_LEXICAL_REFIT_QUIET_S="3")

    def start(name: str) -> WorkerProcess:
        return worker_factory(**env, SIMSTREAM_WEB_PORT=str(free_port()),
                              SIMSTREAM_DATA_DIR=str(tmp_path / name))

    # (a) Two workers: the end-to-end invariant over the lists both publish.
    workers = [start("w1"), start("w2")]
    for w in workers:
        w.wait_ready(timeout=180)
    shares = wait_owned(workers)
    scenario = Scenario(seed=23)
    scenario.load()
    scenario.churn(rounds=2)
    scenario.send(settings, scenario.events)
    wait_settled(settings, workers, scenario)
    stats = [w.get("/stats")[1] for w in workers]
    assert all(s["events"] > 0 for s in stats), f"one worker did all the work: {stats} ({shares})"
    assert sum(s["dead_letters"] for s in stats) == scenario.bad

    # Shoppers: each user's history lives on the owner of their user-events partition, each
    # item's behaviour row on the owner of its pair-updates partition.
    baskets = shopping(settings, scenario)
    for user in SHOPPERS:
        owner = partition_for(user, PARTITIONS) in shares[1]
        histories = [w.get(f"/users/{user}/recommendations")[1]["history"] for w in workers]
        assert histories == ([0, 4] if owner else [4, 0]), (user, histories)
    time.sleep(3.0)  # the group commits its offsets every second

    # (b) SIGKILL one worker while changes flow: the survivor takes its partitions over.
    done = len(scenario.events)
    scenario.churn(rounds=2)
    churn = scenario.events[done:]
    chunks = [churn[i * len(churn) // 4:(i + 1) * len(churn) // 4] for i in range(4)]

    def produce() -> None:
        for chunk in chunks:
            scenario.send(settings, chunk)
            time.sleep(1.0)

    sender = threading.Thread(target=produce)
    sender.start()
    time.sleep(1.5)
    killed = workers.pop()
    killed.stop(signal.SIGKILL)
    sender.join()
    assert wait_owned(workers, timeout=90) == [set(range(PARTITIONS))]
    wait_settled(settings, workers, scenario)
    # The survivor rebuilt the killed worker's behaviour state from the topics: histories,
    # and the rows that keep its complements (not emptied by the handover).
    for user in SHOPPERS:
        assert workers[0].get(f"/users/{user}/recommendations")[1]["history"] == 4, user
    check_complements(settings, baskets)

    # (c) A third worker joins: a rebalance, more changes, the invariant again.
    workers.append(start("w3"))
    workers[-1].wait_ready(timeout=180)
    wait_owned(workers, timeout=90)
    done = len(scenario.events)
    scenario.churn(rounds=1)
    scenario.send(settings, scenario.events[done:])
    wait_settled(settings, workers, scenario)
    check_complements(settings, baskets)
    histories = {u: [w.get(f"/users/{u}/recommendations")[1]["history"] for w in workers] for u in SHOPPERS}
    assert all(sorted(h) == [0, 4] for h in histories.values()), histories  # each user on one owner
    health: list[Any] = [w.get("/health")[1] for w in workers]
    assert all(h["owned_partitions"] for h in health), health
    # The IDF was fitted once, in the stream, when the first load went quiet; every worker, the
    # joining one too, adopted it from the topic (a restart or a join never refits).
    idfs = [w.get("/debug/lexical")[1] for w in workers]
    assert idfs[0]["idf"] is not None and all(i == idfs[0] for i in idfs), [i["n_docs"] for i in idfs]
    assert sum("lexical IDF refitted" in w.log_tail(10_000) for w in [*workers, killed]) == 1


def test_workers_bootstrapping_together_settle_with_the_shared_idf(
    grpc_encoder: str, model_base: Path, settings_for: Callable[..., Settings],
    worker_factory: Callable[..., WorkerProcess], tmp_path: Path,
) -> None:
    """A group's bootstrap: both workers merge their backlog without lists (bulk catch-up).
    The owner of partition 0 refits the shared IDF before its settle; the other waits for
    that IDF before its own, instead of settling with none (a duplicates join several times
    slower) and then rebuilding every list again when the IDF arrives. Every list ends exact."""
    env, settings = group(grpc_encoder, model_base, settings_for, SIMSTREAM_BULK_CATCH_UP_MIN="20",
                          SIMSTREAM_PROGRESS_INTERVAL_S="0.2", SIMSTREAM_LEXICAL_REFIT_QUIET_S="600")
    workers = [worker_factory(**env, SIMSTREAM_WEB_PORT=str(free_port()), SIMSTREAM_DATA_DIR=str(tmp_path / name))
               for name in ("w1", "w2")]
    for w in workers:
        w.wait_ready(timeout=180)
    shares = wait_owned(workers)
    scenario = Scenario(seed=29)
    scenario.load()
    scenario.churn(rounds=1)
    scenario.send(settings, scenario.events)
    wait_settled(settings, workers, scenario)

    refitter, other = (workers[0], workers[1]) if 0 in shares[0] else (workers[1], workers[0])
    refitter_log, other_log = refitter.log_tail(10_000), other.log_tail(10_000)
    assert "refitted on" in refitter_log and "refitted on" not in other_log, refitter_log
    assert "bulk catch-up settled" in other_log, other_log
    assert other_log.index("waiting up to") < other_log.index("bulk catch-up settled"), other_log
    assert "no shared IDF after" not in other_log
    idfs = [w.get("/debug/lexical")[1] for w in workers]
    assert idfs[0]["idf"] is not None and idfs[0] == idfs[1]
