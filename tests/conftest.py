"""Shared fixtures: a real Kafka broker, isolated settings per test, and worker processes.

The broker fixture reuses the one named by ``SIMSTREAM_KAFKA_BOOTSTRAP`` (``make test`` starts
one); otherwise it starts ``infra/kafka/kafka.sh`` on a free loopback port for the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, SIMSTREAM, WorkerProcess, free_port

KAFKA_SH = ROOT / "infra" / "kafka" / "kafka.sh"


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
        # The quiet-time IDF refit moves every list; tests that want it turn it on.
        "SIMSTREAM_LEXICAL_REFIT_QUIET_S": "0",
        # The plumbing tests need no model; the end-to-end tests pick "local" or "grpc://".
        "SIMSTREAM_ENCODER": "hashing",
    }
    for name in ("product_changes", "user_events", "similar_items", "substitutes", "complements",
                 "user_recommendations", "dead_letters", "products", "embeddings", "pair_updates", "lexical",
                 "product_labels", "models", "competitor_offers", "offer_matches", "competitor_prices",
                 "duplicates"):
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


@pytest.fixture(scope="session")
def model_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported SavedModel: the one ``make`` exported, or a fresh export for this session."""
    configured = os.environ.get("SIMSTREAM_MODEL_BASE")
    if configured and (Path(configured) / "1" / "saved_model.pb").exists():
        return Path(configured)
    from encoders.export import export_encoder

    base = tmp_path_factory.mktemp("models") / "minilm"
    export_encoder(base, version=1, config_dir=base.parent / "tfserving")
    return base


@pytest.fixture(autouse=True)
def _nothing_stays_frozen() -> Iterator[None]:
    """``Recommender.load`` freezes what it made (``gc.freeze``): a worker wants that, one
    test process running hundreds of tests does not (``gc.get_referrers``, which hypothesis
    uses, no longer sees frozen objects)."""
    import gc

    yield
    if gc.get_freeze_count():
        gc.unfreeze()
