"""``LocalEncoder``: the exported SavedModel run in-process with TensorFlow (the embedded default)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from encoders.base import (
    CHARS_PER_TOKEN,
    EMBEDDING_DIM,
    Embeddings,
    check_texts,
    empty_embeddings,
    l2_normalize,
    pack_batch,
    plan_batches,
)
from encoders.export import DEFAULT_MODEL_NAME, OUTPUT, SIGNATURE, check_signature, resolve_version
from encoders.tokenizer import DEFAULT_MAX_LENGTH, WordPieceTokenizer
from serving.errors import EncoderError

#: Texts per forward pass. 64 keeps the padded batch in L2-sized tiles on a small CPU and
#: bounds latency; throughput is flat from 32 to 128 (see tests/bench/bench_encoder.py).
DEFAULT_BATCH_SIZE = 64

RunBatch = Callable[[np.ndarray, np.ndarray], np.ndarray]


def configure_threads(intra_op: int | None, inter_op: int | None = 1) -> None:
    """Set TensorFlow's thread pools once, before the first op runs (later calls are ignored)."""
    import tensorflow as tf

    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        pass  # TensorFlow already initialised its pools; keep them.


def load_servable(version_dir: Path) -> RunBatch:
    """Load a SavedModel version and return ``run(input_ids, attention_mask) -> float32 [n, 384]``.

    The signature's inputs are ``[None, None]``, so one traced graph serves every padded
    shape: nothing retraces at run time.
    """
    import tensorflow as tf

    check_signature(version_dir)
    loaded = tf.saved_model.load(str(version_dir))
    fn = loaded.signatures[SIGNATURE]

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = fn(input_ids=tf.constant(input_ids, dtype=tf.int32),
                 attention_mask=tf.constant(attention_mask, dtype=tf.int32))
        return np.asarray(out[OUTPUT].numpy(), dtype=np.float32)

    run.loaded = loaded  # type: ignore[attr-defined]  # keeps the variables alive
    return run


class LocalEncoder:
    """Encoder over ``model_base/<version>/`` loaded in this process.

    The model loads on ``start()`` (or on first use). ``encode`` runs on a private one-thread
    executor so the event loop never blocks; TensorFlow parallelises each batch itself over
    ``intra_op_threads`` cores.
    """

    dim = EMBEDDING_DIM

    def __init__(
        self,
        model_base: Path,
        *,
        model_version: int | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = DEFAULT_BATCH_SIZE,
        intra_op_threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise EncoderError(f"batch_size must be at least 1, got {batch_size}")
        self.model_base = Path(model_base).expanduser()
        self.model_name = model_name
        self.max_length = max_length
        self.batch_size = batch_size
        self._pinned = model_version
        self._threads = intra_op_threads
        self._lock = threading.Lock()
        self._run: RunBatch | None = None
        self._tokenizer: WordPieceTokenizer | None = None
        self._version = ""
        self._executor: ThreadPoolExecutor | None = None

    @property
    def model_version(self) -> str:
        """``<model_name>/<version>`` of the loaded SavedModel ("" until ``start()`` or the first encode)."""
        return self._version

    def _ensure_loaded(self) -> tuple[RunBatch, WordPieceTokenizer]:
        with self._lock:
            if self._run is None or self._tokenizer is None:
                version, version_dir = resolve_version(self.model_base, self._pinned)
                configure_threads(self._threads)
                vocab = version_dir / "assets.extra" / "vocab.txt"
                self._tokenizer = WordPieceTokenizer(vocab if vocab.is_file() else None, max_length=self.max_length)
                self._run = load_servable(version_dir)
                self._version = f"{self.model_name}/{version}"
            return self._run, self._tokenizer

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simstream-encoder")
        return self._executor

    async def start(self) -> None:
        """Load the SavedModel off the event loop."""
        await asyncio.get_running_loop().run_in_executor(self._pool(), self._ensure_loaded)

    async def close(self) -> None:
        """Stop the executor; the model is dropped with the encoder."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def encode(self, texts: Sequence[str]) -> Embeddings:
        """Embed texts on the encoder's thread; see ``encode_blocking``."""
        texts = check_texts(texts, self.max_length * CHARS_PER_TOKEN)  # fail fast, on the caller's stack
        return await asyncio.get_running_loop().run_in_executor(self._pool(), self.encode_blocking, texts)

    def encode_blocking(self, texts: Sequence[str]) -> Embeddings:
        """Embed texts: sorted by length, bucketed padding, vectors back in input order."""
        run, tokenizer = self._ensure_loaded()
        cut = check_texts(texts, self.max_length * CHARS_PER_TOKEN)
        if not cut:
            return empty_embeddings(self.dim, self._version)
        token_ids = tokenizer.encode(cut)
        out = np.empty((len(cut), self.dim), dtype=np.float32)
        for idx in plan_batches([len(t) for t in token_ids], self.batch_size):
            ids, mask = pack_batch([token_ids[i] for i in idx], self.max_length)
            out[idx] = run(ids, mask)
        return Embeddings(l2_normalize(out), self._version)

    def __repr__(self) -> str:
        return f"LocalEncoder({self.model_base}, version={self._pinned or 'latest'})"


