"""Shared fixtures: a real Kafka broker, isolated settings per test, and worker processes.

The broker fixture reuses the one named by ``SIMSTREAM_KAFKA_BOOTSTRAP`` (``make test`` starts
one); otherwise it starts ``infra/kafka/kafka.sh`` on a free loopback port for the session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "infra" / "kafka" / "kafka.sh"
SIMSTREAM = str(Path(sys.executable).parent / "simstream")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a running Kafka broker on loopback."""
    existing = os.environ.get("SIMSTREAM_KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    port = free_port()
    data = tmp_path_factory.mktemp("kafka")
    env = {**os.environ, "KAFKA_CONTROLLER_PORT": str(free_port())}
    subprocess.run([str(KAFKA_SH), "up", "--port", str(port), "--data", str(data)], check=True, env=env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(KAFKA_SH), "down", "--port", str(port), "--data", str(data)], check=False, env=env)


@pytest.fixture
def isolated_env(kafka_bootstrap: str, tmp_path: Path) -> dict[str, str]:
    """SIMSTREAM_* variables that give one test its own topics, consumer group and ports."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "SIMSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "SIMSTREAM_APP_ID": f"simstream-test-{tag}",
        "SIMSTREAM_WEB_PORT": str(free_port()),
        "SIMSTREAM_DATA_DIR": str(tmp_path / "data"),
        "SIMSTREAM_TOPIC_PARTITIONS": "3",
        "SIMSTREAM_LOG_LEVEL": "info",
        # The plumbing tests need no model; the end-to-end tests pick "local" or "grpc://".
        "SIMSTREAM_ENCODER": "hashing",
    }
    for name in ("product_changes", "user_events", "similar_items", "substitutes", "complements",
                 "user_recommendations", "dead_letters", "products", "embeddings"):
        env[f"SIMSTREAM_TOPIC_{name.upper()}"] = f"t-{tag}-{name.replace('_', '-')}"
    return env


@pytest.fixture
def settings_for(isolated_env: dict[str, str]) -> Callable[..., Any]:
    """Build a ``Settings`` from the isolated environment plus overrides."""
    from streams.settings import Settings

    def build(**overrides: Any) -> Settings:
        values = {k.removeprefix("SIMSTREAM_").lower(): v for k, v in isolated_env.items()}
        values.update(overrides)
        return Settings(**values)

    return build


class WorkerProcess:
    """A ``simstream worker`` subprocess with its own log file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.web = f"http://127.0.0.1:{env['SIMSTREAM_WEB_PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [SIMSTREAM, "worker"], env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        return self

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.web + path, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = self.get("/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"worker not ready in {timeout} s:\n{self.log_tail()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def worker_factory(isolated_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers that share the test's topics; all are stopped at the end of the test."""
    workers: list[WorkerProcess] = []

    def start(**extra_env: str) -> WorkerProcess:
        env = {**isolated_env, **extra_env}
        worker = WorkerProcess(env, tmp_path / f"worker-{len(workers)}.log").start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="session")
def simstream_cli() -> str:
    path = shutil.which("simstream", path=str(Path(sys.executable).parent)) or SIMSTREAM
    return path
