"""The offer-matching evaluation's arithmetic: the logistic calibration, the threshold of best
F1, and precision and recall with offers that have no true match."""

from __future__ import annotations

import numpy as np
import pytest

from serving.errors import InvalidInput
from serving.evaluation.offers_eval import choose_threshold, evaluate_offers, fit_calibration, scores_at
from serving.offers import Calibration, Candidate


def test_precision_counts_every_predicted_offer_and_recall_only_those_with_a_true_match() -> None:
    # Four offers: two correct, one wrong with a true match elsewhere, one without any true match.
    conf, correct, has_truth = [0.9, 0.8, 0.7, 0.6], [True, True, False, False], [True, True, True, False]
    s = scores_at(conf, correct, has_truth, 0.65)
    assert (s.predicted, s.correct, s.with_truth) == (3, 2, 3)
    assert s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(2 / 3)
    assert choose_threshold(conf, correct, has_truth).threshold == 0.8  # P 1, R 2/3: the best F1


def test_the_calibration_learns_that_a_price_gap_lowers_the_confidence() -> None:
    rng = np.random.default_rng(1)
    n = 400
    scores = rng.uniform(0.3, 1.0, n)
    gaps = rng.uniform(0.0, 2.0, n)
    correct = rng.uniform(size=n) < 1 / (1 + np.exp(-(8 * scores - 2 * gaps - 4)))
    curve = fit_calibration(scores.tolist(), [*gaps.tolist()[:-10], *[None] * 10], correct.tolist())
    assert 5 < curve.slope < 12 and 1 < curve.price_weight < 3.5
    assert 0 < curve.unknown_price_gap < 2
    assert curve.confidence(0.8, 0.0) > curve.confidence(0.8, 1.5)
    score_only = fit_calibration(scores.tolist(), None, correct.tolist())
    assert score_only.price_weight == 0.0 and score_only.slope > 0
    with pytest.raises(InvalidInput):
        fit_calibration([0.5, 0.6], None, [True, True])


def test_evaluate_offers_calibrates_on_validation_and_scores_the_test_half() -> None:
    truth = {f"o{i}": {f"p{i}"} for i in range(40)}
    candidates = {}
    for i in range(60):  # o40..o59 have no true match and score low; every tenth matched offer is wrong
        good = i < 40 and i % 10
        candidates[f"o{i}"] = Candidate(f"p{i}" if good else "px", 0.9 - (0.0 if good else 0.5) + i * 1e-4, 0.0, 0.0)
    keys = sorted(candidates)
    result = evaluate_offers("m", candidates, None, truth, keys[::2], keys[1::2])
    assert result.test.precision == 1.0 and result.test.recall == pytest.approx(18 / 20)
    assert isinstance(result.calibration, Calibration) and 0 < result.calibration.threshold < 1
    assert result.as_dict()["f1"] == round(result.test.f1, 4)
