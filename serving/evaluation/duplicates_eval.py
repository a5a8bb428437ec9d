"""Calibrating ``duplicate_threshold`` on labelled same-product pairs (numpy only).

The labelled set is two listings of one catalog (Amazon-Google: each truth pair is one
product listed twice). Every left x right pair is scored the way ``serving.duplicates``
decides a pair: the textual rule, and the content score against the threshold. The left
items are split in two halves at random (by item, so no left listing is in both); the
threshold is the one with the best F1 on the first half, and precision, recall and F1 are
reported on the other. "Best" is the F-beta score: beta 0.5 (the default of ``simstream
eval duplicates``) weighs precision twice as much as recall, because a pair on the
``duplicates`` topic is acted upon (merged, hidden) and a wrong one costs more than a
missed one; beta 1 is plain F1. Only left-right pairs are labelled, so pairs within one side are
left out (unlabelled duplicates there would count as false positives).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.catalog import Product
from serving.config import RecommenderConfig
from serving.duplicates import numbers_differ
from serving.index import normalize_rows
from serving.lexical import LexicalModel, cosine_many
from serving.scoring import blend, profile, variants
from serving.text import product_text

#: Thresholds tried on the calibration half.
GRID = tuple(round(0.30 + 0.005 * i, 3) for i in range(141))


@dataclass(frozen=True, slots=True)
class PairTable:
    """Every left x right pair: content score, whether the textual rule fires, the label."""

    left: list[str]
    right: list[str]
    content: np.ndarray  # float64 (left, right)
    rule: np.ndarray  # bool (left, right)
    veto: np.ndarray  # bool (left, right): titles whose numbers differ (``numbers_differ``)
    truth: np.ndarray  # bool (left, right)

    def decide(self, rows: np.ndarray, threshold: float) -> np.ndarray:
        """The worker's decision for the pairs of ``rows``: the rule, or the score unless vetoed."""
        return self.rule[rows] | ((self.content[rows] >= threshold) & ~self.veto[rows])


@dataclass(frozen=True, slots=True)
class Scores:
    """Precision, recall and F1 of one decision on one set of pairs."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    def f_beta(self, beta: float) -> float:
        """F-beta: recall counts ``beta`` times as much as precision (F1 at beta 1)."""
        p, r = self.precision, self.recall
        b2 = beta * beta
        return (1 + b2) * p * r / (b2 * p + r) if p + r else 0.0

    @property
    def f1(self) -> float:
        return self.f_beta(1.0)

    def as_dict(self) -> dict[str, Any]:
        return {"precision": round(self.precision, 4), "recall": round(self.recall, 4), "f1": round(self.f1, 4),
                "f0.5": round(self.f_beta(0.5), 4), "tp": self.tp, "fp": self.fp, "fn": self.fn}


def pair_table(
    left: Sequence[Product],
    right: Sequence[Product],
    left_vectors: np.ndarray,
    right_vectors: np.ndarray,
    truth: Mapping[str, set[str]],
    config: RecommenderConfig,
) -> PairTable:
    """Score every pair with the IDF fitted on both sides (one shop's catalog) and the blend of
    ``config``, as the worker scores it."""
    lexical = LexicalModel.fit(product_text(p) for p in [*left, *right])
    left_lex = [lexical.vectorize(product_text(p)) for p in left]
    right_lex = [lexical.vectorize(product_text(p)) for p in right]
    lm = normalize_rows(left_vectors, config.dim).astype(np.float64)
    rm = normalize_rows(right_vectors, config.dim).astype(np.float64)
    dense = lm @ rm.T
    lex = np.array([cosine_many(v, right_lex) for v in left_lex], dtype=np.float64).reshape(len(left), len(right))
    w_dense, w_ev, floor = blend(config)
    content = w_dense * dense + w_ev * np.where(lex > floor, lex - floor, 0.0)
    right_pos = {p.product_id: j for j, p in enumerate(right)}
    by_key: dict[str, list[int]] = {}
    right_profiles = [profile(p) for p in right]
    for j, prof in enumerate(right_profiles):
        for key in prof.dup_keys:
            by_key.setdefault(key, []).append(j)
    rule = np.zeros(content.shape, dtype=bool)
    veto = np.zeros(content.shape, dtype=bool)
    labels = np.zeros(content.shape, dtype=bool)
    for i, product in enumerate(left):
        prof = profile(product)
        for j in np.flatnonzero(content[i] >= GRID[0]).tolist():  # below the grid a veto changes nothing
            veto[i, j] = numbers_differ(prof, right_profiles[j])
        for key in prof.dup_keys:
            for j in by_key.get(key, ()):
                if not variants(prof.group_id, right_profiles[j].group_id):
                    rule[i, j] = True
        for other in truth.get(product.product_id, ()):
            if other in right_pos:
                labels[i, right_pos[other]] = True
    return PairTable([p.product_id for p in left], [p.product_id for p in right], content, rule, veto, labels)


def split_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the left items (row indices), at random with ``seed``."""
    rows = list(range(n))
    random.Random(seed).shuffle(rows)
    half = n // 2
    return np.array(sorted(rows[:half]), dtype=np.int64), np.array(sorted(rows[half:]), dtype=np.int64)


def scores(predicted: np.ndarray, truth: np.ndarray) -> Scores:
    tp = int(np.count_nonzero(predicted & truth))
    return Scores(tp=tp, fp=int(np.count_nonzero(predicted & ~truth)), fn=int(np.count_nonzero(~predicted & truth)))


def choose_threshold(table: PairTable, rows: np.ndarray, beta: float = 0.5, grid: Sequence[float] = GRID) -> float:
    """The threshold of ``grid`` with the best F-beta of "rule or content >= t" on ``rows``
    (the highest of equals: fewer pairs called duplicates for the same score)."""
    truth = table.truth[rows]
    best = max(grid, key=lambda t: (scores(table.decide(rows, t), truth).f_beta(beta), t))
    return float(best)


#: Thresholds whose held-out numbers are reported beside the chosen one.
CURVE = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def calibrate(table: PairTable, seed: int, beta: float = 0.5) -> dict[str, Any]:
    """Choose the threshold on one half of the left items and report the other half."""
    calib, test = split_rows(len(table.left), seed)
    t = choose_threshold(table, calib, beta)
    content, rule, truth = table.content[test], table.rule[test], table.truth[test]
    return {
        "threshold": t,
        "beta": beta,
        "seed": seed,
        "calibration_items": len(calib),
        "test_items": len(test),
        "test_pairs": int(content.size),
        "test_true_pairs": int(np.count_nonzero(truth)),
        "calibration": scores(table.decide(calib, t), table.truth[calib]).as_dict(),
        "test": {
            "rule": scores(rule, truth).as_dict(),
            "threshold": scores(content >= t, truth).as_dict(),
            "threshold_without_veto": scores(rule | (content >= t), truth).as_dict(),
            "rule_or_threshold": scores(table.decide(test, t), truth).as_dict(),
        },
        "test_curve": {str(c): scores(table.decide(test, c), truth).as_dict() for c in CURVE},
    }
