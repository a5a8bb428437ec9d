"""The ``duplicates`` lists at scale, on realistic texts (not collected by pytest).

    .venv/bin/python tests/bench/bench_duplicates.py --n 100000 --churn 5000 --sample 300

The catalog and the churn are those of ``bench_exact_scale.py`` (``harness.build_catalog``:
every real title of ``../shared/data``, then variants, duplicate listings and recombinations
of real titles; MiniLM vectors cached under ``var/bench-cache``, shared with that bench).
The lexical IDF is fitted on the catalog first, as a worker's bootstrap does before it
builds the lists. Measured: ``bulk_load`` (every list, duplicates included: one
``DuplicateBatch``), the time one product's
duplicates take from scratch (``serving.duplicates.candidate_ids`` over the lexical
postings, then ``score_pairs``) for a sample, the churn applied one change at a time through
``apply`` (p50/p99, duplicates publications per change), what the lists hold, and whether a
sample equals the definition computed by brute force over every live product. Last line JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serving.catalog import ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.duplicates import candidate_ids, capped, score_pairs
from serving.lexical import LexicalModel
from serving.recommender import Kind, Recommender
from serving.scoring import profile
from serving.text import product_text
from tests.bench.bench_exact_scale import embed, embedded_catalog, upsert
from tests.bench.harness import VARIANTS, build_catalog

QUICK_ARGS = ["--n", "8000", "--churn", "400", "--sample", "100"]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--churn", type=int, default=5000)
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    # The catalog and churn of bench_exact_scale, drawn in the same order (so the caches hit).
    n_new = args.churn // 5
    rows = build_catalog(args.n + n_new, rng)
    base, fresh = rows[: args.n], rows[args.n :]
    products, merged, vectors = embedded_catalog(base)
    config = RecommenderConfig(hnsw_initial_capacity=args.n + n_new + 1024)
    # Fitted on the catalog first, as a worker's bootstrap does (Worker.settle_bulk).
    rec = Recommender(config, lexical=LexicalModel.fit(product_text(p) for p in merged))
    started = time.perf_counter()
    rec.bulk_load(products, vectors)
    load_s = time.perf_counter() - started
    print(f"bulk_load of {args.n:,} products, every list and duplicates: {load_s:.0f} s", flush=True)

    # One product's duplicates from scratch: the postings' candidates, then the scoring.
    profiles = {p.product_id: profile(p) for p in rec.catalog}
    ids = sorted(profiles)
    cand_lat: list[float] = []
    score_lat: list[float] = []
    cand_sizes: list[int] = []
    for pid in rng.sample(ids, min(args.sample, len(ids))):
        t0 = time.perf_counter()
        found = candidate_ids(pid, index=rec.index, lex=rec.lexical_vectors, postings=rec.postings, config=config)
        t1 = time.perf_counter()
        score_pairs(profiles[pid], found, vector=rec.index.get_vector(pid), vectors=rec.index.get_vectors,
                    lex=rec.lexical_vectors, profiles=profiles, config=config)
        t2 = time.perf_counter()
        cand_lat.append(t1 - t0)
        score_lat.append(t2 - t1)
        cand_sizes.append(len(found))
    print(f"one product's duplicates ({len(cand_lat)} products): candidates p50 {pct(cand_lat, 50):.2f} ms "
          f"p99 {pct(cand_lat, 99):.2f} ms ({np.mean(cand_sizes):.0f} candidates on average), scoring p50 "
          f"{pct(score_lat, 50):.2f} ms p99 {pct(score_lat, 99):.2f} ms", flush=True)

    # The churn of bench_exact_scale, one change at a time.
    n_edit, n_delete, n_flip = 2 * args.churn // 5, args.churn // 5, args.churn - 2 * args.churn // 5 - 2 * n_new
    touched = rng.sample([r["product_id"] for r in base], n_edit + n_delete + n_flip)
    edits, deletes, flips = touched[:n_edit], touched[n_edit : n_edit + n_delete], touched[n_edit + n_delete :]
    edit_titles = {pid: f"{rows[rng.randrange(args.n)]['title']} - {rng.choice(VARIANTS)}" for pid in edits}
    edit_texts = {pid: product_text(replace(merged.get(pid), title=title))  # type: ignore[arg-type]
                  for pid, title in edit_titles.items()}
    new_products = [upsert(r, 1.8e9) for r in fresh]
    for change in new_products:
        merged.apply(change)
    new_texts = [product_text(merged.get(p.product_id)) for p in new_products]  # type: ignore[arg-type]
    churn_vectors = embed([edit_texts[p] for p in edits] + new_texts, "churn")
    edit_vec = dict(zip(edits, churn_vectors[: len(edits)], strict=True))
    ops: list[tuple[Any, np.ndarray | None]] = []
    ops += [(ProductUpsert(pid, 1.8e9, title=edit_titles[pid]), edit_vec[pid]) for pid in edits]
    ops += list(zip(new_products, churn_vectors[len(edits) :], strict=True))
    ops += [(ProductDelete(pid, 1.8e9), None) for pid in deletes]
    ops += [(ProductUpsert(pid, 1.8e9, in_stock=False), None) for pid in flips]
    rng.shuffle(ops)
    lat: dict[str, list[float]] = {"edit": [], "new": [], "delete": [], "stock": []}
    dup_pubs: list[int] = []
    for change, vec in ops:
        kind = ("delete" if isinstance(change, ProductDelete) else "stock" if vec is None
                else "new" if change.product_id not in rec.catalog else "edit")
        t = time.perf_counter()
        pubs = rec.apply(change, vec)
        lat[kind].append(time.perf_counter() - t)
        dup_pubs.append(sum(1 for p in pubs if p.kind is Kind.DUPLICATES))
    every = [x for v in lat.values() for x in v]
    print(f"churn: {len(ops):,} changes, apply p50 {pct(every, 50):.1f} ms p99 {pct(every, 99):.1f} ms; "
          + ", ".join(f"{k} p50 {pct(v, 50):.1f} p99 {pct(v, 99):.1f}" for k, v in lat.items())
          + f"; duplicates lists published per change: mean {np.mean(dup_pubs):.2f}, max {max(dup_pubs)}", flush=True)

    lists = rec.lists(Kind.DUPLICATES)
    sizes = [len(v) for v in lists.values()]
    reasons = Counter(r for v in lists.values() for i in v for r in i.reasons)
    with_dups = sum(1 for s in sizes if s)
    print(f"lists: {len(lists):,}, with a duplicate {with_dups:,} ({with_dups / len(lists):.1%}), mean size "
          f"{np.mean(sizes):.2f}, p99 {np.percentile(sizes, 99):.0f}, max {max(sizes)}; reasons {dict(reasons)}")

    # The definition by brute force for a sample: every live product scored against the owner.
    profiles = {p.product_id: profile(p) for p in rec.catalog}
    ids = sorted(profiles)
    sample = rng.sample(ids, min(args.sample, len(ids)))
    equal = sum(
        capped(score_pairs(profiles[pid], ids, vector=rec.index.get_vector(pid), vectors=rec.index.get_vectors,
                           lex=rec.lexical_vectors, profiles=profiles, config=config), config) == rec.duplicates(pid)
        for pid in sample)
    print(f"equal to the brute-force definition: {equal} of {len(sample)} sampled products")
    print(json.dumps({
        "n": args.n, "bulk_load_s": round(load_s), "candidates_p50_ms": round(pct(cand_lat, 50), 2),
        "candidates_p99_ms": round(pct(cand_lat, 99), 2), "mean_candidates": round(float(np.mean(cand_sizes)), 1),
        "scoring_p50_ms": round(pct(score_lat, 50), 2), "scoring_p99_ms": round(pct(score_lat, 99), 2),
        "churn": len(ops), "apply_p50_ms": round(pct(every, 50), 2), "apply_p99_ms": round(pct(every, 99), 2),
        "apply_by_kind": {k: {"p50_ms": round(pct(v, 50), 2), "p99_ms": round(pct(v, 99), 2)} for k, v in lat.items()},
        "duplicates_pubs_per_change": round(float(np.mean(dup_pubs)), 2), "lists_with_duplicates": with_dups,
        "mean_list_size": round(float(np.mean(sizes)), 2), "max_list_size": max(sizes),
        "sample_equal": equal, "sample": len(sample), "threshold": config.duplicate_threshold,
    }))


if __name__ == "__main__":
    main()
