"""``HashingEncoder``: a deterministic, model-free twin of the encoder for tests and demos.

Each text becomes a signed feature-hashing vector of its lowercased words and their
character trigrams, L2-normalised. Texts that share words get high cosine, so the rest of
the pipeline (index, re-ranking, propagation) behaves sensibly without TensorFlow. Empty or
whitespace-only text maps to the first basis vector ``e0``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from encoders.base import CHARS_PER_TOKEN, EMBEDDING_DIM, Embeddings, check_texts, empty_embeddings
from encoders.tokenizer import DEFAULT_MAX_LENGTH

_WORD = re.compile(r"\w+", re.UNICODE)


def _bucket(feature: str, dim: int) -> tuple[int, float]:
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % dim, (1.0 if (value >> 63) & 1 else -1.0)


class HashingEncoder:
    """Deterministic bag-of-words/char-trigram hashing into ``dim`` dimensions."""

    def __init__(self, *, dim: int = EMBEDDING_DIM, max_length: int = DEFAULT_MAX_LENGTH,
                 version: str = "hashing/1") -> None:
        self.dim = dim
        self.max_length = max_length
        self._version = version

    @property
    def model_version(self) -> str:
        return self._version

    async def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        """Nothing to release."""

    async def encode(self, texts: Sequence[str]) -> Embeddings:
        """Same as ``encode_blocking``; cheap enough to run on the loop."""
        return self.encode_blocking(texts)

    def encode_blocking(self, texts: Sequence[str]) -> Embeddings:
        """One unit vector per text, in input order."""
        cut = check_texts(texts, self.max_length * CHARS_PER_TOKEN)
        if not cut:
            return empty_embeddings(self.dim, self._version)
        out = np.zeros((len(cut), self.dim), dtype=np.float32)
        for row, text in enumerate(cut):
            words = _WORD.findall(text.lower())[: self.max_length]
            if not words:
                out[row, 0] = 1.0
                continue
            for word in words:
                index, sign = _bucket("w:" + word, self.dim)
                out[row, index] += 2.0 * sign
                padded = f"<{word}>"
                for i in range(len(padded) - 2):
                    index, sign = _bucket("c:" + padded[i : i + 3], self.dim)
                    out[row, index] += sign
            norm = float(np.linalg.norm(out[row]))
            if norm == 0.0:  # every feature cancelled out: fall back to the empty vector
                out[row, 0] = 1.0
            else:
                out[row] /= norm
        return Embeddings(out, self._version)
