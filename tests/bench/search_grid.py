"""The measurement behind the search's fusion rule (docs/quality.md): content score or RRF.

Embeds Amazon-Google once with the configured encoder (``var/ag`` from ``simstream convert
leipzig``), then, in both directions (Amazon titles against the Google catalog and Google
names against the Amazon catalog), ranks every query with ``serving.search.search`` under
reciprocal-rank fusion and under the content score for every (floor, weight) of the grid of
docs/quality.md, next to the encoder alone, the lexical half alone and ``tfidf-char``. Prints
one JSON line per cell and direction:

    .venv/bin/python tests/bench/search_grid.py --ag var/ag > var/search_grid.jsonl

Not a ``bench_*.py``: ``make bench`` does not run it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FLOORS = (0.0, 0.2, 0.4)
WEIGHTS = (0.2, 0.4, 0.6, 0.8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ag", type=Path, required=True, help="left.jsonl, right.jsonl, truth.csv of convert leipzig")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    from encoders.factory import create_encoder
    from encoders.training.baselines import tfidf_top_k
    from serving.config import RecommenderConfig
    from serving.evaluation.matching_eval import evaluate_rankings, load_truth, top_k_by_cosine
    from serving.evaluation.search_eval import lexical_rankings, search_core, search_rankings
    from serving.search import MAX_QUERY_CHARS, Fusion, normalize_query
    from serving.text import product_text
    from streams.cli.eval_commands import encode_texts, load_products
    from streams.settings import get_settings

    settings = get_settings()
    encoder = create_encoder(settings.encoder, **settings.encoder_options())
    left, right = load_products(args.ag / "left.jsonl"), load_products(args.ag / "right.jsonl")
    forward = load_truth(args.ag / "truth.csv")
    backward: dict[str, set[str]] = {}
    for a, bs in forward.items():
        for b in bs:
            backward.setdefault(b, set()).add(a)
    vectors = {side: encode_texts([product_text(p) for p in prods], encoder, side)
               for side, prods in (("left", left), ("right", right))}
    k = args.k
    for name, queries_side, corpus, corpus_vectors, truth in (
        ("amazon->google", left, right, vectors["right"], forward),
        ("google->amazon", right, left, vectors["left"], backward),
    ):
        known = {p.product_id for p in corpus}
        queries = [p for p in queries_side if truth.get(p.product_id, set()) & known]
        ids = [p.product_id for p in queries]
        texts = [normalize_query(p.title)[:MAX_QUERY_CHARS] for p in queries]  # what /search accepts
        qvecs = encode_texts(texts, encoder, "queries")

        def emit(method: str, rankings: list[list[str]], extra: dict[str, Any] | None = None,
                 ids: list[str] = ids, truth: dict[str, set[str]] = truth, direction: str = name) -> None:
            report = evaluate_rankings(method, ids, rankings, truth, k).as_dict()
            print(json.dumps({"direction": direction, **report, **(extra or {})}), flush=True)

        base = RecommenderConfig(candidate_depth=settings.candidate_depth, hnsw_initial_capacity=len(corpus) + 1)
        core = search_core(corpus, corpus_vectors, base)
        top = top_k_by_cosine(qvecs, corpus_vectors, k)
        emit("encoder", [[corpus[i].product_id for i in row] for row in top])
        emit("lexical", lexical_rankings(core, texts, k))
        catalog_texts = [product_text(p) for p in corpus]
        top = tfidf_top_k("tfidf-char", texts, catalog_texts, k, fit_texts=catalog_texts)
        emit("tfidf-char", [[corpus[i].product_id for i in row] for row in top])
        emit("search-rrf", search_rankings(core, texts, qvecs, k, Fusion.RRF))
        for floor in FLOORS:
            for weight in WEIGHTS:
                core.config = RecommenderConfig(candidate_depth=settings.candidate_depth, lexical_weight=weight,
                                                lexical_floor=floor)
                emit("search", search_rankings(core, texts, qvecs, k), {"floor": floor, "weight": weight})


if __name__ == "__main__":
    main()
