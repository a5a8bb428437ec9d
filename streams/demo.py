"""``make demo``: a local worker fed a real catalog and a short scripted scenario.

Run as ``python -m streams.demo --catalog FILE``. It creates the topics, starts ``simstream
worker`` as a child process, streams the catalog in, plays the scenario, prints what each
step published, and leaves the worker running until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import click

from streams.kafka_io import create_topics, producer, read_topic
from streams.records import iso
from streams.settings import Settings, get_settings


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, None
    except OSError:
        return 0, None


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise click.ClickException(f"timed out after {timeout:.0f} s waiting for {what}")


class Demo:
    def __init__(self, settings: Settings, catalog: Path) -> None:
        self.settings = settings
        self.catalog = catalog
        self.web = f"http://{settings.web_host}:{settings.web_port}"
        self.kafka = producer(settings)
        self.worker: subprocess.Popen[bytes] | None = None

    def send(self, event: dict[str, Any]) -> float:
        event = {**event, "ts": iso(time.time())}
        self.kafka.send(self.settings.topic_product_changes, key=event["product_id"].encode(),
                        value=json.dumps(event).encode())
        self.kafka.flush()
        return time.time()

    def start_worker(self) -> None:
        log_path = self.settings.data_dir / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        click.echo(f"starting worker (log: {log_path})")
        self.worker = subprocess.Popen(
            [str(Path(sys.executable).parent / "simstream"), "worker"],
            stdout=log_path.open("ab"), stderr=subprocess.STDOUT, env=os.environ.copy(),
        )
        _wait(lambda: _get(self.web + "/health")[0] == 200, 180, "the worker to become ready")

    def load_catalog(self) -> int:
        lines = [json.loads(line) for line in self.catalog.read_text(encoding="utf-8").splitlines() if line.strip()]
        started = time.time()
        for product in lines:
            product.setdefault("ts", iso(started))
            self.kafka.send(self.settings.topic_product_changes, key=product["product_id"].encode(),
                            value=json.dumps(product).encode())
        self.kafka.flush()
        _wait(lambda: (_get(self.web + "/health")[1] or {}).get("products", 0) >= len(lines), 600,
              "the catalog to be applied")
        click.echo(f"loaded {len(lines)} products in {time.time() - started:.1f} s")
        return len(lines)

    def run(self) -> None:
        click.echo(f"creating topics on {self.settings.kafka_bootstrap}")
        create_topics(self.settings)
        self.start_worker()
        self.load_catalog()
        sample = json.loads(self.catalog.read_text(encoding="utf-8").splitlines()[0])["product_id"]
        status, product = _get(f"{self.web}/products/{sample}")
        click.echo(f"\nGET /products/{sample} -> {status}\n{json.dumps(product, indent=2)[:1500]}")
        bad = {"op": "upsert", "product_id": sample, "price": "free"}
        self.send(bad)
        time.sleep(2)
        letters = [r.value for r in read_topic(self.settings, self.settings.topic_dead_letters)]
        if letters:
            click.echo(f"\nbad event {json.dumps(bad)} -> dead letter: {letters[-1]['error']}")
        click.echo(f"\nworker running: {self.web}/health  {self.web}/metrics   (Ctrl-C to stop)")
        assert self.worker is not None
        with contextlib.suppress(KeyboardInterrupt):
            self.worker.wait()

    def close(self) -> None:
        self.kafka.close()
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                self.worker.kill()


@click.command()
@click.option("--catalog", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
def main(catalog: Path) -> None:
    """Run the demo against the broker in SIMSTREAM_KAFKA_BOOTSTRAP."""
    demo = Demo(get_settings(), catalog)
    try:
        demo.run()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
