"""Where a loaded core's memory is, part by part (not collected by pytest, not run by ``make bench``).

    .venv/bin/python tests/bench/memory_breakdown.py var/bench-cache/core-mix-100000-<hash> --capacity 110000

Loads a snapshot (``bench_core_mix.py`` leaves one under ``var/bench-cache``), then prints the
process's RSS growth per product and a deep size of each of the core's containers, bytes per
product. Each object is counted once, in the first part that reaches it (in the order
printed), so an item shared by two lists counts once. numpy arrays count their buffers; the
vectors hnswlib holds natively are in the RSS only.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serving.config import RecommenderConfig
from serving.recommender import Recommender


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 1e6


def deep_size(obj: Any, seen: set[int]) -> int:
    """Bytes of ``obj`` and everything it reaches that ``seen`` does not hold yet."""
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)  # an ndarray that owns its data counts it here
        if isinstance(o, np.ndarray):
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        elif isinstance(o, str | bytes | int | float | bool | type(None)):
            pass
        elif hasattr(o, "__dict__"):
            stack.append(o.__dict__)
        elif hasattr(o, "__slots__"):
            stack.extend(getattr(o, name) for name in o.__slots__ if hasattr(o, name))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("--capacity", type=int, default=110_000, help="HNSW capacity to load with")
    args = ap.parse_args()
    before = rss_mb()
    rec = Recommender.load(args.snapshot, RecommenderConfig(hnsw_initial_capacity=args.capacity))
    gc.collect()
    n = len(rec.catalog)
    print(f"{n} products: RSS +{rss_mb() - before:.0f} MB = {(rss_mb() - before) * 1e3 / n:.2f} KB per product")
    prop = rec._propagation
    buffers = prop.buffers
    parts: dict[str, Any] = {
        "catalog": rec.catalog, "rule profiles": prop.profiles, "lexical vectors": prop.lex,
        "lists": prop.lists, "versions": prop.versions, "candidate buffers": buffers.by_owner,
        "reverse map (holders)": buffers.holders,
        "owners' vectors and floors": {k: v for k, v in vars(buffers).items()
                                       if k not in ("by_owner", "holders", "index", "config")},
        "reasons cache": prop._reasons,
        "duplicate keys": prop.dup_keys, "kept duplicates": prop.dup_known, "their holders": prop.dup_holders,
        "lexical postings": prop.postings, "HNSW wrapper (vector copy, id maps)": vars(rec.index),
    }
    seen: set[int] = set()
    for name, obj in parts.items():
        size = deep_size(obj, seen)
        print(f"{name:40s} {size / 1e6:8.1f} MB {size / n:8.0f} B/product")


if __name__ == "__main__":
    main()
