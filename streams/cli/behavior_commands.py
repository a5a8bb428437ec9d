"""Behaviour evaluation commands: ``eval sessions``.

``simstream eval sessions`` replays a training click log through the same ``BehaviorModel``
the stream uses and scores next-item prediction against popularity and plain item-kNN; the
last stdout line is one JSON list of ``{"method", "hr@K", "mrr@K", "n"}`` objects.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from streams.cli.eval_commands import eval_group


@eval_group.command("sessions")
@click.option(
    "--train", "train_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
)
@click.option(
    "--test", "test_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
)
@click.option("--k", type=click.IntRange(1, 1000), default=20, show_default=True)
def eval_sessions(train_path: Path, test_path: Path, k: int) -> None:
    """Next-item HR@k / MRR@k of simstream's behaviour model, popularity and item-kNN."""
    from serving.errors import SimstreamError
    from serving.evaluation.sessions_eval import (
        behavior_predictor,
        evaluate,
        item_knn_predictor,
        load_sessions,
        popularity_predictor,
        train_behavior,
    )

    t0 = time.perf_counter()
    try:
        train, test = load_sessions(train_path), load_sessions(test_path)
    except SimstreamError as e:
        raise click.ClickException(str(e)) from e
    model = train_behavior(train)
    click.echo(
        f"trained on {sum(len(c) for _, c in train)} clicks in {time.perf_counter() - t0:.1f}s; state {model.size()}"
    )
    results = evaluate(
        test,
        {
            "simstream": behavior_predictor(model),
            "popularity": popularity_predictor(train),
            "item-knn": item_knn_predictor(train),
        },
        k=k,
    )
    for r in results:
        click.echo(f"{r.method:<12} hr@{k}={r.hr:.4f} mrr@{k}={r.mrr:.4f} n={r.n}")
    click.echo(f"elapsed {time.perf_counter() - t0:.1f}s")
    click.echo(
        json.dumps(
            [
                {"method": r.method, f"hr@{k}": round(r.hr, 4), f"mrr@{k}": round(r.mrr, 4), "n": r.n}
                for r in results
            ]
        )
    )


def _convert_group() -> click.Group:
    from streams.cli.eval_commands import convert

    return convert


@_convert_group().command("giftcards")
@click.argument("meta", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out-catalog", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--out-truth", type=click.Path(dir_okay=False, path_type=Path), required=True)
def convert_giftcards(meta: Path, out_catalog: Path, out_truth: Path) -> None:
    """Amazon metadata (``meta_*.json.gz``) -> product upserts JSONL + ``product_id,related_id,kind`` CSV."""
    import csv

    from serving.errors import SimstreamError
    from serving.evaluation.related_eval import convert_amazon_meta

    try:
        upserts, truth = convert_amazon_meta(meta)
    except SimstreamError as e:
        raise click.ClickException(str(e)) from e
    with out_catalog.open("w", encoding="utf-8") as f:
        for u in upserts:
            f.write(json.dumps(u, ensure_ascii=False) + "\n")
    with out_truth.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "related_id", "kind"])
        w.writerows(truth)
    kinds = {k: sum(1 for t in truth if t[2] == k) for k in ("view", "buy")}
    click.echo(json.dumps({"products": len(upserts), "pairs": kinds}))


RELATED_METHODS = ("encoder", "tfidf-word", "tfidf-char", "hybrid")


@eval_group.command("related")
@click.option("--catalog", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--truth", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--method", "methods", type=click.Choice([*RELATED_METHODS, "all"]), multiple=True,
              default=["hybrid"], show_default=True,
              help="Repeat it (or say all) to compare methods side by side on one set of vectors: hybrid is "
                   "the worker's scoring, encoder the dense cosine alone, tfidf-* the scikit-learn baselines.")
@click.option("--encoder", "encoder_target", default=None, help="local, grpc://host:port or hashing.")
@click.option("--model-base", type=click.Path(path_type=Path), default=None)
def eval_related(
    catalog: Path, truth: Path, k: int, methods: tuple[str, ...], encoder_target: str | None,
    model_base: Path | None
) -> None:
    """hit@k / nDCG@k per kind of content-only lists (``serving.evaluation.matching.hybrid_rank``, as the worker).

    Each product with a truth pair queries the whole catalog; the product itself is left out
    of its list. The last stdout line is one JSON list of ``{"method", "kind", "hit@K",
    "ndcg@K", "n"}`` objects.
    """
    from serving.errors import SimstreamError
    from serving.evaluation.related_eval import load_truth, score_lists
    from serving.text import product_text
    from streams.cli.eval_commands import load_products

    t0 = time.perf_counter()
    try:
        pairs = load_truth(truth)
    except SimstreamError as e:
        raise click.ClickException(str(e)) from e
    products = load_products(catalog)
    texts = [product_text(p) for p in products]
    wanted = {pid for by in pairs.values() for pid in by}
    queries = [i for i, p in enumerate(products) if p.product_id in wanted]
    chosen = list(RELATED_METHODS) if "all" in methods else list(dict.fromkeys(methods))
    vectors = None
    rows = []
    for method in chosen:
        if method in ("encoder", "hybrid") and vectors is None:
            from encoders.factory import create_encoder
            from streams.cli.eval_commands import encode_texts
            from streams.settings import get_settings

            settings = get_settings()
            encoder = create_encoder(encoder_target or settings.encoder, **settings.encoder_options(model_base))
            vectors = encode_texts(texts, encoder, "catalog")
        ranked = _related_rankings(method, products, texts, queries, vectors, k + 1)
        lists = {
            products[i].product_id: [r for r in row if r != products[i].product_id][:k]
            for i, row in zip(queries, ranked, strict=True)
        }
        for r in score_lists(lists, pairs, k):
            click.echo(f"{method:<10} {r.kind:<5} hit@{k}={r.hit:.4f} ndcg@{k}={r.ndcg:.4f} n={r.n}")
            rows.append({"method": method, "kind": r.kind, f"hit@{k}": round(r.hit, 4),
                         f"ndcg@{k}": round(r.ndcg, 4), "n": r.n})
    click.echo(f"elapsed {time.perf_counter() - t0:.1f}s")
    click.echo(json.dumps(rows))


def _related_rankings(method: str, products: list[Any], texts: list[str], queries: list[int], vectors: Any,
                      depth: int) -> list[list[str]]:
    """The ``depth`` best catalog ids (the query itself included) for each query product."""
    ids = [p.product_id for p in products]
    if method == "hybrid":
        from dataclasses import replace

        from serving.evaluation.matching import hybrid_rank
        from streams.settings import get_settings
        from streams.worker import recommender_config

        # The worker's own core settings (blend, HNSW ef and M, index adapter), read like the worker.
        base = recommender_config(get_settings())
        config = replace(base, k=depth, candidate_depth=max(base.candidate_depth, depth))
        return hybrid_rank([products[i] for i in queries], vectors[queries], products, vectors, depth, config)
    if method == "encoder":
        from serving.evaluation.matching_eval import top_k_by_cosine

        top = top_k_by_cosine(vectors[queries], vectors, depth)
    else:
        from encoders.training.baselines import tfidf_top_k

        top = tfidf_top_k(method, [texts[i] for i in queries], texts, depth, fit_texts=texts)
    return [[ids[j] for j in row] for row in top]
