"""A group's bootstrap: a worker that does not refit the shared IDF settles once one arrives.

The owner of ``product-changes`` partition 0 refits the IDF at the end of its own bulk
catch-up, on the catalog it holds then: its own partitions and what its replica has read of
the others, often under half of the group's catalog. The other workers wait for that IDF
before they settle (``Worker.awaiting_shared_idf``); the wait must end when it arrives,
not when an IDF fitted on at least half of their own catalog does, which may never come
before ``SIMSTREAM_IDF_WAIT_S`` runs out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from serving.lexical import LexicalModel
from streams.outputs import Inbound
from streams.readiness import InputProgress
from streams.scaleout import partition_for
from streams.settings import Settings
from streams.worker import Worker

NOW = 1_795_000_000.0
TITLES = [f"wireless headphones model {i} with {('noise cancelling', 'bass boost', 'long battery')[i % 3]}"
          for i in range(24)]


def batch(partition: int, first: int, n: int) -> list[Inbound]:
    return [Inbound("product-changes", partition, i, f"P{i}".encode(), json.dumps(
        {"op": "upsert", "product_id": f"P{i}", "title": TITLES[i], "ts": NOW}).encode(), NOW)
        for i in range(first, first + n)]


def behind(worker: Worker, lag: int) -> None:
    """The next progress report: ``lag`` records of owned partitions not consumed yet."""
    worker.progress = InputProgress(lag=lag, rate=0.0, eta_s=None)
    worker.progress_mark = (time.monotonic(), worker.catch_up.taken)


async def test_the_settle_waits_for_the_shared_idf_and_ends_when_one_fitted_on_less_arrives(tmp_path: Path) -> None:
    sent: list[Any] = []

    async def sink(records: Any) -> None:
        sent.extend(records)

    settings = Settings(encoder="hashing", data_dir=tmp_path, bulk_catch_up_min=5, embed_batch_size=4,
                        idf_wait_s=300, lexical_refit_quiet_s=60)
    worker = Worker(settings, sink=sink)
    worker.engine.clock = lambda: NOW
    worker.ownership.allowed, worker.ownership.total = frozenset({1}), 2  # the other worker has 0: it refits
    worker.ownership.settled.set()
    worker.ownership.catching_up = False

    behind(worker, 24)
    await worker.on_product_changes(batch(1, 0, 24))
    core = worker.engine.core
    assert core.unsettled and len(core.catalog) == 24, "a backlog of new products is merged without lists"

    behind(worker, 0)
    assert worker.far_behind(), "with no IDF yet, the settle waits for the refitter's"
    await worker.settle_tick()
    assert core.unsettled and not [r for r in sent if r.topic == settings.topic_similar_items]

    # The refitter fitted on what it held at the end of its own catch-up: a third of this catalog.
    shared = LexicalModel.fit(TITLES[:8])
    core.use_lexical(shared)
    assert not worker.far_behind(), "the shared IDF arrived: the wait is over, fitted on less than half or not"
    await worker.settle_tick()
    assert not core.unsettled and core.lexical.same_as(shared)
    similar = {r.key for r in sent if r.topic == settings.topic_similar_items}
    assert similar == {f"P{i}" for i in range(24) if partition_for(f"P{i}", 2) == 1} != set()


async def test_without_a_shared_idf_the_settle_waits_no_longer_than_idf_wait_s(tmp_path: Path) -> None:
    settings = Settings(encoder="hashing", data_dir=tmp_path, bulk_catch_up_min=5, embed_batch_size=4,
                        idf_wait_s=300, lexical_refit_quiet_s=60)
    worker = Worker(settings)
    worker.engine.clock = lambda: NOW
    worker.ownership.allowed = frozenset({1})
    worker.ownership.settled.set()
    behind(worker, 24)
    await worker.on_product_changes(batch(1, 0, 24))
    behind(worker, 0)
    assert worker.far_behind()
    assert worker.idf_wait_since is not None
    worker.idf_wait_since -= 301
    assert not worker.far_behind(), "past idf_wait_s the worker settles with the IDF at hand"
