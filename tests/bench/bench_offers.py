"""Competitor offer matching: what a new offer and an own product's change cost (not collected by pytest).

    .venv/bin/python tests/bench/bench_offers.py --n 20000 --offers 5000

The shop's catalog is ``harness.build_catalog`` (real titles, variants, duplicate listings,
recombinations) embedded with the in-process MiniLM (vectors cached under
``var/bench-cache``), loaded with ``Recommender.bulk_load`` at the worker's defaults. The
competitor offers are listings of catalog products as another shop writes them (the title's
words reordered, lower-cased, one dropped, the price moved up to 15%), plus a fifth with no
counterpart (titles of other products with a variant suffix). Timed on the matcher the worker
runs (``serving.offers.OfferMatcher``, the calibration of the settings' defaults):

* a new offer matched (``OfferMatcher.apply``), one at a time;
* an own product's title edit, then the exact re-match of every offer it may move
  (``OfferMatcher.on_products_changed``), the re-match alone timed;
* an own product's price change and its re-match.

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serving.catalog import ProductUpsert
from serving.config import RecommenderConfig
from serving.offers import Offer, OfferMatcher
from serving.recommender import Recommender
from serving.text import product_text
from streams.offers import calibration_of
from streams.settings import Settings
from tests.bench.bench_exact_scale import embed, embedded_catalog
from tests.bench.harness import VARIANTS, build_catalog

QUICK_ARGS = ["--n", "2000", "--offers", "300", "--ops", "50"]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def retyped(title: str, rng: random.Random) -> str:
    words = title.split()
    if len(words) > 3:
        words.pop(rng.randrange(len(words)))
    rng.shuffle(words)
    return " ".join(words).lower()


def line(name: str, values: list[float]) -> dict[str, Any]:
    print(f"| {name} | {len(values):,} | {pct(values, 50):.2f} | {pct(values, 99):.2f} | {np.mean(values):.2f} |")
    return {"n": len(values), "p50_ms": round(pct(values, 50), 2), "p99_ms": round(pct(values, 99), 2),
            "mean_ms": round(float(np.mean(values)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="own products")
    ap.add_argument("--offers", type=int, default=5000)
    ap.add_argument("--ops", type=int, default=300, help="own-product changes of each kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    rows = build_catalog(args.n, random.Random(args.seed))
    products, _catalog, vectors = embedded_catalog(rows)
    core = Recommender(RecommenderConfig(hnsw_initial_capacity=args.n + 1024))
    started = time.perf_counter()
    core.bulk_load(products, vectors)
    print(f"bulk_load of {args.n:,} products: {time.perf_counter() - started:.0f} s", flush=True)

    offers: list[Offer] = []
    for i in range(args.offers):
        row = rows[rng.randrange(len(rows))]
        price = row.get("price")
        if i % 5 == 4:
            title = f"{rows[rng.randrange(len(rows))]['title']} {rng.choice(VARIANTS)} bundle"
        else:
            title = retyped(row["title"], rng)
        offers.append(Offer("rival", f"o{i}", title, 1.7e9, brand=row.get("brand"),
                            price=round(price * rng.uniform(0.85, 1.15), 2) if price else None, currency="USD"))
    vectors = embed([o.text for o in offers], "offers")
    matcher = OfferMatcher(calibration_of(Settings()), core.config)
    matched: list[float] = []
    for offer, vector in zip(offers, vectors, strict=True):
        t = time.perf_counter()
        matcher.apply(core, [(offer, vector)])
        matched.append((time.perf_counter() - t) * 1000)
    share = sum(1 for m in matcher.matches.values() if not m.no_match) / max(1, len(matcher.matches))

    ids = sorted(p.product_id for p in core.catalog)
    edits = [(pid, f"{rows[rng.randrange(len(rows))]['title']} - {rng.choice(VARIANTS)}")
             for pid in rng.sample(ids, args.ops)]
    edit_vectors = embed([product_text(core.needs_embedding(ProductUpsert(pid, 2e9, title=t)))  # type: ignore[arg-type]
                          for pid, t in edits], "offer-edits")
    rematch_text: list[float] = []
    for (pid, title), vector in zip(edits, edit_vectors, strict=True):
        core.apply(ProductUpsert(pid, 2e9, title=title), vector)
        t = time.perf_counter()
        matcher.on_products_changed(core, [pid])
        rematch_text.append((time.perf_counter() - t) * 1000)
    rematch_price: list[float] = []
    for j, pid in enumerate(rng.sample(ids, args.ops)):
        current = core.catalog.get(pid)
        price = round((current.price if current and current.price else 20.0) * rng.uniform(0.8, 1.2), 2)
        core.apply(ProductUpsert(pid, 3e9 + j, price=price))
        t = time.perf_counter()
        matcher.on_products_changed(core, [pid])
        rematch_price.append((time.perf_counter() - t) * 1000)

    print(f"\n{args.offers:,} offers against {args.n:,} own products; {share:.0%} matched above the threshold\n")
    print("| timed | count | p50 ms | p99 ms | mean ms |")
    print("| --- | --- | --- | --- | --- |")
    res: dict[str, Any] = {"n": args.n, "offers": args.offers, "matched_share": round(share, 3)}
    res["new_offer"] = line("a new offer matched", matched)
    res["rematch_after_title_edit"] = line("re-match after an own product's title edit", rematch_text)
    res["rematch_after_price_change"] = line("re-match after an own product's price change", rematch_price)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
