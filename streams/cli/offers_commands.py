"""``simstream eval offers``: competitor-offer matching calibrated and scored on Amazon-Google.

The Amazon products play the competitor's offers, the Google products the shop's catalog.
The split is by item and is the one ``simstream eval finetune`` makes with the same
``--holdout`` and ``--seed`` (``split_by_item`` on the true matches): a version fine-tuned
there never saw an evaluated offer or its true match. The held-out matched offers are split
again by item into a validation half (Platt scaling and the threshold of best F1) and a test
half (the reported precision, recall and F1); Amazon products with no true match at all are
offers too (negatives: the threshold must say ``no_match`` for them), split by a hash of their
id. Every Google product is in the catalog. See ``serving/evaluation/offers_eval.py``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from streams.cli.eval_commands import encode_texts, eval_group

ROOT = Path(__file__).resolve().parents[2]
SHARED_SET = ROOT.parent / "shared" / "data" / "amazon-google"
TITLES_SET = ROOT / "data" / "amazon-google-titles"
COMPETITOR = "amazon"


def _one(folder: Path, *patterns: str) -> Path:
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise click.UsageError(f"{folder} has none of {', '.join(patterns)}; pass the Amazon-Google folder")


def _hashed_half(seed: int, key: str) -> bool:
    """A stable coin flip per id (the unmatched offers' split)."""
    return hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()[0] & 1 == 1


@eval_group.command("offers")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Amazon-Google folder: Leipzig's Amazon.csv, GoogleProducts.csv and perfect mapping, or the "
                   "titles-only copy [default: ../shared/data/amazon-google, else data/amazon-google-titles].")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True,
              help="Share of the matched items held out from training, as `eval finetune --holdout`.")
@click.option("--seed", type=int, default=0, show_default=True, help="Draws the split, as `eval finetune --seed`.")
@click.option("--versions", default=None,
              help="Model versions to compare, e.g. 1,2 [default: SIMSTREAM_MODEL_VERSION, else the latest].")
@click.option("--encoder", "encoder_target", default=None,
              help="local, grpc://host:port or hashing [SIMSTREAM_ENCODER].")
@click.option("--model-base", type=click.Path(path_type=Path), default=None,
              help="SavedModel base for the local encoder [SIMSTREAM_MODEL_BASE].")
@click.option("--pairs", "pairs_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A fine-tuned version's pair set (WORK/pairs of `eval finetune`): checks that no evaluated offer "
                   "or catalog answer is in its training pairs.")
def eval_offers(data: Path | None, holdout: float, seed: int, versions: str | None, encoder_target: str | None,
                model_base: Path | None, pairs_dir: Path | None) -> None:
    """Match Amazon offers against the Google catalog; calibrate on one half, report precision/recall/F1 on the other."""
    from encoders.export import version_blend
    from encoders.factory import create_encoder
    from encoders.training.pairs import PairBuilder, load_pair_set, split_by_item
    from serving.errors import SimstreamError
    from serving.evaluation.offers_eval import ANCHORS, best_matches, evaluate_offers
    from serving.evaluation.search_eval import search_core
    from serving.offers import Offer, log_price_gap
    from serving.text import product_text
    from streams.cli.eval_commands import leipzig_rows, leipzig_to_upserts
    from streams.records import product_from_wire
    from streams.settings import get_settings
    from streams.worker import recommender_config

    started = time.perf_counter()
    settings = get_settings()
    folder = data or (SHARED_SET if SHARED_SET.is_dir() else TITLES_SET)
    left_csv = _one(folder, "Amazon.csv", "amazon.csv")
    right_csv = _one(folder, "GoogleProducts.csv", "google.csv")
    mapping_csv = _one(folder, "*perfectMapping*.csv", "truth.csv")

    def products(path: Path) -> dict[str, Any]:
        rows = leipzig_to_upserts(path)[0]
        return {r["product_id"]: product_from_wire({k: v for k, v in r.items() if k != "op"}) for r in rows}

    left, right = products(left_csv), products(right_csv)
    mapping = [(a, b) for a, b in ([v.strip() for v in row.values() if v is not None][:2]
                                   for row in leipzig_rows(mapping_csv)) if a in left and b in right]
    truth: dict[str, set[str]] = {}
    for a, b in mapping:
        truth.setdefault(f"{COMPETITOR}|{a}", set()).add(b)
    try:
        builder = PairBuilder({*left, *right})
        builder.add_all(mapping, "labelled")
        held = split_by_item(builder.pairs, holdout, seed)  # the test items of `eval finetune`
        halves = split_by_item(held.valid, 0.5, seed + 2)
    except SimstreamError as exc:
        raise click.ClickException(str(exc)) from exc
    matched = {a for a, _ in mapping}
    valid_ids = sorted(i for i in held.held_out if i in left and i not in halves.held_out)
    test_ids = sorted(i for i in held.held_out if i in left and i in halves.held_out)
    for pid in sorted(set(left) - matched):  # no true match anywhere: a negative in either half
        (test_ids if _hashed_half(seed, pid) else valid_ids).append(pid)
    checked: int | None = None
    if pairs_dir is not None:
        pair_set, _ = load_pair_set(pairs_dir)
        trained = {i for p in [*pair_set.train, *pair_set.valid] for i in p.key}
        answers = {b for i in [*valid_ids, *test_ids] for b in truth.get(f"{COMPETITOR}|{i}", set())}
        checked = len(trained & ({*valid_ids, *test_ids} | answers))
        if checked:
            raise click.ClickException(f"{checked} evaluated offers or their answers are in {pairs_dir}'s pairs: "
                                       "use the --holdout and --seed that pair set was made with")
    offers = [Offer(COMPETITOR, p.product_id, p.title, p.ts, brand=p.brand, price=p.price, currency=p.currency)
              for p in (left[i] for i in [*valid_ids, *test_ids])]
    catalog = [right[i] for i in sorted(right)]
    base = (model_base or settings.model_base).expanduser()
    wanted: list[int | None] = ([int(v) for v in versions.split(",") if v.strip()] if versions
                                else [settings.model_version])
    click.echo(f"{len(offers)} Amazon offers ({len(valid_ids)} validation, {len(test_ids)} test; "
               f"{len(set(left) - matched)} have no true match) against {len(catalog)} Google products of "
               f"{folder}", err=True)
    results = []
    for version in wanted:
        encoder = create_encoder(encoder_target or settings.encoder,
                                 **{**settings.encoder_options(base), "model_version": version})
        config = recommender_config(settings)
        carried = version_blend(base, version) if settings.model_blend and version is not None else None
        if carried is not None:
            config = carried.apply(config)
        config = replace(config, hnsw_initial_capacity=len(catalog) + 1)
        catalog_vectors = encode_texts([product_text(p) for p in catalog], encoder, "catalog")
        offer_vectors = encode_texts([o.text for o in offers], encoder, "offers")
        core = search_core(catalog, catalog_vectors, config)
        found = dict(zip((o.key for o in offers), best_matches(core, offers, offer_vectors), strict=True))
        gaps = {o.key: log_price_gap(o, right.get(found[o.key].product_id or "")) for o in offers}
        keys_valid, keys_test = [f"{COMPETITOR}|{i}" for i in valid_ids], [f"{COMPETITOR}|{i}" for i in test_ids]
        # Every offer (the stream's case: some have no counterpart in the catalog), and, for
        # comparison, only the offers that have one.
        for offers_label, valid_keys, test_keys in (
                ("all", keys_valid, keys_test),
                ("with a true match", [k for k in keys_valid if k in truth], [k for k in keys_test if k in truth])):
            for label, with_price in (("score", None), ("score + price gap", gaps)):
                result = evaluate_offers(f"{encoder.model_version}, {label}", found, with_price, truth, valid_keys,
                                         test_keys)
                results.append((offers_label, result))
                click.echo(f"{result.model}, {offers_label} offers: test F1 {result.test.f1:.4f}, "
                           f"{time.perf_counter() - started:.1f} s", err=True)
    click.echo("| offers | model, confidence from | threshold | slope | price weight | intercept | valid F1 | "
               "test precision | test recall | test F1 | test offers (with a true match) | best product correct |")
    click.echo("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for offers_label, r in results:
        c = r.calibration
        click.echo(f"| {offers_label} | {r.model} | {c.threshold:.4f} | {c.slope:.3f} | {c.price_weight:.3f} | "
                   f"{c.intercept:.3f} | {r.valid.f1 * 100:.1f} | {r.test.precision * 100:.1f} | "
                   f"{r.test.recall * 100:.1f} | **{r.test.f1 * 100:.1f}** | {r.test_offers} ({r.test.with_truth}) | "
                   f"{r.test_top1_correct * 100:.1f}% |")
    click.echo("\nAnchors (Amazon-Google as pairwise classification of candidate pairs, F1; a different protocol: "
               "here every offer is matched against the whole catalog, then kept or called no_match): "
               + "; ".join(f"{name} {f1:.1f}" for name, f1 in ANCHORS))
    for offers_label, r in results:
        if offers_label != "all":
            continue
        c = r.calibration
        click.echo(f"settings for {r.model}: SIMSTREAM_OFFER_MATCH_THRESHOLD={c.threshold:.4f} "
                   f"SIMSTREAM_OFFER_CONFIDENCE_SLOPE={c.slope:.4f} SIMSTREAM_OFFER_CONFIDENCE_INTERCEPT={c.intercept:.4f} "
                   f"SIMSTREAM_OFFER_CONFIDENCE_PRICE_WEIGHT={c.price_weight:.4f} "
                   f"SIMSTREAM_OFFER_UNKNOWN_PRICE_GAP={c.unknown_price_gap:.4f}")
    click.echo(json.dumps({"data": str(folder), "holdout": holdout, "seed": seed, "catalog": len(catalog),
                           "valid_offers": len(valid_ids), "test_offers": len(test_ids),
                           "evaluated_in_training_pairs": checked, "results": [{"offers": o, **r.as_dict()} for o, r in results],
                           "seconds": round(time.perf_counter() - started, 1)}))
