"""``ExactIndex``: numpy brute force behind the ``VectorIndex`` port; the reference the tests
compare against (and the index of small deployments)."""

from __future__ import annotations

import io
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from serving.config import RecommenderConfig
from serving.errors import SnapshotError
from serving.index.base import Offsets, check_ids, dedupe_last, normalize_rows
from serving.index.persistence import (
    FORMAT,
    atomic_write_bytes,
    offsets_from_json,
    offsets_to_json,
    read_meta,
    sha256_file,
    write_meta,
)


class ExactIndex:
    """Brute-force inner product in numpy. Exact and deterministic: ties break by id."""

    exact = True

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        self.dim = dim
        self._pos: dict[str, int] = {}
        self._ids: list[str] = []
        self._mat = np.zeros((0, dim), dtype=np.float32)
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, config: RecommenderConfig) -> ExactIndex:
        return cls(config.dim)

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        rows = normalize_rows(vectors, self.dim)
        id_list, rows = dedupe_last(check_ids(ids, rows.shape[0]), rows)
        with self._lock:
            new = [pid for pid in id_list if pid not in self._pos]
            mat = np.concatenate([self._mat, np.zeros((len(new), self.dim), np.float32)])
            for pid in new:
                self._pos[pid] = len(self._ids)
                self._ids.append(pid)
            mat[[self._pos[pid] for pid in id_list]] = rows
            self._mat = mat

    def delete(self, product_id: str) -> bool:
        with self._lock:
            pos = self._pos.pop(product_id, None)
            if pos is None:
                return False
            last = len(self._ids) - 1
            if pos != last:
                moved = self._ids[last]
                self._ids[pos] = moved
                self._pos[moved] = pos
                self._mat[pos] = self._mat[last]
            self._ids.pop()
            self._mat = self._mat[:last].copy()
            return True

    def query(
        self, vector: np.ndarray, k: int, *, exclude: Collection[str] = ()
    ) -> list[tuple[str, float]]:
        q = normalize_rows(vector, self.dim)[0].astype(np.float64)
        with self._lock:
            if k <= 0 or not self._ids:
                return []
            scores = self._mat.astype(np.float64) @ q
            ids = np.array(self._ids, dtype=object)
            order = np.lexsort((ids, -scores))
            out: list[tuple[str, float]] = []
            for i in order:
                pid = self._ids[i]
                if pid in exclude:
                    continue
                out.append((pid, float(scores[i])))
                if len(out) >= k:
                    break
            return out

    def query_batch(
        self, vectors: np.ndarray, k: int, *, exclude: Sequence[str | None] | None = None
    ) -> list[list[tuple[str, float]]]:
        rows = normalize_rows(vectors, self.dim)
        skip = list(exclude) if exclude is not None else [None] * len(rows)
        return [self.query(row, k, exclude=(x,) if x else ()) for row, x in zip(rows, skip, strict=True)]

    def get_vector(self, product_id: str) -> np.ndarray:
        with self._lock:
            return self._mat[self._pos[product_id]].copy()

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        with self._lock:
            return self._mat[[self._pos[pid] for pid in ids]].reshape(len(ids), self.dim).copy()

    def ids(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._ids))

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._pos

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def live_count(self) -> int:
        return len(self._ids)

    @property
    def deleted_count(self) -> int:
        return 0  # deletes compact the matrix at once

    def save(self, path: Path, offsets: Mapping[str, Mapping[int, int]]) -> None:
        path = Path(path)
        with self._lock:
            buf = io.BytesIO()
            np.save(buf, self._mat, allow_pickle=False)
            atomic_write_bytes(path, buf.getvalue())
            write_meta(
                path,
                {
                    "format": FORMAT,
                    "kind": "exact",
                    "dim": self.dim,
                    "ids": self._ids,
                    "offsets": offsets_to_json(offsets),
                    "sha256": sha256_file(path),
                },
            )

    def load(self, path: Path, *, checked: bool = False) -> Offsets:
        path = Path(path)
        meta = read_meta(path, "exact", checked=checked)
        try:
            mat = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"index file {path} is corrupt ({exc})") from exc
        ids = meta.get("ids")
        if (
            meta.get("dim") != self.dim
            or not isinstance(ids, list)
            or mat.dtype != np.float32
            or mat.shape != (len(ids), self.dim)
            or len(set(ids)) != len(ids)
        ):
            raise SnapshotError(f"index file {path} does not match its metadata or dimension {self.dim}")
        offsets = offsets_from_json(meta.get("offsets", {}))
        with self._lock:
            self._ids = [str(i) for i in ids]
            self._pos = {pid: i for i, pid in enumerate(self._ids)}
            self._mat = mat
        return offsets
