"""The ``Encoder`` port, its result type, and the batching every adapter shares.

All adapters turn texts into unit vectors the same way:

1. validate (``str`` only) and cut each text to ``max_chars`` characters, which bounds the
   tokenizer's cost on multi-megabyte input before truncation to ``max_length`` tokens;
2. tokenize with the model's WordPiece vocabulary (``encoders.tokenizer``);
3. sort by token count, cut into batches of at most ``batch_size`` texts, and pad each
   batch only to its own longest text, rounded up to one of a few fixed lengths
   (``PAD_BUCKETS``) so that a compiled graph sees few distinct shapes;
4. run each batch and put the vectors back in input order.

Empty or whitespace-only text is tokenized to ``[CLS] [SEP]`` and gets that sequence's
embedding, exactly as the reference (sentence-transformers) does: a defined, non-zero unit
vector that is the same for every empty text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from serving.errors import InvalidInput

#: all-MiniLM-L6-v2's embedding width.
EMBEDDING_DIM = 384
#: Padded lengths a batch is rounded up to; the last bucket is always ``max_length``.
PAD_BUCKETS = (8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 256, 320, 384, 448, 512)
#: Characters kept per token of ``max_length`` before tokenizing. WordPiece tokens average
#: ~4-5 characters on product text; 32 leaves room for long words and punctuation runs while
#: making a 10 MB text cost no more than a 4 KB one.
CHARS_PER_TOKEN = 32


class InvalidText(InvalidInput):
    """A text given to the encoder is not a ``str``. Pass strings (use ``""`` for none)."""


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Vectors for a sequence of texts: float32 ``[n, dim]``, unit rows, in input order."""

    vectors: np.ndarray
    model_version: str

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


@runtime_checkable
class Encoder(Protocol):
    """Text to unit vectors. Adapters: local SavedModel, TF Serving over gRPC, hashing twin."""

    dim: int

    async def encode(self, texts: Sequence[str]) -> Embeddings:
        """Embed any number of texts without blocking the event loop."""
        ...

    def encode_blocking(self, texts: Sequence[str]) -> Embeddings:
        """Embed any number of texts from synchronous code (CLI, offline jobs)."""
        ...

    async def start(self) -> None:
        """Connect and check the model (idempotent)."""
        ...

    async def close(self) -> None:
        """Release channels, threads and models (idempotent)."""
        ...

    @property
    def model_version(self) -> str:
        """The version of the model that produced the vectors, e.g. ``minilm/1``."""
        ...


def check_texts(texts: Sequence[str], max_chars: int) -> list[str]:
    """Validate that every item is a ``str`` and cut each to ``max_chars`` characters."""
    if isinstance(texts, str | bytes):
        raise InvalidText("encode() takes a sequence of texts, not one string; wrap it in a list")
    out: list[str] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidText(
                f"text #{i} is {type(text).__name__}, not str; convert it (use '' for a missing text)"
            )
        out.append(text[:max_chars])
    return out


def padded_length(longest: int, max_length: int) -> int:
    """The bucket a batch whose longest sequence has ``longest`` tokens is padded to."""
    for bucket in PAD_BUCKETS:
        if bucket >= longest:
            return min(bucket, max_length)
    return max_length


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices of the texts in each batch: sorted by length so each batch pads little."""
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pack_batch(token_ids: Sequence[Sequence[int]], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a batch of token id lists to its bucket; returns int32 ``input_ids``, ``attention_mask``."""
    longest = max((len(t) for t in token_ids), default=1)
    width = padded_length(longest, max_length)
    ids = np.zeros((len(token_ids), width), dtype=np.int32)
    mask = np.zeros((len(token_ids), width), dtype=np.int32)
    for row, tokens in enumerate(token_ids):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit rows in float32 (the model already normalises; this guards float drift over gRPC)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


def empty_embeddings(dim: int, model_version: str) -> Embeddings:
    """The result of encoding no text at all."""
    return Embeddings(np.zeros((0, dim), dtype=np.float32), model_version)


def backoff_delays(retries: int, base_s: float, cap_s: float) -> list[float]:
    """Upper bounds of the jittered exponential backoff before each retry (full jitter)."""
    return [min(cap_s, base_s * math.pow(2.0, i)) for i in range(retries)]
