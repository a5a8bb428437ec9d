"""End-to-end load on real Kafka: a 20k-product catalog, then mixed changes at fixed rates.

    SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:19092 .venv/bin/python tests/bench/bench_stream.py \
        --products 20000 --rates 20,50,100 --duration 120

(``make bench`` starts the broker and runs every ``tests/bench/bench_*.py``.)

The catalog is every real product title in ``shared/data`` (Amazon and Google software from
the Leipzig benchmark, Amazon gift cards), extended to the requested size with variants of
those products ("<title> - <variant>", sharing the original's ``group_id``), as a shop's
variants would be. The worker runs as its own process with the in-process MiniLM encoder.

Mixed changes: 60% text edits, 20% stock flips, 20% price changes, sent at a fixed rate.
Each list carries ``caused_by`` (product and event time), so every publication is
attributed to the event that caused it:

* own list: event time to the broker timestamp of the changed product's own list
  (``similar-items`` for a text edit, ``substitutes`` for stock and price changes);
* last list: event time to the last list that event republished;
* backlog: events sent but not yet consumed, sampled each second;
* CPU (cores busy) and resident memory of the worker process.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from streams.kafka_io import create_topics, producer, read_topic  # noqa: E402
from streams.records import iso  # noqa: E402
from streams.settings import Settings  # noqa: E402
from tests.support import WorkerProcess, free_port  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
VARIANTS = ["black", "white", "blue", "red", "2-pack", "3-pack", "large", "small", "2025 edition",
            "deluxe", "bundle", "refurbished", "gift box", "travel size", "pro", "lite"]


def real_products() -> list[dict[str, Any]]:
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
                    price = float(str(row.get("price", "")).replace("$", "").replace(",", ""))
                except ValueError:
                    price = None
                products.append({"title": row["title"][:300], "brand": row.get("brand") or None, "price": price,
                                 "category": [c for c in row.get("category", []) if c][:4] or ["Gift Cards"]})
    return products


def build_catalog(n: int, rng: random.Random) -> list[dict[str, Any]]:
    base = real_products()
    catalog = []
    for i in range(n):
        src = base[i % len(base)]
        variant = i // len(base)
        title = src["title"] if variant == 0 else f"{src['title']} - {VARIANTS[(variant - 1) % len(VARIANTS)]}"
        price = src["price"] or round(rng.uniform(5, 300), 2)
        catalog.append({"op": "upsert", "product_id": f"p{i:06d}", "title": title, "brand": src["brand"],
                        "category": src["category"], "price": price, "currency": "USD", "in_stock": True,
                        "group_id": f"g{i % len(base):06d}"})
    return catalog


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


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def wait_consumed(worker: WorkerProcess, target: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if worker.get("/stats")[1]["events"] >= target:
            return time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit(f"worker did not consume {target} events in {timeout:.0f} s:\n{worker.log_tail()}")


def run_rate(settings: Settings, worker: WorkerProcess, stats: ProcStats, catalog: list[dict[str, Any]],
             rate: int, duration: float, consumed_before: int, rng: random.Random) -> dict[str, Any]:
    kafka = producer(settings, linger_ms=0)
    sent: dict[tuple[str, str], tuple[float, str]] = {}
    backlog: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            consumed = worker.get("/stats")[1]["events"] - consumed_before
            backlog.append(len(sent) - consumed)
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    cpu0, wall0 = stats.cpu_s(), time.monotonic()
    sampler.start()
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < duration:
        due = start + i / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        product = catalog[rng.randrange(len(catalog))]
        pid = product["product_id"]
        roll = rng.random()
        now = time.time()
        ts = iso(now)
        if roll < 0.6:
            words = product["title"].split()
            rng.shuffle(words)
            event = {"op": "upsert", "product_id": pid, "title": " ".join(words) + f" {rng.choice(VARIANTS)}"}
            kind = "text"
        elif roll < 0.8:
            product["in_stock"] = not product["in_stock"]
            event = {"op": "upsert", "product_id": pid, "in_stock": product["in_stock"]}
            kind = "stock_out" if not product["in_stock"] else "stock_in"
        else:
            event = {"op": "upsert", "product_id": pid, "price": round(product["price"] * rng.uniform(0.7, 1.3), 2)}
            kind = "price"
        event["ts"] = ts
        if (pid, ts) in sent:  # two events for one product in the same millisecond: skip the second
            continue
        kafka.send(settings.topic_product_changes, key=pid.encode(), value=json.dumps(event).encode())
        sent[(pid, ts)] = (now, kind)
        i += 1
    kafka.flush()
    kafka.close()
    catch_up = wait_consumed(worker, consumed_before + len(sent), timeout=600)
    time.sleep(2.0)
    stop.set()
    sampler.join()
    cpu = (stats.cpu_s() - cpu0) / (time.monotonic() - wall0)

    own: dict[str, list[float]] = {"text": [], "stock_out": [], "stock_in": [], "price": []}
    last: list[float] = []
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
            sent_at, kind = sent[cause]
            wants = settings.topic_similar_items if kind == "text" else settings.topic_substitutes
            if record.key == cause[0] and topic == wants:
                first_seen[cause] = min(first_seen.get(cause, float("inf")), record.timestamp)
    for cause, (sent_at, kind) in sent.items():
        if cause in first_seen:
            own[kind].append(max(0.0, first_seen[cause] - sent_at))
        if cause in last_seen:
            last.append(max(0.0, last_seen[cause] - sent_at))
    all_own = own["text"] + own["stock_out"] + own["stock_in"] + own["price"]
    half = len(backlog) // 2
    growing = len(backlog) > 4 and statistics.mean(backlog[half:]) > max(2 * rate, 2 * statistics.mean(backlog[:half]) + rate)
    return {
        "rate": rate, "events": len(sent), "achieved_rate": round(len(sent) / duration, 1),
        "own_p50_ms": round(pct(all_own, 50) * 1000), "own_p99_ms": round(pct(all_own, 99) * 1000),
        "own_max_ms": round(max(all_own, default=float("nan")) * 1000),
        "text_own_p99_ms": round(pct(own["text"], 99) * 1000),
        "stockout_subs_p50_ms": round(pct(own["stock_out"], 50) * 1000),
        "stockout_subs_p99_ms": round(pct(own["stock_out"], 99) * 1000),
        "last_p50_ms": round(pct(last, 50) * 1000), "last_p99_ms": round(pct(last, 99) * 1000),
        "last_max_ms": round(max(last, default=float("nan")) * 1000),
        "backlog_max": max(backlog, default=0), "backlog_end": backlog[-1] if backlog else 0,
        "backlog_growing": growing, "catch_up_s": round(catch_up, 1),
        "cpu_cores": round(cpu, 2), "rss_mb": round(stats.rss_mb()),
        "own_lists_measured": len(all_own),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--rates", default="20,50,100")
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--encoder", default="local")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "stream.json")
    args = parser.parse_args()
    bootstrap = os.environ.get("SIMSTREAM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        raise SystemExit("set SIMSTREAM_KAFKA_BOOTSTRAP (make bench starts a broker)")

    tag = uuid.uuid4().hex[:6]
    data_dir = ROOT / "bench-out" / f"worker-{tag}"
    env = {"SIMSTREAM_KAFKA_BOOTSTRAP": bootstrap, "SIMSTREAM_APP_ID": f"bench-{tag}",
           "SIMSTREAM_WEB_PORT": str(free_port()), "SIMSTREAM_DATA_DIR": str(data_dir),
           "SIMSTREAM_ENCODER": args.encoder, "SIMSTREAM_LOG_LEVEL": "warning"}
    for name in ("product_changes", "user_events", "similar_items", "substitutes", "complements",
                 "user_recommendations", "dead_letters", "products", "embeddings"):
        env[f"SIMSTREAM_TOPIC_{name.upper()}"] = f"bench-{tag}-{name.replace('_', '-')}"
    if os.environ.get("SIMSTREAM_MODEL_BASE"):
        env["SIMSTREAM_MODEL_BASE"] = os.environ["SIMSTREAM_MODEL_BASE"]
    settings = Settings(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    data_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(env, data_dir / "worker.log").start()
    worker.wait_ready(timeout=300)
    assert worker.proc is not None
    stats = ProcStats(worker.proc.pid)

    rng = random.Random(42)
    catalog = build_catalog(args.products, rng)
    kafka = producer(settings)
    load_start = time.monotonic()
    for product in catalog:
        kafka.send(settings.topic_product_changes, key=product["product_id"].encode(),
                   value=json.dumps({**product, "ts": iso(time.time())}).encode())
    kafka.flush()
    kafka.close()
    wait_consumed(worker, len(catalog), timeout=3600)
    load_s = time.monotonic() - load_start
    print(f"catalog of {len(catalog)} products embedded, indexed and published in {load_s:.1f} s "
          f"({len(catalog) / load_s:.0f} products/s); worker RSS {stats.rss_mb():.0f} MB", flush=True)

    results = []
    consumed = len(catalog)
    for rate in (int(r) for r in args.rates.split(",")):
        result = run_rate(settings, worker, stats, catalog, rate, args.duration, consumed, rng)
        consumed += result["events"]
        results.append(result)
        print(json.dumps(result), flush=True)
    worker.stop()

    report = {"command": " ".join(sys.argv), "products": len(catalog), "load_s": round(load_s, 1),
              "encoder": args.encoder, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\n| rate ev/s | achieved | own list p50 / p99 / max ms | text edit own p99 ms | stock-out substitutes "
          "p50 / p99 ms | last list p50 / p99 / max ms | backlog max / end | CPU cores | RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['rate']} | {r['achieved_rate']} | {r['own_p50_ms']} / {r['own_p99_ms']} / {r['own_max_ms']} | "
              f"{r['text_own_p99_ms']} | {r['stockout_subs_p50_ms']} / {r['stockout_subs_p99_ms']} | "
              f"{r['last_p50_ms']} / {r['last_p99_ms']} / {r['last_max_ms']} | {r['backlog_max']} / "
              f"{r['backlog_end']}{' (growing)' if r['backlog_growing'] else ''} | {r['cpu_cores']} | {r['rss_mb']} |")


if __name__ == "__main__":
    main()
