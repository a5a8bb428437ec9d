"""End-to-end load on real Kafka: a 20k-product catalog, then mixed changes at fixed rates.

    SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:19092 .venv/bin/python tests/bench/bench_stream.py \
        --products 20000 --rates 20,50,100 --duration 120

(``make bench`` starts the broker and runs every ``tests/bench/bench_*.py``; raw latency samples
and the backlog go to ``--out``/``stream.samples.json`` for the plots in BENCHMARKS.md.)

The catalog is every real product title in ``shared/data`` (Amazon and Google software from
the Leipzig benchmark, Amazon gift cards), extended to the requested size with a shop-like
mix built from those titles (``harness.build_catalog``): variants in their group, duplicate
listings under another id, and recombinations of two real titles. The worker runs as its own
process with the in-process MiniLM encoder.

Mixed changes (``--mix``; 60% text edits, 20% stock flips, 20% price changes by default), sent
at a fixed rate.
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
import json
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.harness import (
    BenchWorker,
    MixedChanges,
    attribute_latencies,
    backlog_growing,
    build_catalog,
    consumed,
    highest_rate_held,
    latency_plot,
    load_catalog,
    ms,
    out_dir,
    pct,
    send_at_rate,
    start_worker,
    timeseries_plot,
    wait_consumed,
    write_samples,
)

QUICK_ARGS = ["--products", "1500", "--rates", "5,20", "--duration", "20"]


def run_rate(bench: BenchWorker, catalog: list[dict[str, Any]], rate: int, duration: float,
             consumed_before: int, rng: random.Random,
             mix: tuple[float, float, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One window at ``rate``: the summary row, and raw samples (latencies in ms, backlog over time)."""
    changes = MixedChanges(catalog, rng, mix=mix)
    backlog: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            backlog.append(len(changes.sent) - (consumed(bench.worker) - consumed_before))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    cpu0, wall0 = bench.stats.cpu_s(), time.monotonic()
    sampler.start()
    send_at_rate(bench.settings, changes, rate, duration)
    sent = changes.sent
    catch_up = wait_consumed(bench.worker, consumed_before + len(sent), timeout=600)
    time.sleep(2.0)
    stop.set()
    sampler.join()
    cpu = (bench.stats.cpu_s() - cpu0) / (time.monotonic() - wall0)

    lat = attribute_latencies(bench.settings, sent)
    own, all_own, last = lat.own, lat.all_own, lat.last
    row = {
        "rate": rate, "events": len(sent), "achieved_rate": round(len(sent) / duration, 1),
        "own_p50_ms": ms(pct(all_own, 50)), "own_p99_ms": ms(pct(all_own, 99)),
        "own_max_ms": ms(max(all_own, default=float("nan"))),
        "text_own_p99_ms": ms(pct(own["text"], 99)),
        "stockout_subs_p50_ms": ms(pct(own["stock_out"], 50)),
        "stockout_subs_p99_ms": ms(pct(own["stock_out"], 99)),
        "last_p50_ms": ms(pct(last, 50)), "last_p99_ms": ms(pct(last, 99)),
        "last_max_ms": ms(max(last, default=float("nan"))),
        "backlog_max": max(backlog, default=0), "backlog_end": backlog[-1] if backlog else 0,
        "backlog_growing": backlog_growing([float(b) for b in backlog], rate), "catch_up_s": round(catch_up, 1),
        "cpu_cores": round(cpu, 2), "rss_mb": round(bench.stats.rss_mb()),
        "own_lists_measured": len(all_own),
    }
    samples = {"own_ms": [v * 1000 for v in all_own], "last_ms": [v * 1000 for v in last],
               "text_own_ms": [v * 1000 for v in own["text"]],
               "stockout_subs_ms": [v * 1000 for v in own["stock_out"]], "backlog": backlog}
    return row, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--rates", default="20,50,100")
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--encoder", default="local")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder for stream.samples.json [SIMSTREAM_BENCH_OUT, else var/bench]")
    parser.add_argument("--keep", action="store_true", help="keep the worker's data folder (snapshots, log)")
    parser.add_argument("--mix", default="0.6,0.2,0.2",
                        help="shares of text edits, stock flips and price changes (real-shaped: 0.2,0.4,0.4; "
                             "attribute-only: 0,0.5,0.5; text-only: 1,0,0)")
    args = parser.parse_args()
    text_share, stock_share, price_share = (float(x) for x in args.mix.split(","))
    mix = (text_share, stock_share, price_share)
    out = out_dir(args.out)

    bench = start_worker("stream", out / "scratch", encoder=args.encoder)
    rng = random.Random(42)
    catalog = build_catalog(args.products, rng)
    load_s = load_catalog(bench, catalog)
    print(f"catalog of {len(catalog)} products embedded, indexed and published in {load_s:.1f} s "
          f"({len(catalog) / load_s:.0f} products/s); worker RSS {bench.stats.rss_mb():.0f} MB", flush=True)

    results = []
    samples: dict[int, dict[str, Any]] = {}
    done = len(catalog)
    for rate in (int(r) for r in args.rates.split(",")):
        result, samples[rate] = run_rate(bench, catalog, rate, args.duration, done, rng, mix)
        done += result["events"]
        results.append(result)
        print(json.dumps(result), flush=True)
    bench.worker.stop()
    if not args.keep:
        shutil.rmtree(bench.data_dir, ignore_errors=True)

    write_samples(out, "stream", [
        latency_plot("stream-own", f"Event to the changed product's own list, {len(catalog):,} products",
                     {f"{r} ev/s": s["own_ms"] for r, s in samples.items()}),
        latency_plot("stream-last", "Event to the last list it republished",
                     {f"{r} ev/s": s["last_ms"] for r, s in samples.items()}),
        timeseries_plot("stream-backlog", "Backlog (events sent, not yet consumed) during each window", [
            {"ylabel": "events", "log": True, "series": {f"{r} ev/s": {"x": list(range(len(s["backlog"]))), "y": s["backlog"]}
                                            for r, s in samples.items()}}]),
    ])
    print("\n| rate ev/s | achieved | own list p50 / p99 / max ms | text edit own p99 ms | stock-out substitutes "
          "p50 / p99 ms | last list p50 / p99 / max ms | backlog max / end | CPU cores | RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['rate']} | {r['achieved_rate']} | {r['own_p50_ms']} / {r['own_p99_ms']} / {r['own_max_ms']} | "
              f"{r['text_own_p99_ms']} | {r['stockout_subs_p50_ms']} / {r['stockout_subs_p99_ms']} | "
              f"{r['last_p50_ms']} / {r['last_p99_ms']} / {r['last_max_ms']} | {r['backlog_max']} / "
              f"{r['backlog_end']}{' (growing)' if r['backlog_growing'] else ''} | {r['cpu_cores']} | {r['rss_mb']} |")
    print(json.dumps({"bench": "stream", "command": " ".join(sys.argv), "products": len(catalog),
                      "load_s": round(load_s, 1), "encoder": args.encoder, "duration_s": args.duration,
                      "mix": {"text": mix[0], "stock": mix[1], "price": mix[2]},
                      "highest_rate_held": highest_rate_held(results), "results": results}))


if __name__ == "__main__":
    main()
