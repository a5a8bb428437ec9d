"""Settings: one frozen object, read from SIMSTREAM_* variables, validated on load."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from streams.settings import Settings, configuration_markdown


def test_defaults_match_the_design(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, _, _ in Settings.describe():
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.kafka_bootstrap == "127.0.0.1:9092" and s.encoder == "local" and s.k == 10
    assert s.topic_product_changes == "product-changes" and s.topic_dead_letters == "simstream-dead-letters"
    assert s.topic_partitions == 6 and s.web_host == "127.0.0.1"


def test_environment_variables_are_read_and_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMSTREAM_KAFKA_BOOTSTRAP", "10.0.0.1:9093, 10.0.0.2:9093")
    monkeypatch.setenv("SIMSTREAM_K", "25")
    monkeypatch.setenv("SIMSTREAM_PRICE_BAND", "0.2")
    monkeypatch.setenv("SIMSTREAM_ENCODER", "grpc://127.0.0.1:8500")
    monkeypatch.setenv("SIMSTREAM_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("SIMSTREAM_KAFKA_SSL_CAFILE", "/etc/ca.pem")
    s = Settings()
    assert s.bootstrap_servers == ["10.0.0.1:9093", "10.0.0.2:9093"]
    assert s.k == 25 and s.price_band == 0.2 and s.encoder == "grpc://127.0.0.1:8500"
    assert s.kafka_ssl_cafile == Path("/etc/ca.pem")


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.k = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("var", "value"),
    [("SIMSTREAM_K", "0"), ("SIMSTREAM_ENCODER", "http://x"), ("SIMSTREAM_LEXICAL_WEIGHT", "1.5"),
     ("SIMSTREAM_WEB_PORT", "70000"), ("SIMSTREAM_KAFKA_SECURITY_PROTOCOL", "TLS")],
)
def test_invalid_values_are_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError) as err:
        Settings()
    assert var.removeprefix("SIMSTREAM_").lower() in str(err.value)


def test_sasl_requires_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ValidationError, match="SASL_USERNAME"):
        Settings()
    monkeypatch.setenv("SIMSTREAM_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("SIMSTREAM_KAFKA_SASL_PASSWORD", "s3cret")
    s = Settings()
    assert "s3cret" not in repr(s)


def test_configuration_doc_is_generated_from_the_settings() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    expected = configuration_markdown()
    assert all(f"`{var}`" in expected and description for var, _, description in Settings.describe())
    assert doc.read_text(encoding="utf-8") == expected, (
        "docs/configuration.md is out of date with streams/settings.py: regenerate it with `make docs` "
        "(or `simstream settings --markdown > docs/configuration.md`)"
    )


def test_configuration_doc_shows_home_paths_portably(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone-else")
    assert "`~/.cache/simstream/models/minilm`" in configuration_markdown()


def test_settings_command_prints_what_make_docs_writes() -> None:
    from click.testing import CliRunner

    from streams.cli import main

    result = CliRunner().invoke(main, ["settings", "--markdown"])
    assert result.exit_code == 0 and result.output == configuration_markdown()
    plain = CliRunner().invoke(main, ["settings"])
    assert plain.exit_code == 0 and plain.output.startswith("SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:9092\t")


def test_a_model_version_that_carries_a_blend_sets_the_lists_weights(tmp_path: Path) -> None:
    import json as _json

    from serving.config import Blend
    from streams.rollover import blend_for
    from streams.settings import Settings

    base = tmp_path / "minilm"
    (base / "2" / "assets.extra").mkdir(parents=True)
    (base / "2" / "assets.extra" / "simstream.json").write_text(_json.dumps(
        {"dim": 384, "blend": {"lexical_weight": 0.2, "lexical_floor": 0.1, "behavior_weight": 0.3}}), encoding="utf-8")
    (base / "3" / "assets.extra").mkdir(parents=True)
    (base / "3" / "assets.extra" / "simstream.json").write_text(_json.dumps(
        {"dim": 384, "blend": {"lexical_weight": 7, "lexical_floor": 0.1, "behavior_weight": 0.3}}), encoding="utf-8")
    settings = Settings(model_base=base, lexical_weight=0.6, lexical_floor=0.4, behavior_weight=0.0)
    assert blend_for(settings, 2) == Blend(0.2, 0.1, 0.3)
    configured = Blend(0.6, 0.4, 0.0)
    assert blend_for(settings, 1) == configured  # no folder here: the settings' blend
    assert blend_for(settings, 3) == configured  # an invalid blend is not used
    assert blend_for(settings, None) == configured
    off = Settings(model_base=base, model_blend=False, lexical_weight=0.6, lexical_floor=0.4, behavior_weight=0.0)
    assert blend_for(off, 2) == configured
