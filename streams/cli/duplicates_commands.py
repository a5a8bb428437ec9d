"""``simstream eval duplicates``: calibrate ``SIMSTREAM_DUPLICATE_THRESHOLD`` on labelled pairs.

Both sides of a matching set (``simstream convert leipzig``) form one catalog in which every
truth pair is one product listed twice; see ``serving.evaluation.duplicates_eval``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from streams.cli.eval_commands import encode_texts, eval_group, load_products


@eval_group.command("duplicates")
@click.option("--left", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="One side of the catalog (product-changes JSONL).")
@click.option("--right", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The other side (product-changes JSONL).")
@click.option("--truth", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="CSV with header left_id,right_id: the same product on both sides.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split of the left items.")
@click.option("--beta", type=click.FloatRange(0.1, 10), default=0.5, show_default=True,
              help="The threshold maximises F-beta on the calibration half (0.5: precision counts double).")
@click.option("--encoder", "encoder_target", default=None,
              help="local, grpc://host:port or hashing [SIMSTREAM_ENCODER].")
@click.option("--model-base", type=click.Path(path_type=Path), default=None,
              help="SavedModel base for the local encoder [SIMSTREAM_MODEL_BASE].")
def eval_duplicates(left: Path, right: Path, truth: Path, seed: int, beta: float, encoder_target: str | None,
                    model_base: Path | None) -> None:
    """Choose the duplicate threshold on half of the LEFT items, report the other half.

    Every LEFT x RIGHT pair is decided as the worker decides it (the textual rule, or the
    content score with the worker's blend at the threshold); the threshold with the best
    F-beta on the first half is reported with precision, recall, F1 and F0.5 on the second,
    for the rule alone, the threshold alone and both, and for a range of other thresholds.
    The last line is one JSON object.
    """
    from encoders.factory import create_encoder
    from serving.evaluation.duplicates_eval import calibrate, pair_table
    from serving.evaluation.matching_eval import load_truth
    from serving.text import product_text
    from streams.settings import get_settings
    from streams.worker import recommender_config

    started = time.perf_counter()
    truth_map = load_truth(truth)
    lefts, rights = load_products(left), load_products(right)
    settings = get_settings()
    encoder = create_encoder(encoder_target or settings.encoder, **settings.encoder_options(model_base))
    left_vectors = encode_texts([product_text(p) for p in lefts], encoder, "left")
    right_vectors = encode_texts([product_text(p) for p in rights], encoder, "right")
    table = pair_table(lefts, rights, left_vectors, right_vectors, truth_map, recommender_config(settings))
    report = calibrate(table, seed, beta)
    report["encoder"] = encoder.model_version
    test = report["test"]
    click.echo(f"{len(lefts)} x {len(rights)} products, threshold {report['threshold']} chosen on "
               f"{report['calibration_items']} left items, {time.perf_counter() - started:.1f} s\n", err=True)
    click.echo("| decision (held-out half) | precision | recall | F1 | F0.5 |")
    click.echo("| --- | --- | --- | --- | --- |")
    t = report["threshold"]
    rows = [(test["rule"], "textual rule alone"), (test["threshold"], f"content score >= {t} alone"),
            (test["threshold_without_veto"], f"rule or content score >= {t}, numbers not checked"),
            (test["rule_or_threshold"], f"rule or content score >= {t} unless numbers differ (the worker's)")]
    rows += [(s, f"rule or content score >= {c} unless numbers differ") for c, s in report["test_curve"].items()]
    for s, label in rows:
        click.echo(f"| {label} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['f0.5']:.4f} |")
    click.echo(json.dumps(report))
