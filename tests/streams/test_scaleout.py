"""Ownership across rebalances, without a broker: what a worker publishes, holds and skips.

The Kafka side (two workers, a SIGKILL, a third joining) is ``test_scaleout_kafka.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.recommender import Kind
from streams.outputs import Outbound
from streams.scaleout import Ownership, PartitionOwnership, hand_over, partition_for, replay_window_s
from streams.settings import Settings

PARTITIONS = 4


def keys_on(partition: int, n: int = 3) -> list[str]:
    """Product ids that Kafka's default partitioner puts on ``partition``."""
    found = [f"P{i}" for i in range(1000) if partition_for(f"P{i}", PARTITIONS) == partition]
    return found[:n]


def ownership(settled_on: frozenset[int] | None = None) -> Ownership:
    own = Ownership(Settings())
    own.total = PARTITIONS
    if settled_on is not None:
        own.on_assigned(settled_on, {"user-events": settled_on})
        own.allowed = own.skip = settled_on
        own.behavior_held = {"user-events": settled_on}
        own.target = None
        own.settled.set()
    return own


def test_partition_for_spreads_keys_like_kafkas_default_partitioner() -> None:
    # Reference values of Kafka's Utils.murmur2 (positive, modulo the partition count).
    assert partition_for("21", 1 << 30) == (-973932308 & 0x7FFFFFFF) % (1 << 30)
    assert {partition_for(f"P{i}", PARTITIONS) for i in range(100)} == set(range(PARTITIONS))


def test_a_worker_applies_nothing_before_its_first_handover() -> None:
    own = ownership()
    assert not own.settled.is_set()
    assert not own.owns_partition(0) and not own.holds("user-events", 0)
    assert own.gate([Outbound("similar-items", keys_on(0)[0], {"items": []})]) == []


def test_only_lists_of_owned_partitions_go_out_and_other_records_always_do() -> None:
    own = ownership(frozenset({0, 1}))
    mine, theirs = keys_on(0)[0], keys_on(2)[0]
    records = [Outbound("similar-items", mine, {}), Outbound("substitutes", theirs, {}),
               Outbound("simstream-products", theirs, {}), Outbound("user-recommendations", "u1", {})]
    assert [(r.topic, r.key) for r in own.gate(records)] == [
        ("similar-items", mine), ("simstream-products", theirs), ("user-recommendations", "u1")]
    assert own.owns_partition(0) and not own.owns_partition(2)
    assert own.holds("user-events", 1) and not own.holds("user-events", 3)


def test_a_revocation_holds_lists_until_the_handover_and_keeps_only_what_stays() -> None:
    own = ownership(frozenset({0, 1}))
    kept, lost = keys_on(0)[0], keys_on(1)[0]
    assert own.replica_skips(kept)
    own.on_revoked()
    assert not own.settled.is_set() and not own.owns_partition(0)
    # Between revocation and handover the replica applies every record, its own echoes too.
    assert not own.replica_skips(kept)
    out = own.gate([Outbound("similar-items", kept, {"v": 1}), Outbound("similar-items", kept, {"v": 2}),
                    Outbound("complements", lost, {"v": 1}), Outbound("simstream-embeddings", lost, {})])
    assert [r.topic for r in out] == ["simstream-embeddings"]
    own.on_assigned(frozenset({0, 3}))
    released = own.release(frozenset({0, 3}) & own.allowed)
    assert [(r.key, r.value) for r in released] == [(kept, {"v": 2})]  # the last held per key, lost ones dropped
    assert own.held == {}


def test_hand_over_republishes_only_lists_that_differ_and_continues_versions() -> None:
    import numpy as np

    from serving.catalog import ProductUpsert
    from serving.config import RecommenderConfig
    from serving.index import ExactIndex
    from serving.recommender import Recommender
    from streams.wire import publication_to_wire

    config = RecommenderConfig(k=2, candidate_depth=4, dim=4)
    rng = np.random.default_rng(3)
    ids = [f"P{i}" for i in range(12)]

    def build(owns: PartitionOwnership) -> Recommender:
        core = Recommender(config, ExactIndex(config.dim), owns=owns)
        for i, pid in enumerate(ids):
            core.apply(ProductUpsert(product_id=pid, ts=float(i + 1), title=f"item {pid}"), rng.normal(size=4))
        return core

    previous = build(PartitionOwnership(frozenset({0, 1, 2, 3}), PARTITIONS))
    on_topic = {kind: {pid: publication_to_wire(previous.republish(kind, pid), model_version="m/1", at=0.0)
                       for pid in previous.lists(kind)} for kind in (Kind.SIMILAR, Kind.SUBSTITUTES, Kind.DUPLICATES)}
    heir = Recommender(config, ExactIndex(config.dim), owns=PartitionOwnership(frozenset(), PARTITIONS))
    for p in previous.catalog:
        heir.apply(ProductUpsert(product_id=p.product_id, ts=p.ts, title=p.title), previous.index.get_vector(p.product_id))
    gained = {kind: {pid: v for pid, v in values.items() if partition_for(pid, PARTITIONS) == 2}
              for kind, values in on_topic.items()}
    pubs = hand_over(heir, PartitionOwnership(frozenset({2}), PARTITIONS), gained, "m/1")
    # Same catalog, same vectors: the heir builds exactly what is on the topic, so nothing is republished.
    assert [p for p in pubs if p.kind is not Kind.COMPLEMENTS] == []
    assert set(heir.lists(Kind.SIMILAR)) == set(gained[Kind.SIMILAR])
    # Under another model version everything gained goes out again, versions above the topic's.
    heir2 = Recommender(config, ExactIndex(config.dim), owns=PartitionOwnership(frozenset(), PARTITIONS))
    for p in previous.catalog:
        heir2.apply(ProductUpsert(product_id=p.product_id, ts=p.ts, title=p.title), previous.index.get_vector(p.product_id))
    again = [p for p in hand_over(heir2, PartitionOwnership(frozenset({2}), PARTITIONS), gained, "m/2")
             if p.kind is Kind.SIMILAR]
    assert {p.product_id for p in again} == set(gained[Kind.SIMILAR])
    assert all(p.version > gained[Kind.SIMILAR][p.product_id]["version"] for p in again)


def test_the_replay_window_covers_what_still_weighs() -> None:
    settings = Settings(feed_history_ttl_s=3600, session_gap_s=1800, behavior_half_life_s=600)
    assert replay_window_s(settings, settings.topic_user_events) == 3600
    assert replay_window_s(settings, settings.topic_pair_updates) == 8 * 600


def test_a_restored_snapshot_given_its_partitions_back_is_not_rebuilt_and_republishes_what_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restart from a snapshot: the core keeps maintaining the partitions it was saved under
    (``saved_ownership``) while changes since the snapshot replay; the first handover gives
    them back. No buffer is rebuilt; exactly the lists that differ from their topics are
    republished; the handed-over behaviour rows replace the saved ones; the lists equal a
    from-scratch build."""
    import numpy as np

    from serving.behavior import BehaviorRow
    from serving.candidates import CandidateBuffers
    from serving.catalog import ProductUpsert
    from serving.config import RecommenderConfig
    from serving.index import ExactIndex
    from serving.recommender import Recommender
    from streams.scaleout import saved_ownership
    from streams.wire import publication_to_wire, same_items

    config = RecommenderConfig(k=3, candidate_depth=5, dim=4)
    everything = PartitionOwnership(frozenset(range(PARTITIONS)), PARTITIONS)
    rng = np.random.default_rng(5)
    ids = [f"P{i}" for i in range(16)]
    vectors = {pid: rng.normal(size=4) for pid in ids}
    titles = {pid: f"item {pid}" for pid in ids}
    saved_rows = {"P6": BehaviorRow(partners=(("P7", 0.9),), complements=(("P8", 0.8),))}
    previous = Recommender(config, ExactIndex(config.dim), owns=everything)
    for i, pid in enumerate(ids):
        previous.apply(ProductUpsert(product_id=pid, ts=float(i + 1), title=titles[pid]), vectors[pid])
    previous.apply_behavior(saved_rows)
    on_topic = {kind: {pid: publication_to_wire(previous.republish(kind, pid), model_version="m/1", at=0.0)
                       for pid in previous.lists(kind)} for kind in Kind}
    previous.save(tmp_path)

    restored = Recommender.load(tmp_path, config)
    restored.set_ownership(saved_ownership(restored, PARTITIONS))
    # Replayed since the snapshot, published by nobody yet (the gate holds no partition).
    vectors["P3"] = vectors["P9"] + 0.01
    titles["P3"] = "item P3 v2"
    restored.apply(ProductUpsert(product_id="P3", ts=100.0, title=titles["P3"]), vectors["P3"])
    differ = {(kind, pid) for kind in Kind for pid, items in restored.lists(kind).items()
              if not same_items(on_topic[kind].get(pid), items)}
    assert differ, "the replayed change moved some lists"

    built: list[str] = []
    real_build = CandidateBuffers.build
    monkeypatch.setattr(CandidateBuffers, "build", lambda self, pids, lex, *a: built.extend(pids) or
                        real_build(self, pids, lex, *a))
    handed = {"P5": BehaviorRow(partners=(("P2", 0.7),), complements=(("P2", 0.6),))}  # P6's row is gone
    pubs = hand_over(restored, everything, on_topic, "m/1", handed, gained=everything)
    assert built == []
    by_key = {(p.kind, p.product_id): p for p in pubs}
    assert len(by_key) == len(pubs)
    assert differ | {(Kind.COMPLEMENTS, "P5"), (Kind.COMPLEMENTS, "P6")} <= by_key.keys()
    for (kind, pid), pub in by_key.items():
        assert pub.items == restored.list_of(kind, pid)
        assert not same_items(on_topic[kind].get(pid), pub.items), "only lists that differ go out"
        if pid in on_topic[kind]:
            assert pub.version > on_topic[kind][pid]["version"]
    assert restored.list_of(Kind.COMPLEMENTS, "P6") == ()

    fresh = Recommender(config, ExactIndex(config.dim), owns=everything)
    for i, pid in enumerate(ids):
        fresh.apply(ProductUpsert(product_id=pid, ts=float(i + 1), title=titles[pid]), vectors[pid])
    fresh.apply_behavior(handed)
    for kind in (Kind.SIMILAR, Kind.SUBSTITUTES, Kind.DUPLICATES):
        assert restored.lists(kind) == fresh.lists(kind)
    assert {p: c for p, c in restored.lists(Kind.COMPLEMENTS).items() if c} == \
        {p: c for p, c in fresh.lists(Kind.COMPLEMENTS).items() if c}
