"""Throughput of ``LocalEncoder`` on the demo catalog's texts (a benchmark, not a test).

    .venv/bin/python tests/bench/bench_encoder.py [--model-base DIR] [--reference-python /tmp/refenv/bin/python]

Texts: the demo catalog (``data/amazon-software/catalog.jsonl``: the 1,363 Amazon.csv products
of the Amazon-Google set), as titles alone and as the full ``product_text`` (title, brand;
what the worker embeds). Batch sizes 32
and 128, three rounds each, the best kept (the machine is shared). With ``--reference-python`` it runs the PyTorch
reference (sentence-transformers, same weights, same texts, same batch size and threads) in
that interpreter and prints the ratio.

Roofline: MiniLM-L6 costs ~21 MFLOP per token (2 x 10.6 M transformer weights; attention
adds <5% at these lengths); 2 AVX-512 cores peak at ~380 GFLOP/s fp32, i.e. ~18,000 tokens/s.
Tokens/s counts real tokens (with [CLS]/[SEP]), not padding.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[2]
PEAK_FLOPS = 380e9
FLOP_PER_TOKEN = 21e6
QUICK_ARGS = ["--batch", "32"]

REFERENCE = r"""
import json, sys, time, torch
from sentence_transformers import SentenceTransformer
texts, batch, threads, model_dir = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
m = SentenceTransformer(model_dir, device="cpu"); m.max_seq_length = 128
m.encode(texts[:64], batch_size=batch)
best = 1e9
for _ in range(3):
    t = time.perf_counter(); m.encode(texts, batch_size=batch, normalize_embeddings=True); best = min(best, time.perf_counter() - t)
print(len(texts) / best)
"""


def demo_texts(catalog: Path) -> dict[str, list[str]]:
    """Titles and full product texts of the demo catalog (product-changes JSONL)."""
    sys.path.insert(0, str(ROOT))
    from serving.catalog import Product, freeze_attributes
    from serving.text import product_text

    products = []
    with catalog.open(encoding="utf-8") as handle:
        for line in handle:
            r = json.loads(line)
            products.append(Product(product_id=r["product_id"], title=r["title"], ts=0.0,
                                    description=r.get("description") or "", brand=r.get("brand"),
                                    category=tuple(r.get("category") or ()),
                                    attributes=freeze_attributes(r.get("attributes"))))
    return {"title": [p.title for p in products], "full": [product_text(p) for p in products]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=ROOT / "data" / "amazon-software" / "catalog.jsonl",
                        help="the demo catalog (Amazon.csv of Amazon-Google as product-changes JSONL)")
    parser.add_argument("--model-base", type=Path, default=os.environ.get("SIMSTREAM_MODEL_BASE"),
                        help="exported model [SIMSTREAM_MODEL_BASE]; exported to a temp dir if it holds none")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-python", default=None, help="interpreter with sentence-transformers")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from encoders.export import export_saved_model, list_versions
    from encoders.local import LocalEncoder

    texts = demo_texts(args.catalog)
    base = args.model_base
    if base is None or not list_versions(base):
        base = base or Path(tempfile.mkdtemp(prefix="bench-model-")) / "minilm"
        export_saved_model(base)
    rows = []
    for batch in args.batch:
        encoder = LocalEncoder(base, batch_size=batch, intra_op_threads=args.threads)
        encoder.encode_blocking(texts["title"][:batch])  # load the model
        tokenizer = encoder._ensure_loaded()[1]
        for kind, items in texts.items():
            tokens = sum(len(t) for t in tokenizer.encode(items))
            encoder.encode_blocking(items)  # warm every padded shape once
            best = min(_timed(encoder, items) for _ in range(3))
            rate, tok_rate = len(items) / best, tokens / best
            row = {"texts": kind, "batch": batch, "texts_per_s": round(rate), "tokens_per_text": round(tokens / len(items), 1),
                   "tokens_per_s": round(tok_rate), "gflops": round(tok_rate * FLOP_PER_TOKEN / 1e9, 1),
                   "share_of_peak": round(tok_rate * FLOP_PER_TOKEN / PEAK_FLOPS, 3)}
            if args.reference_python:
                row["reference_texts_per_s"] = round(_reference(args.reference_python, items, batch, args.threads))
                row["ratio"] = round(rate / row["reference_texts_per_s"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| texts | batch | tokens/text | texts/s | tokens/s | GFLOP/s | of 380 GFLOP/s peak |"
          + (" reference texts/s | ratio |" if args.reference_python else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.reference_python else ""))
    for r in rows:
        line = (f"| {r['texts']} | {r['batch']} | {r['tokens_per_text']} | {r['texts_per_s']} | {r['tokens_per_s']} "
                f"| {r['gflops']} | {r['share_of_peak']:.0%} |")
        if args.reference_python:
            line += f" {r['reference_texts_per_s']} | {r['ratio']} |"
        print(line)
    print(json.dumps({"bench": "encoder", "threads": args.threads, "texts": len(texts["title"]), "rows": rows}))


def _timed(encoder: object, items: list[str]) -> float:
    started = time.perf_counter()
    encoder.encode_blocking(items)  # type: ignore[attr-defined]
    return time.perf_counter() - started


def _reference(python: str, texts: list[str], batch: int, threads: int) -> float:
    from encoders.tokenizer import weights_dir

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(texts, handle)
    out = subprocess.run([python, "-c", REFERENCE, handle.name, str(batch), str(threads), str(weights_dir())],
                         capture_output=True, text=True, check=True)
    os.unlink(handle.name)
    return float(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
