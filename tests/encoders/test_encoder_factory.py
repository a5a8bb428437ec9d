"""``create_encoder``: one target string per adapter, clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from encoders import Encoder, create_encoder
from serving.errors import ConfigurationError


def test_targets_build_their_adapters(tmp_path: Path) -> None:
    from encoders.hashing import HashingEncoder
    from encoders.local import LocalEncoder
    from encoders.tfserving import TFServingEncoder

    local = create_encoder("local", model_base=tmp_path)
    assert isinstance(local, LocalEncoder) and isinstance(local, Encoder)
    remote = create_encoder("grpc://127.0.0.1:8500", model_base=tmp_path, model_version=3, timeout_s=2, retries=1)
    assert isinstance(remote, TFServingEncoder)
    assert (remote.target, remote.pinned_version, remote.timeout_s, remote.retries) == ("127.0.0.1:8500", 3, 2, 1)
    assert remote.deadline_budget_s <= 2 * 2 + 0.05
    assert isinstance(create_encoder("hashing", model_base=tmp_path), HashingEncoder)


@pytest.mark.parametrize("target", ["tfserving", "grpc://", "grpc://nohost", ""])
def test_bad_targets_name_the_setting(tmp_path: Path, target: str) -> None:
    with pytest.raises(ConfigurationError, match="SIMSTREAM_ENCODER"):
        create_encoder(target, model_base=tmp_path)


def test_local_encoder_without_a_model_says_how_to_export(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="export-encoder"):
        create_encoder("local", model_base=tmp_path).encode_blocking(["x"])
