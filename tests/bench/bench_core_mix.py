"""The recommendation core on a realistic catalog under real-shaped mixes (not collected by pytest).

    .venv/bin/python tests/bench/bench_core_mix.py --n 100000 --ops 3000

The catalog is ``harness.build_catalog`` (real titles of ``../shared/data``, their variants,
duplicate listings and recombinations), embedded with the in-process MiniLM (vectors cached
under ``var/bench-cache``) with the IDF fitted on it, as a worker's bootstrap fits it.
``Recommender.bulk_load`` builds it once and saves a snapshot
there; a rerun loads the snapshot instead (both timed). Then three mixes run through
``Recommender.apply`` **in batches of 256, primed as the stream primes them**
(``Recommender.prime``): the real-shaped mix of issue #14 (20% title edits, 40% stock flips,
40% price changes of up to 20%), the attribute-only mix (stock and price) and the text-only
mix. Title edits are real titles with a variant suffix, embedded by the same encoder.

Also timed: a snapshot written by a forked child as the worker writes it (how long the caller
pauses for the fork, how long the child takes). Reported per mix: changes/s through the core, apply p50/p99 per kind, list publications
per change; and the RSS per product after the load. This is the core alone: the worker adds
decoding, the encoder, JSON and Kafka sends (``bench_stream.py`` measures those). The last
line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serving.catalog import ProductChange, ProductUpsert
from serving.config import RecommenderConfig
from serving.lexical import LexicalModel
from serving.recommender import Recommender
from serving.snapshot import save_in_child
from serving.text import product_text
from tests.bench.bench_exact_scale import CACHE, embed, embedded_catalog
from tests.bench.harness import VARIANTS, build_catalog

QUICK_ARGS = ["--n", "3000", "--ops", "300"]
BATCH = 256


def rss_kb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    return float("nan")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def make_mix(
    rec: Recommender, rows: list[dict[str, Any]], shares: tuple[float, float, float], ops: int,
    rng: random.Random, ts: float,
) -> list[tuple[str, ProductChange, str | None]]:
    """(kind, change, new text or None): ``shares`` of title edits, stock flips, price changes."""
    ids = sorted(p.product_id for p in rec.catalog)
    stock: dict[str, bool] = {}
    price: dict[str, float | None] = {}
    out: list[tuple[str, ProductChange, str | None]] = []
    for j in range(ops):
        pid = rng.choice(ids)
        current = rec.catalog.get(pid)
        assert current is not None
        r = rng.random()
        at = ts + j
        if r < shares[0]:
            title = f"{rows[rng.randrange(len(rows))]['title']} - {rng.choice(VARIANTS)}"
            change = ProductUpsert(pid, at, title=title)
            product = rec.needs_embedding(change)
            assert product is not None
            out.append(("text", change, product_text(product)))
        elif r < shares[0] + shares[1]:
            in_stock = not stock.get(pid, current.in_stock)
            stock[pid] = in_stock
            out.append(("stock", ProductUpsert(pid, at, in_stock=in_stock), None))
        else:
            base = price.get(pid, current.price) or 20.0
            new = round(base * rng.uniform(0.8, 1.2), 2)
            price[pid] = new
            out.append(("price", ProductUpsert(pid, at, price=new), None))
    return out


def run_mix(rec: Recommender, name: str, mix: list[tuple[str, ProductChange, str | None]]) -> dict[str, Any]:
    texts = [t for _k, _c, t in mix if t is not None]
    vectors = dict(zip(texts, embed(texts, f"mix-{name}"), strict=True)) if texts else {}
    lat: dict[str, list[float]] = {}
    pubs = 0
    gc.collect()
    started = time.perf_counter()
    for at in range(0, len(mix), BATCH):
        part = mix[at : at + BATCH]
        batch_vectors = [vectors[t] for _k, _c, t in part if t is not None]
        if len(batch_vectors) > 1:
            rec.prime(np.stack(batch_vectors))
        for kind, change, text in part:
            t = time.perf_counter()
            pubs += len(rec.apply(change, vectors[text] if text is not None else None))
            lat.setdefault(kind, []).append((time.perf_counter() - t) * 1000)
        rec.unprime()
    wall = time.perf_counter() - started
    result: dict[str, Any] = {"changes": len(mix), "changes_per_s": round(len(mix) / wall, 1),
                              "publications_per_change": round(pubs / len(mix), 2)}
    print(f"{name}: {len(mix):,} changes in {wall:.1f} s = {len(mix) / wall:,.0f} changes/s through the core, "
          f"{pubs / len(mix):.1f} list publications per change")
    for kind, values in sorted(lat.items()):
        result[kind] = {"n": len(values), "p50_ms": round(pct(values, 50), 2), "p99_ms": round(pct(values, 99), 2),
                        "mean_ms": round(float(np.mean(values)), 2)}
        print(f"  {kind:<6} n={len(values):>5}  p50 {pct(values, 50):6.2f} ms  p99 {pct(values, 99):7.2f} ms  "
              f"mean {np.mean(values):6.2f} ms")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--ops", type=int, default=3000, help="changes per mix")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    rows = build_catalog(args.n, random.Random(args.seed))
    products, merged, vectors = embedded_catalog(rows)
    config = RecommenderConfig(hnsw_initial_capacity=args.n + 1024)
    key = hashlib.sha256(f"{args.n}-{args.seed}-{config}-idf".encode()).hexdigest()[:12]
    snap = CACHE / f"core-mix-{args.n}-{key}"
    res: dict[str, Any] = {"n": args.n, "batch": BATCH}
    gc.collect()
    rss0 = rss_kb()
    started = time.perf_counter()
    if snap.is_dir():
        rec = Recommender.load(snap, config)
        res["snapshot_load_s"] = round(time.perf_counter() - started, 1)
        print(f"snapshot load of {args.n:,} products: {res['snapshot_load_s']} s "
              f"(lists taken over after a sample of 200 recomputed)")
    else:
        # Fitted on the catalog first, as a worker's bootstrap does (Worker.settle_bulk):
        # without an IDF every n-gram weighs alike and the duplicates' search scans them all.
        rec = Recommender(config, lexical=LexicalModel.fit(product_text(p) for p in merged))
        rec.bulk_load(products, vectors)
        res["bulk_load_s"] = round(time.perf_counter() - started, 1)
        print(f"bulk_load of {args.n:,} products: {res['bulk_load_s']} s "
              f"({args.n / res['bulk_load_s']:,.0f} products/s)")
        snap.mkdir(parents=True)
        t = time.perf_counter()
        rec.save(snap)
        res["snapshot_save_s"] = round(time.perf_counter() - t, 1)
        print(f"snapshot save: {res['snapshot_save_s']} s")
    del products, merged, vectors
    gc.collect()
    gc.freeze()
    res["rss_kb_per_product"] = round((rss_kb() - rss0) / args.n, 1)
    print(f"RSS after the load: {res['rss_kb_per_product']} KB per product (three float32 copies of each "
          f"vector, 4.5 KB, included: the graph's, the index's numpy store and the reverse check's)")
    with tempfile.TemporaryDirectory(prefix="simstream-bench-") as scratch:
        # What the worker does every SIMSTREAM_SNAPSHOT_INTERVAL_S: fork, the child writes.
        t = time.perf_counter()
        child = save_in_child(lambda: rec.save(Path(scratch)))
        res["snapshot_fork_pause_ms"] = round((time.perf_counter() - t) * 1000, 1)
        child.wait()
        res["snapshot_child_write_s"] = round(time.perf_counter() - t, 1)
        print(f"forked snapshot: the caller paused {res['snapshot_fork_pause_ms']} ms for the fork; "
              f"the child wrote it in {res['snapshot_child_write_s']} s")
    ts = 2e9
    for name, shares in (("mixed", (0.2, 0.4, 0.4)), ("attributes", (0.0, 0.5, 0.5)), ("text", (1.0, 0.0, 0.0))):
        ops = args.ops if name != "text" else max(1, args.ops // 3)
        res[name] = run_mix(rec, name, make_mix(rec, rows, shares, ops, rng, ts))
        ts += ops + 1
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
