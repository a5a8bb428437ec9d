"""Worker snapshots: a failed write is logged and the previous snapshot stays current."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from serving.recommender import Kind, Recommender
from streams.outputs import Inbound
from streams.settings import Settings
from streams.worker import Worker, recommender_config

NOW = 1_795_000_000.0


async def fill(worker: Any, n: int, start: int = 0) -> None:
    messages = [Inbound("product-changes", 0, i, f"P{i}".encode(), json.dumps(
        {"op": "upsert", "product_id": f"P{i}", "title": f"wireless headphones model {i}", "ts": NOW}).encode(), NOW)
        for i in range(start, start + n)]
    await worker.engine.handle(messages)


async def forking_worker(tmp_path: Path) -> Worker:
    """A worker that snapshots in a forked child, holding 12 products."""
    worker = Worker(Settings(encoder="hashing", data_dir=tmp_path, snapshot_fork=True))
    worker.engine.clock = lambda: NOW
    await fill(worker, 12)
    return worker


async def test_a_failed_snapshot_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(encoder="hashing", data_dir=tmp_path)
    worker = Worker(settings)
    worker.engine.clock = lambda: NOW
    await fill(worker, 12)
    first = worker.take_snapshot()
    assert first is not None and (worker.snapshot_root / "CURRENT").read_text() == first.name

    await fill(worker, 5, start=12)
    worker.dirty = True

    def disk_full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("serving.snapshot._write_files", disk_full)
    with caplog.at_level(logging.ERROR):
        assert worker.take_snapshot() is None
    assert "snapshot failed, the previous one is kept" in caplog.text and "No space left" in caplog.text
    assert worker.dirty, "the failed snapshot must be retried"
    assert (worker.snapshot_root / "CURRENT").read_text() == first.name
    assert not [p for p in worker.snapshot_root.iterdir() if p.name.startswith(".tmp-")]

    restored = Recommender.load(worker.snapshot_root, recommender_config(settings))
    assert len(restored.catalog) == 12
    assert restored.lists(Kind.SIMILAR).keys() == {f"P{i}" for i in range(12)}


async def test_a_forked_snapshot_is_of_the_instant_of_the_fork(tmp_path: Path) -> None:
    """The child writes the core as it was when forked, while the stream goes on changing it."""
    worker = await forking_worker(tmp_path)
    worker.dirty = True
    child = worker.fork_snapshot()
    assert child is not None and not worker.dirty
    await fill(worker, 5, start=12)  # the stream goes on while the child writes
    path = child.wait()
    assert (worker.snapshot_root / "CURRENT").read_text() == path.name
    restored = Recommender.load(worker.snapshot_root, recommender_config(worker.settings))
    assert len(restored.catalog) == 12 and len(worker.engine.core.catalog) == 17
    assert restored.lists(Kind.SIMILAR).keys() == {f"P{i}" for i in range(12)}


async def test_the_snapshot_pause_counts_the_streams_wait_not_the_batch_in_flight(tmp_path: Path) -> None:
    """``simstream_snapshot_pause_seconds`` is the time the stream is held for the fork: a
    batch that runs for half a second when the snapshot is due is not part of it."""
    import asyncio

    worker = await forking_worker(tmp_path)
    worker.dirty = True
    in_flight = asyncio.Event()

    async def long_batch() -> None:
        async with worker.batch_lock:
            in_flight.set()
            await asyncio.sleep(0.5)

    batch = asyncio.ensure_future(long_batch())
    await in_flight.wait()
    path = await worker.snapshot_between_batches()
    await batch
    assert path is not None
    pause = worker.metrics.snapshot_pause
    assert pause._sum.get() < 0.4  # the fork alone; the half second was the batch's
    assert sum(b.get() for b in pause._buckets) == 1


async def test_a_failed_forked_snapshot_is_retried_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    worker = await forking_worker(tmp_path)
    first = await worker.snapshot_between_batches()
    assert first is not None and (worker.snapshot_root / "CURRENT").read_text() == first.name

    await fill(worker, 5, start=12)
    worker.dirty = True

    def disk_full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("serving.snapshot._write_files", disk_full)  # the child inherits it
    with caplog.at_level(logging.ERROR):
        assert await worker.snapshot_between_batches() is None
    assert "snapshot failed, the previous one is kept" in caplog.text and "No space left" in caplog.text
    assert worker.dirty, "the failed snapshot must be retried"
    assert (worker.snapshot_root / "CURRENT").read_text() == first.name


async def test_the_idf_is_refitted_in_a_quiet_stream_by_the_owner_of_partition_zero(tmp_path: Path) -> None:
    import time

    from streams.outputs import Outbound

    sent: list[Outbound] = []

    async def sink(records: Any) -> None:
        sent.extend(records)

    settings = Settings(encoder="hashing", data_dir=tmp_path, lexical_refit_quiet_s=5)
    worker = Worker(settings, sink=sink)
    worker.engine.clock = lambda: NOW
    await fill(worker, 12)
    assert not worker.engine.core.lexical.fitted
    worker.catch_up.done = True
    worker.ownership.allowed = frozenset({0})
    worker.last_product_event_at = time.time()
    await worker.refit_lexical_when_quiet()
    assert not worker.engine.core.lexical.fitted, "the stream is not quiet yet"
    worker.ownership.allowed = frozenset({1})
    worker.last_product_event_at = time.time() - 10
    await worker.refit_lexical_when_quiet()
    assert not worker.engine.core.lexical.fitted, "another worker owns partition 0"
    worker.ownership.allowed = frozenset({0, 1})
    await worker.refit_lexical_when_quiet()
    assert worker.engine.core.lexical.n_docs == 12
    assert [r.key for r in sent if r.topic == settings.topic_lexical] == ["idf"]
    sent.clear()
    await worker.refit_lexical_when_quiet()
    assert sent == [], "fitted on the whole catalog: nothing to refit until it doubles"


def test_input_progress_says_how_far_behind_at_what_pace_and_when_caught_up() -> None:
    from streams.readiness import CatchUp, input_progress

    progress = input_progress({0: 1000, 1: 500, 2: 900}, {0: 400, 1: 500, 2: 0}, {0, 1}, consumed=300,
                              seconds=10.0)
    assert (progress.lag, progress.rate, progress.eta_s) == (600, 30.0, 20.0)  # partition 2 is not ours
    assert "600 records behind, consuming 30/s, caught up in 20 s" in progress.line("product-changes")
    assert input_progress({0: 5}, {0: 5}, {0}, consumed=0, seconds=10.0).eta_s == 0.0
    assert input_progress({0: 9}, {0: 5}, {0}, consumed=0, seconds=10.0).eta_s is None  # stalled

    catch_up = CatchUp("product-changes")
    catch_up.start({0: 10}, {0: 2})
    catch_up.consumed(0, 4)
    catch_up.gained({0: 3, 1: 7})  # a committed offset never moves a position back
    assert catch_up.positions == {0: 5, 1: 7} and catch_up.taken == 1
