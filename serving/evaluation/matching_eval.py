"""Offline product-matching evaluation: hit@1, hit@k and MRR@k of a ranking against ground truth.

A *query* is a left product that has at least one true match on the right. A method ranks
the right side for every query; hit@k is the share of queries with a true match among the
first k, MRR@k the mean of 1/rank of the first true match (0 when none is in the first k).
numpy only: the core must not depend on scikit-learn.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.errors import InvalidInput

Truth = dict[str, set[str]]


@dataclass(frozen=True, slots=True)
class MatchingReport:
    """The metrics of one method on one matching set."""

    method: str
    n_queries: int
    k: int
    hit_at_1: float
    hit_at_k: float
    mrr_at_k: float

    def as_dict(self) -> dict[str, Any]:
        """The one-line JSON shape of ``simstream eval matching``."""
        return {
            "method": self.method,
            "n_queries": self.n_queries,
            "hit@1": round(self.hit_at_1, 4),
            f"hit@{self.k}": round(self.hit_at_k, 4),
            f"mrr@{self.k}": round(self.mrr_at_k, 4),
        }


def load_truth(path: Path) -> Truth:
    """``left_id,right_id`` CSV (header required) -> left id -> set of right ids."""
    truth: Truth = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"left_id", "right_id"} <= set(reader.fieldnames):
            raise InvalidInput(f"{path}: the truth CSV needs the header 'left_id,right_id'")
        for row in reader:
            left, right = (row["left_id"] or "").strip(), (row["right_id"] or "").strip()
            if left and right:
                truth.setdefault(left, set()).add(right)
    return truth


def top_k_by_cosine(query_vectors: np.ndarray, corpus_vectors: np.ndarray, k: int,
                    *, chunk: int = 1024) -> np.ndarray:
    """Indices of the k most similar corpus rows per query (unit rows: dot product = cosine)."""
    k = min(k, corpus_vectors.shape[0])
    out = np.empty((query_vectors.shape[0], k), dtype=np.int64)
    for start in range(0, query_vectors.shape[0], chunk):
        scores = query_vectors[start : start + chunk] @ corpus_vectors.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def evaluate_rankings(method: str, query_ids: Sequence[str], rankings: Sequence[Sequence[str]],
                      truth: Mapping[str, set[str]], k: int) -> MatchingReport:
    """Score one ranking of right ids per query against ``truth``."""
    if len(query_ids) != len(rankings):
        raise InvalidInput(f"{len(query_ids)} queries but {len(rankings)} rankings")
    if not query_ids:
        raise InvalidInput("no query has a true match: check that the truth CSV's ids match the files")
    hit1 = hitk = rr = 0.0
    for qid, ranked in zip(query_ids, rankings, strict=True):
        relevant = truth.get(qid, set())
        for rank, rid in enumerate(ranked[:k], start=1):
            if rid in relevant:
                hitk += 1
                rr += 1.0 / rank
                hit1 += rank == 1
                break
    n = len(query_ids)
    return MatchingReport(method, n, k, hit1 / n, hitk / n, rr / n)
