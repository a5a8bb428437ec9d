"""Offer matching on a labelled set: what ``simstream eval offers`` measures, and the calibration
the worker's settings take.

Each offer (a left product of a matching set) is matched against the whole catalog (the right
products) by ``serving.offers.OfferMatcher``, the stream's own code path, giving its best own
product and content score. Then, on labelled offers:

* an offer is **correct** when its best product is one of its true matches;
* at a confidence threshold ``t``, it is **predicted** a match when its confidence is at least
  ``t``; **precision** is the share of predicted offers that are correct, **recall** the share
  of offers *with a true match in the catalog* that are predicted and correct, F1 their
  harmonic mean. An offer without any true match is a negative: predicting it is a false
  positive, so the threshold has to learn to say ``no_match``;
* **calibration** (``fit_logistic``): a logistic regression from the content score, and with
  ``use_price`` the log price gap of the offer and its best product (``serving.offers.
  log_price_gap``; an unknown gap counts as the validation offers' median), to the
  probability that the best product is correct (Platt scaling: smoothed targets, Newton's
  method with a little L2), fitted on the validation offers; ``choose_threshold`` then picks
  the confidence of best F1 on them. Both are then applied, unchanged, to the test offers.

numpy only, like the rest of the core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from serving.errors import InvalidInput
from serving.offers import MAX_LOG_PRICE_GAP, Calibration, Candidate, Offer, OfferMatcher
from serving.recommender import Recommender

#: Published anchors for Amazon-Google as a pairwise task (F1 on its candidate-pair test set).
ANCHORS = (("Ditto (Li et al., VLDB 2021)", 75.6), ("GPT-4-class prompting (Peeters et al., 2023/24)", 78.0))


def best_matches(core: Recommender, offers: Sequence[Offer], vectors: np.ndarray) -> list[Candidate]:
    """The best own product of every offer, as the worker's ``OfferMatcher`` finds it."""
    if len(offers) != len(vectors):
        raise InvalidInput(f"best_matches: {len(offers)} offers but {len(vectors)} vectors")
    matcher = OfferMatcher(Calibration(1.0, 0.0, 0.0), core.config)
    matcher.apply(core, list(zip(offers, vectors, strict=True)))
    return [matcher.matches[o.key].candidate for o in offers]


def fit_logistic(features: np.ndarray, labels: Sequence[bool], *, l2: float = 1e-3,
                 iterations: int = 100) -> np.ndarray:
    """Weights ``w`` (one per feature column, then the intercept) of ``P(label) = 1 / (1 +
    exp(-(features·w[:-1] + w[-1])))``, fitted by Newton's method on the log loss with Platt's
    smoothed targets (finite when the classes separate) and a small L2 on the feature weights."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != y.size or y.size == 0 or y.min() == y.max():
        raise InvalidInput("fit_logistic needs one feature row per label, and both correct and incorrect examples")
    positives, negatives = y.sum(), y.size - y.sum()
    target = np.where(y > 0, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    penalty = np.diag([l2] * x.shape[1] + [1e-9])
    w = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (p - target) + penalty @ w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return w


def fit_calibration(scores: Sequence[float], gaps: Sequence[float | None] | None, labels: Sequence[bool]) -> Calibration:
    """The confidence curve (threshold 0: ``choose_threshold`` sets it) from content scores and,
    when ``gaps`` is given and some are known, log price gaps. A price weight that comes out
    negative (dearer looking likelier) is not kept: the curve is fitted on the score alone."""
    known = [g for g in (gaps or []) if g is not None]
    if gaps is not None and known:
        unknown = float(np.median(known))
        x = np.stack([np.asarray(scores, dtype=np.float64),
                      np.asarray([unknown if g is None else g for g in gaps], dtype=np.float64)], axis=1)
        w = fit_logistic(x, labels)
        if w[1] < 0 and w[0] > 0:
            return Calibration(float(w[0]), float(w[2]), 0.0, price_weight=float(-w[1]),
                               unknown_price_gap=min(unknown, MAX_LOG_PRICE_GAP))
    w = fit_logistic(np.asarray(scores, dtype=np.float64)[:, None], labels)
    return Calibration(float(w[0]), float(w[1]), 0.0)


@dataclass(frozen=True, slots=True)
class Scores:
    """Precision, recall and F1 at one threshold, with the counts behind them."""

    threshold: float
    precision: float
    recall: float
    f1: float
    predicted: int
    correct: int
    with_truth: int


def scores_at(confidences: Sequence[float], correct: Sequence[bool], has_truth: Sequence[bool],
              threshold: float) -> Scores:
    """Precision, recall and F1 when offers of confidence at least ``threshold`` are matches."""
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    predicted = conf >= threshold
    tp = int((predicted & ok).sum())
    n_pred = int(predicted.sum())
    n_truth = int(np.asarray(has_truth, dtype=bool).sum())
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_truth if n_truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Scores(threshold, precision, recall, f1, n_pred, tp, n_truth)


def choose_threshold(confidences: Sequence[float], correct: Sequence[bool], has_truth: Sequence[bool]) -> Scores:
    """The threshold of best F1 (ties: the higher threshold), tried at every confidence seen."""
    best: Scores | None = None
    for t in sorted(set(confidences), reverse=True):
        s = scores_at(confidences, correct, has_truth, t)
        if best is None or s.f1 > best.f1:
            best = s
    if best is None:
        raise InvalidInput("choose_threshold needs at least one offer")
    return best


@dataclass(frozen=True)
class OfferEvaluation:
    """One model's calibration on the validation offers and its scores on the test offers."""

    model: str
    calibration: Calibration
    valid: Scores
    test: Scores
    test_offers: int
    test_top1_correct: float

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model, "threshold": round(self.calibration.threshold, 4),
            "slope": round(self.calibration.slope, 4), "intercept": round(self.calibration.intercept, 4),
            "price_weight": round(self.calibration.price_weight, 4),
            "unknown_price_gap": round(self.calibration.unknown_price_gap, 4),
            "valid_f1": round(self.valid.f1, 4), "precision": round(self.test.precision, 4),
            "recall": round(self.test.recall, 4), "f1": round(self.test.f1, 4), "test_offers": self.test_offers,
            "test_offers_with_truth": self.test.with_truth, "test_predicted": self.test.predicted,
            "test_top1_correct": round(self.test_top1_correct, 4),
        }


def evaluate_offers(model: str, candidates: Mapping[str, Candidate], gaps: Mapping[str, float | None] | None,
                    truth: Mapping[str, set[str]], valid: Sequence[str], test: Sequence[str]) -> OfferEvaluation:
    """Calibrate on the ``valid`` offers and score the ``test`` offers (keys of ``candidates``);
    ``gaps`` (each offer's log price gap to its best product) adds the price to the curve."""

    def columns(keys: Sequence[str]) -> tuple[list[float], list[float | None], list[bool], list[bool]]:
        scores = [candidates[k].score if math.isfinite(candidates[k].score) else -1.0 for k in keys]
        key_gaps = [gaps.get(k) if gaps is not None else None for k in keys]
        correct = [candidates[k].product_id in truth.get(k, set()) for k in keys]
        return scores, key_gaps, correct, [bool(truth.get(k)) for k in keys]

    v_scores, v_gaps, v_correct, v_truth = columns(valid)
    curve = fit_calibration(v_scores, v_gaps if gaps is not None else None, v_correct)
    v_conf = [curve.confidence(s, g) for s, g in zip(v_scores, v_gaps, strict=True)]
    chosen = choose_threshold(v_conf, v_correct, v_truth)
    calibration = replace(curve, threshold=chosen.threshold)
    t_scores, t_gaps, t_correct, t_truth = columns(test)
    t_conf = [curve.confidence(s, g) for s, g in zip(t_scores, t_gaps, strict=True)]
    test_scores = scores_at(t_conf, t_correct, t_truth, chosen.threshold)
    top1 = sum(t_correct) / max(1, sum(t_truth))
    return OfferEvaluation(model, calibration, chosen, test_scores, len(test), top1)
