"""Build the configured ``Encoder`` from explicit settings (the core never reads the environment)."""

from __future__ import annotations

from pathlib import Path

from encoders.base import Encoder
from encoders.tokenizer import DEFAULT_MAX_LENGTH
from serving.errors import ConfigurationError


def create_encoder(
    target: str,
    *,
    model_base: Path,
    model_name: str = "minilm",
    model_version: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    timeout_s: float = 5.0,
    retries: int = 4,
) -> Encoder:
    """``local`` -> ``LocalEncoder``, ``grpc://host:port`` -> ``TFServingEncoder``, ``hashing`` -> ``HashingEncoder``.

    Nothing is loaded or connected here; call ``await encoder.start()`` (or just encode).
    """
    if target == "local":
        from encoders.local import LocalEncoder

        return LocalEncoder(model_base, model_version=model_version, model_name=model_name, max_length=max_length)
    if target.startswith("grpc://"):
        address = target[len("grpc://") :]
        if not address or ":" not in address:
            raise ConfigurationError(f"SIMSTREAM_ENCODER={target!r}: expected grpc://host:port")
        from encoders.tfserving import TFServingEncoder

        return TFServingEncoder(address, model_name=model_name, model_version=model_version,
                                max_length=max_length, timeout_s=timeout_s, retries=retries)
    if target == "hashing":
        from encoders.hashing import HashingEncoder

        return HashingEncoder(max_length=max_length)
    raise ConfigurationError(f"SIMSTREAM_ENCODER={target!r}: use 'local', 'grpc://host:port' or 'hashing'")
