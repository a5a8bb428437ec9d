"""Operations: status, snapshot, rebuild-index, refit-lexical, replay."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import click

from streams.cli.group import main
from streams.settings import Settings, get_settings


def _worker_url(settings: Settings, url: str | None) -> str:
    host = "127.0.0.1" if settings.web_host in ("0.0.0.0", "::") else settings.web_host
    return (url or f"http://{host}:{settings.web_port}").rstrip("/")


def _call(settings: Settings, url: str, path: str, *, post: bool = False, timeout: float = 600) -> tuple[int, Any]:
    request = urllib.request.Request(url + path, method="POST" if post else "GET", data=b"" if post else None)
    if settings.web_token is not None:
        request.add_header("Authorization", f"Bearer {settings.web_token.get_secret_value()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except OSError as exc:
        raise click.ClickException(f"no worker answers at {url} ({exc}); start one or pass --url") from None


def consumer_lag(settings: Settings) -> list[dict[str, Any]]:
    """Committed offset, end offset and lag of the worker group on each input partition."""
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient, OffsetSpec

    from streams.kafka_io import client_options

    admin = KafkaAdminClient(**client_options(settings))
    try:
        committed = admin.list_group_offsets({settings.app_id: None}).get(settings.app_id, {})
        partitions = []
        for topic in (settings.topic_product_changes, settings.topic_user_events):
            for index in sorted(p["partition_index"] for p in admin.describe_topics([topic])[0]["partitions"]):
                partitions.append(TopicPartition(topic, index))
        ends = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in partitions})
    finally:
        admin.close()
    rows = []
    for tp in partitions:
        end = ends[tp].offset if hasattr(ends[tp], "offset") else int(ends[tp])
        meta = committed.get(tp)
        done = meta.offset if meta is not None and meta.offset >= 0 else None
        rows.append({"topic": tp.topic, "partition": tp.partition, "committed": done, "end": end,
                     "lag": end - (done or 0)})
    return rows


@main.command()
@click.option("--url", default=None, help="Worker web address [http://SIMSTREAM_WEB_HOST:SIMSTREAM_WEB_PORT].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(url: str | None, as_json: bool) -> None:
    """Lag per input partition, and the worker's index size, encoder and model version."""
    settings = get_settings()
    lag = consumer_lag(settings)
    worker: dict[str, Any] = {}
    try:
        _, worker = _call(settings, _worker_url(settings, url), "/health", timeout=5)
    except click.ClickException as exc:
        worker = {"status": "unreachable", "error": exc.message}
    if as_json:
        click.echo(json.dumps({"group": settings.app_id, "lag": lag, "worker": worker}))
        return
    click.echo(f"consumer group {settings.app_id}: total lag {sum(r['lag'] for r in lag)}")
    for r in lag:
        click.echo(f"  {r['topic']}[{r['partition']}]  committed {r['committed']}  end {r['end']}  lag {r['lag']}")
    click.echo(f"worker: {worker.get('status')}  products {worker.get('products')}  index live "
               f"{worker.get('index_live')} deleted {worker.get('index_deleted')}  encoder "
               f"{settings.encoder} ({'reachable' if worker.get('encoder_reachable') else 'not reachable'})  "
               f"model {worker.get('model_version')}  restored from {worker.get('restored_from')}")


@main.command()
@click.option("--url", default=None, help="Worker web address [http://SIMSTREAM_WEB_HOST:SIMSTREAM_WEB_PORT].")
def snapshot(url: str | None) -> None:
    """Ask the running worker to write an index snapshot now (between two batches)."""
    settings = get_settings()
    code, body = _call(settings, _worker_url(settings, url), "/admin/snapshot", post=True)
    if code != 200:
        raise click.ClickException(body.get("error", f"HTTP {code}"))
    click.echo(f"snapshot written: {body['snapshot']}")


@main.command("rebuild-index")
@click.option("--url", default=None, help="Worker web address [http://SIMSTREAM_WEB_HOST:SIMSTREAM_WEB_PORT].")
def rebuild_index(url: str | None) -> None:
    """Rebuild the worker's index from simstream-embeddings and swap it in atomically.

    Ingestion pauses during the rebuild; reads keep answering from the old index.
    The group's lexical IDF is used as it is (a rebuild never refits it: see refit-lexical),
    and lists that change are republished.
    """
    settings = get_settings()
    code, body = _call(settings, _worker_url(settings, url), "/admin/rebuild-index", post=True)
    if code != 200:
        raise click.ClickException(body.get("error", f"HTTP {code}"))
    click.echo(f"rebuilt: {body['products']} products, {body['republished']} records republished, "
               f"{body['embedded']} texts embedded, in {body['seconds']} s")


@main.command("refit-lexical")
def refit_lexical() -> None:
    """Fit the lexical IDF on the catalog in simstream-products and share it with every worker.

    The IDF is published on simstream-lexical; each running worker adopts it and republishes
    the lists whose lexical scores move it. Run it after the catalog changed a lot (workers
    refit on their own once the catalog has more than doubled and the product stream has been
    quiet for SIMSTREAM_LEXICAL_REFIT_QUIET_S; a restart never refits).
    """
    import time

    from serving.lexical import LexicalModel
    from serving.text import product_text
    from streams.kafka_io import latest_by_key, producer, read_topic
    from streams.records import product_from_wire
    from streams.wire import LEXICAL_KEY, lexical_to_wire

    settings = get_settings()
    texts: list[str] = []
    unreadable = 0
    for value in latest_by_key(read_topic(settings, settings.topic_products, timeout_s=120)).values():
        try:
            texts.append(product_text(product_from_wire(value)))
        except Exception:  # noqa: BLE001 - a record the workers would skip too
            unreadable += 1
    if not texts:
        raise click.ClickException(f"{settings.topic_products} holds no products: nothing to fit the IDF on")
    model = LexicalModel.fit(texts)
    kafka = producer(settings)
    try:
        kafka.send(settings.topic_lexical, key=LEXICAL_KEY.encode(),
                   value=json.dumps(lexical_to_wire(model, at=time.time())).encode()).get(timeout=60)
    finally:
        kafka.close()
    click.echo(f"fitted the IDF on {model.n_docs} products ({unreadable} unreadable records skipped); "
               f"published on {settings.topic_lexical}")


def _parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("use ISO-8601, e.g. 2026-11-28T03:00:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@main.command()
@click.option("--from", "since", required=True, help="ISO-8601 time to replay from, e.g. 2026-11-28T03:00:00Z.")
@click.option("--topic", "topics", multiple=True,
              help="Input topic to rewind (repeatable) [product-changes and user-events].")
def replay(since: str, topics: tuple[str, ...]) -> None:
    """Rewind the worker group to the first record at or after a time; stop the workers first.

    Kafka only moves the offsets of a group with no active member. Replayed product changes
    are harmless: events older than the stored state are ignored and counted.
    """
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient, OffsetTimestamp

    from streams.kafka_io import client_options

    settings = get_settings()
    when = _parse_time(since)
    names = list(topics) or [settings.topic_product_changes, settings.topic_user_events]
    admin = KafkaAdminClient(**client_options(settings))
    try:
        # kafka-python 3 answers {group_id: {"group_state": ...}}.
        state = admin.describe_groups([settings.app_id]).get(settings.app_id, {}).get("group_state")
        if state not in (None, "Empty", "Dead"):
            raise click.ClickException(f"group {settings.app_id} is {state}: stop every worker, then replay")
        specs = {}
        for topic in names:
            for p in admin.describe_topics([topic])[0]["partitions"]:
                specs[TopicPartition(topic, p["partition_index"])] = OffsetTimestamp(int(when.timestamp() * 1000))
        result = admin.reset_group_offsets(settings.app_id, specs)
    finally:
        admin.close()
    for tp, outcome in sorted(result.items(), key=lambda kv: (kv[0].topic, kv[0].partition)):
        error = outcome.get("error")
        suffix = "" if error is None or getattr(error, "errno", 0) == 0 else f"  error {error.__name__}"
        click.echo(f"{tp.topic}[{tp.partition}] -> offset {outcome.get('offset')}{suffix}")
