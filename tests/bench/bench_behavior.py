"""Benchmark of the pure behaviour core: per-event feed update latency and bounded memory.

Not collected by pytest. Run: ``.venv/bin/python tests/bench/bench_behavior.py [--events N]``.
Each event goes through ``BehaviorModel.ingest`` and ``UserFeeds.observe`` and the user's feed
is recomputed with ``UserFeeds.recommend`` (neighbours from the behaviour model), which is the
core work the stream does per event, without Kafka. Prints p50/p99 latency and the state
size (and traced memory) at checkpoints: it must plateau, not grow with events.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import tracemalloc
from pathlib import Path
from typing import Any

from serving.behavior import BehaviorConfig, BehaviorModel
from serving.catalog import Product, UserEvent, UserEventType
from serving.feeds import FeedConfig, UserFeeds

QUICK_ARGS = ["--events", "20000"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=os.environ.get("SIMSTREAM_BENCH_OUT"),
                    help="write raw latency samples to OUT/behavior.samples.json (for make bench's plots)")
    args = ap.parse_args()
    rng = random.Random(7)
    bcfg = BehaviorConfig(top_n=50, max_items=20_000, max_sessions=20_000)
    fcfg = FeedConfig(max_users=20_000, max_trending=5_000)
    model, feeds = BehaviorModel(bcfg), UserFeeds(fcfg)
    catalog = {
        f"p{i}": Product(f"p{i}", f"p{i}", 0.0, category=(f"c{i % 50}",), group_id=f"g{i // 3}")
        for i in range(args.items)
    }
    types = [UserEventType.VIEW] * 8 + [UserEventType.ADD_TO_CART, UserEventType.PURCHASE]
    lat: list[float] = []
    tracemalloc.start()
    checkpoints = {args.events // 4, args.events // 2, args.events}
    rows: list[dict[str, Any]] = []
    samples: dict[str, list[float]] = {}
    done = 0
    ts = 1.7e9
    for n in range(1, args.events + 1):
        ts += 0.005  # 200 events/s of event time
        # zipf-ish item popularity, users clustered so sessions have several events
        item = f"p{min(args.items - 1, int(rng.paretovariate(1.2)) - 1 + rng.randrange(0, 50) * 100)}"
        ev = UserEvent(f"u{rng.randrange(args.users)}", rng.choice(types), ts, item)
        t0 = time.perf_counter()
        model.ingest(ev)
        feeds.observe(ev)
        feeds.recommend(
            ev.user_id,
            ts,
            similar=lambda i, t=ts: model.partners(i, "view", 20, now=t),
            complements=lambda i, t=ts: model.partners(i, "purchase", 10, now=t),
            products=catalog.get,
        )
        lat.append(time.perf_counter() - t0)
        if n in checkpoints:
            cur, _ = tracemalloc.get_traced_memory()
            s = sorted(lat)
            samples[f"events {done + 1:,}–{n:,}"] = [round(x * 1e3, 4) for x in lat]
            done = n
            rows.append(
                {
                    "events": n,
                    "p50_ms": round(s[len(s) // 2] * 1e3, 3),
                    "p99_ms": round(s[int(len(s) * 0.99)] * 1e3, 3),
                    "traced_mb": round(cur / 2**20, 1),
                    "behavior": model.size(),
                    "feeds": feeds.size(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            lat.clear()
    print("\n| events (latency of those since the previous row) | p50 ms | p99 ms | traced MB | behaviour state | feeds state |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        state = {k: ", ".join(f"{name} {v:,}" for name, v in r[k].items()) for k in ("behavior", "feeds")}
        print(f"| {r['events']:,} | {r['p50_ms']} | {r['p99_ms']} | {r['traced_mb']} | {state['behavior']} "
              f"| {state['feeds']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "behavior.samples.json").write_text(json.dumps({"bench": "behavior", "plots": [
            {"id": "behavior-event", "kind": "latency", "unit": "ms", "series": samples,
             "title": "One user event: ingest, observe and the user's feed recomputed"}]}))
    print(json.dumps({"bench": "behavior", "events": args.events, "items": args.items, "users": args.users,
                      "checkpoints": rows}))


if __name__ == "__main__":
    main()
