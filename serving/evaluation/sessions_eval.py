"""Offline next-item evaluation on session click logs (yoochoose layout).

Every training click becomes a ``view`` ``UserEvent`` (user = session = ``SessionId``) and is
replayed through the same ``BehaviorModel`` the stream uses. For every prefix of every test
session the next item is predicted; HR@k and MRR@k are averaged over all prefixes.

Baselines computed in the same run:

* ``popularity``: the k most clicked training items (excluding the current item).
* ``item-knn``: plain item-to-item co-occurrence of the *last* item: the number of training
  sessions containing both items, no decay, no normalisation, no position weights.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.behavior import BehaviorConfig, BehaviorModel
from serving.catalog import UserEvent, UserEventType
from serving.errors import InvalidInput

Sessions = list[tuple[str, list[tuple[str, float]]]]
Predictor = Callable[[Sequence[str], int], list[str]]


@dataclass(frozen=True)
class EvalResult:
    """One method's scores over ``n`` predictions."""

    method: str
    hr: float
    mrr: float
    n: int


def load_sessions(path: Path) -> Sessions:
    """Read ``SessionId<TAB>ItemId<TAB>Time`` (header line) into time-ordered sessions."""
    by: dict[str, list[tuple[str, float]]] = defaultdict(list)
    with path.open(newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:3]] != ["SessionId", "ItemId", "Time"]:
            raise InvalidInput(f"{path}: expected header SessionId, ItemId, Time")
        for i, row in enumerate(rows, start=2):
            if len(row) < 3:
                raise InvalidInput(f"{path}:{i}: expected 3 tab-separated fields")
            try:
                by[row[0]].append((row[1], float(row[2])))
            except ValueError as e:
                raise InvalidInput(f"{path}:{i}: bad Time {row[2]!r}") from e
    return [(sid, sorted(clicks, key=lambda c: c[1])) for sid, clicks in by.items()]


def train_behavior(train: Sessions, config: BehaviorConfig | None = None) -> BehaviorModel:
    """Replay training sessions, in global time order, through ``BehaviorModel.ingest``."""
    model = BehaviorModel(config)
    events = [
        UserEvent(user_id=sid, type=UserEventType.VIEW, ts=ts, product_id=item, session_id=sid)
        for sid, clicks in train
        for item, ts in clicks
    ]
    events.sort(key=lambda e: (e.ts, e.session_id or "", e.product_id or ""))
    model.ingest_all(events)
    return model


def behavior_predictor(model: BehaviorModel, *, history: int = 5, fanout: int = 100) -> Predictor:
    """Sum of normalised partner scores of the last ``history`` distinct items, newer weigh more."""

    def predict(prefix: Sequence[str], k: int) -> list[str]:
        seen: list[str] = []
        for it in reversed(prefix):
            if it not in seen:
                seen.append(it)
            if len(seen) >= history:
                break
        scores: dict[str, float] = defaultdict(float)
        for pos, it in enumerate(seen):
            w = 1.0 / (pos + 1)
            for p, s in model.partners(it, "view", fanout):
                scores[p] += w * s
        scores.pop(prefix[-1], None)
        return [p for p, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]

    return predict


def popularity_predictor(train: Sessions) -> Predictor:
    """The most clicked training items."""
    top = [
        it
        for it, _ in sorted(
            Counter(it for _, c in train for it, _ in c).items(), key=lambda kv: (-kv[1], kv[0])
        )
    ]

    def predict(prefix: Sequence[str], k: int) -> list[str]:
        return [it for it in top[: k + 1] if it != prefix[-1]][:k]

    return predict


def item_knn_predictor(train: Sessions) -> Predictor:
    """Plain co-occurrence of the last item: number of sessions holding both items."""
    co: dict[str, Counter[str]] = defaultdict(Counter)
    for _, clicks in train:
        items = sorted({it for it, _ in clicks})
        for a in items:
            for b in items:
                if a != b:
                    co[a][b] += 1

    def predict(prefix: Sequence[str], k: int) -> list[str]:
        row = co.get(prefix[-1])
        if not row:
            return []
        return [it for it, _ in sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]

    return predict


def evaluate(test: Sessions, predictors: dict[str, Predictor], k: int = 20) -> list[EvalResult]:
    """HR@k and MRR@k of each predictor over every prefix of every test session."""
    hits = dict.fromkeys(predictors, 0.0)
    rr = dict.fromkeys(predictors, 0.0)
    n = 0
    for _, clicks in test:
        items = [it for it, _ in clicks]
        for i in range(1, len(items)):
            prefix, target = items[:i], items[i]
            n += 1
            for name, pred in predictors.items():
                ranked = pred(prefix, k)
                if target in ranked:
                    hits[name] += 1
                    rr[name] += 1.0 / (ranked.index(target) + 1)
    return [EvalResult(m, hits[m] / n if n else 0.0, rr[m] / n if n else 0.0, n) for m in predictors]
