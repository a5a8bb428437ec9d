"""Lexical similarity: TF-IDF weighted, hashed character n-grams, words and codes (numpy only).

Each product text (``serving.text.product_text``) becomes a sparse vector of three kinds of
features, hashed into one space:

* character n-grams of length 2 to 5 of every lower-cased, whitespace-separated word padded
  with a space on both sides (scikit-learn's ``char_wb``); a padded word shorter than 2
  characters counts as one n-gram;
* whole words (runs of letters and digits, ``[^\\W_]+``), weighted ``WORD_WEIGHT``: a shared
  rare word is stronger evidence than the n-grams it shares with look-alike words;
* model-number-like codes, weighted ``CODE_WEIGHT``: a whitespace-separated token that holds
  both letters and digits, with its punctuation dropped, at least 3 characters long
  (``WH-1000XM4`` and ``wh1000xm4`` are the same code ``wh1000xm4``);
* each feature hashed with CRC32 into ``2**18`` buckets (stable across processes, unlike
  Python's ``hash``; words and codes are hashed with a kind prefix, so the word ``usb``
  is a different feature from the n-gram ``usb``);
* term frequency sublinear (``1 + ln tf``) times the kind's weight, times the bucket's IDF,
  then L2-normalised.

The IDF is ``ln((1 + n) / (1 + df)) + IDF_OFFSET``, with ``IDF_OFFSET = 0.1`` rather than
scikit-learn's 1: a feature that nearly every product has ("gift card", "software") weighs
almost nothing instead of a sixth of the rarest one.

The IDF is *frozen*: it is fitted on the catalog at an explicit refit
(``Recommender.refit_lexical``) and stays fixed in between, so a streamed change never
moves the scores of unrelated pairs. A bucket never seen at the last fit gets the
largest IDF (as rare as it gets); before any fit every bucket weighs 1.0.

``SCHEME`` names this transform. An IDF is only meaningful for the transform it was fitted
with, so a shared IDF record or a snapshot carries the scheme, and one of another scheme
(an older version's) is treated as absent, never mixed in (``LexicalModel.scheme``).

Measured in ``docs/quality.md``: on Amazon-Google the lexical half alone went from hit@1
0.724 (the previous char 3-5 n-grams, IDF offset 1) to 0.748, above scikit-learn's char
TF-IDF (``char_wb`` 2-5, sublinear: 0.733).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

N_BUCKETS = 1 << 18
NGRAM_MIN = 2
NGRAM_MAX = 5
#: Weight of a whole-word feature, and of a model-number-like code, relative to an n-gram.
WORD_WEIGHT = 2.0
CODE_WEIGHT = 3.0
#: Added to ``ln((1 + n) / (1 + df))``; keeps every IDF positive.
IDF_OFFSET = 0.1
#: Entries of the other vectors from which ``cosine_many`` spreads ``a`` over every bucket
#: rather than searching it once per entry.
SPREAD_FROM = 20_000
#: The transform's name: an IDF fitted under another scheme is not used (see the module doc).
SCHEME = "char_wb2-5+words2+codes3/idf+0.1/crc32-2^18"
#: The scheme of records written before schemes were named (char_wb 3-5 n-grams, IDF offset 1).
LEGACY_SCHEME = "char_wb3-5/idf+1/crc32-2^18"

_WORD = re.compile(r"[^\W_]+")
#: What ``str.isalnum`` rejects: re's ``\w`` is exactly isalnum plus the underscore.
_NOT_ALNUM = re.compile(r"[\W_]+")
_WORD_PREFIX = "w\x00"
_CODE_PREFIX = "m\x00"

#: A sparse vector: sorted unique bucket indices (int32) and L2-normalised weights (float32).
SparseVec = tuple[np.ndarray, np.ndarray]

_EMPTY: SparseVec = (np.zeros(0, np.int32), np.zeros(0, np.float32))


def ngrams(text: str) -> dict[str, int]:
    """Character n-grams of every word, ``char_wb`` style, with their counts."""
    # Plain dicts, not Counters, here and below: an empty Counter costs more than counting a
    # title's words, and its __missing__ is a Python call for every new key.
    counts: dict[str, int] = {}
    get = counts.get
    for word in text.lower().split():
        padded = f" {word} "
        if len(padded) < NGRAM_MIN:
            counts[padded] = get(padded, 0) + 1
            continue
        for n in range(NGRAM_MIN, NGRAM_MAX + 1):
            if n > len(padded):
                break
            for i in range(len(padded) - n + 1):
                gram = padded[i : i + n]
                counts[gram] = get(gram, 0) + 1
    return counts


def words(text: str) -> dict[str, int]:
    """Lower-cased runs of letters and digits, with their counts."""
    counts: dict[str, int] = {}
    get = counts.get
    for word in _WORD.findall(text.lower()):
        counts[word] = get(word, 0) + 1
    return counts


def codes(text: str) -> dict[str, int]:
    """Model-number-like tokens: letters and digits together, punctuation dropped, >= 3 long."""
    counts: dict[str, int] = {}
    for token in text.lower().split():
        code = _NOT_ALNUM.sub("", token)
        # isalpha/isdigit of the whole code settle most tokens without a look at each character.
        if (len(code) >= 3 and not code.isalpha() and not code.isdigit()
                and any(ch.isdigit() for ch in code) and any(ch.isalpha() for ch in code)):
            counts[code] = counts.get(code, 0) + 1
    return counts


def _bucket(feature: str) -> int:
    return zlib.crc32(feature.encode("utf-8")) & (N_BUCKETS - 1)


def bucket_weights(text: str) -> dict[int, float]:
    """Hashed features: bucket -> the sum over its features of ``kind weight * (1 + ln tf)``.

    Before the IDF; the order of the sum is fixed by the text, so it is deterministic.
    """
    out: dict[int, float] = {}
    for kind_weight, prefix, counts in (
        (1.0, "", ngrams(text)),
        (WORD_WEIGHT, _WORD_PREFIX, words(text)),
        (CODE_WEIGHT, _CODE_PREFIX, codes(text)),
    ):
        for feature, c in counts.items():
            b = _bucket(prefix + feature)
            out[b] = out.get(b, 0.0) + kind_weight * (1.0 + math.log(c))
    return out


class LexicalModel:
    """The frozen IDF and the text -> sparse vector transform."""

    #: The transform this model's vectors come from; always ``SCHEME`` (a model of another
    #: scheme is never built: readers of shared records and snapshots check it first).
    scheme = SCHEME

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
        """Smoothed IDF ``ln((1 + n) / (1 + df)) + IDF_OFFSET`` over the given texts.

        Unseen buckets get ``ln(1 + n) + IDF_OFFSET``, the largest value.
        """
        df = np.zeros(N_BUCKETS, dtype=np.int64)
        n = 0
        for text in texts:
            n += 1
            keys = list(bucket_weights(text))
            if keys:
                df[np.asarray(keys, dtype=np.int64)] += 1
        idf = (np.log((1.0 + n) / (1.0 + df)) + IDF_OFFSET).astype(np.float32)
        return cls(idf, n)

    def vectorize(self, text: str) -> SparseVec:
        """The L2-normalised TF-IDF vector of a text; empty when the text has no feature."""
        counts = bucket_weights(text)
        if not counts:
            return _EMPTY
        idx = np.fromiter(sorted(counts), dtype=np.int32, count=len(counts))
        tf = np.array([counts[int(b)] for b in idx], dtype=np.float64)
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
    if bi.size >= SPREAD_FROM:
        # Many entries: look ``a``'s weights up in a vector spread over every bucket (0 where
        # it has none) instead of a binary search per entry; the same products either way.
        spread = np.zeros(N_BUCKETS, np.float64)
        spread[ai] = av
        prod = spread[bi] * bv
    else:
        pos = np.searchsorted(ai, bi)
        pos[pos >= ai.size] = 0
        match = ai[pos] == bi
        prod = np.where(match, av.astype(np.float64)[pos] * bv, 0.0)
    seg = np.repeat(np.arange(n), lengths)
    # bincount adds each bin's weights sequentially: deterministic and batch-independent.
    return np.bincount(seg, weights=prod, minlength=n).tolist()
