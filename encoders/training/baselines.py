"""Honest lexical baselines for the matching evaluation (scikit-learn; never imported by the core).

* ``tfidf-word``: word 1-2-grams, sublinear tf, l2-normalised, cosine.
* ``tfidf-char``: ``char_wb`` 2-5-grams, sublinear tf, l2-normalised, cosine. (Until the
  lexical rework of ``docs/quality.md`` it was 3-5-grams without sublinear tf; 2-5 with
  sublinear tf is the stronger of the two on both shared sets, so it is the bar now.)

The vocabulary and idf are fitted on both sides together (unsupervised, as the encoder is).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TFIDF_METHODS = ("tfidf-word", "tfidf-char")


def tfidf_top_k(method: str, query_texts: Sequence[str], corpus_texts: Sequence[str], k: int,
                *, chunk: int = 512, fit_texts: Sequence[str] | None = None) -> np.ndarray:
    """Indices of the k best corpus texts per query under the named TF-IDF cosine.

    The vectorizer is fitted on ``fit_texts`` when given (e.g. the catalog alone, when the
    queries are products of that catalog), else on the corpus and the queries together.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    if method == "tfidf-word":
        vectorizer = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
    elif method == "tfidf-char":
        vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, lowercase=True)
    else:
        raise ValueError(f"unknown TF-IDF method {method!r}; use one of {TFIDF_METHODS}")
    vectorizer.fit(list(fit_texts) if fit_texts is not None else list(corpus_texts) + list(query_texts))
    corpus = vectorizer.transform(corpus_texts)
    queries = vectorizer.transform(query_texts)
    k = min(k, corpus.shape[0])
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], chunk):
        scores = (queries[start : start + chunk] @ corpus.T).toarray()
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
    return out
