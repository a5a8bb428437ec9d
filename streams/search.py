"""``GET /search`` behind the web view: the query's embedding, with an LRU of recent queries,
then ``serving.search.search`` on the core thread, and the hits as JSON.

The query is embedded through the engine's encoder port, the very encoder the products'
vectors come from (in-process or TF Serving). Embeddings of the last
``SIMSTREAM_SEARCH_CACHE_SIZE`` distinct queries are kept (least recently used evicted), keyed
by the model version and the normalised text, so a model rollover never pairs a query vector
of one model with product vectors of another. A size of 0 turns the cache off.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.errors import EncoderError
from serving.search import SearchHit, SearchRequest, search

if TYPE_CHECKING:
    from encoders.base import Encoder
    from serving.recommender import Recommender
    from streams.engine import Engine


@dataclass
class QueryVectors:
    """An LRU of query embeddings: (model version, normalised text) -> unit vector."""

    size: int
    hits: int = 0
    misses: int = 0
    _entries: OrderedDict[tuple[str, str], np.ndarray] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._entries)

    async def vector(self, encoder: Encoder, text: str) -> np.ndarray:
        """The embedding of ``text`` (already normalised) by ``encoder``, from the cache when
        it holds one. Raises the encoder's ``EncoderError`` (e.g. ``EncoderUnavailable``)."""
        key = (encoder.model_version, text)
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return cached
        self.misses += 1
        result = await encoder.encode([text])
        vector = result.vectors[0]
        if self.size > 0:
            self._entries[key] = vector
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return vector


def hit_to_wire(core: Recommender, hit: SearchHit) -> dict[str, Any]:
    """One hit as ``/search`` answers it: the product's display fields, the scores and why."""
    product = core.catalog.get(hit.product_id)
    return {
        "product_id": hit.product_id,
        "title": product.title if product else None,
        "brand": product.brand if product else None,
        "category": list(product.category) if product else [],
        "price": product.price if product else None,
        "currency": product.currency if product else None,
        "in_stock": product.in_stock if product else None,
        "score": hit.score,
        "dense": hit.dense,
        "lexical": hit.lexical,
        "dense_rank": hit.dense_rank,
        "lexical_rank": hit.lexical_rank,
        "matched": list(hit.matched),
        "filters": list(hit.filters),
        "reasons": list(hit.reasons),
    }


class SearchUnavailable(EncoderError):  # noqa: N818 (public name, like EncoderUnavailable)
    """The query could not be embedded: the encoder is away or refused it. Try again shortly."""


async def run_search(engine: Engine, queries: QueryVectors, request: SearchRequest) -> dict[str, Any]:
    """The ``/search`` answer for a validated request. Raises ``SearchUnavailable`` when the
    encoder cannot embed the query."""
    f = request.filters
    body: dict[str, Any] = {
        "query": request.text, "k": request.k,
        "filters": {"category": f.category, "in_stock": f.in_stock, "price_min": f.price_min, "price_max": f.price_max},
        "hits": [],
    }
    if not request.text:
        return body
    assert engine.encoder is not None, "Engine needs an encoder"
    for _attempt in range(2):
        encoder = engine.encoder
        try:
            vector = await queries.vector(encoder, request.text)
        except EncoderError as exc:
            raise SearchUnavailable(f"the encoder could not embed the query ({exc}); try again shortly") from exc
        if engine.encoder is encoder:  # no model rollover swapped the core meanwhile
            break
    hits = await engine.read(lambda core: [hit_to_wire(core, h) for h in
                                           search(core, vector, request.text, request.k, request.filters)])
    body["hits"] = hits
    body["model_version"] = encoder.model_version
    return body
