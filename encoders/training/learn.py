"""The learning loop: mine pairs, fine-tune, compare on held-out items, promote or refuse.

``simstream learn`` (``streams/learn.py``) reads what the stream carries and calls
``learn_once``; everything here works on plain values, so it is tested without Kafka:

1. **Pairs** (``mine_pairs``): co-view, co-cart and co-purchase partners from
   ``user-events`` (the behaviour model's normalised scores, so one shopper does not make a
   pair), ``group_id`` variants, and labelled pairs from ``product-labels``. A label is the
   last word on its pair: a negative label removes a mined positive and becomes a hard
   negative of both items.
2. **Enough new pairs?** The positives beyond the count the last training run had; below
   ``min_new_pairs`` the run is skipped (nothing is trained).
3. **Split by item** (``split_by_item``): a test share and a validation share of the items
   take no part in training; the test pairs decide, the validation pairs stop the training
   early and calibrate the blend.
4. **Hard negatives**: labelled negatives first, then for each training anchor the live
   model's nearest items that are not its partners and score below ``0.95`` of its partner
   (a margin against unlabelled duplicates, which would be false negatives).
5. **Fine-tune** (``encoders.training.finetune``) into a staging folder beside the model base.
6. **Calibrate** the dense/lexical weight and floor on the validation pairs with the
   candidate's vectors (a small grid; ties go to the blend in use), and the behaviour weight
   on time: behaviour learnt from the earlier events, judged on the co-occurrence of the
   later ones (``fit_behavior_weight``).
7. **Compare on the test items**: the live version with its blend, the candidate with the
   calibrated one, and char and word TF-IDF, each ranking every catalog product outside the
   training and validation items (hit@1, hit@k, MRR@k).
8. **Decide**: promote when the candidate's hybrid hit@1 beats the live one's by at least
   ``min_gain``; the version folder is then moved into the model base in one rename (TF
   Serving and the workers' poll see a complete version or none), and the workers roll over.
   Otherwise the staging folder is removed. Either way the ``LearnReport`` says why.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoders.training.finetune import FinetuneConfig, Log
from encoders.training.pairs import (
    NotEnoughPairs,
    Pair,
    PairBuilder,
    PairLabel,
    PairSet,
    behavior_pairs,
    group_pairs,
    split_by_item,
)
from serving.behavior import CHANNELS, BehaviorModel
from serving.catalog import Product, UserEvent
from serving.config import Blend, RecommenderConfig
from serving.errors import ConfigurationError, InvalidInput
from serving.evaluation.matching_eval import evaluate_rankings
from serving.lexical import LexicalModel, cosine_many
from serving.scoring import dense_scores
from serving.text import product_text

#: Where a run stages the candidate version: hidden from ``list_versions`` (not a number).
STAGING = ".learn-staging"
#: One learning run per model base at a time (the worker's timer and a scheduled CLI may meet).
LOCK = ".learn.lock"
#: A mined negative must score below this share of its anchor's partner (false-negative guard).
NEGATIVE_MARGIN = 0.95
#: The blend grid the calibration searches (lexical weight x floor).
BLEND_WEIGHTS = (0.0, 0.2, 0.4, 0.6, 0.8)
BLEND_FLOORS = (0.0, 0.2, 0.4, 0.6)
#: Fewer validation queries than this cannot tell blends apart: the live blend is kept.
MIN_CALIBRATION_QUERIES = 20
#: The behaviour weights the calibration tries, and the share of the events (by time) it
#: learns behaviour from; the later events are what the lists must foresee.
BEHAVIOR_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5)
BEHAVIOR_PAST_SHARE = 0.8


@dataclass(frozen=True)
class LearnConfig:
    """What a run needs to decide. Defaults suit a shop with a few thousand labelled or mined pairs."""

    min_new_pairs: int = 200
    min_gain: float = 0.01
    test_share: float = 0.3
    valid_share: float = 0.15
    k: int = 10
    behavior_min_score: float = 0.1
    channels: tuple[str, ...] = CHANNELS
    use_groups: bool = True
    hard_negatives: int = 3
    seed: int = 0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        if not 0 < self.test_share < 1 or not 0 < self.valid_share < 1:
            raise InvalidInput("test and validation shares must be in (0, 1)")
        if self.min_new_pairs < 0 or not -1 <= self.min_gain <= 1 or self.k < 1 or self.hard_negatives < 0:
            raise InvalidInput("min_new_pairs >= 0, min_gain in [-1, 1], k >= 1 and hard_negatives >= 0 are required")


@dataclass
class MinedPairs:
    """Positives (deduplicated, labels applied), negatives per item, counts by source."""

    positives: list[Pair]
    negatives: dict[str, set[str]]
    by_source: dict[str, int]
    labels: dict[str, int]


def mine_pairs(products: Mapping[str, Product], events: Iterable[UserEvent], labels: Iterable[PairLabel],
               config: LearnConfig) -> MinedPairs:
    """Every training signal the stream carries, as positive pairs and per-item negatives."""
    builder = PairBuilder(products)
    model = BehaviorModel()
    seen: set[str] = set()
    for event in events:
        model.ingest(event)
        if event.product_id:
            seen.add(event.product_id)
    builder.add_all(behavior_pairs(model, seen, channels=config.channels, min_score=config.behavior_min_score),
                    "behavior")
    if config.use_groups:
        builder.add_all(group_pairs(products.values()), "group")
    last: dict[tuple[str, str], PairLabel] = {}
    for label in labels:  # log order: the last label of a pair wins
        last[label.key] = label
    builder.add_all(((lb.left_id, lb.right_id) for lb in last.values() if lb.positive), "labelled")
    negative_keys = {key for key, lb in last.items() if not lb.positive and key[0] in products and key[1] in products}
    positives = [p for p in builder.pairs if p.key not in negative_keys]
    negatives: dict[str, set[str]] = {}
    for a, b in negative_keys:
        negatives.setdefault(a, set()).add(b)
        negatives.setdefault(b, set()).add(a)
    by_source: dict[str, int] = {}
    for p in positives:
        by_source[p.source] = by_source.get(p.source, 0) + 1
    counts = {"positive": sum(lb.positive for lb in last.values()),
              "negative": sum(not lb.positive for lb in last.values())}
    return MinedPairs(positives, negatives, by_source, counts)


# --- ranking on held-out items ------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """hit@1 / hit@k / MRR@k of one method on one query set."""

    queries: int
    hit_at_1: float
    hit_at_k: float
    mrr_at_k: float

    def as_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "hit@1": round(self.hit_at_1, 4), "hit@k": round(self.hit_at_k, 4),
                "mrr@k": round(self.mrr_at_k, 4)}


def _partners(pairs: Iterable[Pair]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in pairs:
        out.setdefault(p.left, set()).add(p.right)
        out.setdefault(p.right, set()).add(p.left)
    return out


def _score_rankings(queries: Sequence[str], rankings: Sequence[Sequence[str]], truth: Mapping[str, set[str]],
                    k: int) -> Scores:
    report = evaluate_rankings("", queries, rankings, truth, k)
    return Scores(report.n_queries, report.hit_at_1, report.hit_at_k, report.mrr_at_k)


def _pair_scores(q: str, others: Sequence[str], vectors: Mapping[str, np.ndarray],
                 lexical: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(dense, lexical) of ``q`` with each of ``others``, computed as the core computes them."""
    if not others:
        return np.zeros(0), np.zeros(0)
    dense = dense_scores(vectors[q], np.stack([vectors[c] for c in others]))
    return dense, np.asarray(cosine_many(lexical[q], [lexical[c] for c in others]))


def _content(blend: Blend, dense: np.ndarray, lexical: np.ndarray) -> np.ndarray:
    """``serving.scoring.content_score`` over arrays."""
    w, f = blend.lexical_weight, blend.lexical_floor
    return (1 - w) * dense + w / (1 - f) * np.where(lexical > f, lexical - f, 0.0)


class CandidateTable:
    """Per query: its dense top-``depth`` corpus items (itself excluded) with dense and lexical
    scores, so that any blend re-ranks them without searching again (the worker's two stages)."""

    def __init__(self, queries: Sequence[str], corpus: Sequence[str], vectors: Mapping[str, np.ndarray],
                 lexical: Mapping[str, Any], depth: int) -> None:
        self.queries = list(queries)
        self.corpus = list(corpus)
        matrix = np.stack([vectors[c] for c in self.corpus]).astype(np.float32)
        position = {c: i for i, c in enumerate(self.corpus)}
        qmat = np.stack([vectors[q] for q in self.queries]).astype(np.float32)
        depth = min(depth + 1, len(self.corpus))
        self.rows: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        for start in range(0, len(self.queries), 512):
            sims = qmat[start : start + 512] @ matrix.T
            for offset, row in enumerate(sims):
                q = self.queries[start + offset]
                if q in position:
                    row[position[q]] = -np.inf  # an item is not its own match
                top = np.argpartition(-row, depth - 1)[:depth]
                ids = [self.corpus[j] for j in top if np.isfinite(row[j])]
                self.rows.append((ids, *_pair_scores(q, ids, vectors, lexical)))

    def rank(self, blend: Blend | None) -> list[list[str]]:
        """Each query's candidates by content score under ``blend`` (dense alone when ``None``), ties by id."""
        out = []
        for ids, dense, lex in self.rows:
            score = dense if blend is None else _content(blend, dense, lex)
            order = sorted(range(len(ids)), key=lambda i: (-score[i], ids[i]))
            out.append([ids[i] for i in order])
        return out


def calibrate(table: CandidateTable, truth: Mapping[str, set[str]], k: int, current: Blend) -> tuple[Blend, Scores]:
    """The grid blend with the best hit@1 (then MRR@k) on ``table``; ties keep ``current`` or the nearest to it."""
    best_key: tuple[float, float, float] | None = None
    best: tuple[Blend, Scores] | None = None
    grid = [current] + [Blend(w, f, current.behavior_weight) for f in BLEND_FLOORS for w in BLEND_WEIGHTS]
    for blend in grid:
        scores = _score_rankings(table.queries, table.rank(blend), truth, k)
        distance = abs(blend.lexical_weight - current.lexical_weight) + abs(blend.lexical_floor - current.lexical_floor)
        key = (round(scores.hit_at_1, 9), round(scores.mrr_at_k, 9), -distance)
        if best_key is None or key > best_key:
            best_key, best = key, (blend, scores)
    assert best is not None
    return best


def fit_behavior_weight(events: Sequence[UserEvent], catalog: Sequence[str], vectors: Mapping[str, np.ndarray],
                        lexical: Mapping[str, Any], blend: Blend, k: int, depth: int,
                        min_score: float = 0.1) -> tuple[float, dict[str, Any]]:
    """The behaviour weight whose lists best foresee later co-occurrence, and what each scored.

    The events are cut in time: the behaviour model learns from the first
    ``BEHAVIOR_PAST_SHARE`` of them, and an item's *future partners* are its co-view, co-cart
    and co-purchase partners in the rest. Each item's list is ranked, as the worker ranks it,
    over its dense top-``depth`` plus its past behaviour partners by
    ``(1 - w) * content + w * behaviour``; the weight with the best hit@k wins (ties: the
    current weight, then the smaller). Behaviour is judged on what it did not see, so a
    weight is not rewarded for repeating its own input. Too few items with a future: the
    current weight is kept.
    """
    current = blend.behavior_weight
    timed = sorted((e for e in events if e.product_id in vectors or e.product_id is None), key=lambda e: e.ts)
    if len(timed) < 10:
        return current, {"reason": f"{len(timed)} usable events"}
    cut = timed[int(len(timed) * BEHAVIOR_PAST_SHARE)].ts
    past, future = BehaviorModel(), BehaviorModel()
    for event in timed:
        (past if event.ts < cut else future).ingest(event)
    in_catalog = set(catalog)
    truth: dict[str, set[str]] = {}
    for item in sorted({e.product_id for e in timed if e.ts >= cut and e.product_id in in_catalog}):
        partners = {p for p, score in future.partners(item, "all", k=20) if score >= min_score and p in in_catalog}
        if partners:
            truth[item] = partners
    if len(truth) < MIN_CALIBRATION_QUERIES:
        return current, {"reason": f"{len(truth)} items with later co-occurrence, fewer than "
                                   f"{MIN_CALIBRATION_QUERIES}", "queries": len(truth)}
    queries = sorted(truth)
    table = CandidateTable(queries, catalog, vectors, lexical, depth)
    rows = []
    for q, (ids, dense, lex) in zip(queries, table.rows, strict=True):
        behavior = dict(past.partners(q, "all", k=100))
        extra = sorted(c for c in behavior.keys() - set(ids) if c in vectors and c != q)
        extra_dense, extra_lex = _pair_scores(q, extra, vectors, lexical)
        content = dict(zip(ids + extra, np.concatenate([_content(blend, dense, lex),
                                                        _content(blend, extra_dense, extra_lex)]), strict=True))
        rows.append((content, behavior))
    scores: dict[float, float] = {}
    for bw in sorted({current, *BEHAVIOR_WEIGHTS}):
        rankings = [sorted(content, key=lambda c: (-((1 - bw) * content[c] + bw * behavior.get(c, 0.0)), c))
                    for content, behavior in rows]
        scores[bw] = _score_rankings(queries, rankings, truth, k).hit_at_k
    best = max(scores, key=lambda bw: (scores[bw], bw == current, -bw))
    return best, {"queries": len(queries), "hit@k_by_weight": {str(bw): round(v, 4) for bw, v in scores.items()}}


# --- the run ------------------------------------------------------------------------------------
@dataclass
class LearnReport:
    """Everything a run decided, for the log, ``/metrics`` and the ``simstream-models`` record."""

    decision: str  # "promoted", "refused", "skipped" or "failed"
    reason: str
    live_version: int | None
    version: int | None = None
    pairs: dict[str, Any] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    blend: dict[str, float] | None = None
    live_blend: dict[str, float] | None = None
    finetune: dict[str, Any] | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 1)
        return out


Embed = Callable[[Path, int, Sequence[str]], np.ndarray]
"""``embed(model_base, version, texts)``: unit vectors of ``texts`` under ``<model_base>/<version>``."""

Train = Callable[..., Any]


def _mine_negatives(train: Sequence[Pair], vectors: Mapping[str, np.ndarray], pool: Sequence[str],
                    known: Mapping[str, set[str]], labelled: Mapping[str, set[str]], per_item: int,
                    groups: Mapping[str, str | None]) -> dict[str, list[str]]:
    """Labelled negatives first, then the live model's nearest non-partners below the margin."""
    partners = _partners(train)
    out: dict[str, list[str]] = {}
    pool_ids = [p for p in pool if p in vectors]
    if not pool_ids:
        return out
    matrix = np.stack([vectors[p] for p in pool_ids]).astype(np.float32)
    anchors = sorted({p.left for p in train} | {p.right for p in train})
    for start in range(0, len(anchors), 512):
        chunk = anchors[start : start + 512]
        sims = np.stack([vectors[a] for a in chunk]).astype(np.float32) @ matrix.T
        for a, row in zip(chunk, sims, strict=True):
            chosen = [n for n in sorted(labelled.get(a, ())) if n in vectors]
            if per_item > 0:
                own = partners.get(a, set()) | known.get(a, set())
                best_partner = max((float(vectors[a] @ vectors[b]) for b in partners.get(a, ())), default=1.0)
                order = np.argsort(-row, kind="stable")[: 5 * per_item + len(own) + 1]
                mined = 0
                for j in order:
                    n = pool_ids[j]
                    if n == a or n in own or n in chosen or (groups.get(a) and groups.get(a) == groups.get(n)):
                        continue
                    if row[j] >= NEGATIVE_MARGIN * best_partner:
                        continue
                    chosen.append(n)
                    mined += 1
                    if mined >= per_item:
                        break
            if chosen:
                out[a] = chosen
    return out


def learn_once(products: Mapping[str, Product], mined: MinedPairs, *, model_base: Path, live_version: int,
               live_config: RecommenderConfig, config: LearnConfig, embed: Embed, train: Train,
               positives_at_last_training: int = 0, events: Sequence[UserEvent] = (),
               log: Log = print) -> LearnReport:
    """One run of the loop (module docstring); ``train`` is ``encoders.training.finetune.finetune``
    or a stand-in with its signature. Promotion moves ``<base>/.learn-staging/<N>`` to ``<base>/<N>``."""
    from encoders.export import list_versions

    started = time.perf_counter()
    live_blend = Blend.of(live_config)
    keys = {p.key for p in mined.positives}
    report = LearnReport("skipped", "", live_version, live_blend=asdict(live_blend),
                         pairs={"positives": len(keys), "new": max(0, len(keys) - positives_at_last_training),
                                "by_source": dict(mined.by_source),
                                "labels": dict(mined.labels),
                                "negatives": sum(len(v) for v in mined.negatives.values()) // 2})
    if report.pairs["new"] < config.min_new_pairs:
        report.reason = (f"{report.pairs['new']} new pairs since the last training "
                         f"({positives_at_last_training} then, {len(keys)} now), fewer than {config.min_new_pairs}")
        report.seconds = time.perf_counter() - started
        return report
    try:
        test_split = split_by_item(mined.positives, config.test_share, config.seed)
        dev_split = split_by_item(test_split.train, config.valid_share, config.seed + 1)
    except NotEnoughPairs as exc:
        report.reason = f"not enough pairs to split by item: {exc}"
        report.seconds = time.perf_counter() - started
        return report
    train_pairs, valid_pairs, test_pairs = dev_split.train, dev_split.valid, test_split.valid
    report.pairs.update(train=len(train_pairs), valid=len(valid_pairs), test=len(test_pairs))
    if len(train_pairs) < config.finetune.min_train_pairs or not valid_pairs or not test_pairs:
        report.reason = (f"{len(train_pairs)} training, {len(valid_pairs)} validation and {len(test_pairs)} test "
                         f"pairs after the split by item; need {config.finetune.min_train_pairs}, 1 and 1")
        report.seconds = time.perf_counter() - started
        return report

    texts = {pid: product_text(p) for pid, p in products.items()}
    ids = sorted(texts)
    fit_items = {i for p in [*train_pairs, *valid_pairs] for i in p.key}
    train_items = {i for p in train_pairs for i in p.key}
    corpus = [i for i in ids if i not in fit_items]  # the test items and everything never paired
    log(f"learn: {len(keys)} positive pairs ({report.pairs['new']} new; {report.pairs['by_source']}), "
        f"{len(train_pairs)} train / {len(valid_pairs)} validation / {len(test_pairs)} test pairs, "
        f"{len(corpus)} products in the test corpus")

    lock = exclusive_lock(model_base / LOCK)
    if lock is None:
        report.reason = f"another learning run holds {model_base / LOCK}"
        report.seconds = time.perf_counter() - started
        return report
    try:
        live_vectors = dict(zip(ids, embed(model_base, live_version, [texts[i] for i in ids]), strict=True))
        groups = {pid: p.group_id for pid, p in products.items()}
        negatives = _mine_negatives(train_pairs, live_vectors, [i for i in ids if i not in fit_items or i in train_items],
                                    _partners(mined.positives), mined.negatives, config.hard_negatives, groups)
        report.pairs["hard_negative_items"] = len(negatives)
        versions = list_versions(model_base)
        version = max(versions, default=live_version) + 1
        staging = model_base / STAGING
        if staging.exists():
            shutil.rmtree(staging)  # a run that died half-way (the lock says no run is alive)
        staging.mkdir(parents=True)
        (staging / str(live_version)).symlink_to((model_base / str(live_version)).resolve(), target_is_directory=True)
        train_texts = {i: texts[i] for i in fit_items | {n for ns in negatives.values() for n in ns}}
        try:
            result = train(PairSet(list(train_pairs), list(valid_pairs), train_texts), staging, live_version, version,
                           config.finetune, log=log, negatives=negatives)
            report.finetune = {k: v for k, v in result.as_dict().items() if k not in ("version_dir", "epochs")}
            cand_vectors = dict(zip(ids, embed(staging, version, [texts[i] for i in ids]), strict=True))

            lexical_model = LexicalModel.fit([texts[i] for i in ids])
            lexical = {i: lexical_model.vectorize(texts[i]) for i in ids}
            depth = max(live_config.candidate_depth, config.k)
            valid_truth = _partners(valid_pairs)
            valid_corpus = [i for i in ids if i not in train_items]
            valid_table = CandidateTable(sorted(valid_truth), valid_corpus, cand_vectors, lexical, depth)
            if len(valid_table.queries) >= MIN_CALIBRATION_QUERIES:
                blend, valid_scores = calibrate(valid_table, valid_truth, config.k, live_blend)
            else:
                blend, valid_scores = live_blend, _score_rankings(valid_table.queries, valid_table.rank(live_blend),
                                                                  valid_truth, config.k)
            behavior_weight, behavior_fit = fit_behavior_weight(events, ids, cand_vectors, lexical, blend, config.k, depth,
                                                                config.behavior_min_score)
            blend = Blend(blend.lexical_weight, blend.lexical_floor, behavior_weight)
            report.blend = asdict(blend)

            test_truth = _partners(test_pairs)
            queries = sorted(test_truth)
            live_table = CandidateTable(queries, corpus, live_vectors, lexical, depth)
            cand_table = CandidateTable(queries, corpus, cand_vectors, lexical, depth)
            live_scores = _score_rankings(queries, live_table.rank(live_blend), test_truth, config.k)
            cand_scores = _score_rankings(queries, cand_table.rank(blend), test_truth, config.k)
            tfidf_scores = _tfidf("tfidf-char", queries, corpus, texts, test_truth, config.k)
            report.heldout = {
                "live": {"hybrid": live_scores.as_dict(),
                         "encoder": _score_rankings(queries, live_table.rank(None), test_truth, config.k).as_dict()},
                "candidate": {"hybrid": cand_scores.as_dict(),
                              "encoder": _score_rankings(queries, cand_table.rank(None), test_truth, config.k).as_dict()},
                "tfidf-char": tfidf_scores.as_dict(),
                "tfidf-word": _tfidf("tfidf-word", queries, corpus, texts, test_truth, config.k).as_dict(),
                "validation_candidate_hybrid": valid_scores.as_dict(),
                "behavior_weight_fit": behavior_fit,
            }
            live_hit, cand_hit, tfidf_hit = live_scores.hit_at_1, cand_scores.hit_at_1, tfidf_scores.hit_at_1
            gain = cand_hit - live_hit
            summary = (f"held-out hybrid hit@1 {cand_hit:.4f} (candidate, blend w={blend.lexical_weight:g} "
                       f"f={blend.lexical_floor:g}) vs {live_hit:.4f} (live version {live_version}); "
                       f"char TF-IDF {tfidf_hit:.4f}; {len(queries)} test queries")
            if gain >= config.min_gain and math.isfinite(gain):
                meta_path = staging / str(version) / "assets.extra" / "simstream.json"
                _add_blend(meta_path, blend, report)
                (staging / str(version)).rename(model_base / str(version))
                report.decision, report.version = "promoted", version
                report.reason = f"{summary}: gain {gain:+.4f} >= {config.min_gain:g}"
            else:
                report.decision = "refused"
                report.reason = f"{summary}: gain {gain:+.4f} < {config.min_gain:g}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report.seconds = time.perf_counter() - started
        log(f"learn: {report.decision}: {report.reason}")
        return report
    finally:
        lock.close()


def exclusive_lock(path: Path) -> Any:
    """An open file holding an exclusive lock on ``path``, or ``None`` when another process holds it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _tfidf(method: str, queries: Sequence[str], corpus: Sequence[str], texts: Mapping[str, str],
           truth: Mapping[str, set[str]], k: int) -> Scores:
    from encoders.training.baselines import tfidf_top_k

    top = tfidf_top_k(method, [texts[q] for q in queries], [texts[c] for c in corpus], k + 1,
                      fit_texts=[texts[c] for c in corpus])
    rankings = [[corpus[j] for j in row if corpus[j] != q][:k] for q, row in zip(queries, top, strict=True)]
    return _score_rankings(queries, rankings, truth, k)


def _add_blend(meta_path: Path, blend: Blend, report: LearnReport) -> None:
    import json

    if not meta_path.is_file():
        raise ConfigurationError(f"the staged version has no {meta_path.name}; was it exported by finetune?")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["blend"] = asdict(blend)
    meta["learn"] = {"heldout": report.heldout, "pairs": report.pairs}
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
