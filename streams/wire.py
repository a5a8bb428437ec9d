"""JSON shapes of what simstream writes: lists, embeddings. Plain functions, no Kafka."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.errors import InvalidInput
from serving.recommender import Kind, Publication, ScoredItem
from streams.records import iso


def item_to_wire(item: ScoredItem) -> dict[str, Any]:
    """One list entry as JSON. Scores go out unrounded: rounding cost more CPU than the bytes it saved."""
    return {
        "product_id": item.product_id,
        "score": item.score,
        "content": item.content,
        "dense": item.dense,
        "lexical": item.lexical,
        "behavior": item.behavior,
        "reasons": list(item.reasons),
    }


def publication_to_wire(pub: Publication, *, model_version: str, at: float) -> dict[str, Any] | None:
    """The ``similar-items`` / ``substitutes`` value of a publication; ``None`` is a tombstone."""
    if pub.items is None:
        return None
    value: dict[str, Any] = {
        "product_id": pub.product_id,
        "items": [item_to_wire(i) for i in pub.items],
        "model_version": model_version,
        "version": pub.version,
        "updated_at": iso(at),
    }
    if pub.kind is Kind.SUBSTITUTES:
        value["trigger"] = (pub.trigger or "refresh").__str__()
    return value


def same_items(published: Mapping[str, Any] | None, items: Sequence[ScoredItem] | None) -> bool:
    """Whether a list read back from Kafka already says what ``items`` says (scores within 1e-6)."""
    if published is None or items is None:
        return published is None and items is None
    entries = published.get("items", [])
    return len(entries) == len(items) and all(
        e["product_id"] == i.product_id and abs(float(e["score"]) - i.score) <= 1e-6
        for e, i in zip(entries, items, strict=True)
    )


@dataclass(frozen=True, slots=True)
class StoredEmbedding:
    """One ``simstream-embeddings`` value: the vector a product was indexed with."""

    product_id: str
    vector: np.ndarray  # float32 [dim]
    model_version: str
    content_hash: str


def embedding_to_wire(e: StoredEmbedding) -> dict[str, Any]:
    """Vectors travel as base64 of little-endian float32: exact, and half the size of a JSON list."""
    vector = np.asarray(e.vector, dtype="<f4")
    return {
        "product_id": e.product_id,
        "model_version": e.model_version,
        "content_hash": e.content_hash,
        "dim": int(vector.shape[0]),
        "dtype": "float32le",
        "vector": base64.b64encode(vector.tobytes()).decode("ascii"),
    }


def embedding_from_wire(obj: Mapping[str, Any]) -> StoredEmbedding:
    try:
        raw = base64.b64decode(obj["vector"], validate=True)
        vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if vector.shape[0] != int(obj["dim"]):
            raise ValueError(f"vector has {vector.shape[0]} values, dim says {obj['dim']}")
        return StoredEmbedding(str(obj["product_id"]), vector, str(obj["model_version"]), str(obj["content_hash"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"unreadable embedding record: {exc}") from None
