"""Faults on a real broker: the broker restarts mid-stream, and the worker loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streams.kafka_io import create_topics, latest_by_key, producer, read_topic
from streams.settings import Settings
from tests.support import ROOT, WorkerProcess, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KAFKA_SH = ROOT / "infra" / "kafka" / "kafka.sh"


class OwnBroker:
    """A broker this test may stop and start again, with its data kept across restarts."""

    def __init__(self, data: Path) -> None:
        self.port, self.controller, self.data = free_port(), free_port(), data
        self.env = {**os.environ, "KAFKA_CONTROLLER_PORT": str(self.controller)}

    def run(self, action: str) -> None:
        subprocess.run([str(KAFKA_SH), action, "--port", str(self.port), "--data", str(self.data)],
                       check=True, env=self.env, capture_output=True)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    broker = OwnBroker(tmp_path / "kafka")
    broker.run("up")
    yield broker
    broker.run("down")


def send(settings: Settings, start: int, stop: int) -> None:
    kafka = producer(settings)
    for i in range(start, stop):
        kafka.send(settings.topic_product_changes, key=f"P{i}".encode(), value=json.dumps(
            {"op": "upsert", "product_id": f"P{i}", "title": f"noise cancelling headphones model {i}",
             "ts": time.time()}).encode())
    kafka.flush()
    kafka.close()


def test_a_broker_restart_mid_stream_loses_nothing(
    own_broker: OwnBroker, isolated_env: dict[str, str], worker_factory: Callable[..., WorkerProcess],
) -> None:
    env = {**isolated_env, "SIMSTREAM_KAFKA_BOOTSTRAP": own_broker.bootstrap}
    settings = Settings(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    worker = worker_factory(SIMSTREAM_KAFKA_BOOTSTRAP=own_broker.bootstrap)
    worker.wait_ready()
    send(settings, 0, 30)

    own_broker.run("down")
    time.sleep(3.0)
    assert worker.alive, worker.log_tail()
    own_broker.run("up")
    send(settings, 30, 60)

    deadline = time.monotonic() + 120
    lists: dict[str, Any] = {}
    while time.monotonic() < deadline:
        lists = latest_by_key(read_topic(settings, settings.topic_similar_items))
        if len(lists) == 60:
            break
        time.sleep(1.0)
    assert len(lists) == 60, worker.log_tail()
    assert len(latest_by_key(read_topic(settings, settings.topic_products))) == 60
    assert worker.alive
