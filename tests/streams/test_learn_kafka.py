"""The learning loop on a real broker: labels in, a version promoted, the worker rolled over to it
with its blend; then a run refused and a run skipped, each recorded on ``simstream-models``.

The catalog and the labels are 120 true Amazon-Google matches (repository data) and 60
unmatched products. The model budget is tiny (a few steps, one layer trained), so the promote
run is asked to promote whatever does not lose by more than 100 points (``--min-gain -1``)
and the refusal run to win by 100 points (``SIMSTREAM_LEARN_MIN_GAIN=1``): what is under
test is the loop and its records, not the size of the gain, which the benchmark measures
(docs/quality.md, `tests/bench/bench_learn.py`).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from encoders.export import list_versions, version_blend
from serving.scoring import content_score
from streams.kafka_io import create_topics, read_topic
from streams.settings import Settings
from streams.worker import recommender_config
from tests.support import WorkerProcess, send, send_products, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "amazon-google-titles"
N_PAIRS = 120
N_UNMATCHED = 60
TINY = ["--epochs", "1", "--max-steps", "3", "--batch-size", "16", "--freeze-layers", "5", "--max-length", "16",
        "--hard-negatives", "1"]


def _rows(name: str) -> dict[str, dict[str, str]]:
    with (DATA / name).open(encoding="utf-8", newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def _catalog() -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    amazon, google = _rows("amazon.csv"), _rows("google.csv")
    with (DATA / "truth.csv").open(encoding="utf-8", newline="") as handle:
        truth = [(r["idAmazon"], r["idGoogleBase"]) for r in csv.DictReader(handle)]
    pairs, used = [], set()
    for a, g in truth:
        if a in amazon and g in google and a not in used and g not in used:
            pairs.append((a, g))
            used |= {a, g}
        if len(pairs) == N_PAIRS:
            break
    unmatched = [g for g in sorted(google) if g not in {x for _, x in truth}][:N_UNMATCHED]
    ts = time.time() - 3600
    events = []
    for pid in [x for pair in pairs for x in pair] + unmatched:
        row = amazon.get(pid) or google[pid]
        events.append({"op": "upsert", "product_id": pid, "title": row["title"], "brand": row["manufacturer"] or None,
                       "price": 19.0, "ts": ts})
    return events, pairs


def _learn(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "streams.cli", "learn", *args], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _values(settings: Settings, topic: str) -> list[Any]:
    return [r.value for r in read_topic(settings, topic)]


def test_learn_promotes_a_version_the_worker_adopts_then_refuses_and_skips(
    model_base: Path, tmp_path: Path, isolated_env: dict[str, str], settings_for: Callable[..., Settings],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    import os

    models = tmp_path / "models" / "minilm"
    models.mkdir(parents=True)
    (models / "1").symlink_to(model_base / "1", target_is_directory=True)
    env = {"SIMSTREAM_ENCODER": "local", "SIMSTREAM_MODEL_BASE": str(models), "SIMSTREAM_MODEL_POLL_INTERVAL_S": "1",
           "SIMSTREAM_SNAPSHOT_INTERVAL_S": "0", "SIMSTREAM_LEARN_INTERVAL_S": "0",
           "SIMSTREAM_LEARN_MIN_NEW_PAIRS": "0", "SIMSTREAM_LEARN_MIN_GAIN": "1",
           "SIMSTREAM_LEARN_MAX_STEPS": "3", "SIMSTREAM_LEARN_FREEZE_LAYERS": "5"}
    settings = settings_for(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    worker = worker_factory(**env)
    worker.wait_ready(timeout=180)

    products, pairs = _catalog()
    send_products(settings, products)
    wait_for(lambda: worker.get("/stats")[1]["events"] >= len(products), 180, "the catalog", worker, every=0.5)

    labels = [(f"{a}|{b}", json.dumps({"left_id": a, "right_id": b, "label": 1}).encode()) for a, b in pairs]
    negatives = [(pairs[i][0], pairs[i + 1][1]) for i in range(5)]
    labels += [(f"{a}|{b}", json.dumps({"left_id": a, "right_id": b, "label": False}).encode()) for a, b in negatives]
    labels += [("bad-1", b"{not json"), ("bad-2", json.dumps({"left_id": "x", "right_id": "y", "label": 7}).encode())]
    send(settings, settings.topic_product_labels, labels)

    # 1. The CLI promotes version 2; the worker's model poll rolls over to it and takes its blend.
    cli_env = {**os.environ, **isolated_env, **env}
    record = _learn(cli_env, "--min-gain", "-1", *TINY)
    assert record["decision"] == "promoted" and record["version"] == 2, record
    assert record["pairs"]["by_source"] == {"labelled": N_PAIRS} and record["pairs"]["labels"] == {
        "positive": N_PAIRS, "negative": 5}
    assert record["pairs"]["train"] > 0 and record["pairs"]["test"] > 0
    for model in ("live", "candidate"):
        assert 0 <= record["heldout"][model]["hybrid"]["hit@1"] <= 1
    assert record["heldout"]["tfidf-char"]["queries"] == record["heldout"]["live"]["hybrid"]["queries"] > 0
    assert record["heldout"]["tfidf-word"]["queries"] == record["heldout"]["tfidf-char"]["queries"]
    assert list_versions(models) == [1, 2] and not (models / ".learn-staging").exists()
    blend = version_blend(models, 2)
    assert blend is not None and record["blend"] == {"lexical_weight": blend.lexical_weight,
                                                     "lexical_floor": blend.lexical_floor,
                                                     "behavior_weight": blend.behavior_weight}
    letters = [v for v in _values(settings, settings.topic_dead_letters) if v["source_topic"] == settings.topic_product_labels]
    assert len(letters) == 2 and any("'label' must be 0, 1, true or false" in v["error"] for v in letters), letters

    wait_for(lambda: worker.get("/health")[1]["model_version"] == "minilm/2"
             and worker.get("/health")[1]["rollover"]["phase"] == "done", 180, "the rollover to version 2", worker,
             every=0.5)
    health = worker.get("/health")[1]
    assert health["blend"] == record["blend"], health
    assert "carries its own blend" in worker.log_tail(400) or record["blend"] == {
        "lexical_weight": settings.lexical_weight, "lexical_floor": settings.lexical_floor,
        "behavior_weight": settings.behavior_weight}
    # The republished lists are scored with version 2's blend.
    config = blend.apply(recommender_config(settings))
    checked = 0
    for pid in [a for a, _ in pairs[:20]]:
        body = worker.get(f"/similar/{pid}")[1]
        assert body["model_version"] == "minilm/2", body
        for item in body["items"]:
            assert abs(item["content"] - content_score(item["dense"], item["lexical"], config)) < 1e-9, item
            checked += 1
    assert checked >= 100

    # 2. The worker's own run (the admin action; the timer starts the same process) is refused:
    #    it must win by 100 points. Nothing is added to the model base; the metrics say so.
    request = urllib.request.Request(worker.web + "/admin/learn", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read()) == {"learn": "started"}
    wait_for(lambda: (worker.get("/health")[1].get("learn") or {}).get("decision") == "refused", 400,
             "the refused run", worker, every=0.5)
    learn = worker.get("/health")[1]["learn"]
    assert learn["version"] is None and "< 1" in learn["reason"], learn
    run_log = (Path(worker.env["SIMSTREAM_DATA_DIR"]) / "learn.log").read_text()
    assert "trainable layers 1/6" in run_log, "the run takes SIMSTREAM_LEARN_FREEZE_LAYERS"
    assert list_versions(models) == [1, 2]
    metrics = urllib.request.urlopen(worker.web + "/metrics", timeout=5).read().decode()
    assert 'simstream_learn_runs_total{decision="refused"} 1.0' in metrics
    assert 'simstream_learn_heldout_hit_at_1{model="candidate"}' in metrics
    assert 'simstream_learn_pairs{source="labelled"} 120.0' in metrics

    # 3. No new pairs since: the next run is skipped without training (in this process: the
    #    command itself was shown above, and a skip decides before any model is loaded).
    from encoders.training.learn import LearnConfig
    from streams.learn import run_learn

    skipped = run_learn(settings, LearnConfig(min_new_pairs=10), recommender_config(settings))
    assert skipped["decision"] == "skipped" and "0 new pairs" in skipped["reason"], skipped

    runs = _values(settings, settings.topic_models)
    assert [r["decision"] for r in runs] == ["promoted", "refused", "skipped"]
    assert runs[1]["live_version"] == 2 and runs[0]["live_version"] == 1
    # The malformed labels were dead-lettered once, by the first run that read them.
    letters = [v for v in _values(settings, settings.topic_dead_letters) if v["source_topic"] == settings.topic_product_labels]
    assert len(letters) == 2
