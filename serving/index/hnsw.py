"""``HnswIndex``: hnswlib behind the ``VectorIndex`` port (inner product on unit vectors);
the production index."""

from __future__ import annotations

import os
import tempfile
import threading
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
        self._id: dict[int, str] = {}
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
            existing = [i for i, pid in enumerate(id_list) if pid in self._label]
            new = [i for i, pid in enumerate(id_list) if pid not in self._label]
            # New ids fill deleted slots first; grow for the rest before touching the graph.
            fresh = max(0, len(new) - self.deleted_count)
            needed = self._index.get_current_count() + fresh
            capacity = self._index.get_max_elements()
            if needed > capacity:
                self._index.resize_index(max(needed, capacity * 2))
            if existing:
                labels = np.array([self._label[id_list[i]] for i in existing], dtype=np.uint64)
                # replace_deleted must stay off for a label that exists: hnswlib would
                # otherwise move it into a vacant slot and leave the old slot aliased.
                self._index.add_items(rows[existing], labels, num_threads=1, replace_deleted=False)
            if new:
                labels = np.arange(self._next_label, self._next_label + len(new), dtype=np.uint64)
                self._next_label += len(new)
                threads = -1 if len(new) >= 256 else 1  # batches (bulk load, replays): every core
                self._index.add_items(rows[new], labels, num_threads=threads, replace_deleted=True)
                for i, label in zip(new, labels.tolist(), strict=True):
                    self._label[id_list[i]] = label
                    self._id[label] = id_list[i]
            self._store.put(id_list, rows)

    def delete(self, product_id: str) -> bool:
        with self._lock:
            label = self._label.pop(product_id, None)
            if label is None:
                return False
            del self._id[label]
            self._store.remove(product_id)
            self._index.mark_deleted(label)
            total = self._index.get_current_count()
            if total and self.deleted_count / total > self.rebuild_deleted_share:
                self.rebuild()
            return True

    def rebuild(self) -> None:
        """Rebuild the graph from live vectors only, dropping every deleted slot."""
        with self._lock:
            ids = list(self._label)
            vectors = self.get_vectors(ids) if ids else np.zeros((0, self.dim), np.float32)
            index = self._new_index(max(16, int(len(ids) * 1.5) + 16))
            labels = np.arange(len(ids), dtype=np.uint64)
            if ids:
                index.add_items(vectors, labels, num_threads=-1 if len(ids) >= 1024 else 1)
            self._index = index
            self._label = {pid: i for i, pid in enumerate(ids)}
            self._id = dict(enumerate(ids))
            self._next_label = len(ids)
            self.rebuilds += 1

    def query(
        self, vector: np.ndarray, k: int, *, exclude: Collection[str] = ()
    ) -> list[tuple[str, float]]:
        q = normalize_rows(vector, self.dim)
        with self._lock:
            live = len(self._label)
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
            out: list[tuple[str, float]] = []
            id_of = self._id.get
            for label, dist in zip(labels[0].tolist(), dists[0].tolist(), strict=True):
                pid = id_of(label)
                if pid is None or pid in exclude:
                    continue
                out.append((pid, 1.0 - dist))
                if len(out) >= k:
                    break
            return out

    def query_batch(
        self, vectors: np.ndarray, k: int, *, exclude: Sequence[str | None] | None = None
    ) -> list[list[tuple[str, float]]]:
        rows = normalize_rows(vectors, self.dim)
        skip = list(exclude) if exclude is not None else [None] * len(rows)
        if len(skip) != len(rows):
            raise InvalidVector("query_batch: pass one exclude entry per row")
        with self._lock:
            live = len(self._label)
            if k <= 0 or live == 0 or len(rows) == 0:
                return [[] for _ in range(len(rows))]
            want = min(k + 1, live)
            try:
                # All cores: this is the bulk path (start-up, replays), not the per-event one.
                labels, dists = self._index.knn_query(rows, k=want, num_threads=-1)
            except RuntimeError:
                return [self.query(r, k, exclude=(x,) if x else ()) for r, x in zip(rows, skip, strict=True)]
            out: list[list[tuple[str, float]]] = []
            for row_labels, row_dists, x in zip(labels.tolist(), dists.tolist(), skip, strict=True):
                found: list[tuple[str, float]] = []
                for label, dist in zip(row_labels, row_dists, strict=True):
                    pid = self._id.get(int(label))
                    if pid is None or pid == x:
                        continue
                    found.append((pid, 1.0 - float(dist)))
                    if len(found) >= k:
                        break
                out.append(found)
            return out

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

    @property
    def deleted_count(self) -> int:
        with self._lock:
            return int(self._index.get_current_count()) - len(self._label)

    @property
    def capacity(self) -> int:
        with self._lock:
            return int(self._index.get_max_elements())

    def save(self, path: Path, offsets: Mapping[str, Mapping[int, int]]) -> None:
        path = Path(path)
        with self._lock:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                self._index.save_index(tmp)
                os.replace(tmp, path)
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
                },
            )

    def load(self, path: Path) -> Offsets:
        path = Path(path)
        meta = read_meta(path, "hnsw")
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
        store = _VectorStore(self.dim, capacity)  # same spare room as the graph
        pids = list(label_of)
        for start in range(0, len(pids), 4096):
            chunk = pids[start : start + 4096]
            rows = np.asarray(
                index.get_items([label_of[p] for p in chunk], return_type="numpy"), dtype=np.float32
            )
            store.put(chunk, rows.reshape(len(chunk), self.dim))
        index.set_ef(self.ef)
        index.set_num_threads(1)
        with self._lock:
            self._index = index
            self._store = store
            self._label = label_of
            self._id = {label: pid for pid, label in label_of.items()}
            self._next_label = int(meta.get("next_label", max(label_of.values(), default=-1) + 1))
        return offsets
