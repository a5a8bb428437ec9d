"""Offline evaluation of content-only related-item lists against behaviour truth pairs.

Truth is ``product_id,related_id,kind`` rows (``kind`` is ``view`` or ``buy``, e.g. Amazon
``also_view`` / ``also_buy``). For every product with at least one truth pair of a kind, its
top-``k`` content list (itself excluded) is scored: hit@k = at least one true related item in
the list; nDCG@k with binary gains, ideal = ``min(#truth, k)`` hits at the top.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.errors import InvalidInput

KINDS = {"also_view": "view", "also_buy": "buy"}


@dataclass(frozen=True)
class RelatedResult:
    """hit@k and nDCG@k for one kind over ``n`` query products."""

    kind: str
    hit: float
    ndcg: float
    n: int


def convert_amazon_meta(path: Path) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """Amazon metadata JSON lines (gzip or plain) -> (upserts, truth rows).

    Only pairs whose both ends are in the file are kept; duplicate asins keep the first row.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    rows: dict[str, dict[str, Any]] = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}:{n}: not JSON ({e})") from e
            asin = str(obj.get("asin") or "").strip()
            if asin and str(obj.get("title") or "").strip() and asin not in rows:
                rows[asin] = obj
    upserts: list[dict[str, Any]] = []
    truth: list[tuple[str, str, str]] = []
    for asin, obj in rows.items():
        up: dict[str, Any] = {"op": "upsert", "product_id": asin, "title": str(obj["title"]).strip()[:500]}
        desc = " ".join(d for d in obj.get("description") or [] if isinstance(d, str)).strip()
        if desc:
            up["description"] = desc[:2000]
        if str(obj.get("brand") or "").strip():
            up["brand"] = str(obj["brand"]).strip()
        cats = [c for c in obj.get("category") or [] if isinstance(c, str) and c.strip()]
        if cats:
            up["category"] = list(dict.fromkeys(cats))
        price = str(obj.get("price") or "").replace("$", "").replace(",", "").strip()
        try:
            if price and float(price) > 0:
                up["price"] = float(price)
        except ValueError:
            pass  # ranges like "10.00 - 50.00" are not a price
        upserts.append(up)
        for field, kind in KINDS.items():
            for other in dict.fromkeys(obj.get(field) or []):
                if other in rows and other != asin:
                    truth.append((asin, other, kind))
    return upserts, truth


def load_truth(path: Path) -> dict[str, dict[str, set[str]]]:
    """``product_id,related_id,kind`` CSV (header optional) -> kind -> product -> related set."""
    out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    with path.open(newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if n == 1 and row[:3] == ["product_id", "related_id", "kind"]:
                continue
            if len(row) < 3 or row[2] not in ("view", "buy"):
                raise InvalidInput(f"{path}:{n}: expected product_id,related_id,kind with kind view|buy")
            out[row[2]][row[0]].add(row[1])
    return out


def score_lists(
    lists: Mapping[str, Sequence[str]], truth: Mapping[str, Mapping[str, set[str]]], k: int
) -> list[RelatedResult]:
    """hit@k and nDCG@k per kind, over the truth products that have a list."""
    results = []
    for kind in sorted(truth):
        hits = ndcg = 0.0
        n = 0
        for pid, rel in truth[kind].items():
            if pid not in lists:
                continue
            n += 1
            ranked = list(lists[pid])[:k]
            gains = [1.0 if r in rel else 0.0 for r in ranked]
            hits += 1.0 if any(gains) else 0.0
            dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
            ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(rel), k)))
            ndcg += dcg / ideal
        results.append(RelatedResult(kind, hits / n if n else 0.0, ndcg / n if n else 0.0, n))
    return results
