"""Operations commands against a live worker on a real broker: status, snapshot, rebuild-index,
refit-lexical, replay."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streams.kafka_io import create_topics, producer
from streams.settings import Settings
from tests.support import SIMSTREAM, WorkerProcess, wait_for

pytestmark = pytest.mark.integration

TS = "2026-11-28T03:00:00Z"


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SIMSTREAM, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          check=check, timeout=300)


def send_products(settings: Settings, numbers: range) -> None:
    kafka = producer(settings)
    for i in numbers:
        kafka.send(settings.topic_product_changes, key=f"P{i}".encode(), value=json.dumps(
            {"op": "upsert", "product_id": f"P{i}", "title": f"wireless headphones model {i}", "ts": TS}).encode())
    kafka.flush()
    kafka.close()


def test_status_snapshot_rebuild_refit_and_replay(
    settings_for: Callable[..., Settings], isolated_env: dict[str, str],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    settings = settings_for()
    create_topics(settings)
    worker = worker_factory()
    worker.wait_ready()
    send_products(settings, range(20))
    wait_for(lambda: worker.get("/stats")[1]["products"] == 20)

    def lag() -> dict[str, Any]:
        return json.loads(cli(isolated_env, "status", "--json").stdout)

    report = wait_for(lambda: (r := lag()) and all(
        row["lag"] == 0 for row in r["lag"] if row["topic"] == settings.topic_product_changes) and r)
    assert report["group"] == settings.app_id
    assert report["worker"]["products"] == 20 and report["worker"]["index_live"] == 20
    assert report["worker"]["model_version"] == "hashing/1"
    assert sum(row["end"] for row in report["lag"] if row["topic"] == settings.topic_product_changes) == 20

    out = cli(isolated_env, "snapshot").stdout
    path = Path(out.strip().removeprefix("snapshot written: "))
    assert (path / "manifest.json").is_file()

    before = worker.get("/similar/P1")[1]
    out = cli(isolated_env, "rebuild-index").stdout
    assert out.startswith("rebuilt: 20 products")
    after = worker.get("/similar/P1")[1]
    assert {i["product_id"] for i in after["items"]} <= {f"P{i}" for i in range(20)} - {"P1"}
    assert after["version"] >= before["version"] and len(after["items"]) == len(before["items"])

    # A rebuild, like a restart, never refits the IDF (that would move every list with no new
    # input): the group's shared one stays, here "none fitted yet" (the stream's quiet-time refit
    # is off in these tests). refit-lexical fits it on the 30 products now there, and the
    # worker adopts it.
    assert worker.get("/debug/lexical")[1]["n_docs"] == 0
    send_products(settings, range(20, 30))
    wait_for(lambda: worker.get("/stats")[1]["products"] == 30)
    out = cli(isolated_env, "refit-lexical").stdout
    assert out.startswith("fitted the IDF on 30 products")
    wait_for(lambda: worker.get("/debug/lexical")[1]["n_docs"] == 30)

    refused = cli(isolated_env, "replay", "--from", "2000-01-01T00:00:00Z", check=False)
    assert refused.returncode != 0 and "stop every worker" in refused.stderr

    worker.stop()
    replayed = wait_for(lambda: (r := cli(isolated_env, "replay", "--from", "2000-01-01T00:00:00Z",
                                          check=False)).returncode == 0 and r)
    assert f"{settings.topic_product_changes}[0] -> offset 0" in replayed.stdout
    offsets = [row["committed"] for row in lag()["lag"] if row["topic"] == settings.topic_product_changes]
    assert offsets and all(o == 0 for o in offsets)

    again = worker_factory()
    again.wait_ready()
    stats = wait_for(lambda: (s := again.get("/stats")[1])["events"] >= 30 and s)
    assert stats["products"] == 30 and stats["dead_letters"] == 0
