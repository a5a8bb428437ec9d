"""Pieces the benchmarks share: where results go, percentiles, process stats, and a worker on
real Kafka fed with a real catalog and mixed changes (``bench_stream.py`` and ``soak.py``).

Conventions every ``tests/bench`` script follows, so ``run.py`` and ``report.py`` need to know
nothing about a new bench:

* it prints human output, markdown tables included, and a final line that is one JSON object
  (its summary);
* given ``--out DIR`` (default: ``$SIMSTREAM_BENCH_OUT``, which ``run.py`` sets) it may write
  ``DIR/<name>.samples.json`` with raw samples for plots (``write_samples``; a bench without
  samples simply writes none);
* a module-level ``QUICK_ARGS`` list holds the arguments of a short smoke run (``make bench
  BENCH_ARGS=--quick``).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import re
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streams.kafka_io import create_topics, producer, read_topic  # noqa: E402
from streams.records import iso  # noqa: E402
from streams.settings import Settings  # noqa: E402
from tests.support import WorkerProcess, free_port  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "var" / "bench"
VARIANTS = ["black", "white", "blue", "red", "2-pack", "3-pack", "large", "small", "2025 edition",
            "deluxe", "bundle", "refurbished", "gift box", "travel size", "pro", "lite"]
TOPICS = ("product_changes", "user_events", "similar_items", "substitutes", "complements",
          "user_recommendations", "dead_letters", "products", "embeddings", "pair_updates", "lexical",
          "product_labels", "models")


# ---- results


def out_dir(value: Path | str | None = None) -> Path:
    """The results folder: ``--out``, else ``$SIMSTREAM_BENCH_OUT``, else ``var/bench``."""
    chosen = Path(value or os.environ.get("SIMSTREAM_BENCH_OUT") or DEFAULT_OUT)
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def latency_plot(plot_id: str, title: str, series: dict[str, list[float]], unit: str = "ms") -> dict[str, Any]:
    """A latency distribution: one series of raw samples per label (histogram and CDF)."""
    return {"id": plot_id, "kind": "latency", "title": title, "unit": unit,
            "series": {label: [round(v, 4) for v in values] for label, values in series.items() if values}}


def timeseries_plot(plot_id: str, title: str, panels: list[dict[str, Any]], xlabel: str = "s") -> dict[str, Any]:
    """Stacked panels sharing x; each ``{"ylabel", "series": {label: {"x", "y"}}, "hlines", "vlines", "log"}``."""
    return {"id": plot_id, "kind": "timeseries", "title": title, "xlabel": xlabel, "panels": panels}


def write_samples(out: Path, name: str, plots: list[dict[str, Any]]) -> Path:
    path = out / f"{name}.samples.json"
    path.write_text(json.dumps({"bench": name, "plots": plots}))
    return path


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(value: float) -> float | None:
    """Seconds to whole milliseconds; None (JSON null) where nothing was measured."""
    return None if value != value else round(value * 1000)


class ProcStats:
    """CPU seconds and RSS of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


class GroupStats:
    """``ProcStats`` of several processes, summed (``each`` keeps them apart)."""

    def __init__(self, pids: list[int]) -> None:
        self.each = [ProcStats(pid) for pid in pids]

    def cpu_s(self) -> float:
        return sum(s.cpu_s() for s in self.each)

    def rss_mb(self) -> float:
        return sum(s.rss_mb() for s in self.each)


class WorkerGroup:
    """Several ``simstream worker`` processes of one consumer group, read as one worker: their
    ``/stats`` counters summed (each counts the input of the partitions it owns and the
    lists it publishes), a bulk catch-up running while any worker's runs."""

    def __init__(self, procs: list[WorkerProcess]) -> None:
        self.procs = procs
        self.env = procs[0].env
        self.web = procs[0].web

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        if path != "/stats":
            raise ValueError(f"a worker group answers /stats only, not {path}")
        merged: dict[str, Any] = {}
        for proc in self.procs:
            status, body = proc.get(path, timeout=timeout)
            if status != 200:
                return status, body
            for key, value in body.items():
                if isinstance(value, bool):
                    merged[key] = merged.get(key, False) or value
                elif isinstance(value, (int, float)):
                    merged[key] = merged.get(key, 0) + value
                else:
                    merged.setdefault(key, value)
        return 200, merged

    def stop(self, timeout: float = 30.0) -> None:
        for proc in self.procs:
            proc.stop(timeout=timeout)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(f"--- worker {i}\n{proc.log_tail(lines)}" for i, proc in enumerate(self.procs))


# ---- catalog


def real_products() -> list[dict[str, Any]]:
    """Every real product title in ``shared/data``: Amazon-Google software and Amazon gift cards."""
    products: list[dict[str, Any]] = []
    for name, title_col in (("Amazon.csv", "title"), ("GoogleProducts.csv", "name")):
        with open(SHARED / "amazon-google" / name, encoding="latin-1", newline="") as handle:
            for row in csv.DictReader(handle):
                title = row[title_col].strip()
                if not title:
                    continue
                price = float(row["price"].split()[0].replace("$", "").replace(",", "") or 0) if row["price"] else 0
                products.append({"title": title, "brand": row["manufacturer"].strip() or None,
                                 "price": price or None, "category": ["Software"]})
    with gzip.open(SHARED / "amazon-giftcards" / "meta_Gift_Cards.json.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row.get("title"):
                try:
                    gift_price: float | None = float(str(row.get("price", "")).replace("$", "").replace(",", ""))
                except ValueError:
                    gift_price = None
                products.append({"title": row["title"][:300], "brand": row.get("brand") or None, "price": gift_price,
                                 "category": [c for c in row.get("category", []) if c][:4] or ["Gift Cards"]})
    return products


#: Shares of a catalog beyond the real products (``build_catalog``): variants of a product
#: in its group, and re-listings of one product under another id (duplicates).
VARIANT_SHARE = 0.15
DUPLICATE_SHARE = 0.05
_NUMBER = re.compile(r"\d+")


def build_catalog(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` products: every real one first, then a shop-like mix built from real titles.

    Beyond the ~6,100 real products of ``shared/data`` (see ``real_products``):

    * 15% **variants** of a product, in its ``group_id``: "<title> - black", "- 2-pack", ...;
    * 5% **duplicate listings**: one product listed again under another id, its title
      re-typed (case, punctuation, the first two words swapped, the brand prepended);
    * 80% **recombinations** of two real titles of the same top category: the head of one
      (its first words: brand and line) and the tail of the other (its last words: edition,
      platform, pack), with the numbers (versions, years, sizes) shifted at random half the
      time, at a price near the first product's.

    Deterministic for a given ``rng`` seed.
    """
    base = real_products()
    by_top: dict[str, list[dict[str, Any]]] = {}
    for src in base:
        by_top.setdefault(src["category"][0], []).append(src)
    catalog: list[dict[str, Any]] = []
    for i in range(n):
        if i < len(base):
            src, title, group = base[i], base[i]["title"], f"g{i:06d}"
            price = src["price"] or round(rng.uniform(5, 300), 2)
        else:
            roll = rng.random()
            j = rng.randrange(len(catalog))
            origin = catalog[j]
            src = {"brand": origin["brand"], "category": origin["category"], "price": origin["price"]}
            if roll < VARIANT_SHARE:
                title, group = f"{origin['title']} - {rng.choice(VARIANTS)}", origin["group_id"]
                price = round(origin["price"] * rng.uniform(0.9, 1.2), 2)
            elif roll < VARIANT_SHARE + DUPLICATE_SHARE:
                title, group, price = retyped(origin["title"], origin["brand"], rng), None, origin["price"]
            else:
                other = rng.choice(by_top[origin["category"][0]])
                head, tail = origin["title"].split(), other["title"].split()
                cut_a = rng.randint(1, max(1, min(4, len(head) - 1)))
                cut_b = rng.randint(min(len(tail) - 1, 1), len(tail) - 1) if len(tail) > 1 else 0
                title = " ".join(head[:cut_a] + tail[cut_b:]) or origin["title"]
                if rng.random() < 0.5:
                    title = _NUMBER.sub(lambda m: str(max(1, int(m.group()) + rng.choice((-2, -1, 1, 2)))), title)
                group, price = f"g{i:06d}", round(origin["price"] * rng.uniform(0.7, 1.3), 2)
        catalog.append({"op": "upsert", "product_id": f"p{i:06d}", "title": title, "brand": src["brand"],
                        "category": src["category"], "price": price, "currency": "USD", "in_stock": True,
                        "group_id": group})
    return catalog


def retyped(title: str, brand: str | None, rng: random.Random) -> str:
    """The same product's title as another seller would type it."""
    words = title.replace(",", "").replace("(", "").replace(")", "").split()
    if len(words) > 2 and rng.random() < 0.5:
        words[0], words[1] = words[1], words[0]
    text = " ".join(words)
    if brand and brand.lower() not in text.lower() and rng.random() < 0.7:
        text = f"{brand} {text}"
    return text.lower() if rng.random() < 0.5 else text.title()


# ---- a worker on real Kafka


@dataclass
class BenchWorker:
    """One ``simstream worker`` process (or a ``WorkerGroup``) on its own topics and consumer group."""

    settings: Settings
    worker: WorkerProcess | WorkerGroup
    stats: ProcStats | GroupStats
    data_dir: Path


def start_worker(
    name: str, scratch: Path, encoder: str = "local", workers: int = 1, **extra_env: str
) -> BenchWorker:
    """Create fresh topics named ``bench-<tag>-*`` and start a worker on them (waits until
    ready); with ``workers`` > 1, that many workers of one consumer group, each with its own
    data folder and web port, read as one (``WorkerGroup``)."""
    bootstrap = os.environ.get("SIMSTREAM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        raise SystemExit("set SIMSTREAM_KAFKA_BOOTSTRAP (make bench and make soak start a broker)")
    tag = uuid.uuid4().hex[:6]
    data_dir = scratch / f"{name}-{tag}"
    env: dict[str, Any] = {"SIMSTREAM_KAFKA_BOOTSTRAP": bootstrap, "SIMSTREAM_APP_ID": f"bench-{tag}",
           "SIMSTREAM_WEB_PORT": str(free_port()), "SIMSTREAM_DATA_DIR": str(data_dir),
           "SIMSTREAM_ENCODER": encoder, "SIMSTREAM_LOG_LEVEL": "warning", **extra_env}
    for topic in TOPICS:
        env[f"SIMSTREAM_TOPIC_{topic.upper()}"] = f"bench-{tag}-{topic.replace('_', '-')}"
    if os.environ.get("SIMSTREAM_MODEL_BASE"):
        env["SIMSTREAM_MODEL_BASE"] = os.environ["SIMSTREAM_MODEL_BASE"]
    settings = Settings(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    data_dir.mkdir(parents=True, exist_ok=True)
    if workers == 1:
        worker = WorkerProcess(env, data_dir / "worker.log").start()
        worker.wait_ready(timeout=300)
        assert worker.proc is not None
        return BenchWorker(settings, worker, ProcStats(worker.proc.pid), data_dir)
    procs = []
    for i in range(workers):
        own = data_dir / f"worker-{i}"
        own.mkdir(parents=True, exist_ok=True)
        procs.append(WorkerProcess({**env, "SIMSTREAM_WEB_PORT": str(free_port()), "SIMSTREAM_DATA_DIR": str(own)},
                                   own / "worker.log").start())
    for proc in procs:
        proc.wait_ready(timeout=300)
    pids = [proc.proc.pid for proc in procs if proc.proc is not None]
    return BenchWorker(settings, WorkerGroup(procs), GroupStats(pids), data_dir)


def restart_worker(bench: BenchWorker, timeout: float = 1800) -> tuple[BenchWorker, float]:
    """Restart ``bench``'s worker as an operator would: a snapshot now (``/admin/snapshot``),
    a graceful stop, and a new process on the same topics and data folder, which loads the
    snapshot, replays what came after it and takes its partitions over. Returns the new
    worker and the seconds from its start until it was ready."""
    import urllib.request

    if not isinstance(bench.worker, WorkerProcess):
        raise SystemExit("--restart restarts one worker; run it without --workers")
    request = urllib.request.Request(bench.worker.web + "/admin/snapshot", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=900.0) as response:
        response.read()
    bench.worker.stop(timeout=300)
    started = time.monotonic()
    worker = WorkerProcess(bench.worker.env, bench.data_dir / "worker.log").start()
    worker.wait_ready(timeout=timeout)
    ready_s = time.monotonic() - started
    assert worker.proc is not None
    return BenchWorker(bench.settings, worker, ProcStats(worker.proc.pid), bench.data_dir), ready_s


def stats(worker: WorkerProcess | WorkerGroup) -> dict[str, Any]:
    """The worker's ``/stats``. It is read on the core thread, so a long core job (an IDF
    refit at 100k products) delays it: waited for, not taken as a failure."""
    return dict(worker.get("/stats", timeout=120.0)[1])


def encoder_busy(worker: WorkerProcess | WorkerGroup) -> tuple[float, float]:
    """(texts embedded, seconds spent in encoder calls) so far, from the worker's ``/metrics``:
    their ratio over a window is the encoder's own texts/s in that window, under the same load
    (a group's: the texts and seconds of all its workers)."""
    import urllib.request

    if isinstance(worker, WorkerGroup):
        each = [encoder_busy(proc) for proc in worker.procs]
        return sum(t for t, _ in each), sum(s for _, s in each)

    with urllib.request.urlopen(worker.web + "/metrics", timeout=120.0) as response:
        text = response.read().decode()
    values = {}
    for name in ("simstream_encoder_batch_size_sum", "simstream_encoder_seconds_sum"):
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        values[name] = float(found.group(1)) if found else 0.0
    return values["simstream_encoder_batch_size_sum"], values["simstream_encoder_seconds_sum"]


def texts_per_s(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The encoder's own rate between two ``encoder_busy`` readings (``None`` without calls)."""
    texts, seconds = after[0] - before[0], after[1] - before[1]
    return round(texts / seconds, 1) if seconds > 0 else None


def consumed(worker: WorkerProcess | WorkerGroup) -> int:
    """Input events the worker has processed (its ``/stats`` counter)."""
    return int(stats(worker)["events"])


def wait_consumed(worker: WorkerProcess | WorkerGroup, target: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if consumed(worker) >= target:
            return time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit(f"worker did not consume {target} events in {timeout:.0f} s:\n{worker.log_tail()}")


def load_catalog(bench: BenchWorker, catalog: list[dict[str, Any]], timeout: float = 3600) -> float:
    """Send the whole catalog and wait until the worker has consumed it; returns the seconds taken."""
    kafka = producer(bench.settings)
    started = time.monotonic()
    for product in catalog:
        kafka.send(bench.settings.topic_product_changes, key=product["product_id"].encode(),
                   value=json.dumps({**product, "ts": iso(time.time())}).encode())
    kafka.flush()
    kafka.close()
    wait_consumed(bench.worker, len(catalog), timeout=timeout)
    # A bulk catch-up publishes the lists only once it settles, after the last record.
    while time.monotonic() - started < timeout:
        now = stats(bench.worker)
        if not now.get("bulk_catch_up") and now.get("lists", 0) >= len(catalog):
            break
        time.sleep(1.0)
    return time.monotonic() - started


# ---- mixed changes at a fixed rate


@dataclass
class MixedChanges:
    """Title edits, stock flips and price changes (``mix``; 60/20/20 by default) on random
    catalog products.

    ``sent`` maps each event's cause (product id, event ``ts``) to (send time, kind), which is
    what every list's ``caused_by`` names.
    """

    catalog: list[dict[str, Any]]
    rng: random.Random
    sent: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)
    #: Shares of text edits, stock flips and price changes.
    mix: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Endless (product id, event) pairs; each is recorded in ``sent`` when yielded."""
        rng = self.rng
        while True:
            product = self.catalog[rng.randrange(len(self.catalog))]
            pid = product["product_id"]
            roll = rng.random()
            now = time.time()
            ts = iso(now)
            if (pid, ts) in self.sent:  # two events for one product in the same millisecond: skip the second
                continue
            text_share, stock_share, _price_share = self.mix
            if roll < text_share:
                words = product["title"].split()
                rng.shuffle(words)
                event: dict[str, Any] = {"op": "upsert", "product_id": pid,
                                         "title": " ".join(words) + f" {rng.choice(VARIANTS)}"}
                kind = "text"
            elif roll < text_share + stock_share:
                product["in_stock"] = not product["in_stock"]
                event = {"op": "upsert", "product_id": pid, "in_stock": product["in_stock"]}
                kind = "stock_out" if not product["in_stock"] else "stock_in"
            else:
                event = {"op": "upsert", "product_id": pid,
                         "price": round(product["price"] * rng.uniform(0.7, 1.3), 2)}
                kind = "price"
            event["ts"] = ts
            self.sent[(pid, ts)] = (now, kind)
            yield pid, event


def send_at_rate(settings: Settings, changes: MixedChanges, rate: float, duration: float) -> int:
    """Send mixed changes at ``rate`` per second for ``duration`` seconds; returns how many were sent."""
    kafka = producer(settings, linger_ms=0)
    start = time.monotonic()
    i = 0
    source = changes.events()
    while time.monotonic() - start < duration:
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        pid, event = next(source)
        kafka.send(settings.topic_product_changes, key=pid.encode(), value=json.dumps(event).encode())
        i += 1
    kafka.flush()
    kafka.close()
    return i


@dataclass
class Latencies:
    """Seconds from each event's send time to the lists it caused, by kind."""

    own: dict[str, list[float]]
    last: list[float]
    own_by_cause: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def all_own(self) -> list[float]:
        return [v for values in self.own.values() for v in values]


def attribute_latencies(settings: Settings, sent: dict[tuple[str, str], tuple[float, str]]) -> Latencies:
    """Read the list topics and attribute each list to the event that caused it (``caused_by``).

    own list: event to the broker timestamp of the changed product's own list (``similar-items``
    for a text edit, ``substitutes`` for stock and price changes); last list: event to the last
    list that event republished.
    """
    first_seen: dict[tuple[str, str], float] = {}
    last_seen: dict[tuple[str, str], float] = {}
    for topic in (settings.topic_similar_items, settings.topic_substitutes):
        for record in read_topic(settings, topic, timeout_s=120):
            value = record.value
            if not isinstance(value, dict) or "caused_by" not in value:
                continue
            cause = (value["caused_by"]["product_id"], value["caused_by"]["event_ts"])
            if cause not in sent:
                continue
            last_seen[cause] = max(last_seen.get(cause, 0.0), record.timestamp)
            _sent_at, kind = sent[cause]
            wants = settings.topic_similar_items if kind == "text" else settings.topic_substitutes
            if record.key == cause[0] and topic == wants:
                first_seen[cause] = min(first_seen.get(cause, float("inf")), record.timestamp)
    own: dict[str, list[float]] = {"text": [], "stock_out": [], "stock_in": [], "price": []}
    last: list[float] = []
    by_cause: dict[tuple[str, str], float] = {}
    for cause, (sent_at, kind) in sent.items():
        if cause in first_seen:
            by_cause[cause] = max(0.0, first_seen[cause] - sent_at)
            own[kind].append(by_cause[cause])
        if cause in last_seen:
            last.append(max(0.0, last_seen[cause] - sent_at))
    return Latencies(own, last, by_cause)


#: The freshness the product promises: a change's lists are out within about a second.
FRESHNESS_BUDGET_MS = 1000
#: A held rate leaves no backlog behind: the worker is caught up this soon after the last event.
MAX_CATCH_UP_S = 2.0


def rate_held(result: dict[str, Any]) -> bool:
    """Whether the worker sustained one rate of the stream bench: its backlog did not grow, it
    caught up within ``MAX_CATCH_UP_S`` of the last event, and a change's own list went out
    within the freshness budget at the p99."""
    return (not result["backlog_growing"] and result["catch_up_s"] <= MAX_CATCH_UP_S
            and result["own_p99_ms"] <= FRESHNESS_BUDGET_MS)


def highest_rate_held(results: list[dict[str, Any]]) -> float | None:
    """The highest rate of the stream bench that ``rate_held``, below any that was not."""
    held = None
    for result in sorted(results, key=lambda r: r["rate"]):
        if not rate_held(result):
            break
        held = result["rate"]
    return held


def backlog_growing(backlog: list[float], rate: float) -> bool:
    """Whether the second half's mean backlog is well above the first half's (falling behind)."""
    half = len(backlog) // 2
    return len(backlog) > 4 and statistics.mean(backlog[half:]) > max(
        2 * rate, 2 * statistics.mean(backlog[:half]) + rate)
