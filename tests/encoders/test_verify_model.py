"""A model version with the wrong signature or dimension is refused, and the old version stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from encoders.verify import choose_version, verify_model
from serving.errors import ModelMismatch


def _save_fake(version_dir: Path, *, dim: int = 384, input_name: str = "input_ids",
               static_dim: bool = True) -> Path:
    """A tiny SavedModel shaped like the encoder but with the given output width or input name."""
    import tensorflow as tf

    spec = [tf.TensorSpec([None, None], tf.int32, name=input_name),
            tf.TensorSpec([None, None], tf.int32, name="attention_mask")]

    @tf.function(input_signature=spec)
    def serve(a: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        x = tf.cast(tf.reduce_sum(a + mask, axis=1, keepdims=True), tf.float32) + tf.ones([1, dim])
        x = tf.math.l2_normalize(x, axis=1)
        if not static_dim:  # a signature that hides its width: only the probe can tell
            x = tf.reshape(x, [tf.shape(a)[0], -1])
        return {"embedding": x}

    module = tf.Module()
    module.serve = serve
    tf.saved_model.save(module, str(version_dir), signatures={"serving_default": serve})
    return version_dir


def test_the_exported_model_verifies(model_base: Path) -> None:
    info = verify_model(model_base / "1", 384)
    assert info.dim == 384 and info.max_length == 128


def test_wrong_dimension_and_signature_are_refused(tmp_path: Path, model_base: Path) -> None:
    with pytest.raises(ModelMismatch, match=r"output 'embedding' must be float32 \[batch, 384\], is \[-1, 8\]"):
        verify_model(_save_fake(tmp_path / "narrow", dim=8), 384)
    with pytest.raises(ModelMismatch, match="input 'input_ids' is missing"):
        verify_model(_save_fake(tmp_path / "renamed", input_name="tokens"), 384)
    with pytest.raises(ModelMismatch, match=r"returned shape \(2, 8\)"):
        verify_model(_save_fake(tmp_path / "hidden", dim=8, static_dim=False), -1)
    with pytest.raises(ModelMismatch, match=r"holds no saved_model\.pb"):
        verify_model(tmp_path / "nothing", 384)
    with pytest.raises(ModelMismatch, match=r"\[batch, 256\]"):
        verify_model(model_base / "1", 256, probe=False)


def test_choose_version_keeps_the_old_version_when_the_new_one_is_wrong(tmp_path: Path, model_base: Path) -> None:
    base = tmp_path / "minilm"
    base.mkdir()
    (base / "1").symlink_to(model_base / "1", target_is_directory=True)
    _save_fake(base / "2", dim=8)
    version, reason = choose_version(base, None, current=1)
    assert version == 1 and reason is not None and "[batch, 384]" in reason
    assert choose_version(base, 1, current=None) == (1, None)
    with pytest.raises(ModelMismatch):
        choose_version(base, 2, current=None)  # nothing live to keep: start-up must fail loudly
