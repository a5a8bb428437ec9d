"""The worker and the CLI talk to Kafka over TLS, and over SASL/SCRAM on top of it.

The test starts its own broker from ``infra/kafka`` with a TLS listener and a SASL_SSL
listener, using a CA and a broker certificate it generates with openssl, and a SCRAM user
it registers when the storage is formatted.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streams.kafka_io import create_topics, latest_by_key, producer, read_topic
from streams.settings import Settings
from tests.support import ROOT, WorkerProcess, free_port

pytestmark = pytest.mark.integration

KAFKA_SH = ROOT / "infra" / "kafka" / "kafka.sh"


def make_certificates(directory: Path) -> tuple[Path, Path]:
    """A throwaway CA and a broker certificate for 127.0.0.1; returns (ca.pem, broker.pem)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=simstream-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
        "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "broker.crt", "-days", "2", "-extfile", "san.ext")
    run("pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.pk8")
    keystore = directory / "broker.pem"
    keystore.write_text((directory / "broker.pk8").read_text() + (directory / "broker.crt").read_text())
    return directory / "ca.pem", keystore


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("tls")
    ca, keystore = make_certificates(directory)
    plain, controller, tls, sasl = free_port(), free_port(), free_port(), free_port()
    extra = directory / "tls.properties"
    extra.write_text(f"""
listeners=PLAINTEXT://127.0.0.1:{plain},CONTROLLER://127.0.0.1:{controller},SSL://127.0.0.1:{tls},SASL_SSL://127.0.0.1:{sasl}
advertised.listeners=PLAINTEXT://127.0.0.1:{plain},SSL://127.0.0.1:{tls},SASL_SSL://127.0.0.1:{sasl}
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={ca}
ssl.client.auth=none
sasl.enabled.mechanisms=SCRAM-SHA-256
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
""")
    env = {**os.environ, "KAFKA_EXTRA_CONFIG": str(extra), "KAFKA_CONTROLLER_PORT": str(controller),
           "KAFKA_SCRAM_USERS": "SCRAM-SHA-256=[name=simstream,password=scram-secret]"}
    data = directory / "data"
    subprocess.run([str(KAFKA_SH), "up", "--port", str(plain), "--data", str(data)], check=True, env=env)
    try:
        yield {"ca": ca, "tls": f"127.0.0.1:{tls}", "sasl": f"127.0.0.1:{sasl}"}
    finally:
        subprocess.run([str(KAFKA_SH), "down", "--port", str(plain), "--data", str(data)], check=False, env=env)


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_the_worker_works_through_tls(
    protocol: str, tls_broker: dict[str, Any], isolated_env: dict[str, str],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    security = {
        "SIMSTREAM_KAFKA_BOOTSTRAP": tls_broker["tls" if protocol == "SSL" else "sasl"],
        "SIMSTREAM_KAFKA_SECURITY_PROTOCOL": protocol,
        "SIMSTREAM_KAFKA_SSL_CAFILE": str(tls_broker["ca"]),
    }
    if protocol == "SASL_SSL":
        security |= {"SIMSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256", "SIMSTREAM_KAFKA_SASL_USERNAME": "simstream",
                     "SIMSTREAM_KAFKA_SASL_PASSWORD": "scram-secret"}
    env = {**isolated_env, **security}
    settings = Settings(**{k.removeprefix("SIMSTREAM_").lower(): v for k, v in env.items()})
    create_topics(settings)
    worker = worker_factory(**security)
    worker.wait_ready()

    kafka = producer(settings)
    for pid, title in (("T1", "Sony WH-1000XM4 headphones"), ("T2", "Sony WH-1000XM5 headphones")):
        kafka.send(settings.topic_product_changes, key=pid.encode(), value=json.dumps(
            {"op": "upsert", "product_id": pid, "title": title, "ts": time.time()}).encode())
    kafka.flush()
    kafka.close()

    deadline = time.monotonic() + 60
    lists: dict[str, Any] = {}
    while time.monotonic() < deadline and len(lists) < 2:
        lists = latest_by_key(read_topic(settings, settings.topic_similar_items))
        time.sleep(0.5)
    assert lists["T1"]["items"][0]["product_id"] == "T2"
    assert "s3cret" not in worker.log_tail(400) and "scram-secret" not in worker.log_tail(400)


def test_a_client_that_does_not_trust_the_broker_is_refused(
    tls_broker: dict[str, Any], isolated_env: dict[str, str], tmp_path: Path
) -> None:
    from kafka.errors import KafkaError

    other_ca, _ = make_certificates(tmp_path)
    values: dict[str, Any] = {k.removeprefix("SIMSTREAM_").lower(): v for k, v in isolated_env.items()}
    values |= {"kafka_bootstrap": tls_broker["tls"], "kafka_security_protocol": "SSL", "kafka_ssl_cafile": other_ca}
    settings = Settings(**values)
    from kafka.admin import KafkaAdminClient

    from streams.kafka_io import client_options

    with pytest.raises((KafkaError, OSError)):
        KafkaAdminClient(**client_options(settings), api_version_auto_timeout_ms=3000, request_timeout_ms=3000)
