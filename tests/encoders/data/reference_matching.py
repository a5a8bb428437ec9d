"""Run the reference model (sentence-transformers) on the exact texts of ``simstream eval matching``.

Throwaway environment only (needs torch), like ``make_golden.py``::

    .venv/bin/simstream eval matching ... --method encoder --text title+brand+price --dump-texts /tmp/t.json
    /tmp/refenv/bin/python tests/encoders/data/reference_matching.py /tmp/t.json --model-dir MODEL_DIR

Prints the same JSON line as the port's evaluation, so the two can be compared (±0.01 hit@1),
and the reference's encoding throughput on these texts.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dump")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    with open(args.dump, encoding="utf-8") as fh:
        data = json.load(fh)
    model = SentenceTransformer(args.model_dir, device="cpu")
    model.max_seq_length = 128
    q_ids, q_texts = zip(*data["queries"], strict=True)
    c_ids, c_texts = zip(*data["corpus"], strict=True)
    started = time.perf_counter()
    q = model.encode(list(q_texts), batch_size=32, normalize_embeddings=True)
    c = model.encode(list(c_texts), batch_size=32, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    scores = q @ c.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, : args.k]
    hit1 = hitk = rr = 0.0
    for qid, row in zip(q_ids, top, strict=True):
        relevant = set(data["truth"][qid])
        for rank, i in enumerate(row, start=1):
            if c_ids[i] in relevant:
                hitk += 1
                rr += 1 / rank
                hit1 += rank == 1
                break
    n = len(q_ids)
    print(f"reference: {len(q_texts) + len(c_texts)} texts in {seconds:.1f} s "
          f"({(len(q_texts) + len(c_texts)) / seconds:.0f} texts/s, batch 32, {args.threads} threads)")
    print(json.dumps({"method": "reference-st", "template": data["template"], "n_queries": n,
                      "hit@1": round(hit1 / n, 4), f"hit@{args.k}": round(hitk / n, 4),
                      f"mrr@{args.k}": round(rr / n, 4)}))


if __name__ == "__main__":
    main()
