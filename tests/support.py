"""Helpers shared by the test modules: free ports, worker subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIMSTREAM = str(Path(sys.executable).parent / "simstream")


@contextmanager
def encoder_server(model_base: Path, log: Path) -> Iterator[str]:
    """``simstream serve-encoder`` (a real gRPC PredictionService) over ``model_base``: yields
    its ``grpc://`` target once the channel is ready, and stops it afterwards."""
    import grpc

    port = free_port()
    proc = subprocess.Popen([SIMSTREAM, "serve-encoder", "--model-base", str(model_base), "--port", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=1)
            break
        except grpc.FutureTimeoutError:
            continue
    try:
        yield f"grpc://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def wait_for(
    predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition", worker: WorkerProcess | None = None,
    every: float = 0.3,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with the worker's log tail
    (at once when the worker has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker is None or worker.alive, worker.log_tail() if worker is not None else ""
        value = predicate()
        if value:
            return value
        time.sleep(every)
    tail = worker.log_tail() if worker is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def send(settings: Any, topic: str, records: Iterable[tuple[str | None, bytes]]) -> None:
    """Produce ``(key, value)`` records to ``topic`` and wait until the broker has them all."""
    from streams.kafka_io import producer

    kafka = producer(settings)
    for key, value in records:
        kafka.send(topic, key=None if key is None else key.encode(), value=value)
    kafka.flush()
    kafka.close()


def send_products(settings: Any, events: Iterable[dict[str, Any]]) -> None:
    """Product changes as JSON on ``product-changes``, keyed by ``product_id``."""
    send(settings, settings.topic_product_changes, ((e["product_id"], json.dumps(e).encode()) for e in events))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])



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


def write_toy_model(target: Path, dim: int = 384, seed: int = 2) -> None:
    """A SavedModel with simstream's signature: unit-normalised sums of per-token sine features."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    freqs = tf.constant(rng.uniform(0.01, 3.0, dim), tf.float32)
    phases = tf.constant(rng.uniform(0.0, 2 * np.pi, dim), tf.float32)
    spec = [tf.TensorSpec([None, None], tf.int32, name="input_ids"),
            tf.TensorSpec([None, None], tf.int32, name="attention_mask")]

    @tf.function(input_signature=spec)
    def serve(input_ids: Any, attention_mask: Any) -> dict[str, Any]:
        feats = tf.sin(tf.cast(input_ids, tf.float32)[..., None] * freqs + phases)
        mask = tf.cast(attention_mask, tf.float32)[..., None]
        return {"embedding": tf.math.l2_normalize(tf.reduce_sum(feats * mask, axis=1), axis=1)}

    module = tf.Module()
    module.serve = serve
    tmp = target.parent / f".tmp-{target.name}"
    tf.saved_model.save(module, str(tmp), signatures={"serving_default": serve})
    os.replace(tmp, target)  # a watcher never sees half a model
