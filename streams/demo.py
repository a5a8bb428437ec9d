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


class Watcher:
    """Reads the two list topics from their current end, to see what one step republished."""

    def __init__(self, settings: Settings) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from streams.kafka_io import client_options

        self.consumer = KafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False)
        parts = []
        for topic in (settings.topic_similar_items, settings.topic_substitutes):
            ids = self.consumer.partitions_for_topic(topic) or set()
            parts += [TopicPartition(topic, p) for p in ids]
        self.consumer.assign(parts)
        self.consumer.seek_to_end()

    def drain(self) -> None:
        while self.consumer.poll(timeout_ms=200):
            pass

    def collect(self, quiet_s: float = 1.5, timeout_s: float = 30.0) -> list[Any]:
        """Records until nothing new arrives for ``quiet_s``."""
        from streams.kafka_io import Record, parse_value, text_of

        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline and (not records or time.monotonic() - last < quiet_s):
            batch = self.consumer.poll(timeout_ms=200)
            for tp, messages in batch.items():
                for m in messages:
                    records.append(Record(tp.topic, tp.partition, m.offset, text_of(m.key), parse_value(m.value), m.timestamp / 1000))
                    last = time.monotonic()
        return records


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
        def settled() -> bool:
            stats = _get(self.web + "/stats")[1] or {}
            quiet = stats.get("last_event_at") is not None and time.time() - stats["last_event_at"] > 2.0
            return bool(stats.get("products", 0) >= len(lines) and quiet)

        _wait(settled, 900, "the catalog to be applied")
        click.echo(f"loaded {len(lines)} products in {time.time() - started:.1f} s")
        return len(lines)

    def watch(self) -> Watcher:
        return Watcher(self.settings)

    def step(self, label: str, events: list[dict[str, Any]], watcher: Watcher) -> list[Any]:
        """Send events, wait until the outputs go quiet, and print what was republished."""
        watcher.drain()
        sent_at = 0.0
        for event in events:
            sent_at = self.send(event)
        records = watcher.collect()
        own = [r for r in records if r.key in {e["product_id"] for e in events}]
        similar = {r.key for r in records if r.topic == self.settings.topic_similar_items}
        substitutes = {r.key for r in records if r.topic == self.settings.topic_substitutes}
        own_ms = (min(r.timestamp for r in own) - sent_at) * 1000 if own else float("nan")
        last_ms = (max(r.timestamp for r in records) - sent_at) * 1000 if records else float("nan")
        others = len((similar | substitutes) - {e["product_id"] for e in events})
        click.secho(f"\n{label}", bold=True)
        click.echo(f"  -> its lists and {others} other products' lists republished "
                   f"({len(similar)} similar-items, {len(substitutes)} substitutes): "
                   f"own list in {own_ms:.0f} ms, last list in {last_ms:.0f} ms")
        return records

    def show_list(self, title: str, value: dict[str, Any] | None, limit: int = 3) -> None:
        if value is None:
            click.echo(f"  {title}: <tombstone>")
            return
        trigger = f" trigger={value['trigger']}" if "trigger" in value else ""
        click.echo(f"  {title} (v{value['version']}{trigger}):")
        for item in value["items"][:limit]:
            name = (_get(f"{self.web}/products/{item['product_id']}")[1] or {}).get("title", item["product_id"])
            click.echo(f"    {item['score']:.3f}  {name[:60]:60}  {', '.join(item['reasons'])}")

    def run(self) -> None:
        click.echo(f"creating topics on {self.settings.kafka_bootstrap}")
        create_topics(self.settings)
        self.start_worker()
        watcher = self.watch()
        self.load_catalog()
        products = [json.loads(line) for line in self.catalog.read_text(encoding="utf-8").splitlines()]
        priced = [p for p in products if p.get("price")]

        def latest(records: list[Any], topic: str, key: str) -> Any:
            values = [r.value for r in records if r.topic == topic and r.key == key]
            return values[-1] if values else None

        edit = products[10]
        records = self.step(f"edited the title of {edit['product_id']} ({edit['title']!r} -> "
                            f"{edit['title'] + ' deluxe bundle'!r})",
                            [{"op": "upsert", "product_id": edit["product_id"], "title": edit["title"] + " deluxe bundle"}],
                            watcher)
        self.show_list("similar-items", latest(records, self.settings.topic_similar_items, edit["product_id"]))

        move = products[20]
        donor = products[400]
        records = self.step(f"retitled {move['product_id']} as a different product ({donor['title']!r})",
                            [{"op": "upsert", "product_id": move["product_id"], "title": donor["title"]}], watcher)
        self.show_list("similar-items", latest(records, self.settings.topic_similar_items, move["product_id"]))

        gone = products[30]
        records = self.step(f"deleted {gone['product_id']} ({gone['title']!r})",
                            [{"op": "delete", "product_id": gone["product_id"]}], watcher)
        self.show_list("similar-items", latest(records, self.settings.topic_similar_items, gone["product_id"]))

        for product in priced[5:7]:
            records = self.step(f"{product['product_id']} ({product['title']!r}, ${product['price']}) went out of stock",
                                [{"op": "upsert", "product_id": product["product_id"], "in_stock": False}], watcher)
            self.show_list("substitutes", latest(records, self.settings.topic_substitutes, product["product_id"]))

        cut = priced[8]
        records = self.step(f"price of {cut['product_id']} ({cut['title']!r}) cut from ${cut['price']} "
                            f"to ${round(cut['price'] * 0.5, 2)}",
                            [{"op": "upsert", "product_id": cut["product_id"], "price": round(cut["price"] * 0.5, 2)}],
                            watcher)
        self.show_list("substitutes", latest(records, self.settings.topic_substitutes, cut["product_id"]))

        bad = {"op": "upsert", "product_id": products[0]["product_id"], "price": "free"}
        self.send(bad)
        time.sleep(1.5)
        letters = [r.value for r in read_topic(self.settings, self.settings.topic_dead_letters)]
        if letters:
            click.echo(f"\nbad event {json.dumps(bad)} -> dead letter: {letters[-1]['error']}")
        click.secho(f"\nworker running: open {self.web}/  (API: /similar/ID /substitutes/ID /products/ID "
                    "/health /metrics)  Ctrl-C to stop", bold=True)
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
