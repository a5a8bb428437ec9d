"""The learning loop on a labelled stream (not collected by pytest).

    SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:39092 .venv/bin/python tests/bench/bench_learn.py

Replays Amazon-Google (``../shared/data/amazon-google``, Leipzig; see its SOURCE.txt) as a shop
would: both catalogs through ``product-changes`` into a worker (in-process MiniLM), then the
1,300 true matches as ``product-labels``. ``--set giftcards`` does the same with the Amazon
gift cards (``../shared/data/amazon-giftcards``, see its SOURCE.txt) and their also_view and
also_buy links as positive labels (related items, so hit@10 is what counts there). Then ``simstream learn`` runs once with its defaults
(its own process, as the worker's timer starts it) and the worker's model poll rolls over to
the version it promotes. Reported: the run's decision, its held-out table (live version,
candidate, char TF-IDF; the test items are in no training or validation pair), the time of
each phase, and the target of issue #15: the promoted version's held-out hit@1 at least 3
points above char TF-IDF's. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.harness import SHARED, load_catalog, start_worker

QUICK_ARGS = ["--pairs", "200", "--max-steps", "5"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="dataset", choices=("amazon-google", "giftcards"), default="amazon-google",
                    help="amazon-google: the true matches as labels; giftcards: the also_view and also_buy "
                         "links of ../shared/data/amazon-giftcards as labels (related items, judged at hit@10)")
    ap.add_argument("--data", type=Path, default=None, help="The set's folder (default: under ../shared/data).")
    ap.add_argument("--pairs", type=int, default=None, help="Use only the first N labelled pairs (smoke runs).")
    ap.add_argument("--max-steps", type=int, default=None, help="Training budget (SIMSTREAM_LEARN_MAX_STEPS).")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from encoders.export import list_versions
    from streams.cli.eval_commands import leipzig_rows, leipzig_to_upserts
    from streams.kafka_io import producer
    from streams.records import iso

    if args.dataset == "giftcards":
        from serving.evaluation.related_eval import convert_amazon_meta

        data = args.data or SHARED / "amazon-giftcards"
        catalog, links = convert_amazon_meta(data / "meta_Gift_Cards.json.gz")
        labels = sorted({(min(a, b), max(a, b)) for a, b, _kind in links})[: args.pairs]
    else:
        data = args.data or SHARED / "amazon-google"
        amazon, _ = leipzig_to_upserts(data / "Amazon.csv")
        google, _ = leipzig_to_upserts(data / "GoogleProducts.csv")
        catalog = amazon + google
        mapping = sorted(data.glob("*perfectMapping*.csv"))[0]
        rows = [[v.strip() for v in row.values() if v is not None][:2] for row in leipzig_rows(mapping)]
        labels = [(a, b) for a, b in rows if a and b][: args.pairs]

    scratch = Path(tempfile.mkdtemp(prefix="bench-learn-"))
    source = Path(os.environ.get("SIMSTREAM_MODEL_BASE", "~/.cache/simstream/models/minilm")).expanduser()
    models = scratch / "models" / "minilm"
    models.mkdir(parents=True)
    (models / "1").symlink_to((source / "1").resolve(), target_is_directory=True)
    extra = {"SIMSTREAM_MODEL_BASE": str(models), "SIMSTREAM_MODEL_POLL_INTERVAL_S": "2",
             "SIMSTREAM_LEARN_INTERVAL_S": "0", "SIMSTREAM_SNAPSHOT_INTERVAL_S": "0"}
    if args.max_steps:
        extra["SIMSTREAM_LEARN_MAX_STEPS"] = str(args.max_steps)
    os.environ["SIMSTREAM_MODEL_BASE"] = str(models)
    bench = start_worker("learn", scratch, encoder="local", **extra)
    try:
        load_s = load_catalog(bench, catalog)
        print(f"catalog: {len(catalog)} products through product-changes, embedded, indexed and listed in "
              f"{load_s:.0f} s")
        kafka = producer(bench.settings)
        for a, b in labels:
            kafka.send(bench.settings.topic_product_labels, key=f"{a}|{b}".encode(),
                       value=json.dumps({"left_id": a, "right_id": b, "label": 1, "ts": iso(time.time())}).encode())
        kafka.flush()
        kafka.close()
        print(f"labels: {len(labels)} labelled pairs on {bench.settings.topic_product_labels}")

        env = {**os.environ, **bench.worker.env}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "streams.cli", "learn"], env=env, capture_output=True,
                              text=True, check=False)
        learn_s = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"simstream learn failed:\n{done.stderr[-3000:]}")
        record: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"simstream learn: {record['decision']} in {learn_s:.0f} s: {record['reason']}")

        swap_s = None
        if record["decision"] == "promoted":
            started = time.monotonic()
            while time.monotonic() - started < 1800:
                health = bench.worker.get("/health", timeout=30)[1]
                if health["model_version"] == f"minilm/{record['version']}" and health["rollover"]["phase"] == "done":
                    swap_s = time.monotonic() - started
                    break
                time.sleep(1.0)
            print(f"worker rolled over to version {record['version']} (blend {record['blend']}) in "
                  f"{swap_s if swap_s is None else round(swap_s)} s after the promotion")
    finally:
        bench.worker.stop()

    held = record.get("heldout") or {}
    rows = [("live version (zero-shot), hybrid", held.get("live", {}).get("hybrid")),
            ("live version (zero-shot), encoder alone", held.get("live", {}).get("encoder")),
            ("candidate (fine-tuned), hybrid with its calibrated blend", held.get("candidate", {}).get("hybrid")),
            ("candidate (fine-tuned), encoder alone", held.get("candidate", {}).get("encoder")),
            ("char TF-IDF (char_wb 2-5, sublinear)", held.get("tfidf-char")),
            ("word TF-IDF (1-2, sublinear)", held.get("tfidf-word"))]
    print("\n| held-out test items | queries | hit@1 | hit@10 | MRR@10 |\n| --- | --- | --- | --- | --- |")
    for name, scores in rows:
        if scores:
            print(f"| {name} | {scores['queries']} | {scores['hit@1']:.4f} | {scores['hit@k']:.4f} | "
                  f"{scores['mrr@k']:.4f} |")
    tuned = (held.get("candidate") or {}).get("hybrid", {}).get("hit@1")
    tfidf = (held.get("tfidf-char") or {}).get("hit@1")
    margin = None if tuned is None or tfidf is None else round(100 * (tuned - tfidf), 1)
    print(f"\nfine-tuned hybrid vs char TF-IDF on the held-out items, hit@1: {margin:+} points (target on "
          f"amazon-google: >= +3)" if margin is not None else "\nno held-out table: the run did not train")
    print(json.dumps({
        "set": args.dataset, "products": len(catalog), "labels": len(labels), "decision": record["decision"],
        "version": record.get("version"), "versions": list_versions(models), "pairs": record.get("pairs"),
        "blend": record.get("blend"), "heldout": held, "margin_over_tfidf_char_points": margin,
        "target_met": (margin is not None and margin >= 3 and record["decision"] == "promoted")
        if args.dataset == "amazon-google" else None,
        "catalog_s": round(load_s), "learn_s": round(learn_s), "rollover_s": None if swap_s is None else round(swap_s),
    }))


if __name__ == "__main__":
    main()
