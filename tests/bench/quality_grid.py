"""The grid behind the default lexical weight and floor (docs/quality.md), and the rule that picks them.

Embeds each shared set once with the configured encoder, ranks it with the baselines of
``simstream eval`` (encoder alone, ``tfidf-char``, ``tfidf-word``) and with the worker's hybrid
(``serving.evaluation.matching.hybrid_rank``) for every (floor, weight) of the grid, and
prints one JSON line per cell, then the chosen cell:

    .venv/bin/python tests/bench/quality_grid.py --ag var/ag --gc-catalog var/gc.jsonl \\
        --gc-truth var/gc_pairs.csv > var/quality_grid.jsonl

(``var/ag`` from ``simstream convert leipzig``, the gift cards from ``simstream convert
giftcards``; the commands are in docs/quality.md.) Not a ``bench_*.py``: ``make bench`` does
not run it.

The rule, over the criteria Amazon-Google hit@1, gift cards also_view hit@10 and gift cards
also_buy hit@10: a cell's margin on a criterion is its hit rate minus the best baseline's;
a margin of at most one query either way counts as 0 (below what these sets resolve: one
query is 0.09, 0.15 and 0.32 points, and HNSW's approximate candidates alone move results
by that much); the cell with the largest worst-case margin wins, ties broken by the largest
mean margin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FLOORS = (0.0, 0.2, 0.3, 0.4, 0.5)
WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def clamp(margin: float, n: int) -> float:
    """``margin`` (a difference of hit rates over ``n`` queries), 0 when within one query."""
    return 0.0 if abs(margin) * n <= 1.0 + 1e-9 else margin


def choose(cells: list[dict[str, Any]], best: dict[str, float], sizes: dict[str, int]) -> dict[str, Any]:
    """The cell the rule picks (see the module doc)."""

    def key(cell: dict[str, Any]) -> tuple[float, float]:
        margins = {c: cell[c] - best[c] for c in best}
        worst = min(clamp(m, sizes[c]) for c, m in margins.items())
        return round(worst, 6), sum(margins.values()) / len(margins)

    return max(cells, key=key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ag", type=Path, required=True, help="left.jsonl, right.jsonl, truth.csv of convert leipzig")
    parser.add_argument("--gc-catalog", type=Path, required=True)
    parser.add_argument("--gc-truth", type=Path, required=True)
    args = parser.parse_args()


    from encoders.factory import create_encoder
    from encoders.training.baselines import tfidf_top_k
    from serving.config import RecommenderConfig
    from serving.evaluation.matching import hybrid_rank
    from serving.evaluation.matching_eval import evaluate_rankings, load_truth, top_k_by_cosine
    from serving.evaluation.related_eval import load_truth as load_related_truth
    from serving.evaluation.related_eval import score_lists
    from serving.lexical import LexicalModel
    from serving.text import product_text
    from streams.cli.eval_commands import encode_texts, load_products
    from streams.settings import get_settings

    settings = get_settings()
    encoder = create_encoder(settings.encoder, **settings.encoder_options(None))

    # Amazon-Google, as `simstream eval matching`.
    truth = load_truth(args.ag / "truth.csv")
    corpus = load_products(args.ag / "right.jsonl")
    known = {p.product_id for p in corpus}
    queries = [p for p in load_products(args.ag / "left.jsonl") if truth.get(p.product_id, set()) & known]
    q_ids, c_ids = [p.product_id for p in queries], [p.product_id for p in corpus]
    q_texts, c_texts = [product_text(p) for p in queries], [product_text(p) for p in corpus]
    qv, cv = encode_texts(q_texts, encoder, "queries"), encode_texts(c_texts, encoder, "corpus")
    ag_lexical = LexicalModel.fit(c_texts)

    def ag_hit1(rankings: list[list[str]]) -> float:
        return evaluate_rankings("x", q_ids, rankings, truth, 10).hit_at_1

    # Gift cards, as `simstream eval related`.
    pairs = load_related_truth(args.gc_truth)
    products = load_products(args.gc_catalog)
    ids = [p.product_id for p in products]
    texts = [product_text(p) for p in products]
    vectors = encode_texts(texts, encoder, "catalog")
    gc_lexical = LexicalModel.fit(texts)
    wanted = {pid for by in pairs.values() for pid in by}
    qi = [i for i, p in enumerate(products) if p.product_id in wanted]

    def gc_hits(ranked: list[list[str]]) -> dict[str, float]:
        lists = {ids[i]: [r for r in row if r != ids[i]][:10] for i, row in zip(qi, ranked, strict=True)}
        return {f"gc_{r.kind}": r.hit for r in score_lists(lists, pairs, 10)}

    baselines: dict[str, dict[str, float]] = {}
    baselines["encoder"] = {"ag_hit1": ag_hit1([[c_ids[j] for j in row] for row in top_k_by_cosine(qv, cv, 10)]),
                            **gc_hits([[ids[j] for j in row] for row in top_k_by_cosine(vectors[qi], vectors, 11)])}
    for method in ("tfidf-char", "tfidf-word"):
        top = tfidf_top_k(method, q_texts, c_texts, 10)
        gtop = tfidf_top_k(method, [texts[i] for i in qi], texts, 11, fit_texts=texts)
        baselines[method] = {"ag_hit1": ag_hit1([[c_ids[j] for j in row] for row in top]),
                             **gc_hits([[ids[j] for j in row] for row in gtop])}
    criteria = ("ag_hit1", "gc_view", "gc_buy")
    best = {c: max(b[c] for b in baselines.values()) for c in criteria}
    known_ids = set(ids)
    sizes = {"ag_hit1": len(queries), **{f"gc_{kind}": sum(1 for pid in by if pid in known_ids)
                                         for kind, by in pairs.items()}}
    print(json.dumps({"baselines": baselines, "best": best, "queries": sizes}), flush=True)

    cells = []
    for floor in FLOORS:
        for weight in WEIGHTS:
            config = RecommenderConfig(k=11, candidate_depth=50, lexical_weight=weight, lexical_floor=floor)
            cell: dict[str, Any] = {"floor": floor, "weight": weight}
            cell["ag_hit1"] = ag_hit1(hybrid_rank(queries, qv, corpus, cv, 10, config, lexical=ag_lexical))
            cell.update(gc_hits(hybrid_rank([products[i] for i in qi], vectors[qi], products, vectors, 11, config,
                                            lexical=gc_lexical)))
            cells.append(cell)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in cell.items()}), flush=True)
    chosen = choose(cells, best, sizes)
    print(json.dumps({"chosen": {"floor": chosen["floor"], "weight": chosen["weight"]}}))


if __name__ == "__main__":
    main()
