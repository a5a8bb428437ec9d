"""HNSW recall on *real* embeddings (not collected by pytest).

    .venv/bin/python tests/bench/bench_recall_real.py

The 100k core benchmark uses synthetic clustered vectors, because no public catalog here has
100k products; on those every ``ef`` reaches recall 1.0, which says nothing about the choice
of ``ef``. This run embeds every product of the Amazon-Google benchmark
(``../shared/data/amazon-google``, Leipzig; see its SOURCE.txt) with the MiniLM encoder
(``SIMSTREAM_MODEL_BASE`` or ``~/.cache/simstream/models/minilm``), indexes them with
``HnswIndex`` at the worker's defaults, and measures, for each product as the query, the
recall@10 of its 10 nearest other products against brute force at ef 50, 100 and 200, with
query latency. Real product embeddings crowd together (many near-duplicates), which is what
makes HNSW miss. The last line is JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np

from serving.config import RecommenderConfig
from serving.index import HnswIndex, normalize_rows

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "amazon-google"


def load_texts(data: Path) -> tuple[list[str], list[str]]:
    """(ids, texts) of every Amazon and Google product: title, manufacturer, description head."""
    ids: list[str] = []
    texts: list[str] = []
    for name, title_col in (("Amazon.csv", "title"), ("GoogleProducts.csv", "name")):
        with (data / name).open(encoding="latin-1", newline="") as fh:
            for row in csv.DictReader(fh):
                parts = [row[title_col], row.get("manufacturer") or "", (row.get("description") or "")[:200]]
                ids.append(f"{name[0]}:{row['id']}")
                texts.append(" | ".join(p.strip() for p in parts if p and p.strip()))
    return ids, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    from encoders.local import LocalEncoder

    base = Path(os.environ.get("SIMSTREAM_MODEL_BASE", "~/.cache/simstream/models/minilm")).expanduser()
    ids, texts = load_texts(args.data)
    encoder = LocalEncoder(base)
    t = time.perf_counter()
    vectors = normalize_rows(encoder.encode_blocking(texts).vectors, 384)
    embed_s = time.perf_counter() - t
    print(f"embedded {len(texts)} real product texts with {encoder.model_version} in {embed_s:.0f} s")

    config = RecommenderConfig()
    index = HnswIndex.from_config(RecommenderConfig(hnsw_initial_capacity=len(ids) + 16))
    index.upsert(ids, vectors)
    sims = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    truth = np.argpartition(-sims, args.k, axis=1)[:, : args.k]
    pos = {pid: i for i, pid in enumerate(ids)}
    res: dict[str, object] = {"n": len(ids), "k": args.k, "hnsw_m": config.hnsw_m,
                              "default_ef": config.hnsw_ef, "embed_s": embed_s, "ef": {}}
    for ef in (50, 100, 200):
        index.set_ef(ef)
        hits = 0
        lat: list[float] = []
        for i, pid in enumerate(ids):
            t = time.perf_counter()
            found = index.query(vectors[i], args.k, exclude=(pid,))
            lat.append(time.perf_counter() - t)
            hits += len({pos[f] for f, _ in found} & set(truth[i].tolist()))
        recall = hits / (args.k * len(ids))
        p50, p99 = (float(np.percentile(np.asarray(lat) * 1000, q)) for q in (50, 99))
        res["ef"][str(ef)] = {"recall@10": recall, "p50_ms": p50, "p99_ms": p99}  # type: ignore[index]
        print(f"ef={ef:>3}: recall@{args.k} {recall:.4f}  query p50 {p50:.3f} ms  p99 {p99:.3f} ms")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
