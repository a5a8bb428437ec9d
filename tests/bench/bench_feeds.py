"""User feeds benchmark (not collected by pytest).

    SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python tests/bench/bench_feeds.py --rate 200 --duration 60

1. **Stream.** A real worker (in-process MiniLM) on a real broker loads a catalog of real
   products (``--products``), then receives user events at ``--rate`` per second for
   ``--duration`` seconds: Zipf-popular products, shoppers in sessions of views, add-to-carts
   and purchases. Every accepted event republishes its user's feed, so a user's n-th feed
   record answers their n-th event; latency is that record's timestamp minus the event's
   send time. Budget: p99 <= 200 ms at 200 events/s.
2. **Memory.** ``--events`` (1M) synthetic events through the same behaviour model and feeds
   the worker runs, in this process, with RSS and state sizes sampled every 10%: memory is
   bounded by the settings (behaviour rows, sessions, users, history length), not by the
   number of events, so it levels off once the bounds are reached.

The last line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness import (
    ProcStats,
    build_catalog,
    latency_plot,
    load_catalog,
    ms,
    out_dir,
    pct,
    start_worker,
    timeseries_plot,
    write_samples,
)

from serving.catalog import UserEvent, UserEventType
from streams.behavior_stream import behavior_config, feed_config
from streams.kafka_io import producer, read_topic
from streams.settings import Settings

QUICK_ARGS = ["--products", "300", "--rate", "50", "--duration", "10", "--events", "50000"]
KINDS = [("view", 0.8), ("add_to_cart", 0.15), ("purchase", 0.05)]


class Shoppers:
    """Users in short sessions over Zipf-popular products."""

    def __init__(self, products: list[str], users: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.products = products
        self.cum_weights = list(itertools.accumulate(1.0 / (r + 1) ** 1.1 for r in range(len(products))))
        self.users = users
        self.left: dict[int, int] = {}

    def next(self) -> tuple[str, str, str]:
        """The next event: shoppers come in sessions of 1 to 8 events, a few at a time."""
        if not self.left:
            for _ in range(4):
                self.left[self.rng.randrange(self.users)] = self.rng.randint(1, 8)
        user = self.rng.choice(list(self.left))
        self.left[user] -= 1
        if self.left[user] <= 0:
            del self.left[user]
        kind = self.rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        item = self.rng.choices(self.products, cum_weights=self.cum_weights)[0]
        return f"u{user:07d}", kind, item


def stream_part(args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    rng = random.Random(args.seed)
    catalog = build_catalog(args.products, rng)
    bench = start_worker("feeds", scratch, encoder="local", SIMSTREAM_BEHAVIOR_WEIGHT="0.3")
    try:
        load_s = load_catalog(bench, catalog)
        print(f"catalog of {len(catalog)} products loaded in {load_s:.0f} s")
        settings = bench.settings
        shoppers = Shoppers([p["product_id"] for p in catalog], users=args.users, seed=args.seed)
        kafka = producer(settings, linger_ms=0)
        sent: dict[str, list[float]] = {}
        total = int(args.rate * args.duration)
        started = time.monotonic()
        cpu0 = bench.stats.cpu_s()
        for i in range(total):
            due = started + i / args.rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            user, kind, item = shoppers.next()
            now = time.time()
            sent.setdefault(user, []).append(now)
            kafka.send(settings.topic_user_events, key=user.encode(),
                       value=json.dumps({"user_id": user, "type": kind, "product_id": item, "ts": now}).encode())
        kafka.flush()
        kafka.close()
        elapsed = time.monotonic() - started
        cpu_cores = (bench.stats.cpu_s() - cpu0) / elapsed
        rss = bench.stats.rss_mb()
        records = []
        for _ in range(60):  # until every feed is out (or a minute without progress)
            records = list(read_topic(settings, settings.topic_user_recommendations, timeout_s=120))
            if len(records) >= total:
                break
            time.sleep(1.0)
        seen: dict[str, int] = {}
        latencies: list[float] = []
        for record in records:
            if record.key is None or record.value is None:
                continue
            n = seen.get(record.key, 0)
            seen[record.key] = n + 1
            times = sent.get(record.key, [])
            if n < len(times):
                latencies.append(record.timestamp - times[n])
        answered = sum(seen.values())
    finally:
        bench.worker.stop()
    print(f"{total} user events at {total / elapsed:.0f}/s; {answered} feeds published")
    print()
    print("| rate ev/s | events | feeds | event → feed p50 ms | p99 ms | max ms | worker CPU (cores) | RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.rate:.0f} | {total} | {answered} | {ms(pct(latencies, 50))} | {ms(pct(latencies, 99))} | "
          f"{ms(pct(latencies, 100))} | {cpu_cores:.2f} | {rss:.0f} |")
    return {"rate": args.rate, "events": total, "feeds": answered, "feed_p50_ms": ms(pct(latencies, 50)),
            "feed_p99_ms": ms(pct(latencies, 99)), "feed_max_ms": ms(pct(latencies, 100)),
            "cpu_cores": round(cpu_cores, 2), "rss_mb": round(rss), "latencies_s": latencies}


def memory_part(args: argparse.Namespace) -> dict[str, object]:
    from serving.behavior import BehaviorModel
    from serving.feeds import UserFeeds

    settings = Settings()
    model = BehaviorModel(behavior_config(settings))
    feeds = UserFeeds(feed_config(settings))
    shoppers = Shoppers([f"i{n:06d}" for n in range(args.items)], users=args.memory_users, seed=args.seed + 1)
    stats = ProcStats(__import__("os").getpid())
    gc.collect()
    base = stats.rss_mb()
    rows: list[dict[str, float]] = []
    step = max(1, args.events // 10)
    t0 = time.monotonic()
    ts = 1_790_000_000.0
    for i in range(1, args.events + 1):
        user, kind, item = shoppers.next()
        ts += 0.05
        event = UserEvent(user, UserEventType(kind), ts, item)
        model.ingest(event)
        feeds.observe(event)
        if i % step == 0:
            size = {**{f"behavior_{k}": v for k, v in model.size().items()},
                    **{f"feeds_{k}": v for k, v in feeds.size().items()}}
            rows.append({"events": i, "rss_mb": stats.rss_mb() - base, **size})
    elapsed = time.monotonic() - t0
    print()
    print(f"memory over {args.events:,} events ({args.events / elapsed:,.0f} events/s in one process; "
          f"{args.items:,} products, {args.memory_users:,} users; default bounds)")
    print()
    print("| events | RSS growth MB | behaviour rows | cells | open sessions | users with history |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['events']:,} | {r['rss_mb']:.0f} | {r['behavior_rows']:,} | {r['behavior_cells']:,} | "
              f"{r['behavior_sessions']:,} | {r.get('feeds_users', 0):,} |")
    last_half = [r["rss_mb"] for r in rows[len(rows) // 2:]]
    growth = (last_half[-1] - last_half[0]) / max(1.0, last_half[0]) if last_half else 0.0
    return {"events": args.events, "rss_growth_mb": round(rows[-1]["rss_mb"]), "second_half_growth": round(growth, 3),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--memory-users", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-stream", action="store_true", help="only the in-process memory part")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = out_dir(args.out)
    summary: dict[str, object] = {}
    plots = []
    if not args.skip_stream:
        with tempfile.TemporaryDirectory(prefix="simstream-feeds-") as scratch:
            stream = stream_part(args, Path(scratch))
        lat: list[float] = stream.pop("latencies_s")  # type: ignore[assignment]
        plots.append(latency_plot("feeds-latency", "user event → published feed", {"feed": [v * 1000 for v in lat]}))
        summary["stream"] = stream
    memory = memory_part(args)
    rows: list[dict[str, float]] = memory.pop("rows")  # type: ignore[assignment]
    plots.append(timeseries_plot("feeds-memory", "memory over events", [
        {"ylabel": "RSS growth MB", "series": {"rss": {"x": [r["events"] for r in rows], "y": [r["rss_mb"] for r in rows]}}},
    ], xlabel="events"))
    summary["memory"] = memory
    write_samples(out, "feeds", plots)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
