"""Which vector each product was embedded with, without a second copy of the vectors.

The engine must know, for every product, the model version and content hash its vector
belongs to: a redelivered event, a restart or a replica record then reuses the vector instead
of embedding the same text again. It used to keep the vector itself too (``StoredEmbedding``),
a second float32 copy of every vector the index already holds: 1.5 KB per product, plus
the array's own header, about 190 MB at 100k products and 1.9 GB at 1M.

Here a vector is *held* only until its product is applied to the core (a restore's records,
a replica's embedding that arrives before its product, a fresh embedding in flight); once
applied, the entry keeps the version and hash alone, and the vector is read back from the
core (``Recommender.indexed_vector``) when it is needed again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from serving.catalog import Catalog, Product
from streams.wire import StoredEmbedding


class KnownEmbedding(NamedTuple):
    """What a product was embedded with; ``vector`` is ``None`` once the core holds it."""

    model_version: str
    content_hash: str
    vector: np.ndarray | None


class Embeddings:
    """product id -> ``KnownEmbedding``; read from the event loop and the core's thread alike
    (single dict operations, each atomic under the GIL)."""

    def __init__(self) -> None:
        self._by_id: dict[str, KnownEmbedding] = {}
        # Few model versions, millions of entries: one string object per version.
        self._versions: dict[str, str] = {}

    def _version(self, model_version: str) -> str:
        return self._versions.setdefault(model_version, model_version)

    def hold(self, stored: StoredEmbedding, held: Product | None = None) -> None:
        """A vector not applied to the core yet: keep it until ``applied``. ``held``: the
        product as the core holds it now; with that very text, it is applied already."""
        if _applied(held, stored.content_hash):
            self.applied(stored.product_id, stored.model_version, stored.content_hash)
            return
        self._by_id[stored.product_id] = KnownEmbedding(
            self._version(stored.model_version), stored.content_hash, np.asarray(stored.vector, dtype=np.float32))

    def applied(self, product_id: str, model_version: str, content_hash: str) -> None:
        """The core holds this product's vector for ``content_hash`` now: drop any held copy."""
        self._by_id[product_id] = KnownEmbedding(self._version(model_version), content_hash, None)

    def release_applied(self, catalog: Catalog) -> int:
        """Drop the held vectors of products the core already holds with that very text (a
        restore's records of products the snapshot had); return how many were dropped."""
        dropped = 0
        for pid, known in list(self._by_id.items()):
            if known.vector is None:
                continue
            if _applied(catalog.get(pid), known.content_hash):
                self._by_id[pid] = known._replace(vector=None)
                dropped += 1
        return dropped

    def covers(self, product: Product, model_version: str) -> bool:
        """Whether ``product``'s current text has a vector of ``model_version`` (held here or
        in the core), so it need not be embedded again."""
        known = self._by_id.get(product.product_id)
        return known is not None and known.content_hash == product.content_hash and known.model_version == model_version

    def get(self, product_id: str) -> KnownEmbedding | None:
        return self._by_id.get(product_id)

    def held(self, product_id: str) -> np.ndarray | None:
        """The vector kept here for ``product_id`` (not yet applied to the core), if any."""
        known = self._by_id.get(product_id)
        return None if known is None else known.vector

    def discard(self, product_id: str) -> None:
        self._by_id.pop(product_id, None)

    def held_count(self) -> int:
        """How many vectors are kept here (the rest are read from the core)."""
        return sum(1 for known in self._by_id.values() if known.vector is not None)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._by_id

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)


def _applied(held: Product | None, content_hash: str) -> bool:
    """Whether the core holds a product (``held``) with the text of ``content_hash``."""
    return held is not None and held.content_hash == content_hash
