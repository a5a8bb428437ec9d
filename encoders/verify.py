"""Checks that a SavedModel version can replace the live one: signature, dimension, a real forward pass.

The worker calls ``verify_model`` before it switches to a new version (at start-up or on a
rollover) and, through ``choose_version``, keeps the version it has when the new one fails:
a wrong model must never reach the index, where its vectors would mix with the old ones.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoders.base import EMBEDDING_DIM, Encoder
from encoders.export import SIGNATURE, list_versions, read_signature_defs, signature_problems
from serving.errors import ModelMismatch

log = logging.getLogger(__name__)

#: ``[CLS] hello world [SEP]`` and ``[CLS] [SEP]`` plus padding in the MiniLM vocabulary:
#: any BERT-vocabulary model embeds them; the probe checks shape, finiteness and unit norm.
_PROBE_IDS = np.array([[101, 7592, 2088, 102], [101, 102, 0, 0]], dtype=np.int32)
_PROBE_MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=np.int32)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What ``verify_model`` found in a version folder that passed."""

    version_dir: Path
    dim: int
    max_length: int | None
    meta: dict[str, object]


def verify_model(version_dir: Path, expected_dim: int = EMBEDDING_DIM, *, probe: bool = True) -> ModelInfo:
    """Raise ``ModelMismatch`` unless ``version_dir`` is a simstream encoder of width ``expected_dim``.

    Checks, cheapest first: ``saved_model.pb`` exists; ``serving_default`` takes int32
    ``input_ids``/``attention_mask`` ``[batch, length]`` and returns float32 ``embedding``
    ``[batch, expected_dim]``; ``assets.extra/simstream.json`` (when present) agrees on the
    dimension; and with ``probe``, a two-text forward pass returns finite unit rows of that
    width (a signature can lie about shapes; running it cannot).
    """
    version_dir = Path(version_dir)
    if not (version_dir / "saved_model.pb").is_file():
        raise ModelMismatch(f"{version_dir} holds no saved_model.pb; export the model there or pick another version")
    try:
        signatures = read_signature_defs(version_dir)
    except Exception as exc:
        raise ModelMismatch(f"{version_dir}/saved_model.pb cannot be parsed ({exc}); re-export it") from exc
    sig = signatures.get(SIGNATURE)
    if sig is None:
        raise ModelMismatch(f"{version_dir} has no '{SIGNATURE}' signature (has {sorted(signatures)}); re-export it")
    problems = signature_problems(sig, expected_dim)
    if problems:
        raise ModelMismatch(f"{version_dir}: " + "; ".join(problems) + "; this version cannot replace the live one")
    meta: dict[str, object] = {}
    meta_path = version_dir / "assets.extra" / "simstream.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelMismatch(f"{meta_path} is not JSON ({exc}); re-export the version") from exc
        if meta.get("dim", expected_dim) != expected_dim:
            raise ModelMismatch(f"{meta_path} says dim {meta.get('dim')}, the index needs {expected_dim}")
    if probe:
        _probe(version_dir, expected_dim)
    max_length = meta.get("max_length")
    return ModelInfo(version_dir, expected_dim, max_length if isinstance(max_length, int) else None, meta)


def _probe(version_dir: Path, expected_dim: int) -> None:
    import tensorflow as tf

    try:
        fn = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE]
        out = fn(input_ids=tf.constant(_PROBE_IDS), attention_mask=tf.constant(_PROBE_MASK))
        vectors = np.asarray(next(iter(out.values())).numpy())
    except Exception as exc:
        raise ModelMismatch(f"{version_dir} fails a test forward pass ({type(exc).__name__}: {exc}); "
                            "re-export it") from exc
    if vectors.shape != (2, expected_dim):
        raise ModelMismatch(f"{version_dir} returned shape {vectors.shape} for 2 texts, expected (2, {expected_dim})")
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.isfinite(vectors)) or not np.allclose(norms, 1.0, atol=1e-3):
        raise ModelMismatch(f"{version_dir} returned non-finite or non-unit vectors (norms {norms.tolist()}); "
                            "the model must end in L2 normalisation")


def choose_version(model_base: Path, wanted: int | None, current: int | None,
                   expected_dim: int = EMBEDDING_DIM, *, probe: bool = True) -> tuple[int, str | None]:
    """The version to run: ``wanted`` (or the latest) if it verifies, else ``current``, with the reason.

    Returns ``(version, None)`` when the wanted one passed, ``(current, reason)`` when it was
    refused and the old one stays. Raises ``ModelMismatch`` only when there is no usable
    version at all (nothing current to keep).
    """
    versions = list_versions(Path(model_base))
    target = wanted if wanted is not None else (versions[-1] if versions else None)
    if target is not None and target == current:
        return current, None
    try:
        if target is None:
            raise ModelMismatch(f"no SavedModel version under {model_base}")
        verify_model(Path(model_base) / str(target), expected_dim, probe=probe)
    except ModelMismatch as exc:
        if current is None:
            raise
        log.error("model version %s refused, keeping version %s: %s", target, current, exc)
        return current, str(exc)
    return target, None


#: Texts ``probe_encoder`` embeds through a running encoder.
PROBE_TEXTS = ("hello world", "")


async def probe_encoder(encoder: Encoder, expected_dim: int = EMBEDDING_DIM) -> str:
    """Start ``encoder`` and embed two texts through it; returns the model version it reports.

    The same checks as ``verify_model``'s probe, through the adapter the worker will use (for
    TF Serving, ``start()`` also checks the served signature). Raises ``ModelMismatch`` for a
    wrong dimension or non-unit output; ``EncoderUnavailable`` passes through (an outage is
    not a verdict on the model).
    """
    await encoder.start()
    result = await encoder.encode(list(PROBE_TEXTS))
    vectors = np.asarray(result.vectors)
    if vectors.ndim != 2 or vectors.shape != (len(PROBE_TEXTS), expected_dim):
        raise ModelMismatch(f"model {result.model_version or '?'} returned vectors of shape {vectors.shape}, "
                            f"the index needs ({len(PROBE_TEXTS)}, {expected_dim})")
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.isfinite(vectors)) or not np.allclose(norms, 1.0, atol=1e-3):
        raise ModelMismatch(f"model {result.model_version} returned non-finite or non-unit vectors "
                            f"(norms {norms.tolist()})")
    return result.model_version
