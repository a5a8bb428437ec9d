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


class EncoderServer:
    """``simstream serve-encoder`` on a fixed loopback port, which the test stops and restarts."""

    def __init__(self, model_base: Path, log: Path) -> None:
        from tests.support import SIMSTREAM

        self.port = free_port()
        self.args = [SIMSTREAM, "serve-encoder", "--model-base", str(model_base), "--port", str(self.port)]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import grpc

        self.proc = subprocess.Popen(self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{self.port}")).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                continue
        raise AssertionError("serve-encoder did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


OUTAGE_S = 30.0


@pytest.mark.faults  # over a minute (model loads, a 30 s outage): make test-faults runs it
def test_an_encoder_outage_holds_text_changes_while_stock_changes_flow(
    model_base: Path, settings_for: Callable[..., Settings], worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    server = EncoderServer(model_base, tmp_path / "serve-encoder.log")
    server.start()
    try:
        env = {"SIMSTREAM_ENCODER": f"grpc://127.0.0.1:{server.port}", "SIMSTREAM_MODEL_BASE": str(model_base),
               "SIMSTREAM_ENCODER_TIMEOUT_S": "1", "SIMSTREAM_ENCODER_RETRIES": "1"}
        settings = settings_for(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
        create_topics(settings)
        worker = worker_factory(**env)
        worker.wait_ready(timeout=180)
        send(settings, 0, 40)
        deadline = time.monotonic() + 120
        while worker.get("/stats")[1]["products"] < 40 and time.monotonic() < deadline:
            time.sleep(0.5)

        server.stop()
        stopped = time.monotonic()
        kafka = producer(settings)
        for i in range(0, 10):  # title edits: need the encoder
            kafka.send(settings.topic_product_changes, key=f"P{i}".encode(), value=json.dumps(
                {"op": "upsert", "product_id": f"P{i}", "title": f"studio monitor speakers {i}",
                 "ts": time.time()}).encode())
        for i in range(20, 30):  # stock changes: must keep flowing
            kafka.send(settings.topic_product_changes, key=f"P{i}".encode(), value=json.dumps(
                {"op": "upsert", "product_id": f"P{i}", "in_stock": False, "ts": time.time()}).encode())
        kafka.flush()
        kafka.close()

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(not worker.get(f"/products/P{i}")[1]["in_stock"] for i in range(20, 30)):
                break
            time.sleep(0.5)
        assert all(not worker.get(f"/products/P{i}")[1]["in_stock"] for i in range(20, 30)), worker.log_tail()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and worker.get("/health")[1]["pending_text_changes"] < 10:
            time.sleep(0.5)
        status, health = worker.get("/health")
        assert status == 503 and health["status"] == "degraded" and health["pending_text_changes"] == 10, health
        assert all(worker.get(f"/products/P{i}")[1]["title"] == f"noise cancelling headphones model {i}"
                   for i in range(10)), "a title edit was applied without its embedding"

        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
        server.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and worker.get("/health")[0] != 200:
            time.sleep(0.5)
        assert worker.get("/health")[0] == 200, worker.log_tail()
        titles = [worker.get(f"/products/P{i}")[1]["title"] for i in range(10)]
        assert titles == [f"studio monitor speakers {i}" for i in range(10)]
        assert worker.get("/stats")[1]["dead_letters"] == 0
        lists = latest_by_key(read_topic(settings, settings.topic_similar_items))
        assert len(lists) == 40
        assert all(i["product_id"] in {f"P{n}" for n in range(40)} for v in lists.values() for i in v["items"])
    finally:
        server.stop()
