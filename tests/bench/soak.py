"""Soak: one worker on real Kafka holds a steady rate for 20 minutes; memory must stay flat.

    SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:39092 .venv/bin/python tests/bench/soak.py --duration 1200
    make soak                      # starts a broker, runs this, regenerates BENCHMARKS.md
    make soak SOAK_ARGS="--duration 300 --rate 8"

The worker (in-process MiniLM, default settings) first loads the stream bench's catalog
(``--products``, every real product of ``shared/data`` plus variants), then gets the stream
bench's mixed changes (60% title edits, 20% stock flips, 20% price changes) at ``--rate``
events/s for ``--duration`` seconds. Every ``--interval`` seconds it samples the worker's
resident memory (RSS, /proc), its CPU, and the backlog (events sent but not yet consumed,
from the worker's ``/stats``); every ``--lag-every`` seconds the consumer group's committed
lag on the broker (what ``simstream status`` shows). Afterwards every list is attributed to
its cause, as in the stream bench, for the latency over time.

Rate: by default half the highest rate the stream bench held without a growing backlog at
the same catalog size (``stream.run.json`` in the results folder, which ``make bench``
writes before the soak runs); without such a result, 10 events/s (half of 20/s, the highest
rate the README's stream benchmark held at 20k products).

Check: memory flat within 10% after warm-up. The warm-up is the first ``--warmup`` seconds
of the steady rate (default: a quarter of the duration, at most 300 s). The reference is the
median RSS of the first minute after the warm-up (the first tenth of it if shorter); every
later sample must lie within 10% of it. The script exits 1 when the check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.harness import (
    FRESHNESS_BUDGET_MS,
    MAX_CATCH_UP_S,
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

QUICK_ARGS = ["--products", "1500", "--duration", "60", "--interval", "1"]
FALLBACK_RATE = 10.0
TOLERANCE = 0.10


def default_rate(out: Path, products: int) -> tuple[float, str]:
    """Half the highest rate the stream bench held at this catalog size, else the fallback."""
    try:
        summary = json.loads((out / "stream.run.json").read_text())["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        summary = None
    # Judged here from the measured windows (``harness.rate_held``), not from the summary's
    # field, so a result file written under an older criterion is read the same way.
    held = highest_rate_held(summary["results"]) if summary and summary.get("results") else None
    if summary and summary.get("products") == products and held:
        return held / 2, (f"half of {held:g} ev/s, the highest rate the stream bench held at {products:,} products "
                          f"(p99 own list within {FRESHNESS_BUDGET_MS} ms, caught up within {MAX_CATCH_UP_S:g} s)")
    return FALLBACK_RATE, f"the default: no stream bench result at {products:,} products in {out.name}/"


def group_lag(settings: Any) -> int | None:
    """Total committed lag of the worker's consumer group on its input topics (None on failure)."""
    from kafka.errors import KafkaError

    from streams.cli.ops_commands import consumer_lag

    try:
        return sum(int(row["lag"]) for row in consumer_lag(settings))
    except (KafkaError, OSError, KeyError, IndexError):  # a transient admin error must not end the run
        return None


def memory_check(t: list[float], rss: list[float], warmup: float) -> dict[str, Any]:
    """Flat within ``TOLERANCE`` of the median of the first minute after the warm-up."""
    post = [(x, y) for x, y in zip(t, rss, strict=True) if x >= warmup]
    if len(post) < 3:
        return {"pass": False, "reason": f"only {len(post)} samples after the warm-up of {warmup:.0f} s"}
    span = post[-1][0] - post[0][0]
    window = min(60.0, span / 10)
    reference = statistics.median(y for x, y in post if x <= post[0][0] + window)
    lo, hi = min(y for _, y in post), max(y for _, y in post)
    deviation = max(hi - reference, reference - lo) / reference
    slope = statistics.linear_regression([x for x, _ in post], [y for _, y in post]).slope if span > 0 else 0.0
    return {"pass": deviation <= TOLERANCE, "reference_mb": round(reference), "min_mb": round(lo),
            "max_mb": round(hi), "end_mb": round(post[-1][1]), "max_deviation": round(deviation, 4),
            "trend_mb_per_min": round(slope * 60, 2), "reference_window_s": round(window, 1),
            "samples": len(post)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds at the steady rate (20 min)")
    parser.add_argument("--rate", type=float, default=None, help="events/s (default: see above)")
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default: duration/4, at most 300)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS and backlog samples")
    parser.add_argument("--lag-every", type=float, default=15.0, help="seconds between consumer-lag samples")
    parser.add_argument("--encoder", default="local")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder for soak.samples.json [SIMSTREAM_BENCH_OUT, else var/bench]")
    parser.add_argument("--keep", action="store_true", help="keep the worker's data folder (snapshots, log)")
    args = parser.parse_args()
    out = out_dir(args.out)
    rate, rate_source = (args.rate, "--rate") if args.rate else default_rate(out, args.products)
    warmup = args.warmup if args.warmup is not None else min(300.0, args.duration / 4)
    print(f"soak: {rate:g} ev/s ({rate_source}) for {args.duration:.0f} s, warm-up {warmup:.0f} s", flush=True)

    bench = start_worker("soak", out / "scratch", encoder=args.encoder)
    catalog = build_catalog(args.products, random.Random(42))
    load_s = load_catalog(bench, catalog)
    rss_loaded = bench.stats.rss_mb()
    print(f"catalog of {len(catalog)} products loaded in {load_s:.1f} s; worker RSS {rss_loaded:.0f} MB", flush=True)

    changes = MixedChanges(catalog, random.Random(7))
    base = consumed(bench.worker)
    series: dict[str, list[float]] = {"t": [], "rss_mb": [], "backlog": [], "cpu_cores": []}
    lag_t: list[float] = []
    lag: list[float] = []
    stop = threading.Event()
    start, start_wall = time.monotonic(), time.time()

    def sample() -> None:
        cpu_prev, wall_prev, next_lag = bench.stats.cpu_s(), time.monotonic(), 0.0
        while not stop.wait(args.interval):
            now = time.monotonic()
            cpu = bench.stats.cpu_s()
            series["t"].append(round(now - start, 2))
            series["rss_mb"].append(round(bench.stats.rss_mb(), 1))
            series["backlog"].append(len(changes.sent) - (consumed(bench.worker) - base))
            series["cpu_cores"].append(round((cpu - cpu_prev) / (now - wall_prev), 3))
            cpu_prev, wall_prev = cpu, now
            if now - start >= next_lag:
                value = group_lag(bench.settings)
                if value is not None:
                    lag_t.append(round(now - start, 2))
                    lag.append(value)
                next_lag = now - start + args.lag_every
            last = len(series["t"])
            if last % max(1, round(60 / args.interval)) == 0:
                print(f"  t={series['t'][-1]:7.0f} s  RSS {series['rss_mb'][-1]:7.0f} MB  "
                      f"backlog {series['backlog'][-1]:5.0f}  CPU {series['cpu_cores'][-1]:.2f}", flush=True)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sent = send_at_rate(bench.settings, changes, rate, args.duration)
    steady_s = time.monotonic() - start
    catch_up = wait_consumed(bench.worker, base + sent, timeout=600)
    stop.set()
    sampler.join()
    rss_end = bench.stats.rss_mb()

    lat = attribute_latencies(bench.settings, changes.sent)
    bench.worker.stop()
    if not args.keep:
        shutil.rmtree(bench.data_dir, ignore_errors=True)

    # own-list p99 per minute of send time
    by_minute: dict[int, list[float]] = {}
    for cause, seconds in lat.own_by_cause.items():
        by_minute.setdefault(int((changes.sent[cause][0] - start_wall) // 60), []).append(seconds)
    own_by_minute = {m: ms(pct(v, 99)) for m, v in sorted(by_minute.items()) if len(v) >= 10}  # no stub minute

    memory = memory_check(series["t"], series["rss_mb"], warmup)
    post_backlog = [b for x, b in zip(series["t"], series["backlog"], strict=True) if x >= warmup]
    growing = backlog_growing(post_backlog, rate)
    all_own = lat.all_own
    summary = {
        "bench": "soak", "rate": rate, "rate_source": rate_source, "duration_s": args.duration,
        "steady_s": round(steady_s, 1), "warmup_s": warmup, "products": len(catalog), "load_s": round(load_s, 1),
        "events_sent": sent, "catch_up_s": round(catch_up, 1),
        "rss_after_load_mb": round(rss_loaded), "rss_end_mb": round(rss_end),
        "memory_flat": memory, "memory_pass": memory["pass"],
        "backlog_max_after_warmup": max(post_backlog, default=None),
        "backlog_end": series["backlog"][-1] if series["backlog"] else None,
        "backlog_growing": growing,
        "group_lag_max": max(lag, default=None), "group_lag_end": lag[-1] if lag else None,
        "own_p50_ms": ms(pct(all_own, 50)), "own_p99_ms": ms(pct(all_own, 99)),
        "own_max_ms": ms(max(all_own, default=float("nan"))),
        "own_lists_measured": len(all_own),
        "cpu_cores_mean": round(statistics.mean(series["cpu_cores"]), 2) if series["cpu_cores"] else None,
    }
    ref = memory.get("reference_mb")
    minutes = [x / 60 for x in series["t"]]
    rss_panel: dict[str, Any] = {"ylabel": "worker RSS (MB)", "series": {"RSS": {"x": minutes, "y": series["rss_mb"]}},
                                 "vlines": [{"x": warmup / 60, "label": "end of warm-up"}]}
    if ref:
        rss_panel["hlines"] = [{"y": ref * (1 + TOLERANCE), "label": "reference +10%"},
                               {"y": ref * (1 - TOLERANCE), "label": "reference -10%"}]
    write_samples(out, "soak", [
        timeseries_plot("soak", f"Soak at {rate:g} ev/s, {len(catalog):,} products: memory and backlog over time", [
            rss_panel,
            {"ylabel": "backlog (events)", "series": {
                "sent, not consumed": {"x": minutes, "y": series["backlog"]},
                "consumer-group lag (committed)": {"x": [x / 60 for x in lag_t], "y": lag}}},
            {"ylabel": "own list p99 per minute (ms)", "series": {
                "p99": {"x": [m + 0.5 for m in own_by_minute], "y": list(own_by_minute.values())}}},
        ], xlabel="minutes at the steady rate"),
        latency_plot("soak-own", f"Soak: event to the changed product's own list at {rate:g} ev/s",
                     {"own list": [v * 1000 for v in all_own], "last list": [v * 1000 for v in lat.last]}),
    ])

    verdict = "PASS" if memory["pass"] else "FAIL"
    detail = (f"max deviation {memory['max_deviation']:.1%} from {memory['reference_mb']} MB"
              if "max_deviation" in memory else memory.get("reason", ""))
    print("\n| measure | result |")
    print("| --- | --- |")
    print(f"| rate | {rate:g} ev/s ({rate_source}) |")
    print(f"| duration | {steady_s:.0f} s at the rate (warm-up {warmup:.0f} s), after a catalog load of "
          f"{len(catalog):,} products in {load_s:.0f} s |")
    print(f"| events sent | {sent:,} (caught up {catch_up:.1f} s after the last) |")
    if "reference_mb" in memory:
        print(f"| RSS after warm-up: reference / min / max / end | {memory['reference_mb']:,} / {memory['min_mb']:,} / "
              f"{memory['max_mb']:,} / {memory['end_mb']:,} MB (after the load: {rss_loaded:,.0f} MB) |")
        print(f"| RSS trend after warm-up | {memory['trend_mb_per_min']:+.2f} MB/min |")
    print(f"| **memory flat within 10% after warm-up** | **{verdict}** ({detail}) |")
    print(f"| backlog after warm-up: max / end | {summary['backlog_max_after_warmup']} / {summary['backlog_end']}"
          f"{' (growing)' if growing else ''} events |")
    print(f"| consumer-group lag (committed offsets): max / end | {summary['group_lag_max']} / {summary['group_lag_end']} |")
    print(f"| own list p50 / p99 / max | {summary['own_p50_ms']} / {summary['own_p99_ms']} / {summary['own_max_ms']} ms |")
    print(f"| worker CPU, mean | {summary['cpu_cores_mean']} cores |")
    print(json.dumps(summary))
    if not memory["pass"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
