"""Lexical similarity: TF-IDF weighted, hashed character n-grams (numpy only).

Each product text (``serving.text.product_text``) becomes a sparse vector:

* lower-cased words, each padded with a space on both sides, cut into character n-grams
  of length 3 to 5 inside the word (scikit-learn's ``char_wb``); a padded word shorter
  than 3 characters counts as one n-gram;
* n-grams hashed with CRC32 into ``2**18`` buckets (stable across processes, unlike
  Python's ``hash``);
* term frequency sublinear (``1 + ln tf``), times the IDF, then L2-normalised.

The IDF is *frozen*: it is fitted on the catalog at an explicit refit
(``Recommender.refit_lexical``) and stays fixed in between, so a streamed change never
moves the scores of unrelated pairs. A bucket never seen at the last fit gets the
largest IDF (as rare as it gets); before any fit every bucket weighs 1.0.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

N_BUCKETS = 1 << 18
NGRAM_MIN = 3
NGRAM_MAX = 5

#: A sparse vector: sorted unique bucket indices (int32) and L2-normalised weights (float32).
SparseVec = tuple[np.ndarray, np.ndarray]

_EMPTY: SparseVec = (np.zeros(0, np.int32), np.zeros(0, np.float32))


def ngrams(text: str) -> Counter[str]:
    """Character n-grams of every word, ``char_wb`` style."""
    counts: Counter[str] = Counter()
    for word in text.lower().split():
        padded = f" {word} "
        if len(padded) < NGRAM_MIN:
            counts[padded] += 1
            continue
        for n in range(NGRAM_MIN, NGRAM_MAX + 1):
            if n > len(padded):
                break
            for i in range(len(padded) - n + 1):
                counts[padded[i : i + n]] += 1
    return counts


def bucket_counts(text: str) -> dict[int, int]:
    """Hashed n-gram counts: bucket -> term frequency."""
    out: dict[int, int] = {}
    for gram, c in ngrams(text).items():
        b = zlib.crc32(gram.encode("utf-8")) & (N_BUCKETS - 1)
        out[b] = out.get(b, 0) + c
    return out


class LexicalModel:
    """The frozen IDF and the text -> sparse vector transform."""

    def __init__(self, idf: np.ndarray | None = None, n_docs: int = 0) -> None:
        if idf is not None:
            idf = np.asarray(idf, dtype=np.float32)
            if idf.shape != (N_BUCKETS,) or not np.all(np.isfinite(idf)) or np.any(idf <= 0):
                raise ValueError(f"idf must be {N_BUCKETS} positive finite weights")
        self.idf = idf
        self.n_docs = n_docs

    @property
    def fitted(self) -> bool:
        return self.idf is not None

    def same_as(self, other: LexicalModel) -> bool:
        """Whether both weigh every n-gram alike (same IDF, or both unfitted)."""
        if self.idf is None or other.idf is None:
            return self.idf is None and other.idf is None
        return self.n_docs == other.n_docs and bool(np.array_equal(self.idf, other.idf))

    @classmethod
    def fit(cls, texts: Iterable[str]) -> LexicalModel:
        """Smoothed IDF ``ln((1 + n) / (1 + df)) + 1`` over the given texts.

        Unseen buckets get ``ln(1 + n) + 1``, the largest value.
        """
        df = np.zeros(N_BUCKETS, dtype=np.int64)
        n = 0
        for text in texts:
            n += 1
            keys = list(bucket_counts(text))
            if keys:
                df[np.asarray(keys, dtype=np.int64)] += 1
        idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        return cls(idf, n)

    def vectorize(self, text: str) -> SparseVec:
        """The L2-normalised TF-IDF vector of a text; empty when the text has no n-gram."""
        counts = bucket_counts(text)
        if not counts:
            return _EMPTY
        idx = np.fromiter(sorted(counts), dtype=np.int32, count=len(counts))
        tf = np.array([1.0 + math.log(counts[int(b)]) for b in idx], dtype=np.float64)
        weights = tf * (self.idf[idx].astype(np.float64) if self.idf is not None else 1.0)
        norm = float(np.linalg.norm(weights))
        if norm == 0.0:
            return _EMPTY
        return idx, (weights / norm).astype(np.float32)


def cosine(a: SparseVec, b: SparseVec) -> float:
    """Cosine of two normalised sparse vectors (their dot product), in float64."""
    return cosine_many(a, [b])[0]


def cosine_many(a: SparseVec, others: Sequence[SparseVec]) -> list[float]:
    """``cosine(a, b)`` for every ``b`` in one vectorised pass.

    Each result is the float64 sum, in ascending bucket order, of the matching products, so
    a pair scores bit-for-bit the same alone or in a batch, and in either orientation
    (``cosine(a, b) == cosine(b, a)`` exactly).
    """
    n = len(others)
    ai, av = a
    if n == 0:
        return []
    if ai.size == 0:
        return [0.0] * n
    lengths = np.fromiter((len(b[0]) for b in others), dtype=np.int64, count=n)
    if int(lengths.sum()) == 0:
        return [0.0] * n
    bi = np.concatenate([b[0] for b in others])
    bv = np.concatenate([b[1] for b in others]).astype(np.float64)
    pos = np.searchsorted(ai, bi)
    pos[pos >= ai.size] = 0
    match = ai[pos] == bi
    prod = np.where(match, av.astype(np.float64)[pos] * bv, 0.0)
    seg = np.repeat(np.arange(n), lengths)
    # bincount adds each bin's weights sequentially: deterministic and batch-independent.
    return np.bincount(seg, weights=prod, minlength=n).tolist()
