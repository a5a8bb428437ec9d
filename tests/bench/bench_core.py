"""Benchmark of the recommendation core (not collected by pytest).

    .venv/bin/python tests/bench/bench_core.py --n 100000

Vectors: synthetic, *clustered with a low effective dimension*: ``--clusters`` centres in a
``--latent``-dimensional space, each item its centre plus Gaussian noise, projected to
``--dim`` dimensions by a fixed random matrix, plus a little isotropic noise, then
normalised. Product texts are synthetic titles (brand, noun, model number) shared within a
cluster, so the lexical part has real work to do.

Measures: index upsert throughput (one at a time and batched); query latency at ef 50/100/200
with recall@10 against brute force; ``Recommender.apply`` p50/p99 for a new upsert, a text
change (move), a delete and a stock flip, propagation included; bulk load time; memory per
item (RSS delta); snapshot save/load time; and the mean similar-items overlap of a sample of
products with an exact from-scratch recomputation.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.catalog import ProductChange, ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.index import HnswIndex, normalize_rows
from serving.lexical import cosine_many
from serving.recommender import Kind, Recommender, build_lists
from serving.scoring import profile
from serving.text import product_text

QUICK_ARGS = ["--n", "3000", "--ops", "60", "--queries", "100"]

BRANDS = [f"Brand{i}" for i in range(60)]
NOUNS = ["headphones", "speaker", "cable", "charger", "mouse", "keyboard", "monitor", "lamp", "kettle", "drill"]
COLORS = ["black", "white", "red", "blue", "silver"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def make_data(n: int, dim: int, latent: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(latent, dim)).astype(np.float32) / np.sqrt(latent)
    centers = rng.normal(size=(clusters, latent)).astype(np.float32)
    labels = rng.integers(0, clusters, size=n)
    z = centers[labels] + 0.35 * rng.normal(size=(n, latent)).astype(np.float32)
    x = z @ proj + 0.05 * rng.normal(size=(n, dim)).astype(np.float32)
    return normalize_rows(x.astype(np.float32), dim), labels


def make_product(i: int, cluster: int, rng: np.random.Generator, ts: float) -> ProductUpsert:
    brand = BRANDS[(cluster * 7 + int(rng.integers(3))) % len(BRANDS)]
    noun = NOUNS[cluster % len(NOUNS)]
    return ProductUpsert(
        product_id=f"P{i:07d}",
        ts=ts,
        title=f"{brand} {noun} {chr(65 + cluster % 26)}{cluster % 97}-{int(rng.integers(100, 999))}",
        brand=brand,
        category=("Root", f"Leaf{cluster % 200}"),
        price=float(np.round(rng.lognormal(3.5, 0.4), 2)),
        in_stock=bool(rng.random() < 0.9),
        group_id=f"G{i // 3}" if rng.random() < 0.3 else None,
        attributes=(("color", COLORS[int(rng.integers(len(COLORS)))]),),
    )


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def brute_topk(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for start in range(0, len(queries), 256):
        s = queries[start : start + 256] @ data.T
        out.append(np.argpartition(-s, k, axis=1)[:, :k])
    return np.vstack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--ops", type=int, default=300, help="timed apply() calls per kind")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--out", type=Path, default=os.environ.get("SIMSTREAM_BENCH_OUT"),
                    help="write raw latency samples to OUT/core.samples.json (for make bench's plots)")
    args = ap.parse_args()
    n, dim = args.n, args.dim
    res: dict[str, object] = {"n": n, "dim": dim, "latent_dim": args.latent, "clusters": args.clusters}
    config = RecommenderConfig(dim=dim, hnsw_initial_capacity=n + 2 * args.ops + 4096)
    res["config"] = {
        "k": config.k, "candidate_depth": config.candidate_depth, "candidate_slack": config.candidate_slack,
        "hnsw_ef": config.hnsw_ef, "hnsw_m": config.hnsw_m,
        "hnsw_ef_construction": config.hnsw_ef_construction,
    }
    extra = 3 * args.ops + args.queries
    vecs, labels = make_data(n + extra, dim, args.latent, args.clusters, args.seed)
    base, spare = vecs[:n], vecs[n:]
    rng = np.random.default_rng(args.seed + 1)
    ids = [f"P{i:07d}" for i in range(n + extra)]
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"data: {n} clustered vectors, dim {dim}, effective dim {args.latent}, {args.clusters} clusters")

    # ---- index alone: batched and one-at-a-time upserts, query latency and recall
    index = HnswIndex.from_config(config)
    t = time.perf_counter()
    for start in range(0, n, 1000):
        index.upsert(ids[start : start + 1000], base[start : start + 1000])
    dt = time.perf_counter() - t
    res["index_upsert_batched_per_s"] = n / dt
    print(f"index upsert, batches of 1000: {n / dt:,.0f}/s ({dt:.1f} s for {n})")
    single = spare[: args.ops]
    t = time.perf_counter()
    for i in range(args.ops):
        index.upsert([f"S{i}"], single[i])
    dt = time.perf_counter() - t
    res["index_upsert_single_per_s"] = args.ops / dt
    print(f"index upsert, one at a time (into {n}): {args.ops / dt:,.0f}/s ({dt / args.ops * 1000:.2f} ms each)")
    for i in range(args.ops):
        index.delete(f"S{i}")
    queries = normalize_rows(
        spare[-args.queries :] + 0.02 * rng.normal(size=(args.queries, dim)).astype(np.float32), dim
    )
    truth = brute_topk(base, queries, 10)
    qres = {}
    samples: dict[str, dict[str, list[float]]] = {"query": {}, "apply": {}}
    for ef in (50, 100, 200):
        index.set_ef(ef)
        lat: list[float] = []
        hits = 0
        for qi, q in enumerate(queries):
            t = time.perf_counter()
            found = index.query(q, 10)
            lat.append(time.perf_counter() - t)
            hits += len({int(pid[1:]) for pid, _ in found} & set(truth[qi].tolist()))
        recall = hits / (10 * len(queries))
        samples["query"][f"ef {ef}"] = [round(x * 1000, 4) for x in lat]
        qres[ef] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "recall@10": recall}
        print(f"query ef={ef:>3}: p50 {pct(lat, 50):.3f} ms  p99 {pct(lat, 99):.3f} ms  recall@10 {recall:.4f}")
    res["query"] = qres
    del index
    gc.collect()

    # ---- recommender: bulk load, memory
    products = [make_product(i, int(labels[i]), rng, 1.0) for i in range(n)]
    gc.collect()
    rss0 = rss_mb()
    rec = Recommender(config)
    t = time.perf_counter()
    rec.bulk_load(products, base)
    dt = time.perf_counter() - t
    gc.collect()
    # The buffers are millions of long-lived tuples: freeze them out of the cyclic GC, as a
    # worker should after loading, or a full collection stalls apply() for ~100 ms.
    gc.freeze()
    rss1 = rss_mb()
    res["bulk_load_s"] = dt
    res["memory_per_item_kb"] = (rss1 - rss0) * 1024 / n
    print(f"Recommender.bulk_load: {dt:.1f} s ({n / dt:,.0f} products/s)")
    print(f"memory: {rss1 - rss0:,.0f} MB RSS for {n} products = {(rss1 - rss0) * 1024 / n:.1f} KB/item "
          f"(vector {dim * 4 / 1024:.1f} KB + HNSW links + lexical vector + candidate buffer + lists)")

    # ---- apply() latencies with propagation
    def timed(label: str, changes: Sequence[tuple[ProductChange, np.ndarray | None]]) -> None:
        lat: list[float] = []
        cpu: list[float] = []
        pubs = 0
        for change, vec in changes:
            c = time.process_time()
            t = time.perf_counter()
            out = rec.apply(change, vec)
            lat.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            pubs += len(out)
        samples["apply"][label] = [round(x * 1000, 4) for x in lat]
        res[f"apply_{label}"] = {
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": pct(lat, 100),
            "cpu_p50_ms": pct(cpu, 50), "cpu_p99_ms": pct(cpu, 99),
            "publications_per_op": pubs / len(changes),
        }
        print(f"apply {label:<12}: p50 {pct(lat, 50):6.2f} ms  p99 {pct(lat, 99):6.2f} ms  "
              f"max {pct(lat, 100):6.2f} ms  (cpu p50 {pct(cpu, 50):.2f} p99 {pct(cpu, 99):.2f})  "
              f"publications/op {pubs / len(changes):.1f}")

    ts = 2.0
    new_ids = list(range(n, n + args.ops))
    timed("upsert_new", [
        (make_product(i, int(labels[i]), rng, ts), vecs[i]) for i in new_ids
    ])
    live = [f"P{i:07d}" for i in rng.choice(n, size=3 * args.ops, replace=False)]
    moves = []
    for j, pid in enumerate(live[: args.ops]):
        target = n + args.ops + j
        moves.append((ProductUpsert(pid, 3.0, title=f"moved item {j} {labels[target]}"), vecs[target]))
    timed("upsert_move", moves)
    flips = []
    for pid in live[args.ops : 2 * args.ops]:
        current = rec.catalog.get(pid)
        assert current is not None
        flips.append((ProductUpsert(pid, 4.0, in_stock=not current.in_stock), None))
    timed("stock_flip", flips)
    timed("delete", [(ProductDelete(pid, 5.0), None) for pid in live[2 * args.ops :]])

    # ---- invariant sample: similar lists vs an exact recomputation for 200 products
    all_ids = sorted(rec.index.ids())
    mat = rec.index.get_vectors(all_ids).astype(np.float64)
    sample = rng.choice(len(all_ids), size=min(200, len(all_ids)), replace=False)
    overlaps = []
    c = config.candidate_depth
    lex_of = rec.export_state().lexical_vectors
    profiles = {p.product_id: profile(p) for p in rec.catalog}
    for row in sample:
        pid = all_ids[row]
        scores = mat @ mat[row]
        scores[row] = -np.inf
        top = np.argpartition(-scores, c)[:c]
        cand_ids = [all_ids[j] for j in top]
        lex = cosine_many(lex_of[pid], [lex_of[x] for x in cand_ids])
        want, _subs = build_lists(
            profiles[pid], [(x, float(scores[j]), lx) for x, j, lx in zip(cand_ids, top, lex, strict=True)],
            profiles.get, config,
        )
        got = rec.similar(pid) or ()
        w = {i.product_id for i in want}
        overlaps.append(len(w & {i.product_id for i in got}) / max(1, len(w)))
    res["similar_overlap_vs_exact_sample"] = float(np.mean(overlaps))
    print(f"similar-items overlap with exact recomputation (200 sampled products): {np.mean(overlaps):.4f}")

    # ---- snapshots
    tmp = Path(tempfile.mkdtemp(prefix="simstream-bench-"))
    try:
        t = time.perf_counter()
        snap = rec.save(tmp)
        save_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in snap.iterdir()) / 1e6
        t = time.perf_counter()
        back = Recommender.load(tmp, config)
        load_s = time.perf_counter() - t
        assert back.lists(Kind.SIMILAR) == rec.lists(Kind.SIMILAR)
        res["snapshot"] = {"save_s": save_s, "load_s": load_s, "size_mb": size}
        print(f"snapshot: save {save_s:.1f} s, load {load_s:.1f} s (lists recomputed and verified), {size:,.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text_example = product_text(rec.catalog.get(all_ids[0]))  # type: ignore[arg-type]
    print(f"example product text: {text_example!r}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "core.samples.json").write_text(json.dumps({"bench": "core", "plots": [
            {"id": "core-apply", "kind": "latency", "unit": "ms", "series": samples["apply"],
             "title": f"Recommender.apply, propagation included ({n:,} products)"},
            {"id": "core-query", "kind": "latency", "unit": "ms", "series": samples["query"],
             "title": f"HNSW query latency, k=10 ({n:,} vectors)"}]}))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
