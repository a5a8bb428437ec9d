"""End-to-end load on real Kafka: a catalog (`--products`), then changes at fixed rates, mix by mix.

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

With ``--workers N`` (scale-out on one machine) N workers of one consumer group share the
partitions; the counters, CPU and RSS reported are their sums.

With ``--restart`` the windows run on a restarted worker: after the bootstrap the worker takes
a snapshot (``/admin/snapshot``), stops gracefully and starts again on the same topics and
data folder; the time until it is ready again (snapshot load, replay, first handover) is
reported as ``restart_ready_s``.
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
    encoder_busy,
    highest_rate_held,
    latency_plot,
    load_catalog,
    ms,
    out_dir,
    pct,
    restart_worker,
    send_at_rate,
    start_worker,
    texts_per_s,
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
            try:
                backlog.append(len(changes.sent) - (consumed(bench.worker) - consumed_before))
            except OSError as exc:  # a worker too busy to answer in time: that second has no sample
                print(f"backlog sample skipped: {exc}", file=sys.stderr, flush=True)
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    encoder0 = encoder_busy(bench.worker)
    cpu0, wall0 = bench.stats.cpu_s(), time.monotonic()
    sampler.start()
    send_at_rate(bench.settings, changes, rate, duration)
    sent = changes.sent
    catch_up = wait_consumed(bench.worker, consumed_before + len(sent), timeout=600)
    time.sleep(2.0)
    stop.set()
    sampler.join()
    cpu = (bench.stats.cpu_s() - cpu0) / (time.monotonic() - wall0)
    encoder = texts_per_s(encoder0, encoder_busy(bench.worker))

    lat = attribute_latencies(bench.settings, sent)
    own, all_own, last = lat.own, lat.all_own, lat.last
    row = {
        "mix": mix_label(mix), "rate": rate, "events": len(sent), "achieved_rate": round(len(sent) / duration, 1),
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
        "text_events_per_s": round(sum(1 for _t, kind in sent.values() if kind == "text") / duration, 1),
        "encoder_texts_per_s": encoder,
        "own_lists_measured": len(all_own),
    }
    samples = {"own_ms": [v * 1000 for v in all_own], "last_ms": [v * 1000 for v in last],
               "text_own_ms": [v * 1000 for v in own["text"]],
               "stockout_subs_ms": [v * 1000 for v in own["stock_out"]], "backlog": backlog}
    return row, samples


def mix_label(mix: tuple[float, float, float]) -> str:
    return f"text {mix[0]:g} / stock {mix[1]:g} / price {mix[2]:g}"


def parse_phase(text: str) -> tuple[tuple[float, float, float], list[int]]:
    """``TEXT,STOCK,PRICE@RATE,RATE,...`` as (mix, rates)."""
    mix_text, _, rates = text.partition("@")
    text_share, stock_share, price_share = (float(x) for x in mix_text.split(","))
    return (text_share, stock_share, price_share), [int(r) for r in rates.split(",") if r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--rates", default="20,50,100")
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--encoder", default="local")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder for stream.samples.json [SIMSTREAM_BENCH_OUT, else var/bench]")
    parser.add_argument("--keep", action="store_true", help="keep the worker's data folder (snapshots, log)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers in the consumer group (scale-out on this machine: each owns a share of the "
                             "partitions and replays every index update); CPU and RSS are their sums")
    parser.add_argument("--restart", action="store_true",
                        help="after the bootstrap, snapshot, stop and restart the worker (timed), then run the windows")
    parser.add_argument("--mix", default="0.6,0.2,0.2",
                        help="shares of text edits, stock flips and price changes (real-shaped: 0.2,0.4,0.4; "
                             "attribute-only: 0,0.5,0.5; text-only: 1,0,0)")
    parser.add_argument("--phase", action="append", default=[], metavar="MIX@RATES",
                        help="after one bootstrap, a mix at its rates, e.g. 0,0.5,0.5@500,1000; repeat for "
                             "several (replaces --mix and --rates)")
    args = parser.parse_args()
    phases = [parse_phase(p) for p in args.phase] or [parse_phase(f"{args.mix}@{args.rates}")]
    out = out_dir(args.out)

    bench = start_worker("stream", out / "scratch", encoder=args.encoder, workers=args.workers)
    rng = random.Random(42)
    catalog = build_catalog(args.products, rng)
    encoder0 = encoder_busy(bench.worker)
    load_s = load_catalog(bench, catalog)
    bootstrap_encoder = texts_per_s(encoder0, encoder_busy(bench.worker))
    bootstrap_rss = round(bench.stats.rss_mb())
    print(f"catalog of {len(catalog)} products embedded, indexed and published in {load_s:.1f} s "
          f"({len(catalog) / load_s:.0f} products/s; the encoder's own rate in that run "
          f"{bootstrap_encoder} texts/s); worker RSS {bootstrap_rss} MB", flush=True)

    done = len(catalog)
    restart_ready_s = None
    if args.restart:
        bench, restart_ready_s = restart_worker(bench)
        restart_ready_s = round(restart_ready_s, 1)
        done = consumed(bench.worker)  # the new process counts from its start
        print(f"worker snapshotted, stopped and restarted: ready in {restart_ready_s} s "
              f"(snapshot load, replay, first handover); RSS {round(bench.stats.rss_mb())} MB", flush=True)

    results = []
    samples: dict[str, dict[str, Any]] = {}
    for mix, rates in phases:
        for rate in rates:
            result, window = run_rate(bench, catalog, rate, args.duration, done, rng, mix)
            samples[f"{rate} ev/s" if len(phases) == 1 else f"{rate} ev/s, {mix_label(mix)}"] = window
            done += result["events"]
            results.append(result)
            print(json.dumps(result), flush=True)
    bench.worker.stop()
    if not args.keep:
        shutil.rmtree(bench.data_dir, ignore_errors=True)

    write_samples(out, "stream", [
        latency_plot("stream-own", f"Event to the changed product's own list, {len(catalog):,} products",
                     {label: s["own_ms"] for label, s in samples.items()}),
        latency_plot("stream-last", "Event to the last list it republished",
                     {label: s["last_ms"] for label, s in samples.items()}),
        timeseries_plot("stream-backlog", "Backlog (events sent, not yet consumed) during each window", [
            {"ylabel": "events", "log": True, "series": {label: {"x": list(range(len(s["backlog"]))), "y": s["backlog"]}
                                            for label, s in samples.items()}}]),
    ])
    print("\n| mix | rate ev/s | achieved | own list p50 / p99 / max ms | text edit own p99 ms | stock-out substitutes "
          "p50 / p99 ms | last list p50 / p99 / max ms | backlog max / end | CPU cores | RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['mix']} | {r['rate']} | {r['achieved_rate']} | {r['own_p50_ms']} / {r['own_p99_ms']} / {r['own_max_ms']} | "
              f"{r['text_own_p99_ms']} | {r['stockout_subs_p50_ms']} / {r['stockout_subs_p99_ms']} | "
              f"{r['last_p50_ms']} / {r['last_p99_ms']} / {r['last_max_ms']} | {r['backlog_max']} / "
              f"{r['backlog_end']}{' (growing)' if r['backlog_growing'] else ''} | {r['cpu_cores']} | {r['rss_mb']} |")
    print(json.dumps({"bench": "stream", "command": " ".join(sys.argv), "products": len(catalog),
                      "workers": args.workers,
                      "load_s": round(load_s, 1), "products_per_s": round(len(catalog) / load_s, 1),
                      "bootstrap_encoder_texts_per_s": bootstrap_encoder, "bootstrap_rss_mb": bootstrap_rss,
                      "restart_ready_s": restart_ready_s,
                      "encoder": args.encoder, "duration_s": args.duration,
                      # The first phase's: the soak runs at half of it.
                      "highest_rate_held": highest_rate_held([r for r in results if r["mix"] == mix_label(phases[0][0])]),
                      "held_by_mix": {mix_label(mix): highest_rate_held([r for r in results if r["mix"] == mix_label(mix)])
                                      for mix, _rates in phases},
                      "results": results}))


if __name__ == "__main__":
    main()
