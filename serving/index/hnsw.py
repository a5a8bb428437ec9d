"""``HnswIndex``: hnswlib behind the ``VectorIndex`` port (inner product on unit vectors);
the production index."""

from __future__ import annotations

import os
import random
import tempfile
import threading
from bisect import insort
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

import hnswlib
import numpy as np

from serving.config import RecommenderConfig
from serving.errors import InvalidVector, SnapshotError
from serving.index.base import Offsets, check_ids, dedupe_last, normalize_rows
from serving.index.persistence import (
    FORMAT,
    offsets_from_json,
    offsets_to_json,
    read_meta,
    sha256_file,
    write_meta,
)

#: Beside an index file: the vector of each graph node, by sorted label (``numpy.save``).
VECTORS_SUFFIX = ".vectors.npy"
#: Nodes whose saved vector a load compares with the graph's own copy.
VECTOR_SAMPLE = 64


def _save_npy(path: str, mat: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, mat, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


class _VectorStore:
    """A dense float32 copy of the live vectors, one row per id, rows reused after deletes.

    hnswlib keeps the vectors too, but its ``get_items`` costs ~15 µs per item from Python;
    the recommender reads a few hundred vectors per change, so a numpy copy pays for its
    memory (``dim * 4`` bytes per item).
    """

    def __init__(self, dim: int, capacity: int = 16) -> None:
        self.dim = dim
        self.mat = np.zeros((max(16, capacity), dim), dtype=np.float32)
        self.row: dict[str, int] = {}
        self.free: list[int] = []
        self.used = 0

    def put(self, ids: Sequence[str], rows: np.ndarray) -> None:
        targets = []
        for pid in ids:
            r = self.row.get(pid)
            if r is None:
                if self.free:
                    r = self.free.pop()
                else:
                    if self.used >= self.mat.shape[0]:
                        grown = np.zeros((self.mat.shape[0] * 2, self.dim), dtype=np.float32)
                        grown[: self.used] = self.mat[: self.used]
                        self.mat = grown
                    r = self.used
                    self.used += 1
                self.row[pid] = r
            targets.append(r)
        self.mat[targets] = rows

    def remove(self, pid: str) -> None:
        r = self.row.pop(pid, None)
        if r is not None:
            self.free.append(r)

    def get(self, ids: Sequence[str]) -> np.ndarray:
        return self.mat[[self.row[pid] for pid in ids]].reshape(len(ids), self.dim)


class HnswIndex:
    """hnswlib behind the ``VectorIndex`` port.

    * Ids are strings; hnswlib labels are integers from a counter, never reused, so a
      stale label can never alias a new product.
    * Products with bit-identical vectors (listings of one title) share one graph node,
      whose label stands for all of them: a search expands it to every such id, by id.
      HNSW keeps few links among identical points, so hundreds of copies of one gift-card
      title made the region around them hard to search; they are now one point.
    * Updating an existing id replaces its vector in place. A new id takes a deleted slot
      when there is one (``allow_replace_deleted``), otherwise a fresh slot.
    * Capacity grows (doubling) before a batch is added, so a batch never half-fails.
    * When deleted slots exceed ``rebuild_deleted_share`` of all slots, the graph is rebuilt
      from the live vectors, which also restores search quality.
    * Every hnswlib call runs under one re-entrant lock: hnswlib forbids concurrent
      add/delete/resize with searches.
    """

    exact = False

    def __init__(
        self,
        dim: int,
        *,
        ef: int = 100,
        m: int = 16,
        ef_construction: int = 200,
        capacity: int = 1024,
        rebuild_deleted_share: float = 0.3,
        seed: int = 100,
    ) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        self.dim = dim
        self.ef = ef
        self.m = m
        self.ef_construction = ef_construction
        self.rebuild_deleted_share = rebuild_deleted_share
        self.seed = seed
        self.rebuilds = 0
        self._lock = threading.RLock()
        self._label: dict[str, int] = {}
        #: label -> the ids its node stands for, sorted (twins share a node).
        self._ids: dict[int, list[str]] = {}
        #: hash of a node's vector bytes -> labels with that hash (compared bytewise on use).
        self._by_hash: dict[int, list[int]] = {}
        self._next_label = 0
        self._store = _VectorStore(dim, capacity)
        self._index = self._new_index(max(16, capacity))

    @classmethod
    def from_config(cls, config: RecommenderConfig) -> HnswIndex:
        return cls(
            config.dim,
            ef=config.hnsw_ef,
            m=config.hnsw_m,
            ef_construction=config.hnsw_ef_construction,
            capacity=config.hnsw_initial_capacity,
            rebuild_deleted_share=config.rebuild_deleted_share,
            seed=config.hnsw_seed,
        )

    def _new_index(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="ip", dim=self.dim)
        index.init_index(
            max_elements=capacity,
            ef_construction=self.ef_construction,
            M=self.m,
            random_seed=self.seed,
            allow_replace_deleted=True,
        )
        index.set_ef(self.ef)
        index.set_num_threads(1)
        return index

    def set_ef(self, ef: int) -> None:
        """Search breadth; higher is slower and more accurate."""
        with self._lock:
            self.ef = ef
            self._index.set_ef(ef)

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        rows = normalize_rows(vectors, self.dim)
        id_list, rows = dedupe_last(check_ids(ids, rows.shape[0]), rows)
        with self._lock:
            # New nodes, (id, row index), added in one call; an id whose node it alone holds
            # and whose vector has no twin is updated in place.
            fresh: list[tuple[str, int]] = []
            pending: dict[int, list[int]] = {}  # hash -> row indexes of the new nodes
            for i, pid in enumerate(id_list):
                row = rows[i]
                key = hash(row.tobytes())
                old = self._label.get(pid)
                if old is not None:
                    current = self._store.get([pid])[0]
                    if np.array_equal(current, row):
                        continue
                    twin = self._twin(key, row)
                    batch_twin = any(np.array_equal(rows[at], row) for at in pending.get(key, ()))
                    if twin is None and not batch_twin and self._ids[old] == [pid]:
                        self._unhash(old, hash(current.tobytes()))
                        # replace_deleted must stay off for a label that exists: hnswlib would
                        # otherwise move it into a vacant slot and leave the old slot aliased.
                        self._index.add_items(row[None, :], np.array([old], dtype=np.uint64), num_threads=1,
                                              replace_deleted=False)
                        self._by_hash.setdefault(key, []).append(old)
                        self._store.put([pid], row[None, :])
                        continue
                    self._detach(pid, old, current)
                else:
                    twin = self._twin(key, row)
                if twin is not None:
                    self._label[pid] = twin
                    insort(self._ids[twin], pid)
                    self._store.put([pid], row[None, :])
                    continue
                # Twins within this batch share one new node.
                same = next((at for at in pending.get(key, ()) if np.array_equal(rows[at], row)), None)
                if same is None:
                    pending.setdefault(key, []).append(i)
                    same = i
                fresh.append((pid, same))
            if not fresh:
                return
            nodes: dict[int, list[str]] = {}
            for pid, at in fresh:
                nodes.setdefault(at, []).append(pid)
            # New nodes fill deleted slots first; grow for the rest before touching the graph.
            grow = max(0, len(nodes) - self.deleted_count)
            needed = self._index.get_current_count() + grow
            capacity = self._index.get_max_elements()
            if needed > capacity:
                self._index.resize_index(max(needed, capacity * 2))
            at_rows = list(nodes)
            labels = np.arange(self._next_label, self._next_label + len(at_rows), dtype=np.uint64)
            self._next_label += len(at_rows)
            threads = -1 if len(at_rows) >= 256 else 1  # batches (bulk load, replays): every core
            self._index.add_items(rows[at_rows], labels, num_threads=threads, replace_deleted=True)
            for at, label in zip(at_rows, labels.tolist(), strict=True):
                members = sorted(nodes[at])
                self._ids[label] = members
                self._by_hash.setdefault(hash(rows[at].tobytes()), []).append(label)
                for pid in members:
                    self._label[pid] = label
                self._store.put(members, np.repeat(rows[at][None, :], len(members), axis=0))

    def _twin(self, key: int, row: np.ndarray) -> int | None:
        """The live node whose vector is ``row``, bit for bit, if any."""
        for label in self._by_hash.get(key, ()):
            if np.array_equal(self._store.get(self._ids[label][:1])[0], row):
                return label
        return None

    def _unhash(self, label: int, key: int) -> None:
        labels = self._by_hash.get(key)
        if labels is not None and label in labels:
            labels.remove(label)
            if not labels:
                del self._by_hash[key]

    def _detach(self, pid: str, label: int, vector: np.ndarray) -> None:
        """``pid`` leaves its node; a node left with no id is deleted from the graph."""
        del self._label[pid]
        members = self._ids[label]
        members.remove(pid)
        if not members:
            del self._ids[label]
            self._unhash(label, hash(vector.tobytes()))
            self._index.mark_deleted(label)

    def delete(self, product_id: str) -> bool:
        with self._lock:
            label = self._label.get(product_id)
            if label is None:
                return False
            self._detach(product_id, label, self._store.get([product_id])[0])
            self._store.remove(product_id)
            total = self._index.get_current_count()
            if total and self.deleted_count / total > self.rebuild_deleted_share:
                self.rebuild()
            return True

    def rebuild(self) -> None:
        """Rebuild the graph from live vectors only, dropping every deleted slot."""
        with self._lock:
            groups = list(self._ids.values())
            firsts = [members[0] for members in groups]
            vectors = self.get_vectors(firsts) if firsts else np.zeros((0, self.dim), np.float32)
            index = self._new_index(max(16, int(len(groups) * 1.5) + 16))
            labels = np.arange(len(groups), dtype=np.uint64)
            if groups:
                index.add_items(vectors, labels, num_threads=-1 if len(groups) >= 1024 else 1)
            self._index = index
            self._ids = dict(enumerate(groups))
            self._label = {pid: label for label, members in self._ids.items() for pid in members}
            self._by_hash = {}
            for label, row in enumerate(vectors):
                self._by_hash.setdefault(hash(row.tobytes()), []).append(label)
            self._next_label = len(groups)
            self.rebuilds += 1

    def query(
        self, vector: np.ndarray, k: int, *, exclude: Collection[str] = ()
    ) -> list[tuple[str, float]]:
        q = normalize_rows(vector, self.dim)
        with self._lock:
            live = len(self._ids)
            if k <= 0 or live == 0:
                return []
            # Ask for a few more than k so excluded ids can be dropped without a Python
            # filter callback (which hnswlib would call once per visited node).
            want = min(k + len(exclude), live)
            while want > 0:
                try:
                    labels, dists = self._index.knn_query(q, k=want, num_threads=1)
                    break
                except RuntimeError:
                    # hnswlib raises when the graph yields fewer than ``want`` live items
                    # (many deletes, small ef): ask for fewer rather than fail.
                    want //= 2
            else:
                return []
            return self._expand(labels[0].tolist(), dists[0].tolist(), k, exclude)

    def _expand(self, labels: list[int], dists: list[float], k: int, exclude: Collection[str]) -> list[tuple[str, float]]:
        """The first ``k`` ids the nodes stand for (twins by id), less ``exclude``."""
        out: list[tuple[str, float]] = []
        ids_of = self._ids.get
        for label, dist in zip(labels, dists, strict=True):
            for pid in ids_of(label, ()):
                if pid in exclude:
                    continue
                out.append((pid, 1.0 - dist))
                if len(out) >= k:
                    return out
        return out

    def query_batch(
        self, vectors: np.ndarray, k: int, *, exclude: Sequence[str | None] | None = None
    ) -> list[list[tuple[str, float]]]:
        rows = normalize_rows(vectors, self.dim)
        skip = list(exclude) if exclude is not None else [None] * len(rows)
        if len(skip) != len(rows):
            raise InvalidVector("query_batch: pass one exclude entry per row")
        with self._lock:
            live = len(self._ids)
            if k <= 0 or live == 0 or len(rows) == 0:
                return [[] for _ in range(len(rows))]
            want = min(k + 1, live)
            try:
                # All cores: this is the bulk path (start-up, replays), not the per-event one.
                labels, dists = self._index.knn_query(rows, k=want, num_threads=-1)
            except RuntimeError:
                return [self.query(r, k, exclude=(x,) if x else ()) for r, x in zip(rows, skip, strict=True)]
            return [
                self._expand(row_labels, row_dists, k, (x,) if x else ())
                for row_labels, row_dists, x in zip(labels.tolist(), dists.tolist(), skip, strict=True)
            ]

    def get_vector(self, product_id: str) -> np.ndarray:
        return self.get_vectors([product_id])[0]

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        with self._lock:
            if not ids:
                return np.zeros((0, self.dim), np.float32)
            for pid in ids:
                if pid not in self._label:
                    raise KeyError(pid)
            return self._store.get(ids)

    def ids(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._label))

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._label

    def __len__(self) -> int:
        return len(self._label)

    @property
    def live_count(self) -> int:
        return len(self._label)

    def _read_vectors(
        self, path: Path, meta: Mapping[str, object], index: hnswlib.Index, labels: list[int], *, checked: bool
    ) -> np.ndarray:
        """The vectors of ``labels`` (sorted), one row each: from the file ``save`` wrote
        beside the graph, once its checksum and a sample of rows match the graph's own
        copies; from the graph, one ``get_items`` at a time, for a file saved without it."""
        vectors_path = Path(str(path) + VECTORS_SUFFIX)
        if "vectors_sha256" not in meta:
            rows = [np.asarray(index.get_items(labels[at : at + 4096], return_type="numpy"), dtype=np.float32)
                    for at in range(0, len(labels), 4096)]
            return np.concatenate(rows).reshape(len(labels), self.dim) if rows else np.zeros((0, self.dim), np.float32)
        try:
            intact = checked or sha256_file(vectors_path) == meta["vectors_sha256"]
            mat = np.load(vectors_path, allow_pickle=False) if intact else None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"index vectors {vectors_path} cannot be read ({exc})") from exc
        if mat is None or mat.dtype != np.float32 or mat.shape != (len(labels), self.dim):
            raise SnapshotError(
                f"index vectors {vectors_path} do not match their checksum or the graph's nodes; "
                "restore the snapshot or rebuild the index from the simstream-embeddings topic"
            )
        sample = sorted(random.Random(len(labels)).sample(range(len(labels)), min(VECTOR_SAMPLE, len(labels))))
        if sample:
            graph = np.asarray(index.get_items([labels[i] for i in sample], return_type="numpy"), dtype=np.float32)
            if not np.array_equal(graph.reshape(len(sample), self.dim), mat[sample]):
                raise SnapshotError(
                    f"index vectors {vectors_path} differ from the graph's own; "
                    "restore the snapshot or rebuild the index from the simstream-embeddings topic"
                )
        return mat

    @property
    def deleted_count(self) -> int:
        with self._lock:
            return int(self._index.get_current_count()) - len(self._ids)

    @property
    def capacity(self) -> int:
        with self._lock:
            return int(self._index.get_max_elements())

    def save(self, path: Path, offsets: Mapping[str, Mapping[int, int]]) -> None:
        """The graph in hnswlib's format at ``path``, each node's vector in ``path`` +
        ``VECTORS_SUFFIX`` (a load reads them in one piece: ``get_items`` took ~15 us per
        vector), and the metadata sidecar."""
        path = Path(path)
        vectors_path = Path(str(path) + VECTORS_SUFFIX)
        with self._lock:
            labels = sorted(self._ids)
            for target, write in (
                (path, lambda tmp: self._index.save_index(tmp)),
                (vectors_path, lambda tmp: _save_npy(tmp, self._store.get([self._ids[lb][0] for lb in labels]))),
            ):
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=path.parent)
                os.close(fd)
                try:
                    write(tmp)
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            write_meta(
                path,
                {
                    "format": FORMAT,
                    "kind": "hnsw",
                    "dim": self.dim,
                    "labels": {pid: label for pid, label in self._label.items()},
                    "next_label": self._next_label,
                    "max_elements": int(self._index.get_max_elements()),
                    "offsets": offsets_to_json(offsets),
                    "sha256": sha256_file(path),
                    "vectors_sha256": sha256_file(vectors_path),
                },
            )

    def load(self, path: Path, *, checked: bool = False) -> Offsets:
        path = Path(path)
        meta = read_meta(path, "hnsw", checked=checked)
        labels = meta.get("labels")
        if meta.get("dim") != self.dim or not isinstance(labels, dict):
            raise SnapshotError(f"index file {path} does not match dimension {self.dim} or is malformed")
        offsets = offsets_from_json(meta.get("offsets", {}))
        label_of = {str(pid): int(label) for pid, label in labels.items()}
        saved_max = int(meta.get("max_elements", 0))
        # Spare room as before, and at least a quarter more than what is stored.
        capacity = max(saved_max, int(len(label_of) * 1.25) + 16)
        index = hnswlib.Index(space="ip", dim=self.dim)
        try:
            index.load_index(str(path), max_elements=capacity, allow_replace_deleted=True)
        except (RuntimeError, ValueError, OSError) as exc:
            raise SnapshotError(f"index file {path} cannot be loaded by hnswlib ({exc})") from exc
        stored = set(int(x) for x in index.get_ids_list())
        if not set(label_of.values()) <= stored:
            raise SnapshotError(f"index file {path} lacks labels named in its metadata")
        ids: dict[int, list[str]] = {}
        for pid, label in label_of.items():
            ids.setdefault(label, []).append(pid)
        labels = sorted(ids)
        mat = self._read_vectors(path, meta, index, labels, checked=checked)
        row_of = {label: i for i, label in enumerate(labels)}
        store = _VectorStore(self.dim, capacity)  # same spare room as the graph
        pids = list(label_of)
        store.put(pids, mat[[row_of[label_of[p]] for p in pids]])
        index.set_ef(self.ef)
        index.set_num_threads(1)
        by_hash: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            ids[label].sort()
            by_hash.setdefault(hash(mat[i].tobytes()), []).append(label)
        with self._lock:
            self._index = index
            self._store = store
            self._label = label_of
            self._ids = ids
            self._by_hash = by_hash
            self._next_label = int(meta.get("next_label", max(label_of.values(), default=-1) + 1))
        return offsets
