"""Behaviour evaluation commands: ``eval sessions``.

``simstream eval sessions`` replays a training click log through the same ``BehaviorModel``
the stream uses and scores next-item prediction against popularity and plain item-kNN; the
last stdout line is one JSON list of ``{"method", "hr@K", "mrr@K", "n"}`` objects.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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
    from serving.sessions_eval import (
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
