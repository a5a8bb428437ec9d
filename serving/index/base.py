"""The ``VectorIndex`` port, and the input checks every adapter shares.

Every adapter normalises each vector to unit length (float32) on the way in, so the inner
product is the cosine, and rejects a bad batch as a whole before touching any state.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from serving.errors import InvalidVector

#: Stream offsets an index (or snapshot) covers: topic -> partition -> next offset.
Offsets = dict[str, dict[int, int]]


def normalize_rows(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Validate a batch and return it as float32 unit rows; raise ``InvalidVector`` otherwise.

    A 1-D vector is treated as a batch of one. Nothing is modified in place. Idempotent:
    float32 rows whose norm is already 1 (within 1e-6) are returned unchanged.
    """
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidVector(
            f"expected vectors of dimension {dim}, got shape {tuple(np.shape(vectors))}; "
            "check that the encoder and the index agree on the model"
        )
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InvalidVector(f"vectors must be real numbers, got dtype {arr.dtype}")
    arr64 = arr.astype(np.float64)
    if not np.all(np.isfinite(arr64)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(arr64), axis=1))[0])
        raise InvalidVector(f"vector #{bad} contains NaN or Inf; re-embed the product")
    norms = np.linalg.norm(arr64, axis=1)
    if np.any(norms <= 1e-12):
        bad = int(np.flatnonzero(norms <= 1e-12)[0])
        raise InvalidVector(f"vector #{bad} has zero norm and no direction; re-embed the product")
    out = (arr64 / norms[:, None]).astype(np.float32)
    if arr.dtype == np.float32:
        # Keep rows that are already unit float32 bit-for-bit, so normalising is idempotent:
        # a stored vector passed back in (replay, rebuild, exact_lists) scores identically.
        unit = np.abs(norms - 1.0) <= 1e-6
        out[unit] = arr[unit]
    return out


def check_ids(ids: Sequence[str], n: int) -> list[str]:
    ids = list(ids)
    if len(ids) != n:
        raise InvalidVector(f"got {len(ids)} ids for {n} vectors; pass one id per row")
    for pid in ids:
        if not isinstance(pid, str) or not pid:
            raise InvalidVector(f"ids must be non-empty strings, got {pid!r}")
    return ids


def dedupe_last(ids: list[str], vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Keep the last row for an id that repeats inside one batch (last writer wins)."""
    if len(set(ids)) == len(ids):
        return ids, vectors
    last = {pid: i for i, pid in enumerate(ids)}
    rows = sorted(last.values())
    return [ids[i] for i in rows], vectors[rows]


@runtime_checkable
class VectorIndex(Protocol):
    """Inner-product nearest neighbours over unit vectors, keyed by string id.

    ``exact`` says whether ``query`` is exact (the tests and evaluations rely on it; the
    recommender treats both kinds alike).
    """

    dim: int
    exact: bool

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Insert or replace; the whole batch is validated first (``InvalidVector``)."""
        ...

    def delete(self, product_id: str) -> bool:
        """Remove an id; ``False`` when it was not there."""
        ...

    def query(
        self, vector: np.ndarray, k: int, *, exclude: Collection[str] = ()
    ) -> list[tuple[str, float]]:
        """Up to ``k`` (id, inner product) pairs, best first, never naming an excluded id."""
        ...

    def query_batch(
        self, vectors: np.ndarray, k: int, *, exclude: Sequence[str | None] | None = None
    ) -> list[list[tuple[str, float]]]:
        """``query`` for every row; ``exclude[i]`` (e.g. the row's own id) is left out of row i."""
        ...

    def get_vector(self, product_id: str) -> np.ndarray:
        """The stored unit vector (float32); ``KeyError`` when absent."""
        ...

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored unit vectors as a float32 matrix, one row per id; ``KeyError`` when absent."""
        ...

    def ids(self) -> Iterator[str]:
        """Every live id."""
        ...

    def __contains__(self, product_id: object) -> bool: ...

    def __len__(self) -> int: ...

    @property
    def live_count(self) -> int: ...

    @property
    def deleted_count(self) -> int: ...

    def save(self, path: Path, offsets: Mapping[str, Mapping[int, int]]) -> None:
        """Write the index and the offsets it covers, atomically per file."""
        ...

    def load(self, path: Path, *, checked: bool = False) -> Offsets:
        """Replace this index's state with a saved one and return its offsets. ``checked``:
        the caller has verified every file's checksum already (a snapshot's manifest)."""
        ...
