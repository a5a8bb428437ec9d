"""Worker snapshots: a failed write is logged and the previous snapshot stays current."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from serving.recommender import Kind, Recommender
from streams.app import build_runtime, recommender_config
from streams.pipeline import Inbound
from streams.settings import Settings

NOW = 1_795_000_000.0


async def fill(runtime: Any, n: int, start: int = 0) -> None:
    messages = [Inbound("product-changes", 0, i, f"P{i}".encode(), json.dumps(
        {"op": "upsert", "product_id": f"P{i}", "title": f"wireless headphones model {i}", "ts": NOW}).encode(), NOW)
        for i in range(start, start + n)]
    await runtime.products.handle_batch(messages)


async def test_a_failed_snapshot_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(encoder="hashing", data_dir=tmp_path)
    runtime = build_runtime(settings)
    runtime.products.clock = lambda: NOW
    await fill(runtime, 12)
    first = runtime.take_snapshot()
    assert first is not None and (runtime.snapshot_root / "CURRENT").read_text() == first.name

    await fill(runtime, 5, start=12)
    runtime.dirty = True

    def disk_full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("serving.snapshot._write_files", disk_full)
    with caplog.at_level(logging.ERROR):
        assert runtime.take_snapshot() is None
    assert "snapshot failed, the previous one is kept" in caplog.text and "No space left" in caplog.text
    assert runtime.dirty, "the failed snapshot must be retried"
    assert (runtime.snapshot_root / "CURRENT").read_text() == first.name
    assert not [p for p in runtime.snapshot_root.iterdir() if p.name.startswith(".tmp-")]

    restored = Recommender.load(runtime.snapshot_root, recommender_config(settings))
    assert len(restored.catalog) == 12
    assert restored.lists(Kind.SIMILAR).keys() == {f"P{i}" for i in range(12)}
