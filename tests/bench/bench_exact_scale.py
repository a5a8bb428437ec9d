"""Exact propagation at scale, on realistic texts (not collected by pytest).

    .venv/bin/python tests/bench/bench_exact_scale.py --n 100000 --churn 5000 --sample 2000

The catalog is ``harness.build_catalog`` (every real title of ``../shared/data``, then
variants, duplicate listings and recombinations of real titles), embedded with the
in-process MiniLM (vectors cached under ``var/bench-cache``, so a rerun skips the embedding).
``Recommender.bulk_load`` indexes it (HNSW, the worker's defaults, the IDF fitted on the
catalog as a worker's bootstrap fits it; runs before ``exact_build_limit`` used an unfitted
IDF, which changes the lexical half of every score and makes the duplicates search far
slower, not the comparison, which reads the recommender's own vectors); then a churn is applied
**one change at a time through ``apply``**, the incremental path the stream takes: 40% title
edits (a new vector), 20% new products, 20% deletes, 20% stock flips. Finally a random
sample of products gets its similar items and substitutes recomputed from scratch by brute
force (exact dense top-C over every live vector, the same re-rank), and each list is
compared with the one the incremental path holds.

Reported: the mean and minimum overlap (shared items / k) and the share of identical
lists, for both kinds; issue #14 asks for mean >= 0.99 and min >= 0.9 at 100k. The last
line is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dataclasses import replace

from serving.catalog import Catalog, ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.lexical import LexicalModel, cosine_many
from serving.recommender import Recommender, build_lists
from serving.scoring import profile
from serving.text import product_text
from streams.records import decode_product_change
from tests.bench.harness import ROOT, VARIANTS, build_catalog

QUICK_ARGS = ["--n", "8000", "--churn", "400", "--sample", "300"]
CACHE = ROOT / "var" / "bench-cache"


def embed(texts: list[str], tag: str) -> np.ndarray:
    """MiniLM vectors of ``texts`` (cached by their hash)."""
    import os

    from encoders.local import LocalEncoder

    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = CACHE / f"{tag}-{len(texts)}-{key}.npy"
    if path.is_file():
        return np.load(path)
    base = Path(os.environ.get("SIMSTREAM_MODEL_BASE", "~/.cache/simstream/models/minilm")).expanduser()
    started = time.perf_counter()
    vectors = np.asarray(LocalEncoder(base).encode_blocking(texts).vectors, dtype=np.float32)
    print(f"embedded {len(texts):,} texts in {time.perf_counter() - started:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def upsert(row: dict[str, Any], ts: float) -> ProductUpsert:
    change = decode_product_change(json.dumps({**row, "ts": ts}), now=float("inf")).to_core()
    assert isinstance(change, ProductUpsert)
    return change


def embedded_catalog(rows: list[dict[str, Any]]) -> tuple[list[ProductUpsert], Catalog, np.ndarray]:
    """``rows`` as upserts, the catalog they make, and its products' MiniLM vectors (cached)."""
    products = [upsert(r, 1.7e9) for r in rows]
    merged = Catalog()
    for change in products:
        merged.apply(change)
    texts = [product_text(product) for product in (merged.get(c.product_id) for c in products) if product]
    return products, merged, embed(texts, "catalog")


def overlap_stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    return {"mean": round(float(arr.mean()), 5), "min": round(float(arr.min()), 4),
            "p01": round(float(np.percentile(arr, 1)), 4), "identical_share": round(float(np.mean(arr == 1.0)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--churn", type=int, default=5000)
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ef", type=int, default=None, help="HNSW ef (default: the worker's)")
    ap.add_argument("--m", type=int, default=None, help="HNSW M (default: the worker's)")
    ap.add_argument("--index", default="hnsw", choices=("hnsw", "exact"))
    ap.add_argument("--exact-build-limit", type=int, default=None,
                    help="owners up to which the bulk load completes its searches exactly (default: the worker's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    n_new = args.churn // 5
    rows = build_catalog(args.n + n_new, rng)
    base, fresh = rows[: args.n], rows[args.n :]
    products, merged, vectors = embedded_catalog(base)

    tuned = {
        k: v
        for k, v in (("hnsw_ef", args.ef), ("hnsw_m", args.m), ("exact_build_limit", args.exact_build_limit))
        if v is not None
    }
    config = RecommenderConfig(hnsw_initial_capacity=args.n + n_new + 1024, index=args.index, **tuned)
    rec = Recommender(config, lexical=LexicalModel.fit(product_text(p) for p in merged))
    started = time.perf_counter()
    rec.bulk_load(products, vectors)
    load_s = time.perf_counter() - started
    print(f"bulk_load of {args.n:,} products: {load_s:.0f} s", flush=True)

    # The churn, applied one change at a time.
    ids = [r["product_id"] for r in base]
    n_edit, n_delete, n_flip = 2 * args.churn // 5, args.churn // 5, args.churn - 2 * args.churn // 5 - 2 * n_new
    touched = rng.sample(ids, n_edit + n_delete + n_flip)
    edits, deletes, flips = touched[:n_edit], touched[n_edit : n_edit + n_delete], touched[n_edit + n_delete :]
    edit_titles = {pid: f"{rows[rng.randrange(args.n)]['title']} - {rng.choice(VARIANTS)}" for pid in edits}
    edit_texts = {}

    for pid, title in edit_titles.items():
        edit_texts[pid] = product_text(replace(merged.get(pid), title=title))  # type: ignore[arg-type]
    new_products = [upsert(r, 1.8e9) for r in fresh]
    for change in new_products:
        merged.apply(change)
    new_texts = [product_text(merged.get(p.product_id)) for p in new_products]  # type: ignore[arg-type]
    churn_vectors = embed([edit_texts[p] for p in edits] + new_texts, "churn")
    edit_vec = dict(zip(edits, churn_vectors[: len(edits)], strict=True))
    new_vec = churn_vectors[len(edits) :]
    ops: list[tuple[Any, np.ndarray | None]] = []
    ops += [(ProductUpsert(pid, 1.8e9, title=edit_titles[pid]), edit_vec[pid]) for pid in edits]
    ops += [(p, v) for p, v in zip(new_products, new_vec, strict=True)]
    ops += [(ProductDelete(pid, 1.8e9), None) for pid in deletes]
    ops += [(ProductUpsert(pid, 1.8e9, in_stock=False), None) for pid in flips]
    rng.shuffle(ops)
    lat: list[float] = []
    started = time.perf_counter()
    for change, vec in ops:
        t = time.perf_counter()
        rec.apply(change, vec)
        lat.append(time.perf_counter() - t)
    churn_s = time.perf_counter() - started
    p50, p99 = (float(np.percentile(lat, q)) * 1000 for q in (50, 99))
    print(f"churn: {len(ops):,} changes applied one at a time in {churn_s:.0f} s (apply p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms): {n_edit} title edits, {n_new} new, {n_delete} deletes, {n_flip} stock flips",
          flush=True)

    # Exact recomputation of a sample, by brute force over every live vector.
    live = sorted(p.product_id for p in rec.catalog)
    matrix = rec.index.get_vectors(live).astype(np.float64)
    position = {pid: i for i, pid in enumerate(live)}
    lexical = rec.export_state().lexical_vectors
    profiles = {p.product_id: profile(p) for p in rec.catalog}
    sample = sorted(rng.sample(live, min(args.sample, len(live))))
    # Changed products first in the sample's interest: every edited or new product that is live.
    c = config.candidate_depth
    ids_arr = np.array(live, dtype=object)
    similar_overlap: list[float] = []
    subs_overlap: list[float] = []
    similar_tied: list[float] = []
    subs_tied: list[float] = []
    worst: list[tuple[float, str]] = []
    for start in range(0, len(sample), 256):
        chunk = sample[start : start + 256]
        sims = matrix[[position[p] for p in chunk]] @ matrix.T
        for pid, scores in zip(chunk, sims, strict=True):
            scores[position[pid]] = -np.inf
            # Exact with ties: everything at or above the C-th score, then (-score, id).
            edge = np.partition(scores, len(scores) - c)[len(scores) - c]
            top = np.flatnonzero(scores >= edge)
            order = sorted(top, key=lambda j: (-scores[j], ids_arr[j]))[:c]
            cand_ids = [live[j] for j in order]
            lex = cosine_many(lexical[pid], [lexical[x] for x in cand_ids])
            want_sim, want_subs = build_lists(
                profiles[pid], [(x, float(scores[j]), lx) for x, j, lx in zip(cand_ids, order, lex, strict=True)],
                profiles.get, config)
            for want, got, bucket, tied in ((want_sim, rec.similar(pid) or (), similar_overlap, similar_tied),
                                            (want_subs, rec.substitutes(pid) or (), subs_overlap, subs_tied)):
                w = {i.product_id for i in want}
                share = len(w & {i.product_id for i in got}) / len(w) if w else float(not got)
                bucket.append(share)
                # Items of equal score are interchangeable: the definition breaks such ties by
                # id, which an approximate index cannot see among identical vectors.
                want_scores = Counter(round(i.score, 9) for i in want)
                got_scores = Counter(round(i.score, 9) for i in got)
                tied.append(sum((want_scores & got_scores).values()) / len(want) if want else float(not got))
            worst.append((similar_overlap[-1], pid))
    sim_stats, subs_stats = overlap_stats(similar_overlap), overlap_stats(subs_overlap)
    sim_tied, subs_tied_stats = overlap_stats(similar_tied), overlap_stats(subs_tied)
    print("\n| list | overlap counted | sampled products | mean overlap | min | 1st percentile | identical lists |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, how, stats in (("similar items", "by id", sim_stats), ("similar items", "ties as equal", sim_tied),
                             ("substitutes", "by id", subs_stats), ("substitutes", "ties as equal", subs_tied_stats)):
        print(f"| {name} | {how} | {len(sample):,} | {stats['mean']:.5f} | {stats['min']:.2f} | {stats['p01']:.2f} | "
              f"{stats['identical_share']:.2%} |")
    met = sim_tied["mean"] >= 0.99 and sim_tied["min"] >= 0.9
    print(f"\ntarget (mean >= 0.99, min >= 0.9 on similar items, ties as equal): {'met' if met else 'NOT met'}; "
          f"worst: {sorted(worst)[:3]}")
    print(json.dumps({"n": args.n, "churn": len(ops), "sample": len(sample), "bulk_load_s": round(load_s),
                      "churn_s": round(churn_s), "apply_p50_ms": round(p50, 2), "apply_p99_ms": round(p99, 2),
                      "similar": sim_stats, "substitutes": subs_stats, "similar_ties_as_equal": sim_tied,
                      "substitutes_ties_as_equal": subs_tied_stats, "target_met": met,
                      "config": {"hnsw_ef": config.hnsw_ef, "hnsw_m": config.hnsw_m, "idf": "fitted",
                                 "exact_build_limit": config.exact_build_limit,
                                 "candidate_depth": c}}))


if __name__ == "__main__":
    main()
