"""Snapshots: round trip, resume mid-stream, atomicity, corruption."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from core_helpers import SMALL, Stream, make_index, random_upsert

from serving.catalog import ProductChange, ProductDelete, ProductUpsert
from serving.config import RecommenderConfig
from serving.errors import SnapshotError
from serving.lexical import SCHEME
from serving.recommender import Kind, Publication, Recommender
from serving.snapshot import CURRENT, MANIFEST, resolve_snapshot


def make_changes(seed: int, n: int) -> list[tuple[ProductChange, np.ndarray | None]]:
    """A deterministic stream: inserts, moves, deletes, stock and price flips."""
    rng = np.random.default_rng(seed)
    out: list[tuple[ProductChange, np.ndarray | None]] = []
    live: list[str] = []
    for i in range(n):
        ts = float(i + 1)
        r = rng.random()
        if r < 0.5 or len(live) < 5:
            pid = f"p{int(rng.integers(0, 80)):03d}"
            out.append((random_upsert(rng, pid, ts), rng.normal(size=SMALL.dim)))
            if pid not in live:
                live.append(pid)
        elif r < 0.6:
            out.append((ProductDelete(live.pop(int(rng.integers(len(live)))), ts), None))
        elif r < 0.75:
            pid = live[int(rng.integers(len(live)))]
            out.append((ProductUpsert(pid, ts, title=f"moved {i}"), rng.normal(size=SMALL.dim)))
        elif r < 0.9:
            pid = live[int(rng.integers(len(live)))]
            out.append((ProductUpsert(pid, ts, in_stock=bool(rng.random() < 0.5)), None))
        else:
            pid = live[int(rng.integers(len(live)))]
            out.append((ProductUpsert(pid, ts, price=float(rng.integers(5, 50))), None))
    return out


def count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[str]:
    """Patch ``cls.name(self, product_id)`` to record each product it is called for."""
    calls: list[str] = []
    real = getattr(cls, name)

    def counting(self: Any, p: str) -> Any:
        calls.append(p)
        return real(self, p)

    monkeypatch.setattr(cls, name, counting)
    return calls


def feed(rec: Recommender, changes: list[tuple[ProductChange, np.ndarray | None]]) -> list[Publication]:
    pubs: list[Publication] = []
    for change, vector in changes:
        needed = rec.needs_embedding(change)
        pubs += rec.apply(change, vector if needed is not None else None)
    return pubs


def state(rec: Recommender) -> tuple[object, ...]:
    ids = sorted(rec.index.ids())
    return (
        sorted(rec.catalog, key=lambda p: p.product_id),
        rec.lists(Kind.SIMILAR),
        rec.lists(Kind.SUBSTITUTES),
        rec.versions,
        ids,
        rec.index.get_vectors(ids).tobytes(),
        rec.offsets,
        rec.stats(),
        rec.catalog.get("p001"),
    )


def one_listing_many_shops(*, seed: int, shops: int) -> tuple[RecommenderConfig, np.random.Generator, Recommender]:
    """One listing sold by ``shops`` shops, with duplicates lists capped at two: every
    list is full and keeps a reserve beyond what it shows."""
    config = replace(SMALL, duplicate_max_items=2)
    rng = np.random.default_rng(seed)
    rec = Recommender(config, make_index("exact", config))
    for i in range(shops):
        rec.apply(ProductUpsert(f"d{i:02d}", float(i + 1), title="acme widget pro 3000", brand="Acme"),
                  rng.normal(size=config.dim))
    return config, rng, rec


#: Buffers of three: after a load, every admission goes through the
#: restored floors and owner vectors (``CandidateBuffers.adopt_all``).
NARROW = replace(SMALL, k=2, candidate_depth=3, candidate_slack=0)


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
@pytest.mark.parametrize("config", [SMALL, NARROW], ids=["small", "narrow"])
def test_save_mid_stream_reload_and_finish_equals_uninterrupted(
    kind: str, config: RecommenderConfig, tmp_path: Path
) -> None:
    changes = make_changes(3, 400)
    straight = Recommender(config, make_index(kind, config))
    straight_pubs = feed(straight, changes)

    first = Recommender(config, make_index(kind, config))
    pubs = feed(first, changes[:200])
    first.offsets = {"product-changes": {0: 200, 1: 7}}
    first.save(tmp_path / "snap")
    resumed = Recommender.load(tmp_path / "snap", config)
    assert resumed.offsets == {"product-changes": {0: 200, 1: 7}}
    assert state(resumed)[:6] == state(first)[:6]
    pubs += feed(resumed, changes[200:])
    resumed.offsets = straight.offsets = {}
    assert state(resumed) == state(straight)
    assert pubs == straight_pubs  # the same publications, versions included


def test_refit_idf_survives_a_snapshot(tmp_path: Path) -> None:
    changes = make_changes(5, 120)
    rec = Recommender(SMALL, make_index("exact", SMALL))
    feed(rec, changes[:60])
    rec.refit_lexical()
    rec.save(tmp_path)
    back = Recommender.load(tmp_path, SMALL)
    assert back.lexical.fitted and np.array_equal(back.lexical.idf, rec.lexical.idf)  # type: ignore[arg-type]
    assert feed(back, changes[60:]) == feed(rec, changes[60:])
    assert state(back) == state(rec)


def test_empty_recommender_round_trips(tmp_path: Path) -> None:
    rec = Recommender(SMALL, make_index("hnsw", SMALL))
    rec.save(tmp_path)
    back = Recommender.load(tmp_path, SMALL)
    assert len(back.catalog) == 0 and back.lists(Kind.SIMILAR) == {}
    assert feed(back, make_changes(1, 10))


def test_saves_are_atomic_and_keep_the_previous_snapshot(tmp_path: Path) -> None:
    rec = Recommender(SMALL, make_index("exact", SMALL))
    changes = make_changes(2, 30)
    feed(rec, changes[:10])
    first = rec.save(tmp_path)
    feed(rec, changes[10:20])
    second = rec.save(tmp_path)
    assert resolve_snapshot(tmp_path) == second and first.is_dir()
    feed(rec, changes[20:])
    third = rec.save(tmp_path)
    assert not first.exists() and second.is_dir() and third.is_dir()
    assert (tmp_path / CURRENT).read_text() == third.name
    assert not list(tmp_path.glob(".tmp-*"))
    # A crash after the temp dir is written but before CURRENT moves leaves the last good one.
    (tmp_path / ".tmp-crashed").mkdir()
    (tmp_path / ".tmp-crashed" / "catalog.json").write_text("{}")
    assert Recommender.load(tmp_path, SMALL).stats().products == len(rec.catalog)


def _corrupt(snap: Path, how: str) -> None:
    if how == "truncate-index":
        data = (snap / "index.bin").read_bytes()
        (snap / "index.bin").write_bytes(data[: len(data) // 3])
    elif how == "flip-catalog":
        data = bytearray((snap / "catalog.json").read_bytes())
        data[len(data) // 2] ^= 0x01
        (snap / "catalog.json").write_bytes(bytes(data))
    elif how == "truncate-npy":
        data = (snap / "buf_dense.npy").read_bytes()
        (snap / "buf_dense.npy").write_bytes(data[:-8])
    elif how == "missing-file":
        (snap / "state.json").unlink()
    elif how == "manifest":
        (snap / MANIFEST).write_text(json.dumps({"format": 1})[:-3])
    elif how == "forged-manifest":
        # Content that passes checksums but contradicts itself must still be refused.
        (snap / "state.json").write_text(json.dumps({"ids": ["nope"], "versions": []}))
        manifest = json.loads((snap / MANIFEST).read_text())
        import hashlib

        data = (snap / "state.json").read_bytes()
        manifest["files"]["state.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (snap / MANIFEST).write_text(json.dumps(manifest))
    elif how == "current":
        (snap.parent / CURRENT).write_text("../../etc")


@pytest.mark.parametrize(
    "how",
    ["truncate-index", "flip-catalog", "truncate-npy", "missing-file", "manifest", "forged-manifest", "current"],
)
def test_corrupt_or_truncated_snapshot_raises_snapshot_error(how: str, tmp_path: Path) -> None:
    rec = Recommender(SMALL, make_index("hnsw", SMALL))
    feed(rec, make_changes(4, 60))
    snap = rec.save(tmp_path)
    _corrupt(snap, how)
    with pytest.raises(SnapshotError, match=r"snapshot|CURRENT"):
        Recommender.load(tmp_path, SMALL)


def test_missing_snapshot_and_wrong_dim(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError):
        Recommender.load(tmp_path / "nothing", SMALL)
    rec = Recommender(SMALL, make_index("exact", SMALL))
    stream = Stream(rec)
    stream.apply(ProductUpsert("a", 1, title="a"), np.ones(SMALL.dim))
    rec.save(tmp_path)
    from dataclasses import replace

    with pytest.raises(SnapshotError, match="dimension"):
        Recommender.load(tmp_path, replace(SMALL, dim=16))


def _rewrite_state(snap: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change state.json and re-sign it in the manifest (so only the content is wrong)."""
    import hashlib

    state = json.loads((snap / "state.json").read_text())
    edit(state)
    data = json.dumps(state).encode()
    (snap / "state.json").write_bytes(data)
    manifest = json.loads((snap / MANIFEST).read_text())
    manifest["files"]["state.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (snap / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("scheme", [None, "char_wb3-5/idf+1/crc32-2^18", "something newer"])
def test_a_snapshot_of_another_lexical_scheme_is_not_used(scheme: str | None, tmp_path: Path) -> None:
    """Its stored lexical vectors and IDF belong to another transform: mixing them with this
    version's vectors would score pairs across two feature spaces, so the load is refused
    (the worker then rebuilds from the topics). A snapshot from before schemes were named
    (no ``lexical_scheme``) is of the char 3-5-gram scheme."""
    rec = Recommender(SMALL, make_index("exact", SMALL))
    feed(rec, make_changes(6, 60))
    rec.refit_lexical()
    snap = rec.save(tmp_path)
    assert json.loads((snap / "state.json").read_text())["lexical_scheme"] == SCHEME
    assert Recommender.load(tmp_path, SMALL).lexical.same_as(rec.lexical)

    def edit(state: dict[str, Any]) -> None:
        if scheme is None:
            del state["lexical_scheme"]
        else:
            state["lexical_scheme"] = scheme

    _rewrite_state(snap, edit)
    with pytest.raises(SnapshotError, match="lexical vectors are of scheme"):
        Recommender.load(tmp_path, SMALL)


def test_a_load_takes_the_saved_lists_over_and_recomputes_only_a_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At scale, recomputing every list was most of a load: the lists are saved, a random
    sample is recomputed and compared, the rest taken over as saved."""
    from serving import propagation

    rng = np.random.default_rng(3)
    rec = Recommender(SMALL, make_index("hnsw", SMALL))
    for i in range(260):
        rec.apply(random_upsert(rng, f"q{i:03d}", float(i + 1)), rng.normal(size=SMALL.dim))
    rec.save(tmp_path)
    snap = resolve_snapshot(tmp_path)
    assert (snap / "list_reasons.json").is_file() and (snap / "list_similar_item.npy").is_file()

    computed = count_calls(monkeypatch, propagation.Propagator, "_compute")
    searched = count_calls(monkeypatch, propagation.Propagator, "_duplicates")
    back = Recommender.load(tmp_path, SMALL)
    assert len(computed) == propagation.RESTORE_SAMPLE < 260
    # A duplicates search costs about 30 list recomputations: a quarter of the sample does one.
    assert len(searched) == propagation.RESTORE_DUPLICATES_SAMPLE < propagation.RESTORE_SAMPLE
    assert set(searched) < set(computed)
    for kind in (Kind.SIMILAR, Kind.SUBSTITUTES):
        assert back.lists(kind) == rec.lists(kind)


def _resign(snap: Path, name: str, data: bytes | None) -> None:
    """Write (or, with ``None``, remove) one file and re-sign the manifest to match."""
    import hashlib

    manifest = json.loads((snap / MANIFEST).read_text())
    if data is None:
        (snap / name).unlink()
        del manifest["files"][name]
    else:
        (snap / name).write_bytes(data)
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (snap / MANIFEST).write_text(json.dumps(manifest))


def test_lists_stored_in_the_older_layout_are_recomputed_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the reason tuples had a table of their own, each item's reasons were stored as
    string indices; such a snapshot loads with every list recomputed, to the same lists."""
    from serving import propagation

    rng = np.random.default_rng(4)
    rec = Recommender(SMALL, make_index("exact", SMALL))
    for i in range(40):
        rec.apply(random_upsert(rng, f"q{i:03d}", float(i + 1)), rng.normal(size=SMALL.dim))
    snap = rec.save(tmp_path)
    _resign(snap, "list_reason_sets.json", None)
    computed = count_calls(monkeypatch, propagation.Propagator, "_compute")
    back = Recommender.load(tmp_path, SMALL)
    assert len(computed) == 40
    for kind in Kind:
        assert back.lists(kind) == rec.lists(kind)


@pytest.mark.parametrize("table", ["[]", "[[0, 99999]]"])
def test_list_reasons_that_name_no_stored_reason_make_the_snapshot_unusable(table: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rec = Recommender(SMALL, make_index("exact", SMALL))
    for i in range(12):
        rec.apply(random_upsert(rng, f"q{i:03d}", float(i + 1)), rng.normal(size=SMALL.dim))
    snap = rec.save(tmp_path)
    _resign(snap, "list_reason_sets.json", table.encode())
    with pytest.raises(SnapshotError, match="unusable"):
        Recommender.load(tmp_path, SMALL)


def test_a_load_keeps_what_each_duplicates_list_holds_beyond_what_it_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full duplicates list keeps a reserve beyond its cap, so a listing that leaves it is
    replaced without a new search. The reserve is saved with the lists: after a load, a
    retitle searches no more than in the recommender that was saved, and both end equal."""
    from serving import propagation

    config, rng, rec = one_listing_many_shops(seed=8, shops=12)
    for i in range(20):
        rec.apply(random_upsert(rng, f"r{i:02d}", float(50 + i)), rng.normal(size=config.dim))
    kept = rec.export_state().duplicates_known
    assert kept is not None and any(len(items) > 2 for items, _ in kept.values())
    rec.save(tmp_path)
    back = Recommender.load(tmp_path, config)
    assert back.export_state().duplicates_known == kept

    searched = count_calls(monkeypatch, propagation.Propagator, "_duplicates")
    counts = []
    vector = rng.normal(size=config.dim)
    for core in (rec, back):
        searched.clear()
        core.apply(ProductUpsert("d03", 100.0, title="bolt cutter heavy duty"), vector)
        counts.append(len(searched))
    assert counts[1] == counts[0]
    for kind in Kind:
        assert back.lists(kind) == rec.lists(kind)


def test_kept_duplicates_that_do_not_match_the_lists_are_not_taken_over(tmp_path: Path) -> None:
    from serving.errors import ListsDiffer

    config, _rng, rec = one_listing_many_shops(seed=9, shops=8)
    saved = rec.export_state()
    assert saved.duplicates_known is not None
    pid, (items, complete) = next(iter(saved.duplicates_known.items()))
    broken = {**saved.duplicates_known, pid: (tuple(reversed(items)), complete)}
    with pytest.raises(ListsDiffer):
        Recommender.from_state(replace(saved, duplicates_known=broken), config)


def test_a_load_pauses_the_cyclic_collector_and_restores_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full collections over the millions of objects a load makes were a third of its time."""
    import gc

    rec = Recommender(SMALL, make_index("exact", SMALL))
    feed(rec, make_changes(2, 20))
    rec.save(tmp_path)
    during: list[bool] = []
    real = Recommender.from_state.__func__  # type: ignore[attr-defined]

    def observed(cls: type[Recommender], *args: Any, **kw: Any) -> Recommender:
        during.append(gc.isenabled())
        return real(cls, *args, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(Recommender, "from_state", classmethod(observed))
    assert gc.isenabled()
    gc.collect()
    frozen = gc.get_freeze_count()
    Recommender.load(tmp_path, SMALL)
    assert during == [False] and gc.isenabled()
    assert gc.get_freeze_count() > frozen, "what the load made is out of the collector's reach"
    gc.disable()
    try:
        Recommender.load(tmp_path, SMALL)
        assert not gc.isenabled(), "a collector the caller had paused stays paused"
    finally:
        gc.enable()
    _resign(resolve_snapshot(tmp_path), "catalog.json", b"{}")
    with pytest.raises(SnapshotError):
        Recommender.load(tmp_path, SMALL)
    assert gc.isenabled(), "a failed load restores the collector too"


def test_a_restore_names_the_holders_of_every_member_in_owner_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reverse map is rebuilt by the column at a restore (one dict append per pair was
    the longest part of a 100k load); it must be what one append per pair gives."""
    from serving.candidates import BufferColumns, CandidateBuffers

    rec = Recommender(SMALL, make_index("hnsw", SMALL))
    feed(rec, make_changes(7, 200))
    rec.save(tmp_path)
    by_column: list[int] = []
    real = CandidateBuffers._add_holders

    def observed(self: CandidateBuffers, columns: BufferColumns) -> None:
        by_column.append(len(columns.members))
        real(self, columns)

    monkeypatch.setattr(CandidateBuffers, "_add_holders", observed)
    buffers = Recommender.load(tmp_path, SMALL)._propagation.buffers
    assert by_column == [sum(len(b) for b in buffers.by_owner.values())] and by_column[0] > 0
    expected: dict[str, list[str]] = {}
    for p, buf in buffers.by_owner.items():
        for c in buf.ids:
            expected.setdefault(c, []).append(p)
    assert buffers.holders == expected  # lists compared in order

    # Owners already held keep their place: the new ones are appended after them.
    more = CandidateBuffers(SMALL, make_index("exact", SMALL))
    more.holders = {"a": ["o1"], "b": ["o2", "o1"]}
    names = np.array(["a", "b", "c", "o3", "o4", "o5"], dtype=object)
    more._add_holders(BufferColumns(names, owners=np.array([3, 4, 5], np.int32), indptr=np.array([0, 2, 2, 5]),
                                    members=np.array([1, 2, 2, 0, 1], np.int32)))
    assert more.holders == {"a": ["o1", "o5"], "b": ["o2", "o1", "o3", "o5"], "c": ["o3", "o5"]}


def test_a_load_makes_each_list_item_once_where_lists_share_it(tmp_path: Path) -> None:
    """A live build puts one item object in both the similar-items and the substitutes list
    of an owner, and a duplicates list shows the first of the duplicates it keeps. A load
    shares them the same way: at 100k products the items are the largest part of the core."""
    config, rng, rec = one_listing_many_shops(seed=10, shops=8)
    for i in range(40):
        rec.apply(random_upsert(rng, f"q{i:03d}", float(20 + i)), rng.normal(size=config.dim))
    rec.save(tmp_path)
    back = Recommender.load(tmp_path, config)
    for kind in Kind:
        assert back.lists(kind) == rec.lists(kind)

    def shared(a: Kind | str, b: Kind) -> tuple[int, int]:
        """(items of ``a`` also in ``b``'s list of the same owner, of those the same object)."""
        lists_a = {p: items for p, (items, _) in back.export_state().duplicates_known.items()} \
            if a == "known" else back.lists(Kind(a))
        equal = same = 0
        for pid, items in lists_a.items():
            others = {item.product_id: item for item in back.lists(b).get(pid, ())}
            for item in items:
                other = others.get(item.product_id)
                if other is not None and other == item:
                    equal += 1
                    same += other is item
        return equal, same

    equal, same = shared(Kind.SUBSTITUTES, Kind.SIMILAR)
    assert equal > 40 and same == equal
    equal, same = shared("known", Kind.DUPLICATES)
    assert equal >= 8 and same == equal
    behaviors = {id(item.behavior) for items in back.lists(Kind.SIMILAR).values() for item in items}
    assert len(behaviors) == 1
