"""The learning loop's decisions, without Kafka and without training a network.

``learn_once`` takes its training and embedding as functions. Here the "training" copies the
base version's folder (so promotion moves a real SavedModel-shaped folder) and the
"embedding" is a deterministic table: the live model places items by their first word, a
better candidate places each labelled pair together. What is under test is the loop: the
skip rule, the split by item, the hard negatives, the calibration, the decision, the
promotion by rename, and that nothing is left behind. The network's own training is
covered by ``test_finetune.py``; the whole loop on Kafka by ``test_learn_kafka.py``.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from encoders.export import list_versions, version_blend
from encoders.training.finetune import FinetuneConfig
from encoders.training.learn import (
    BLEND_FLOORS,
    BLEND_WEIGHTS,
    STAGING,
    CandidateTable,
    LearnConfig,
    MinedPairs,
    calibrate,
    learn_once,
    mine_pairs,
)
from encoders.training.pairs import Pair, PairLabel, PairSet
from serving.catalog import Product, UserEvent, UserEventType
from serving.config import Blend, RecommenderConfig
from serving.lexical import LexicalModel
from serving.text import product_text

DIM = 384


def _product(pid: str, title: str, group: str | None = None) -> Product:
    return Product(product_id=pid, title=title, ts=1.7e9, group_id=group)


def _unit(seed: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    v = rng.standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture
def catalog() -> dict[str, Product]:
    """60 matched pairs (``aN`` ~ ``bN``, titles that share nothing) and 40 unpaired products."""
    out = {}
    for i in range(60):
        out[f"a{i:02d}"] = _product(f"a{i:02d}", f"alpha{i} widget")
        out[f"b{i:02d}"] = _product(f"b{i:02d}", f"zeta{i} gadget")
    for i in range(40):
        out[f"u{i:02d}"] = _product(f"u{i:02d}", f"unrelated{i} thing")
    return out


def _labels(n: int = 60) -> list[PairLabel]:
    return [PairLabel(f"a{i:02d}", f"b{i:02d}", True, 1.7e9) for i in range(n)]


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "minilm"
    (base / "1" / "assets.extra").mkdir(parents=True)
    (base / "1" / "saved_model.pb").write_bytes(b"stand-in")
    (base / "1" / "assets.extra" / "simstream.json").write_text(json.dumps({"dim": DIM}), encoding="utf-8")
    return base


class Run:
    """Stand-ins for ``finetune`` and the encoder, recording what the loop asked of them."""

    def __init__(self, catalog: dict[str, Product], candidate_knows_pairs: bool) -> None:
        self.by_text = {product_text(p): pid for pid, p in catalog.items()}
        self.candidate_knows_pairs = candidate_knows_pairs
        self.trained: list[tuple[PairSet, dict[str, Sequence[str]]]] = []

    def train(self, pairs: PairSet, base: Path, base_version: int, out_version: int, config: FinetuneConfig,
              *, log: Callable[[str], None], negatives: dict[str, Sequence[str]]) -> Any:
        shutil.copytree(base / str(base_version), base / str(out_version))
        self.trained.append((pairs, negatives))

        class Result:
            def as_dict(self) -> dict[str, Any]:
                return {"steps": 1}

        return Result()

    def embed(self, base: Path, version: int, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            pid = self.by_text[text]
            if base.name == STAGING and self.candidate_knows_pairs and pid[0] in "ab":
                rows.append(_unit("pair" + pid[1:]) + 0.05 * _unit(pid))  # the two sides of a pair together
            else:
                rows.append(_unit(pid))  # the live model knows nothing
        m = np.stack(rows)
        return m / np.linalg.norm(m, axis=1, keepdims=True)


def _learn(catalog: dict[str, Product], tmp_path: Path, run: Run, **config: Any) -> Any:
    cfg = LearnConfig(min_new_pairs=config.pop("min_new_pairs", 10), finetune=FinetuneConfig(batch_size=8), **config)
    mined = mine_pairs(catalog, [], _labels(), cfg)
    return learn_once(catalog, mined, model_base=_base(tmp_path), live_version=1, live_config=RecommenderConfig(),
                      config=cfg, embed=run.embed, train=run.train, log=lambda _: None)


def test_signals_become_pairs_and_the_last_label_of_a_pair_wins(catalog: dict[str, Product]) -> None:
    catalog = {**catalog, "g1": _product("g1", "mug red", "mugs"), "g2": _product("g2", "mug blue", "mugs")}
    events = []
    for s in range(6):  # six sessions view u00 and u01 together
        for pid in ("u00", "u01"):
            events.append(UserEvent(user_id=f"user{s}", type=UserEventType.VIEW, ts=1.7e9 + s * 10000,
                                    product_id=pid, session_id=f"s{s}"))
    labels = [PairLabel("a00", "b00", True, 1.0), PairLabel("a01", "b01", True, 1.0),
              PairLabel("b01", "a01", False, 2.0),  # a later negative label of the same pair
              PairLabel("a02", "u05", False, 1.0), PairLabel("a03", "nope", True, 1.0)]
    mined = mine_pairs(catalog, events, labels, LearnConfig())
    keys = {p.key: p.source for p in mined.positives}
    assert keys == {("a00", "b00"): "labelled", ("g1", "g2"): "group", ("u00", "u01"): "behavior"}
    assert mined.negatives == {"a01": {"b01"}, "b01": {"a01"}, "a02": {"u05"}, "u05": {"a02"}}
    assert mined.by_source == {"labelled": 1, "group": 1, "behavior": 1}


def test_too_few_new_pairs_skip_the_run_without_training(catalog: dict[str, Product], tmp_path: Path) -> None:
    run = Run(catalog, candidate_knows_pairs=True)
    cfg = LearnConfig(min_new_pairs=10, finetune=FinetuneConfig(batch_size=8))
    report = learn_once(catalog, mine_pairs(catalog, [], _labels(), cfg), model_base=_base(tmp_path), live_version=1,
                        live_config=RecommenderConfig(), config=cfg, embed=run.embed, train=run.train,
                        positives_at_last_training=55, log=lambda _: None)
    assert report.decision == "skipped" and "5 new pairs" in report.reason, report.reason
    assert run.trained == [] and list_versions(tmp_path / "minilm") == [1]


def test_a_better_candidate_is_promoted_with_its_blend_and_nothing_is_left_staged(
        catalog: dict[str, Product], tmp_path: Path) -> None:
    run = Run(catalog, candidate_knows_pairs=True)
    report = _learn(catalog, tmp_path, run)
    assert report.decision == "promoted" and report.version == 2, report.reason
    base = tmp_path / "minilm"
    assert list_versions(base) == [1, 2] and not (base / STAGING).exists()
    assert version_blend(base, 2) == Blend(**report.blend)
    live, cand = report.heldout["live"]["hybrid"]["hit@1"], report.heldout["candidate"]["hybrid"]["hit@1"]
    assert cand == 1.0 and live < 0.2, report.heldout
    for baseline in ("tfidf-char", "tfidf-word"):
        assert report.heldout[baseline]["queries"] == report.heldout["live"]["hybrid"]["queries"]

    # No test or validation item was trained on, and hard negatives are never a partner.
    (pairs, negatives), = run.trained
    trained_items = {i for p in pairs.train for i in p.key}
    test_items = {p for p in catalog if p[0] in "ab"} - trained_items - {i for p in pairs.valid for i in p.key}
    assert test_items and report.pairs["test"] * 2 == len(test_items)
    partners = {p.left: p.right for p in pairs.train} | {p.right: p.left for p in pairs.train}
    assert negatives and all(partners.get(a) not in ns and a not in ns for a, ns in negatives.items())
    assert set(pairs.texts) >= trained_items | {n for ns in negatives.values() for n in ns}


def test_a_candidate_that_does_not_win_by_the_margin_is_refused_and_removed(
        catalog: dict[str, Product], tmp_path: Path) -> None:
    run = Run(catalog, candidate_knows_pairs=False)  # the candidate embeds exactly like the live version
    report = _learn(catalog, tmp_path, run, min_gain=0.01)
    assert report.decision == "refused" and report.version is None
    assert "gain +0.0000 < 0.01" in report.reason, report.reason
    base = tmp_path / "minilm"
    assert list_versions(base) == [1] and not (base / STAGING).exists()
    assert report.heldout["candidate"]["hybrid"] == report.heldout["live"]["hybrid"]


def test_the_calibration_finds_the_blend_the_data_wants() -> None:
    # Dense says nothing (random vectors); the lexical texts decide: a lexical-heavy blend must win.
    ids = [f"p{i}" for i in range(40)]
    texts = {pid: f"model x{i // 2}00 {pid}" for i, pid in enumerate(ids)}  # pairs (p0,p1), (p2,p3) share a code
    model = LexicalModel.fit(list(texts.values()))
    lexical = {pid: model.vectorize(t) for pid, t in texts.items()}
    vectors = {pid: _unit(pid) for pid in ids}
    truth = {ids[i]: {ids[i ^ 1]} for i in range(len(ids))}
    table = CandidateTable(ids, ids, vectors, lexical, depth=50)
    current = Blend(0.0, 0.0, 0.0)
    blend, scores = calibrate(table, truth, 10, current)
    assert blend.lexical_weight > 0 and scores.hit_at_1 == 1.0, (blend, scores)
    dense_only = table.rank(None)
    assert np.mean([r[0] in truth[q] for q, r in zip(ids, dense_only, strict=True)]) < 0.3
    # Of the perfect blends on the grid, the one nearest the blend in use is taken (no needless change).
    perfect = [Blend(w, f, 0.0) for f in BLEND_FLOORS for w in BLEND_WEIGHTS
               if all(r[0] in truth[q] for q, r in zip(ids, table.rank(Blend(w, f, 0.0)), strict=True))]
    assert blend in perfect
    assert blend.lexical_weight + blend.lexical_floor == min(b.lexical_weight + b.lexical_floor for b in perfect)


def test_the_learn_config_refuses_nonsense() -> None:
    from serving.errors import InvalidInput

    with pytest.raises(InvalidInput):
        LearnConfig(test_share=1.0)
    with pytest.raises(InvalidInput):
        LearnConfig(min_gain=2.0)


def test_mined_pairs_survive_a_split_that_leaves_no_test_pairs(tmp_path: Path) -> None:
    catalog = {f"p{i}": _product(f"p{i}", f"thing {i}") for i in range(4)}
    run = Run(catalog, candidate_knows_pairs=True)
    mined = MinedPairs([Pair.of("p0", "p1", "labelled")], {}, {"labelled": 1}, {})
    report = learn_once(catalog, mined, model_base=_base(tmp_path), live_version=1, live_config=RecommenderConfig(),
                        config=LearnConfig(min_new_pairs=1), embed=run.embed, train=run.train, log=lambda _: None)
    assert report.decision == "skipped" and ("split" in report.reason or "pairs after" in report.reason)
    assert run.trained == []


def test_the_behaviour_weight_is_fitted_on_later_events_it_did_not_learn_from() -> None:
    from encoders.training.learn import fit_behavior_weight

    ids = [f"x{i:02d}" for i in range(30)] + [f"y{i:02d}" for i in range(30)]
    vectors = {pid: _unit(pid) for pid in ids}  # dense knows nothing of the pairs
    model = LexicalModel.fit(ids)
    lexical = {pid: model.vectorize(pid) for pid in ids}
    events = []
    for day in range(5):  # every day, shoppers view x_i then y_i in one session
        for i in range(30):
            for pid in (f"x{i:02d}", f"y{i:02d}"):
                events.append(UserEvent(user_id=f"u{i}-{day}", type=UserEventType.VIEW, ts=1.7e9 + day * 86400 + i,
                                        product_id=pid, session_id=f"s{i}-{day}"))
    current = Blend(0.6, 0.4, 0.0)
    weight, fit = fit_behavior_weight(events, ids, vectors, lexical, current, k=10, depth=50)
    assert weight > 0, fit
    assert fit["hit@k_by_weight"][str(weight)] == 1.0 and fit["hit@k_by_weight"]["0.0"] < 0.5, fit

    # Without enough events the weight in use stays, and the fit says why.
    weight, fit = fit_behavior_weight(events[:6], ids, vectors, lexical, current, k=10, depth=50)
    assert weight == 0.0 and "usable events" in fit["reason"]


def test_a_second_run_on_the_same_model_base_waits_its_turn(catalog: dict[str, Product], tmp_path: Path) -> None:
    from encoders.training.learn import LOCK, exclusive_lock

    run = Run(catalog, candidate_knows_pairs=True)
    base = _base(tmp_path)
    held = exclusive_lock(base / LOCK)  # another run is training on this model base
    assert held is not None
    cfg = LearnConfig(min_new_pairs=10, finetune=FinetuneConfig(batch_size=8))
    report = learn_once(catalog, mine_pairs(catalog, [], _labels(), cfg), model_base=base, live_version=1,
                        live_config=RecommenderConfig(), config=cfg, embed=run.embed, train=run.train,
                        log=lambda _: None)
    assert report.decision == "skipped" and "another learning run" in report.reason
    assert run.trained == [] and list_versions(base) == [1]
    held.close()
    assert _learn(catalog, tmp_path / "again", run).decision == "promoted"
