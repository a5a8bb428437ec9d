"""Learning-loop commands: ``train-pairs``, ``finetune`` and ``eval finetune``.

``train-pairs`` builds positive pairs (co-cart/co-purchase from a replay of ``user-events``,
shared ``group_id``, a labelled CSV) and splits them by item; ``finetune`` trains a new
SavedModel version on them beside the base version; ``eval finetune`` runs the whole loop on
the Amazon-Google matching set and compares base and fine-tuned side by side on held-out
items. Each prints one summary line, and the last stdout line is one JSON object.
TensorFlow is imported inside the commands, so ``simstream --help`` stays fast.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from streams.cli.eval_commands import eval_group, load_products
from streams.cli.group import main

if TYPE_CHECKING:
    from serving.catalog import Product, UserEvent


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _read_events(path: Path, counts: dict[str, int]) -> Iterator[UserEvent]:
    """``user-events`` values, one JSON a line; a line that does not decode is counted and skipped."""
    from streams.records import DecodeError, decode_user_event

    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                yield decode_user_event(line, now=float("inf")).to_core()
                counts["events"] += 1
            except DecodeError:
                counts["bad_events"] += 1


@main.command("train-pairs")
@click.option("--catalog", "catalogs", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              required=True, help="Catalog as product-changes JSONL (repeatable); gives ids, texts and group_id.")
@click.option("--events", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A replay of user-events values (JSONL): co-cart and co-purchase pairs.")
@click.option("--labelled", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV with header left_id,right_id: known positive pairs.")
@click.option("--no-groups", is_flag=True, help="Do not pair products that share a group_id.")
@click.option("--min-score", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Least behaviour score (normalised co-occurrence) for a co-cart/co-purchase pair.")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of the items held out for validation (by item: none of them is in a training pair).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Writes train.csv, valid.csv, texts.jsonl and summary.json here.")
def train_pairs(catalogs: tuple[Path, ...], events: Path | None, labelled: Path | None, no_groups: bool,
                min_score: float, holdout: float, seed: int, out_dir: Path) -> None:
    """Build positive pairs for `simstream finetune` and split them by item."""
    from encoders.training.pairs import (
        PairBuilder,
        behavior_pairs,
        group_pairs,
        read_labelled_csv,
        save_pair_set,
        split_by_item,
    )
    from serving.behavior import BehaviorModel
    from serving.errors import SimstreamError
    from serving.text import product_text

    products: dict[str, Product] = {}
    for path in catalogs:
        for p in load_products(path):
            products[p.product_id] = p  # a later upsert of the same id wins
    builder = PairBuilder(products)
    counts = {"events": 0, "bad_events": 0}
    try:
        if events is not None:
            model = BehaviorModel()
            seen: set[str] = set()
            for event in _read_events(events, counts):
                model.ingest(event)
                if event.product_id:
                    seen.add(event.product_id)
            builder.add_all(behavior_pairs(model, seen, min_score=min_score), "behavior")
        if not no_groups:
            builder.add_all(group_pairs(products.values()), "group")
        if labelled is not None:
            builder.add_all(read_labelled_csv(labelled), "labelled")
        split = split_by_item(builder.pairs, holdout, seed)
    except SimstreamError as exc:
        raise _fail(exc) from exc
    stats = builder.stats
    summary: dict[str, Any] = {**split.as_dict(), **stats.as_dict(), **counts, "holdout": holdout, "seed": seed}
    save_pair_set(out_dir, split, {i: product_text(p) for i, p in products.items()}, summary)
    kept = ", ".join(f"{s} {n}" for s, n in sorted(stats.kept.items())) or "none"
    click.echo(f"{len(builder.pairs)} pairs ({kept}); skipped {sum(stats.unknown_ids.values())} with unknown ids, "
               f"{stats.duplicates} duplicates, {stats.self_pairs} self-pairs, {counts['bad_events']} bad events; "
               f"by item: {len(split.train)} train, {len(split.valid)} validation "
               f"({len(split.held_out)} held-out items), {split.dropped} straddling dropped -> {out_dir}", err=True)
    click.echo(json.dumps(summary))


def _finetune_options(f: Any) -> Any:
    """Options shared by ``finetune`` and ``eval finetune``."""
    from encoders.training.finetune import FinetuneConfig

    d = FinetuneConfig()
    options = [
        click.option("--freeze-layers", type=click.IntRange(0, 5), default=d.freeze_layers, show_default=True,
                     help="Keep the lowest L of the 6 transformer layers (and the embeddings) fixed."),
        click.option("--train-embeddings", is_flag=True, help="Also train the token embeddings."),
        click.option("--epochs", type=click.IntRange(1), default=d.epochs, show_default=True),
        click.option("--batch-size", type=click.IntRange(2), default=d.batch_size, show_default=True,
                     help="Pairs per step; each pair's in-batch negatives are the others."),
        click.option("--learning-rate", type=click.FloatRange(0, min_open=True), default=d.learning_rate,
                     show_default=True, help="Peak AdamW rate, after a linear warm-up."),
        click.option("--max-length", type=click.IntRange(4, 512), default=d.max_length, show_default=True,
                     help="Tokens per text while training (the export keeps the base's max length)."),
        click.option("--temperature", type=click.FloatRange(0, min_open=True), default=d.temperature,
                     show_default=True),
        click.option("--patience", type=click.IntRange(1), default=d.patience, show_default=True,
                     help="Epochs without validation gain before early stopping."),
        click.option("--max-steps", type=click.IntRange(1), default=None, help="Cap on optimiser steps (smoke runs)."),
        click.option("--seed", type=int, default=d.seed, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(**kw: Any) -> Any:
    from encoders.training.finetune import FinetuneConfig

    return FinetuneConfig(**kw)


def _log(message: str) -> None:
    click.echo(message, err=True)


@main.command("finetune")
@click.option("--pairs", "pairs_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The --out folder of `simstream train-pairs`.")
@click.option("--base-version", type=click.IntRange(1), required=True, help="SavedModel version to start from.")
@click.option("--out-version", type=click.IntRange(1), required=True, help="Version to write beside it.")
@click.option("--model-base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model base with <version>/ folders [SIMSTREAM_MODEL_BASE].")
@click.option("--force", is_flag=True, help="Replace --out-version if it exists.")
@_finetune_options
def finetune_command(pairs_dir: Path, base_version: int, out_version: int, model_base: Path | None, force: bool,
                     **options: Any) -> None:
    """Fine-tune the encoder on pairs (in-batch contrastive loss) and export it as a new version."""
    from encoders.training.finetune import finetune
    from encoders.training.pairs import load_pair_set
    from serving.errors import SimstreamError
    from streams.settings import get_settings

    base = (model_base or get_settings().model_base).expanduser()
    try:
        config = _config(**options)
        pairs, skipped = load_pair_set(pairs_dir)
        if skipped:
            _log(f"{skipped} pairs name an id without a text in {pairs_dir}/texts.jsonl; skipped")
        result = finetune(pairs, base, base_version, out_version, config, force=force, log=_log)
    except SimstreamError as exc:
        raise _fail(exc) from exc
    click.echo(json.dumps({**result.as_dict(), "skipped_pairs": skipped}))


# --- eval finetune: the loop on Amazon-Google ------------------------------------------------------
def _leipzig_files(data: Path) -> tuple[Path, Path, Path]:
    def one(pattern: str) -> Path:
        found = sorted(data.glob(pattern))
        if not found:
            raise click.UsageError(f"{data} has no {pattern}; pass the Amazon-Google folder of the Leipzig set")
        return found[0]

    return one("Amazon.csv"), one("GoogleProducts.csv"), one("*perfectMapping*.csv")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@eval_group.command("finetune")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder with Amazon.csv, GoogleProducts.csv and the perfect mapping (Leipzig).")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True,
              help="Share of the matched items held out for the test (by item).")
@click.option("--valid", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.15, show_default=True,
              help="Share of the remaining items held out for early stopping (by item).")
@click.option("--work", "work_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("var/finetune-ag"), show_default=True,
              help="Scratch folder: converted data, pairs, held-out files, models/minilm/{N,N+1}.")
@click.option("--model-base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the base version is [SIMSTREAM_MODEL_BASE]; it is copied, never written to.")
@click.option("--base-version", type=click.IntRange(1), default=None, help="Base version [default: the latest].")
@click.option("--k", type=click.IntRange(1, 1000), default=10, show_default=True)
@_finetune_options
def eval_finetune(data: Path, holdout: float, valid: float, work_dir: Path, model_base: Path | None,
                  base_version: int | None, k: int, **options: Any) -> None:
    """Fine-tune on part of the Amazon-Google matches; compare base and fine-tuned on the held-out rest.

    The test items (both sides of a held-out match) appear in no training or validation
    pair, and the test corpus is every Google product that is in no such pair either.
    """
    from encoders.export import resolve_version
    from encoders.training.finetune import finetune
    from encoders.training.pairs import PairBuilder, PairSet, save_pair_set, split_by_item
    from serving.errors import SimstreamError
    from serving.text import product_text
    from streams.cli.eval_commands import leipzig_rows, leipzig_to_upserts
    from streams.settings import get_settings

    started = time.perf_counter()
    settings = get_settings()
    amazon_csv, google_csv, mapping_csv = _leipzig_files(data)
    conv = work_dir / "data"
    conv.mkdir(parents=True, exist_ok=True)
    for path, name in ((amazon_csv, "left.jsonl"), (google_csv, "right.jsonl")):
        _write_jsonl(conv / name, leipzig_to_upserts(path)[0])
    left = {p.product_id: p for p in load_products(conv / "left.jsonl")}
    right = {p.product_id: p for p in load_products(conv / "right.jsonl")}
    mapping = [[v.strip() for v in row.values() if v is not None][:2] for row in leipzig_rows(mapping_csv)]
    try:
        builder = PairBuilder({*left, *right})
        builder.add_all(((a, b) for a, b in mapping if a and b), "labelled")
        test_split = split_by_item(builder.pairs, holdout, options["seed"])
        dev_split = split_by_item(test_split.train, valid, options["seed"] + 1)
        train_items = {i for p in [*dev_split.train, *dev_split.valid] for i in p.key}
        test_items = {i for p in test_split.valid for i in p.key}
        if train_items & test_items:  # guaranteed by split_by_item; checked because the result depends on it
            raise click.ClickException(f"{len(train_items & test_items)} test items are in training pairs")
        texts = {i: product_text(p) for i, p in {**left, **right}.items()}
        save_pair_set(work_dir / "pairs", dev_split, texts, {**dev_split.as_dict(), "test": test_split.as_dict()})

        # Held-out files, so that `simstream eval matching` reproduces the numbers for either version.
        heldout = work_dir / "heldout"
        heldout.mkdir(parents=True, exist_ok=True)
        truth: dict[str, set[str]] = {}
        for p in test_split.valid:
            a, b = (p.left, p.right) if p.left in left else (p.right, p.left)
            truth.setdefault(a, set()).add(b)
        queries = [left[i] for i in sorted(truth)]
        corpus = [p for i, p in sorted(right.items()) if i not in train_items]
        (heldout / "truth.csv").write_text(
            "left_id,right_id\n" + "".join(f"{a},{b}\n" for a in sorted(truth) for b in sorted(truth[a])),
            encoding="utf-8")
        from streams.records import product_to_wire

        _write_jsonl(heldout / "left.jsonl", [product_to_wire(p) for p in queries])
        _write_jsonl(heldout / "right.jsonl", [product_to_wire(p) for p in corpus])

        source = (model_base or settings.model_base).expanduser()
        n, source_dir = resolve_version(source, base_version)
        models = work_dir / "models" / settings.model_name
        if models.exists():
            shutil.rmtree(models)  # a fresh base each run: reproducible, and M never stacks on an old M
        models.mkdir(parents=True)
        shutil.copytree(source_dir, models / str(n))
        _log(f"test: {len(queries)} Amazon queries x {len(corpus)} Google products ({len(test_split.valid)} "
             f"held-out matches, {test_split.dropped} straddling dropped); training on {len(dev_split.train)} "
             f"pairs, {len(dev_split.valid)} for early stopping")
        pairs = PairSet(dev_split.train, dev_split.valid, {i: texts[i] for i in sorted(train_items)})
        result = finetune(pairs, models, n, n + 1, _config(**options), force=True, log=_log)
        report = {
            "base": _evaluate_version(models, n, queries, corpus, truth, k, settings.max_length),
            "finetuned": _evaluate_version(models, n + 1, queries, corpus, truth, k, settings.max_length),
        }
    except SimstreamError as exc:
        raise _fail(exc) from exc
    base, tuned = report["base"], report["finetuned"]
    hit = "hit@1"
    lines = [f"{'method':<12} {'base hit@1':>10} {'tuned hit@1':>11}   hit@{k} base/tuned   mrr@{k} base/tuned"]
    for method in base:
        was, now = base[method], tuned[method]
        lines.append(f"{method:<12} {was[hit]:>10.4f} {now[hit]:>11.4f}   "
                     f"{was[f'hit@{k}']:.4f}/{now[f'hit@{k}']:.4f}        {was[f'mrr@{k}']:.4f}/{now[f'mrr@{k}']:.4f}")
    for line in lines:
        _log(line)
    targets = {
        "encoder_finetuned_ge_tfidf_char": tuned["encoder"][hit] >= tuned["tfidf-char"][hit],
        "hybrid_gain_ge_3_points": tuned["hybrid"][hit] - base["hybrid"][hit] >= 0.03,
        "encoder_hit1_raised": tuned["encoder"][hit] > base["encoder"][hit],
    }
    click.echo(json.dumps({
        "holdout": holdout, "valid": valid, "seed": options["seed"],
        "n_queries": len(queries), "corpus": len(corpus), "train_pairs": len(dev_split.train),
        "valid_pairs": len(dev_split.valid), "test_pairs": len(test_split.valid),
        "test_items_in_training_pairs": len(train_items & test_items),
        "base_version": n, "finetuned_version": n + 1,
        "base": base, "finetuned": tuned, "targets": targets,
        "finetune": {key: v for key, v in result.as_dict().items() if key != "version_dir"},
        "seconds": round(time.perf_counter() - started, 1),
    }))


def _evaluate_version(models: Path, version: int, queries: list[Product], corpus: list[Product],
                      truth: dict[str, set[str]], k: int, max_length: int) -> dict[str, dict[str, Any]]:
    """hit@1 / hit@k / MRR@k of the encoder, hybrid and both TF-IDF baselines, as `eval matching` computes them."""
    from encoders.local import LocalEncoder
    from encoders.training.baselines import tfidf_top_k
    from serving.config import RecommenderConfig
    from serving.evaluation.matching import hybrid_rank
    from serving.evaluation.matching_eval import evaluate_rankings, top_k_by_cosine
    from serving.text import product_text

    encoder = LocalEncoder(models, model_version=version, max_length=max_length)
    q_texts, c_texts = [product_text(p) for p in queries], [product_text(p) for p in corpus]
    qv, cv = encoder.encode_blocking(q_texts).vectors, encoder.encode_blocking(c_texts).vectors
    ids = [p.product_id for p in corpus]
    rankings = {
        "encoder": [[ids[i] for i in row] for row in top_k_by_cosine(qv, cv, k)],
        "hybrid": hybrid_rank(queries, qv, corpus, cv, k, RecommenderConfig(k=k, candidate_depth=max(50, k))),
    }
    for method in ("tfidf-word", "tfidf-char"):  # independent of the model; repeated so each column is complete
        rankings[method] = [[ids[i] for i in row] for row in tfidf_top_k(method, q_texts, c_texts, k)]
    qids = [p.product_id for p in queries]
    out = {}
    for method, ranked in rankings.items():
        report = evaluate_rankings(method, qids, ranked, truth, k).as_dict()
        report.pop("method")
        out[method] = report
    _log(f"minilm/{version}: " + ", ".join(f"{m} hit@1 {r['hit@1']:.4f}" for m, r in out.items()))
    sys.stderr.flush()
    return out


# --- learn: the loop on what the stream carries --------------------------------------------------
@main.command("learn")
@click.option("--min-new-pairs", type=click.IntRange(0), default=None,
              help="Train only when this many positive pairs are new [SIMSTREAM_LEARN_MIN_NEW_PAIRS].")
@click.option("--min-gain", type=click.FloatRange(-1, 1), default=None,
              help="Promote only when the held-out hybrid hit@1 beats the live version's by this "
                   "[SIMSTREAM_LEARN_MIN_GAIN].")
@click.option("--test-share", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.3,
              show_default=True, help="Share of the paired items held out to decide (by item).")
@click.option("--valid-share", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.15,
              show_default=True, help="Share of the remaining items held out for early stopping and the blend.")
@click.option("--hard-negatives", type=click.IntRange(0, 20), default=3, show_default=True,
              help="Mined hard negatives per training item (labelled negatives are always used).")
@click.option("--no-groups", is_flag=True, help="Do not pair products that share a group_id.")
@_finetune_options
def learn_command(min_new_pairs: int | None, min_gain: float | None, test_share: float, valid_share: float,
                  hard_negatives: int, no_groups: bool, **options: Any) -> None:
    """Mine pairs from the topics, fine-tune, and promote a new model version if it wins on held-out items.

    Reads simstream-products, user-events, product-labels and simstream-models; writes one
    record to simstream-models (and dead letters for malformed labels). A promoted version
    appears in the model base, where the workers' model poll rolls over to it.
    """
    from encoders.training.learn import LearnConfig
    from serving.errors import SimstreamError
    from streams.learn import run_learn
    from streams.settings import get_settings
    from streams.worker import recommender_config

    settings = get_settings()
    try:
        config = LearnConfig(
            min_new_pairs=settings.learn_min_new_pairs if min_new_pairs is None else min_new_pairs,
            min_gain=settings.learn_min_gain if min_gain is None else min_gain,
            test_share=test_share, valid_share=valid_share, hard_negatives=hard_negatives,
            use_groups=not no_groups, seed=options["seed"],
            finetune=_config(**{**options, "max_steps": options["max_steps"] or settings.learn_max_steps}))
        record = run_learn(settings, config, recommender_config(settings), progress=_log)
    except SimstreamError as exc:
        raise _fail(exc) from exc
    _log(f"learn: {record['decision']}: {record['reason']}")
    click.echo(json.dumps(record))
    if record["decision"] == "failed":
        sys.exit(1)
