"""Offline evaluation commands: ``eval matching`` and ``convert leipzig``.

``simstream convert leipzig`` turns the Leipzig entity-resolution CSVs (latin-1) into the
``product-changes`` JSON-lines shape plus a ``left_id,right_id`` truth CSV; ``simstream eval
matching`` ranks the right side for every left product with a true match and prints hit@1,
hit@k and MRR@k, the last stdout line being one JSON object.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from streams.cli.group import main

if TYPE_CHECKING:
    from serving.catalog import Product

#: Event time written by the converter (the data set has none).
CONVERTED_TS = 1_700_000_000.0
_LEADING_NUMBER = re.compile(r"^\s*\$?\s*([0-9][0-9,]*(?:\.[0-9]+)?)")


# --- product text templates (what the evaluation compares) ---------------------------------
def _price(p: Product) -> str:
    return f"{p.price:g}" if p.price else ""


def _template(name: str) -> Callable[[Product], str]:
    from serving.text import product_text

    templates: dict[str, Callable[[Product], str]] = {
        "product": product_text,
        "title": lambda p: p.title,
        "title+brand+price": lambda p: " ".join(x for x in (product_text(p), _price(p)) if x),
        "product+desc200": lambda p: product_text(p, description_chars=200),
        "product+desc500": lambda p: product_text(p, description_chars=500),
    }
    return templates[name]


TEMPLATES = ("product", "title", "title+brand+price", "product+desc200", "product+desc500")
METHODS = ("encoder", "tfidf-word", "tfidf-char", "hybrid")


# --- reading and converting ----------------------------------------------------------------
def load_products(path: Path) -> list[Product]:
    """Upserts from a ``product-changes`` JSONL file, validated by the wire decoder (``ts`` optional)."""
    from streams.records import DecodeError, product_from_wire

    products: list[Product] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if obj.get("op", "upsert") != "upsert":
                continue
            obj.pop("op", None)
            obj.setdefault("ts", CONVERTED_TS)
            try:
                products.append(product_from_wire(obj))
            except DecodeError as exc:
                raise click.ClickException(f"{path}:{number}: {exc}") from exc
    return products


def leipzig_rows(path: Path) -> Iterator[dict[str, str]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # the Leipzig benchmark files are latin-1
    yield from csv.DictReader(io.StringIO(text))


def leipzig_to_upserts(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Leipzig rows (``id,title|name,description,manufacturer,price``) -> upserts; also the skipped count.

    A price of 0 means "unknown" in these files and is left out; ``manufacturer`` becomes ``brand``.
    """
    out: list[dict[str, Any]] = []
    skipped = 0
    for row in leipzig_rows(path):
        title = (row.get("title") or row.get("name") or "").strip()
        product_id = (row.get("id") or "").strip()
        if not title or not product_id:
            skipped += 1
            continue
        change: dict[str, Any] = {"op": "upsert", "product_id": product_id, "ts": CONVERTED_TS, "title": title}
        if (row.get("description") or "").strip():
            change["description"] = row["description"].strip()
        if (row.get("manufacturer") or "").strip():
            change["brand"] = row["manufacturer"].strip()
        match = _LEADING_NUMBER.match(row.get("price") or "")
        if match and float(match.group(1).replace(",", "")) > 0:
            change["price"] = float(match.group(1).replace(",", ""))
        out.append(change)
    return out, skipped


@main.group("convert")
def convert() -> None:
    """Convert public data sets into simstream's input shapes."""


@convert.command("leipzig")
@click.option("--left", "left_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Left CSV, e.g. Amazon.csv.")
@click.option("--right", "right_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Right CSV, e.g. GoogleProducts.csv.")
@click.option("--mapping", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Perfect-mapping CSV: left id, right id (first two columns).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Writes left.jsonl, right.jsonl and truth.csv here.")
def convert_leipzig(left_csv: Path, right_csv: Path, mapping: Path, out_dir: Path) -> None:
    """Leipzig entity-resolution CSVs (Köpcke, Thor, Rahm, VLDB 2010) -> product-changes JSONL + truth."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for side, path in (("left", left_csv), ("right", right_csv)):
        rows, skipped = leipzig_to_upserts(path)
        with (out_dir / f"{side}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        click.echo(f"{side}: {len(rows)} products ({skipped} without id or title skipped) from {path.name}")
    pairs = 0
    with (out_dir / "truth.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["left_id", "right_id"])
        for row in leipzig_rows(mapping):
            values = [v.strip() for v in row.values() if v is not None]
            if len(values) >= 2 and values[0] and values[1]:
                writer.writerow(values[:2])
                pairs += 1
    click.echo(f"truth: {pairs} pairs -> {out_dir / 'truth.csv'}")


# --- the evaluation -------------------------------------------------------------------------
@dataclass(frozen=True)
class MatchingTask:
    """Queries (left products with a true match), the corpus (right products) and their texts."""

    queries: list[Product]
    corpus: list[Product]
    query_texts: list[str]
    corpus_texts: list[str]
    truth: dict[str, set[str]]


def encode_texts(texts: Sequence[str], encoder: Any, label: str) -> Any:
    import numpy as np
    from tqdm import tqdm

    chunk = 512
    parts = []
    with tqdm(total=len(texts), desc=label, unit=" texts", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
        for start in range(0, len(texts), chunk):
            parts.append(encoder.encode_blocking(list(texts[start : start + chunk])).vectors)
            bar.update(min(chunk, len(texts) - start))
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)


@main.group("eval")
def eval_group() -> None:
    """Offline evaluations."""


@eval_group.command("matching")
@click.option("--left", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Query products (product-changes JSONL).")
@click.option("--right", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Indexed products (product-changes JSONL).")
@click.option("--truth", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="CSV with header left_id,right_id.")
@click.option("--method", "methods", type=click.Choice([*METHODS, "all"]), multiple=True, default=["encoder"],
              show_default=True,
              help="Repeat it (or say all) to compare methods side by side in one run, on one set of vectors.")
@click.option("--k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--text", "template", type=click.Choice(TEMPLATES), default="product", show_default=True,
              help="Product text template (product = serving.text.product_text).")
@click.option("--encoder", "encoder_target", default=None,
              help="local, grpc://host:port or hashing [SIMSTREAM_ENCODER].")
@click.option("--model-base", type=click.Path(path_type=Path), default=None,
              help="SavedModel base for the local encoder [SIMSTREAM_MODEL_BASE].")
@click.option("--dump-texts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the query and corpus texts and the truth as JSON (to run a reference model).")
def eval_matching(left: Path, right: Path, truth: Path, methods: tuple[str, ...], k: int, template: str,
                  encoder_target: str | None, model_base: Path | None, dump_texts: Path | None) -> None:
    """Index RIGHT, query with every LEFT product that has a true match; report hit@1, hit@k, MRR@k."""
    from serving.evaluation.matching_eval import evaluate_rankings, load_truth

    started = time.perf_counter()
    truth_map = load_truth(truth)
    corpus = load_products(right)
    queries = [p for p in load_products(left) if p.product_id in truth_map]
    known = {p.product_id for p in corpus}
    queries = [p for p in queries if truth_map[p.product_id] & known]
    text_of = _template(template)
    task = MatchingTask(queries, corpus, [text_of(p) for p in queries], [text_of(p) for p in corpus], truth_map)
    if dump_texts is not None:
        dump_texts.write_text(json.dumps({
            "template": template,
            "queries": [[p.product_id, t] for p, t in zip(task.queries, task.query_texts, strict=True)],
            "corpus": [[p.product_id, t] for p, t in zip(task.corpus, task.corpus_texts, strict=True)],
            "truth": {q: sorted(r) for q, r in truth_map.items()},
        }, ensure_ascii=False), encoding="utf-8")
    chosen = list(METHODS) if "all" in methods else list(dict.fromkeys(methods))
    reports = []
    for method in chosen:
        rankings = RANKERS[method](task, k, encoder_target, model_base)
        report = evaluate_rankings(method, [p.product_id for p in queries], rankings, truth_map, k).as_dict()
        reports.append(report)
        click.echo(f"{method} on {len(queries)} queries x {len(corpus)} products, text={template}: "
                   f"hit@1 {report['hit@1']:.3f}, {time.perf_counter() - started:.1f} s", err=True)
    # One method: one JSON object; several: one JSON list, on the last line either way.
    click.echo(json.dumps(reports[0] if len(reports) == 1 else reports))


def _rank_tfidf(method: str) -> Callable[..., list[list[str]]]:
    def rank(task: MatchingTask, k: int, *_: Any) -> list[list[str]]:
        from encoders.training.baselines import tfidf_top_k

        top = tfidf_top_k(method, task.query_texts, task.corpus_texts, k)
        return [[task.corpus[i].product_id for i in row] for row in top]

    return rank


_VECTORS: dict[int, tuple[Any, Any]] = {}


def _vectors(task: MatchingTask, encoder_target: str | None, model_base: Path | None) -> tuple[Any, Any]:
    """Query and corpus vectors, computed once per task (several methods share them)."""
    if id(task) not in _VECTORS:
        _VECTORS[id(task)] = _embed_task(task, encoder_target, model_base)
    return _VECTORS[id(task)]


def _embed_task(task: MatchingTask, encoder_target: str | None, model_base: Path | None) -> tuple[Any, Any]:
    from encoders.factory import create_encoder
    from streams.settings import get_settings

    settings = get_settings()
    encoder = create_encoder(encoder_target or settings.encoder, **settings.encoder_options(model_base))
    return encode_texts(task.query_texts, encoder, "queries"), encode_texts(task.corpus_texts, encoder, "corpus")


def _rank_encoder(task: MatchingTask, k: int, encoder_target: str | None, model_base: Path | None) -> list[list[str]]:
    from serving.evaluation.matching_eval import top_k_by_cosine

    query_vectors, corpus_vectors = _vectors(task, encoder_target, model_base)
    top = top_k_by_cosine(query_vectors, corpus_vectors, k)
    return [[task.corpus[i].product_id for i in row] for row in top]


def _rank_hybrid(task: MatchingTask, k: int, encoder_target: str | None, model_base: Path | None) -> list[list[str]]:
    try:
        from serving.evaluation.matching import hybrid_rank  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError as exc:
        raise click.UsageError("--method hybrid needs serving.evaluation.matching.hybrid_rank (the core issue)") from exc
    from dataclasses import replace

    from streams.settings import get_settings
    from streams.worker import recommender_config

    query_vectors, corpus_vectors = _vectors(task, encoder_target, model_base)
    # The worker's own core settings (blend, HNSW ef and M, index adapter), read like the worker.
    base = recommender_config(get_settings())
    config = replace(base, k=k, candidate_depth=max(base.candidate_depth, k))
    return list(hybrid_rank(task.queries, query_vectors, task.corpus, corpus_vectors, k, config))


#: method name -> ranker(task, k, encoder_target, model_base) -> right ids per query, best first.
RANKERS: dict[str, Callable[[MatchingTask, int, str | None, Path | None], list[list[str]]]] = {
    "encoder": _rank_encoder,
    "tfidf-word": _rank_tfidf("tfidf-word"),
    "tfidf-char": _rank_tfidf("tfidf-char"),
    "hybrid": _rank_hybrid,
}


# --- semantic search ------------------------------------------------------------------------
SEARCH_METHODS = ("search", "search-rrf", "encoder", "lexical", "tfidf-char")


@eval_group.command("search")
@click.option("--left", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Products whose titles are the queries (product-changes JSONL).")
@click.option("--right", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The catalog searched (product-changes JSONL).")
@click.option("--truth", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="CSV with header left_id,right_id.")
@click.option("--method", "methods", type=click.Choice([*SEARCH_METHODS, "all"]), multiple=True, default=["all"],
              show_default=True, help="Repeat it to compare some methods; all runs every one.")
@click.option("--k", type=click.IntRange(1, 50), default=10, show_default=True, help="Hits per query (MRR@k, hit@k).")
@click.option("--encoder", "encoder_target", default=None,
              help="local, grpc://host:port or hashing [SIMSTREAM_ENCODER].")
@click.option("--model-base", type=click.Path(path_type=Path), default=None,
              help="SavedModel base for the local encoder [SIMSTREAM_MODEL_BASE].")
def eval_search(left: Path, right: Path, truth: Path, methods: tuple[str, ...], k: int,
                encoder_target: str | None, model_base: Path | None) -> None:
    """Search RIGHT with the title of every LEFT product that has a true match; hit@1, hit@k, MRR@k.

    search is GET /search (serving.search: dense and lexical candidates fused with the content
    score) on a core holding RIGHT; search-rrf the same candidates by reciprocal-rank fusion;
    encoder the query's embedding alone (exact cosine); lexical the search's lexical half
    alone; tfidf-char scikit-learn's char_wb 2-5 TF-IDF (fitted on the catalog). Queries are
    titles as a shopper would type them, normalised like /search does (and cut to its 200
    characters).
    """
    from encoders.factory import create_encoder
    from serving.config import RecommenderConfig
    from serving.evaluation.matching_eval import evaluate_rankings, load_truth, top_k_by_cosine
    from serving.evaluation.search_eval import lexical_rankings, search_core, search_rankings
    from serving.search import MAX_QUERY_CHARS, Fusion, normalize_query
    from serving.text import product_text
    from streams.settings import get_settings

    started = time.perf_counter()
    truth_map = load_truth(truth)
    corpus = load_products(right)
    known = {p.product_id for p in corpus}
    queries = [p for p in load_products(left) if truth_map.get(p.product_id, set()) & known]
    if not queries:
        raise click.UsageError("no LEFT product has a true match in RIGHT: check the truth CSV's ids")
    query_texts = [normalize_query(p.title)[:MAX_QUERY_CHARS] for p in queries]  # what /search accepts
    settings = get_settings()
    encoder = create_encoder(encoder_target or settings.encoder, **settings.encoder_options(model_base))
    corpus_vectors = encode_texts([product_text(p) for p in corpus], encoder, "catalog")
    query_vectors = encode_texts(query_texts, encoder, "queries")
    # The worker's own configuration: candidate depth, blend and index settings.
    config = RecommenderConfig(k=settings.k, candidate_depth=settings.candidate_depth,
                               lexical_weight=settings.lexical_weight, lexical_floor=settings.lexical_floor,
                               hnsw_ef=settings.hnsw_ef, hnsw_m=settings.hnsw_m, index=settings.index,
                               hnsw_initial_capacity=len(corpus) + 1)
    core = search_core(corpus, corpus_vectors, config)
    chosen = list(SEARCH_METHODS) if "all" in methods else list(dict.fromkeys(methods))
    reports: list[dict[str, Any]] = []
    for method in chosen:
        t = time.perf_counter()
        if method in ("search", "search-rrf"):
            rankings = search_rankings(core, query_texts, query_vectors, k,
                                       Fusion.RRF if method == "search-rrf" else Fusion.CONTENT)
        elif method == "encoder":
            top = top_k_by_cosine(query_vectors, corpus_vectors, k)
            rankings = [[corpus[i].product_id for i in row] for row in top]
        elif method == "lexical":
            rankings = lexical_rankings(core, query_texts, k)
        else:
            from encoders.training.baselines import tfidf_top_k

            catalog_texts = [product_text(p) for p in corpus]
            top = tfidf_top_k("tfidf-char", query_texts, catalog_texts, k, fit_texts=catalog_texts)
            rankings = [[corpus[i].product_id for i in row] for row in top]
        took = time.perf_counter() - t
        report = evaluate_rankings(method, [p.product_id for p in queries], rankings, truth_map, k).as_dict()
        report["ms_per_query"] = round(took / len(queries) * 1000, 3)
        reports.append(report)
        click.echo(f"{method}: hit@1 {report['hit@1']:.4f}, {time.perf_counter() - started:.1f} s", err=True)
    click.echo(f"{len(queries)} queries (titles of {left.name}) against {len(corpus)} products of {right.name}, "
               f"encoder {encoder.model_version}\n")
    click.echo(f"| method | hit@1 | hit@{k} | MRR@{k} | ms per query |")
    click.echo("| --- | --- | --- | --- | --- |")
    for r in reports:
        click.echo(f"| {r['method']} | {r['hit@1']:.4f} | {r[f'hit@{k}']:.4f} | {r[f'mrr@{k}']:.4f} | "
                   f"{r['ms_per_query']} |")
    click.echo(json.dumps(reports))
