"""One contract suite for every ``VectorIndex`` adapter, plus HNSW-specific behaviour."""

from __future__ import annotations

from pathlib import Path

import hnswlib
import numpy as np
import pytest

from serving.config import RecommenderConfig
from serving.errors import InvalidVector, SnapshotError
from serving.index import ExactIndex, HnswIndex, VectorIndex, normalize_rows
from serving.index.hnsw import VECTOR_SAMPLE, VECTORS_SUFFIX

DIM = 8


def make(kind: str, **kw: object) -> VectorIndex:
    if kind == "exact":
        return ExactIndex(DIM)
    return HnswIndex(DIM, ef=64, capacity=16, **kw)  # type: ignore[arg-type]


KINDS = ["exact", "hnsw"]


def vecs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM))


def ids(n: int, prefix: str = "p") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_protocol_and_basic_query(kind: str) -> None:
    index = make(kind)
    assert isinstance(index, VectorIndex)
    assert len(index) == 0 and index.query(np.ones(DIM), 5) == []
    v = vecs(50)
    index.upsert(ids(50), v)
    assert len(index) == index.live_count == 50 and "p3" in index and "zz" not in index
    res = index.query(v[3], 5)
    assert res[0][0] == "p3" and res[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in res] == sorted((s for _, s in res), reverse=True)
    exact = ExactIndex(DIM)
    exact.upsert(ids(50), v)
    assert [i for i, _ in res] == [i for i, _ in exact.query(v[3], 5)]


@pytest.mark.parametrize("kind", KINDS)
def test_vectors_are_stored_unit_length(kind: str) -> None:
    index = make(kind)
    index.upsert(["a"], np.full(DIM, 3.0))
    got = index.get_vector("a")
    assert got.dtype == np.float32 and np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)
    assert np.array_equal(index.get_vectors(["a"])[0], got)
    # Idempotent normalisation: a stored vector passed back in is kept bit for bit.
    assert np.array_equal(normalize_rows(got, DIM)[0], got)


@pytest.mark.parametrize("kind", KINDS)
def test_upsert_replaces_and_delete_removes(kind: str) -> None:
    index = make(kind)
    v = vecs(20)
    index.upsert(ids(20), v)
    index.upsert(["p0"], -v[5])
    assert np.allclose(index.get_vector("p0"), normalize_rows(-v[5], DIM)[0])
    assert len(index) == 20
    assert index.delete("p5") is True and index.delete("p5") is False and index.delete("nope") is False
    assert len(index) == 19 and "p5" not in index
    assert all(pid != "p5" for pid, _ in index.query(v[5], 19))
    with pytest.raises(KeyError):
        index.get_vector("p5")
    index.upsert(["p5"], v[5])  # re-insert after delete
    assert index.query(v[5], 1)[0][0] == "p5"
    assert sorted(index.ids()) == sorted(ids(20))


@pytest.mark.parametrize("kind", KINDS)
def test_query_k_larger_than_live_and_exclude(kind: str) -> None:
    index = make(kind)
    v = vecs(6)
    index.upsert(ids(6), v)
    res = index.query(v[0], 100)
    assert sorted(pid for pid, _ in res) == sorted(ids(6))
    res = index.query(v[0], 3, exclude={"p0", "p1"})
    assert len(res) == 3 and not {"p0", "p1"} & {pid for pid, _ in res}
    assert index.query(v[0], 0) == []


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_ids_in_one_batch_last_wins(kind: str) -> None:
    index = make(kind)
    v = vecs(2)
    index.upsert(["a", "a"], v)
    assert len(index) == 1
    assert np.allclose(index.get_vector("a"), normalize_rows(v[1], DIM)[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "bad",
    [
        np.ones(DIM + 1),
        np.full(DIM, np.nan),
        np.array([np.inf] + [0.0] * (DIM - 1)),
        np.zeros(DIM),
        np.array(["a"] * DIM),
    ],
    ids=["wrong-dim", "nan", "inf", "zero", "strings"],
)
def test_bad_vectors_raise_and_leave_state_unchanged(kind: str, bad: np.ndarray) -> None:
    index = make(kind)
    v = vecs(5)
    index.upsert(ids(5), v)
    before = index.get_vectors(ids(5)).copy()
    batch = np.vstack([vecs(1, 9), np.zeros(DIM)]) if bad.shape == (DIM,) and bad.dtype.kind == "f" else None
    with pytest.raises(InvalidVector):
        index.upsert(["new"], bad)
    if batch is not None:
        # A batch with one bad row is rejected as a whole.
        with pytest.raises(InvalidVector):
            index.upsert(["ok", "bad"], np.vstack([vecs(1, 9), bad[None, :]]))
    with pytest.raises(InvalidVector):
        index.upsert(["p0", "p1"], v[:1])  # one id per row
    assert len(index) == 5 and "new" not in index and "ok" not in index
    assert np.array_equal(index.get_vectors(ids(5)), before)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_with_offsets(kind: str, tmp_path: Path) -> None:
    index = make(kind)
    v = vecs(40)
    index.upsert(ids(40), v)
    for i in range(5):
        index.delete(f"p{i}")
    offsets = {"product-changes": {0: 17, 3: 4}}
    path = tmp_path / "idx.bin"
    index.save(path, offsets)
    fresh = make(kind)
    assert fresh.load(path) == offsets
    assert len(fresh) == 35 and sorted(fresh.ids()) == sorted(index.ids())
    assert fresh.query(v[10], 5) == index.query(v[10], 5)
    assert np.array_equal(fresh.get_vectors(["p7"]), index.get_vectors(["p7"]))
    fresh.upsert(["new"], v[0])  # spare capacity restored: inserts keep working
    assert "new" in fresh
    assert not list(tmp_path.glob(".*tmp")), "temporary files must be renamed away"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage", ["truncate", "flip", "meta", "missing"])
def test_corrupt_index_file_raises_snapshot_error(kind: str, damage: str, tmp_path: Path) -> None:
    index = make(kind)
    index.upsert(ids(30), vecs(30))
    path = tmp_path / "idx.bin"
    index.save(path, {})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:])
    elif damage == "meta":
        Path(str(path) + ".meta.json").write_text("{not json")
    else:
        path.unlink()
    target = make(kind)
    target.upsert(["keep"], vecs(1))
    with pytest.raises(SnapshotError):
        target.load(path)
    assert list(target.ids()) == ["keep"], "a failed load must leave the index as it was"


def test_hnsw_grows_capacity_before_a_batch() -> None:
    index = HnswIndex(DIM, capacity=16)
    assert index.capacity == 16
    index.upsert(ids(100), vecs(100))
    assert len(index) == 100 and index.capacity >= 100


def test_hnsw_reuses_deleted_slots_and_rebuilds_past_the_share() -> None:
    index = HnswIndex(DIM, capacity=64, rebuild_deleted_share=0.3)
    index.upsert(ids(60), vecs(60))
    for i in range(10):
        index.delete(f"p{i}")
    assert index.deleted_count == 10 and index.live_count == 50 and index.rebuilds == 0
    index.upsert(ids(5, "q"), vecs(5, 3))  # takes deleted slots, no growth
    assert index.deleted_count == 5 and index.capacity == 64
    for i in range(10, 30):
        index.delete(f"p{i}")
    assert index.rebuilds >= 1
    assert index.deleted_count / (index.live_count + index.deleted_count) <= 0.3
    live = sorted(index.ids())
    assert live == sorted([f"p{i}" for i in range(30, 60)] + ids(5, "q"))
    exact = ExactIndex(DIM)
    exact.upsert(live, index.get_vectors(live))
    q = vecs(1, 5)[0]
    assert [i for i, _ in index.query(q, 5)] == [i for i, _ in exact.query(q, 5)]


def test_hnsw_query_survives_heavy_deletes_with_small_ef() -> None:
    index = HnswIndex(DIM, ef=1, m=2, capacity=64, rebuild_deleted_share=1.0)
    index.upsert(ids(64), vecs(64))
    for i in range(60):
        index.delete(f"p{i}")
    res = index.query(vecs(1, 1)[0], 4)
    assert {pid for pid, _ in res} <= {"p60", "p61", "p62", "p63"}


def test_hnsw_recall_at_default_settings() -> None:
    cfg = RecommenderConfig(dim=32)
    index = HnswIndex.from_config(cfg)
    rng = np.random.default_rng(1)
    data = rng.normal(size=(2000, 32))
    index.upsert(ids(2000), data)
    exact = ExactIndex(32)
    exact.upsert(ids(2000), data)
    hits = 0
    for q in rng.normal(size=(50, 32)):
        hits += len({i for i, _ in index.query(q, 10)} & {i for i, _ in exact.query(q, 10)})
    assert hits / 500 >= 0.95


def test_adapters_are_created_and_named_from_one_registry() -> None:
    from serving.errors import ConfigurationError
    from serving.index import DEFAULT_INDEX, INDEX_ADAPTERS, create_index, index_name

    config = RecommenderConfig(dim=4, hnsw_initial_capacity=16)
    assert DEFAULT_INDEX in INDEX_ADAPTERS
    for name, adapter in INDEX_ADAPTERS.items():
        index = create_index(name, config)
        assert type(index) is adapter and index.dim == 4 and len(index) == 0
        assert isinstance(index, VectorIndex) and index_name(index) == name
    assert create_index("exact", config).exact and not create_index("hnsw", config).exact
    with pytest.raises(ConfigurationError, match="unknown vector index"):
        create_index("annoy", config)
    with pytest.raises(ConfigurationError, match="not a registered vector index"):
        index_name(object())  # type: ignore[arg-type]


def same(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> bool:
    """Same ids in the same order, scores equal up to float32 rounding."""
    return [i for i, _ in got] == [i for i, _ in want] and np.allclose(
        [s for _, s in got], [s for _, s in want], atol=1e-5)


def twin_catalog() -> tuple[list[str], np.ndarray]:
    """30 products, 20 of them listings of five titles (bit-identical vectors), in a
    scrambled order so twins arrive apart and in one batch."""
    base = normalize_rows(vecs(15, 7), DIM)
    rows = np.concatenate([base[:10], np.repeat(base[10:], 4, axis=0)])
    order = np.random.default_rng(3).permutation(len(rows))
    return [f"t{i:02d}" for i in order], rows[order]


@pytest.mark.parametrize("kind", KINDS)
def test_twins_are_all_found_with_equal_scores_in_id_order(kind: str) -> None:
    index = make(kind)
    names, rows = twin_catalog()
    index.upsert(names[:12], rows[:12])
    for pid, row in zip(names[12:], rows[12:], strict=True):  # the rest one at a time
        index.upsert([pid], row)
    exact = ExactIndex(DIM)
    exact.upsert(names, rows)
    for q in normalize_rows(vecs(10, 11), DIM):
        assert same(index.query(q, 12), exact.query(q, 12))
        got = [pid for pid, _ in index.query(q, 12, exclude=names[:3])]
        assert got == [pid for pid, _ in exact.query(q, 12, exclude=names[:3])]
    twins = [n for n, r in zip(names, rows, strict=True) if np.array_equal(r, rows[names.index("t10")])]
    assert [pid for pid, _ in index.query(rows[names.index("t10")], 4)] == sorted(twins)


@pytest.mark.parametrize("kind", KINDS)
def test_a_twin_that_moves_or_goes_leaves_the_others_in_place(kind: str, tmp_path: Path) -> None:
    index = make(kind)
    names, rows = twin_catalog()
    index.upsert(names, rows)
    group = sorted(n for n, r in zip(names, rows, strict=True) if np.array_equal(r, rows[names.index("t12")]))
    first, second, *rest = group
    index.delete(first)  # the node's first id goes: the others still stand on it
    index.upsert([second], vecs(1, 99))  # another moves away
    live = [n for n in names if n != first]
    moved = {second: normalize_rows(vecs(1, 99), DIM)[0]}
    exact = ExactIndex(DIM)
    exact.upsert(live, np.stack([moved.get(n, r) for n, r in zip(names, rows, strict=True) if n != first]))
    target = rows[names.index("t12")]
    assert [pid for pid, _ in index.query(target, len(rest))] == rest
    for q in normalize_rows(vecs(5, 12), DIM):
        assert same(index.query(q, 10), exact.query(q, 10))
    index.upsert([second], target)  # and comes back
    assert [pid for pid, _ in index.query(target, len(group) - 1)] == sorted([second, *rest])
    index.save(tmp_path / "index.bin", {})
    back = make(kind)
    back.load(tmp_path / "index.bin")
    assert same(back.query(target, 8), index.query(target, 8))
    assert sorted(back.ids()) == sorted(index.ids())


def test_hnsw_twins_share_one_node() -> None:
    index = HnswIndex(DIM, ef=64, capacity=16)
    names, rows = twin_catalog()
    index.upsert(names, rows)
    assert len(index) == 30 and index.deleted_count == 0
    assert int(index._index.get_current_count()) == 15  # type: ignore[attr-defined]
    group = [n for n, r in zip(names, rows, strict=True) if np.array_equal(r, rows[names.index("t14")])]
    for pid in group:
        index.delete(pid)
    assert index.deleted_count == 1  # the node went with its last id
    index.rebuild()
    assert int(index._index.get_current_count()) == 14 and len(index) == 26  # type: ignore[attr-defined]


def _saved_hnsw(tmp_path: Path) -> tuple[HnswIndex, Path]:
    index = HnswIndex(DIM, ef=64, capacity=16)
    names, rows = twin_catalog()
    index.upsert(names, rows)
    index.upsert(ids(150, "r"), vecs(150, 4))  # more nodes than a load samples
    index.delete("t3")
    path = tmp_path / "idx.bin"
    index.save(path, {})
    return index, path


def test_hnsw_load_reads_the_node_vectors_saved_beside_the_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load takes every node's vector from the file saved beside the graph, reading back
    from the graph only the sample it compares (one vector at a time was most of a load)."""
    index, path = _saved_hnsw(tmp_path)
    assert Path(str(path) + VECTORS_SUFFIX).is_file()
    back = HnswIndex(DIM, ef=64, capacity=16)
    read: list[int] = []
    real_get = hnswlib.Index.get_items

    def counting_get(self: hnswlib.Index, labels: list[int], *args: object, **kw: object) -> object:
        read.extend(labels)
        return real_get(self, labels, *args, **kw)

    monkeypatch.setattr(hnswlib.Index, "get_items", counting_get)
    back.load(path)
    assert 0 < len(read) <= VECTOR_SAMPLE < int(index._index.get_current_count())  # type: ignore[attr-defined]
    assert sorted(back.ids()) == sorted(index.ids())
    assert np.array_equal(back.get_vectors(sorted(index.ids())), index.get_vectors(sorted(index.ids())))


def test_hnsw_node_vectors_that_differ_from_the_graph_are_refused(tmp_path: Path) -> None:
    import hashlib
    import json

    _, path = _saved_hnsw(tmp_path)
    vectors_path = Path(str(path) + VECTORS_SUFFIX)
    mat = np.load(vectors_path)
    mat[:, 0] += 0.5  # re-signed, so only the sample against the graph can tell
    np.save(vectors_path, mat)
    meta_path = Path(str(path) + ".meta.json")
    meta = json.loads(meta_path.read_text())
    meta["vectors_sha256"] = hashlib.sha256(vectors_path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SnapshotError, match="differ from the graph"):
        HnswIndex(DIM, ef=64, capacity=16).load(path)
    vectors_path.write_bytes(vectors_path.read_bytes()[:-8])
    with pytest.raises(SnapshotError, match="checksum"):
        HnswIndex(DIM, ef=64, capacity=16).load(path)


def test_an_hnsw_file_saved_without_node_vectors_loads_from_the_graph(tmp_path: Path) -> None:
    import json

    index, path = _saved_hnsw(tmp_path)
    Path(str(path) + VECTORS_SUFFIX).unlink()
    meta_path = Path(str(path) + ".meta.json")
    meta = json.loads(meta_path.read_text())
    del meta["vectors_sha256"]
    meta_path.write_text(json.dumps(meta))
    back = HnswIndex(DIM, ef=64, capacity=16)
    back.load(path)
    names = sorted(index.ids())
    assert np.array_equal(back.get_vectors(names), index.get_vectors(names))
    assert same(back.query(index.get_vectors(["t12"])[0], 8), index.query(index.get_vectors(["t12"])[0], 8))
