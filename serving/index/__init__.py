"""The ``VectorIndex`` port and its adapters, each in its own module.

* ``HnswIndex`` (``serving.index.hnsw``): hnswlib, inner product on unit vectors; the
  production index.
* ``ExactIndex`` (``serving.index.exact``): numpy brute force; the reference the tests
  compare against.

Both normalise every vector to unit length (float32) on the way in, so the inner product
is the cosine, and both reject a bad batch as a whole before touching any state.

``INDEX_ADAPTERS`` is the one place that maps an index name ("hnsw", "exact") to its
adapter: ``create_index(name, config)`` builds one, ``index_name(index)`` names one (what a
snapshot records so that a load builds the same kind).

Persistence (``serving.index.persistence``): ``save(path, offsets)`` writes two files,
``path`` (the vectors) and ``path + ".meta.json"`` (ids, settings, the stream offsets the
file covers and the sha256 of the vector file). Each file is written to a temporary name
and renamed into place. The instance method ``load(path)`` replaces the instance's state
and returns the offsets; on any error it raises ``SnapshotError`` and leaves the instance
as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from serving.config import RecommenderConfig
from serving.errors import ConfigurationError
from serving.index.base import Offsets, VectorIndex, normalize_rows
from serving.index.exact import ExactIndex
from serving.index.hnsw import HnswIndex
from serving.index.persistence import atomic_write_bytes, offsets_from_json, offsets_to_json, sha256_file

__all__ = [
    "DEFAULT_INDEX",
    "INDEX_ADAPTERS",
    "ExactIndex",
    "HnswIndex",
    "Offsets",
    "VectorIndex",
    "atomic_write_bytes",
    "create_index",
    "index_name",
    "normalize_rows",
    "offsets_from_json",
    "offsets_to_json",
    "sha256_file",
]

#: Every adapter by its name (the names snapshots record and ``hybrid_rank`` accepts).
INDEX_ADAPTERS: Mapping[str, type[HnswIndex] | type[ExactIndex]] = MappingProxyType(
    {"hnsw": HnswIndex, "exact": ExactIndex}
)

#: The index a ``Recommender`` gets when none is passed in.
DEFAULT_INDEX = "hnsw"


def create_index(name: str, config: RecommenderConfig) -> VectorIndex:
    """A new, empty index of the adapter called ``name``, set up from ``config``.

    Raises ``ConfigurationError`` for a name no adapter has.
    """
    adapter = INDEX_ADAPTERS.get(name)
    if adapter is None:
        raise ConfigurationError(f"unknown vector index {name!r}; use one of {sorted(INDEX_ADAPTERS)}")
    return adapter.from_config(config)


def index_name(index: VectorIndex) -> str:
    """The name under which ``index``'s adapter is registered.

    Raises ``ConfigurationError`` for an index of an unregistered class, which
    ``create_index`` could not build again.
    """
    for name, adapter in INDEX_ADAPTERS.items():
        if isinstance(index, adapter):
            return name
    raise ConfigurationError(
        f"{type(index).__name__} is not a registered vector index ({sorted(INDEX_ADAPTERS)}); "
        "register it in serving.index.INDEX_ADAPTERS"
    )
