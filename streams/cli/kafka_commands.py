"""Kafka-facing commands: worker, topics create, load-catalog, tail, produce."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from streams.cli.group import main
from streams.settings import get_settings


@main.command()
def worker() -> None:
    """Run the Faust worker: consume product changes and user events, publish lists.

    Configured entirely by SIMSTREAM_* variables (see `simstream --help`).
    """
    from streams.app import GracefulWorker, create_app

    settings = get_settings()
    app = create_app(settings)
    GracefulWorker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()


@main.group()
def topics() -> None:
    """Manage simstream's Kafka topics."""


@topics.command("create")
@click.option("--partitions", type=click.IntRange(1, 1024), default=None,
              help="Partitions per new topic [SIMSTREAM_TOPIC_PARTITIONS, default 6].")
def topics_create(partitions: int | None) -> None:
    """Create every input, output and internal topic; idempotent. State topics are compacted."""
    from streams.kafka_io import create_topics

    settings = get_settings()
    for name, status in create_topics(settings, partitions=partitions).items():
        click.echo(f"{status:8} {name}")


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # the Leipzig benchmark files are latin-1
    for row in csv.DictReader(io.StringIO(text)):
        product: dict[str, Any] = {"op": "upsert"}
        product["product_id"] = (row.get("product_id") or row.get("id") or "").strip()
        product["title"] = (row.get("title") or row.get("name") or "").strip()
        for field_name, sources in (("description", ("description",)), ("brand", ("brand", "manufacturer"))):
            value = next((row[s].strip() for s in sources if row.get(s)), "")
            if value:
                product[field_name] = value
        price = (row.get("price") or "").strip()
        if price:
            try:
                product["price"] = float(price.replace("$", "").replace(",", "").split()[0])
            except ValueError:
                product["price"] = price  # left as text: validation rejects it with a reason
        yield product


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any] | str]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield line


@main.command("load-catalog")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--topic", default=None, help="Target topic [SIMSTREAM_TOPIC_PRODUCT_CHANGES].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Send at most this many products.")
def load_catalog(file: Path, topic: str | None, limit: int | None) -> None:
    """Validate a JSONL or CSV catalog and send it to product-changes, keyed by product_id.

    CSV columns: id or product_id, title or name, description, brand or manufacturer, price.
    Rows that fail validation are not sent; they are counted with their reasons.
    """
    from tqdm import tqdm

    from streams.kafka_io import producer
    from streams.records import DecodeError, decode_product_change

    settings = get_settings()
    topic = topic or settings.topic_product_changes
    rows: Iterator[Any] = _csv_rows(file) if file.suffix.lower() == ".csv" else _jsonl_rows(file)
    kafka = producer(settings)
    sent, rejected = 0, Counter[str]()
    now = time.time()
    try:
        for row in tqdm(rows, desc="products", unit=" rows", disable=not sys.stderr.isatty()):
            if limit is not None and sent >= limit:
                break
            if isinstance(row, dict):
                row.setdefault("op", "upsert")
                row.setdefault("ts", now)
            payload = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
            try:
                record = decode_product_change(payload, max_bytes=settings.max_message_bytes)
                if record.op == "upsert" and record.title is None:
                    raise DecodeError("a catalog row is a whole product and needs a 'title'")
            except DecodeError as exc:
                rejected[str(exc)] += 1
                continue
            kafka.send(topic, key=record.product_id.encode(), value=payload.encode("utf-8"))
            sent += 1
        kafka.flush()
    finally:
        kafka.close()
    click.echo(f"sent {sent} products to {topic}; rejected {sum(rejected.values())}")
    for reason, count in rejected.most_common():
        click.echo(f"  {count:6}  {reason}")


@main.command()
@click.argument("topic")
@click.argument("file", type=click.File("rb"))
@click.option("--key-field", default=None,
              help="JSON field used as the record key (default: product_id, or user_id for user events).")
def produce(topic: str, file: io.BufferedReader, key_field: str | None) -> None:
    """Send each line of FILE (or - for stdin) to TOPIC as-is, byte for byte.

    Lines are not validated, so this is also how to test the dead-letter path.
    """
    from streams.kafka_io import producer

    settings = get_settings()
    if key_field is None:
        key_field = "user_id" if topic == settings.topic_user_events else "product_id"
    kafka = producer(settings)
    count = 0
    try:
        for line in file:
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            key = None
            try:
                obj = json.loads(line)
                if isinstance(obj, dict) and isinstance(obj.get(key_field), str):
                    key = obj[key_field].encode()
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
            kafka.send(topic, key=key, value=line)
            count += 1
        kafka.flush()
    finally:
        kafka.close()
    click.echo(f"sent {count} records to {topic}")


@main.command()
@click.argument("topic")
@click.option("--follow/--no-follow", default=False, help="Keep waiting for new records.")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="With --follow: stop after this many seconds without a record.")
@click.option("--max", "max_records", type=click.IntRange(1), default=None, help="Stop after N records.")
@click.option("--compact/--all", default=False, help="Show only the last value per key.")
def tail(topic: str, follow: bool, timeout: float, max_records: int | None, compact: bool) -> None:
    """Pretty-print a topic from the beginning, one record per block."""
    from streams.kafka_io import latest_by_key, read_topic

    settings = get_settings()
    records = read_topic(settings, topic, follow=follow, timeout_s=timeout)
    if compact:
        for key, value in latest_by_key(records).items():
            click.echo(f"{key}: {json.dumps(value, ensure_ascii=False, indent=2)}")
        return
    for n, record in enumerate(records, start=1):
        value = "<tombstone>" if record.value is None else json.dumps(record.value, ensure_ascii=False, indent=2)
        click.echo(f"[{record.partition}@{record.offset}] {record.key}: {value}")
        if max_records is not None and n >= max_records:
            break
