"""Convert the Leipzig Amazon.csv (latin-1) to product-changes JSONL: `python make_catalog.py SRC OUT`.

A price of 0 in the source means "unknown" and is left out; every product starts in stock.
"""

from __future__ import annotations

import csv
import json
import sys


def main(src: str, out: str) -> None:
    with open(src, encoding="latin-1", newline="") as handle, open(out, "w", encoding="utf-8") as sink:
        for row in csv.DictReader(handle):
            product = {"op": "upsert", "product_id": row["id"].strip(), "title": row["title"].strip()}
            if row["description"].strip():
                product["description"] = row["description"].strip()
            if row["manufacturer"].strip():
                product["brand"] = row["manufacturer"].strip()
            price = float(row["price"] or 0)
            if price > 0:
                product["price"] = price
                product["currency"] = "USD"
            product["in_stock"] = True
            sink.write(json.dumps(product, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
