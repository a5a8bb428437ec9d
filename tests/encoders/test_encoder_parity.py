"""The Keras port against sentence-transformers' embeddings of the same weights (golden vectors).

``data/golden.npy`` was made by ``data/make_golden.py`` in a throwaway environment with the
reference implementation; the texts (``data/golden_texts.json``) include unicode, a text far
beyond 128 tokens, numbers, an empty and a whitespace-only string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def golden() -> tuple[list[str], np.ndarray, int]:
    meta = json.loads((DATA / "golden_texts.json").read_text(encoding="utf-8"))
    return [t["text"] for t in meta["texts"]], np.load(DATA / "golden.npy"), int(meta["max_seq_length"])


def test_golden_set_covers_the_hard_cases(golden: tuple[list[str], np.ndarray, int]) -> None:
    texts, vectors, _ = golden
    assert len(texts) >= 30 and vectors.shape == (len(texts), 384)
    assert "" in texts and any(not t.strip() and t for t in texts)
    assert any(ord(c) > 127 for t in texts for c in t)
    assert max(len(t) for t in texts) > 2000  # far beyond 128 tokens
    assert any(any(c.isdigit() for c in t) for t in texts)


def test_keras_port_matches_reference(golden: tuple[list[str], np.ndarray, int]) -> None:
    from encoders.base import pack_batch
    from encoders.minilm import load_minilm
    from encoders.tokenizer import WordPieceTokenizer

    texts, reference, max_length = golden
    model, tok = load_minilm(), WordPieceTokenizer(max_length=max_length)
    for i, text in enumerate(texts):  # one by one: no padding at all, the reference's own setting
        ids, mask = pack_batch(tok.encode([text]), max_length)
        vector = np.asarray(model(ids, mask))[0]
        assert float(vector @ reference[i]) >= 0.999, f"text #{i}: {text[:60]!r}"


def test_exported_model_matches_reference(golden: tuple[list[str], np.ndarray, int], local_encoder: Any) -> None:
    texts, reference, _ = golden
    vectors = local_encoder.encode_blocking(texts).vectors  # batched, sorted, bucket-padded
    cosines = np.sum(vectors * reference, axis=1)
    assert cosines.min() >= 0.999, f"worst text #{int(cosines.argmin())}: {cosines.min():.6f}"
