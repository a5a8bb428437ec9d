"""The WordPiece tokenizer: uncased like the model, truncated to max_length."""

from __future__ import annotations

import pytest

from encoders.tokenizer import WordPieceTokenizer
from serving.errors import ConfigurationError


@pytest.fixture(scope="module")
def tok() -> WordPieceTokenizer:
    return WordPieceTokenizer(max_length=16)


def test_lowercases_and_strips_accents(tok: WordPieceTokenizer) -> None:
    assert tok.encode(["Pokémon CAFÉ Deluxe"]) == tok.encode(["pokemon cafe deluxe"])
    assert tok.tokens("Pokémon") == ["[CLS]", "pokemon", "[SEP]"]


def test_special_tokens_and_empty_text(tok: WordPieceTokenizer) -> None:
    assert tok.encode(["", "   \t"]) == [[101, 102], [101, 102]]


def test_truncates_to_max_length_keeping_sep(tok: WordPieceTokenizer) -> None:
    ids = tok.encode(["word " * 100])[0]
    assert len(ids) == 16
    assert ids[0] == 101 and ids[-1] == 102


def test_numbers_split_into_wordpieces(tok: WordPieceTokenizer) -> None:
    assert tok.tokens("1054.99")[1:-1] == ["105", "##4", ".", "99"]


def test_rejects_impossible_max_length() -> None:
    with pytest.raises(ConfigurationError):
        WordPieceTokenizer(max_length=1024)
