"""The SavedModel export: TF Serving's signature, weights stored once, configs, versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encoders.export import (
    check_signature,
    list_versions,
    models_config_text,
    read_signature_defs,
    resolve_version,
)
from serving.errors import ConfigurationError


def test_serving_default_signature(model_base: Path) -> None:
    sig = read_signature_defs(model_base / "1")["serving_default"]
    from tensorflow.core.framework import types_pb2

    assert set(sig.inputs) == {"input_ids", "attention_mask"}
    for tensor in sig.inputs.values():
        assert tensor.dtype == types_pb2.DT_INT32
        assert [d.size for d in tensor.tensor_shape.dim] == [-1, -1]
    assert list(sig.outputs) == ["embedding"]
    assert sig.outputs["embedding"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in sig.outputs["embedding"].tensor_shape.dim] == [-1, 384]
    assert sig.method_name == "tensorflow/serving/predict"
    check_signature(model_base / "1")


def test_signature_runs_with_tf_and_returns_unit_rows(model_base: Path) -> None:
    import tensorflow as tf

    fn = tf.saved_model.load(str(model_base / "1")).signatures["serving_default"]
    out = fn(input_ids=tf.constant([[101, 7592, 102, 0]], tf.int32),
             attention_mask=tf.constant([[1, 1, 1, 0]], tf.int32))["embedding"].numpy()
    assert out.shape == (1, 384) and out.dtype == np.float32
    assert abs(float(np.linalg.norm(out)) - 1.0) < 1e-5


def test_weights_are_stored_once(model_base: Path) -> None:
    from encoders.tokenizer import weights_dir

    variables = sum(p.stat().st_size for p in (model_base / "1" / "variables").iterdir())
    reference = (weights_dir() / "model.safetensors").stat().st_size
    assert variables < 1.1 * reference, (variables, reference)
    assert (model_base / "1" / "saved_model.pb").stat().st_size < 5_000_000  # no constants folded in


def test_export_leaves_no_temporary_folder_and_ships_the_vocab(model_base: Path) -> None:
    assert [p.name for p in model_base.iterdir()] == ["1"]
    assert (model_base / "1" / "assets.extra" / "vocab.txt").is_file()


def test_tf_serving_configs(model_base: Path) -> None:
    config_dir = model_base.parent / "tfserving"
    models = (config_dir / "models.config").read_text()
    assert 'name: "minilm"' in models and 'base_path: "/models/minilm"' in models
    batching = (config_dir / "batching_parameters.txt").read_text()
    assert "pad_variable_length_inputs: true" in batching and "max_batch_size { value: 128 }" in batching
    assert 'base_path: "/srv/m"' in models_config_text("minilm", "/srv/m")


def test_committed_default_config_matches_the_writer() -> None:
    root = Path(__file__).resolve().parents[2]
    assert (root / "infra" / "tfserving" / "models.config").read_text() == models_config_text()


def test_version_resolution(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="export-encoder"):
        resolve_version(tmp_path, None)
    for v in ("1", "3", "10"):
        (tmp_path / v).mkdir()
        (tmp_path / v / "saved_model.pb").write_bytes(b"")
    (tmp_path / "7").mkdir()  # incomplete: no saved_model.pb
    (tmp_path / ".export-11-x").mkdir()
    assert list_versions(tmp_path) == [1, 3, 10]
    assert resolve_version(tmp_path, None)[0] == 10
    assert resolve_version(tmp_path, 3)[0] == 3
    with pytest.raises(ConfigurationError, match="version 7"):
        resolve_version(tmp_path, 7)
