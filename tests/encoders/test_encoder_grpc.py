"""The gRPC path against a real server: start-up checks, failure modes, deadlines, retries."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from encoders.tfserving import EncoderRequestError, TFServingEncoder
from serving.errors import EncoderUnavailable, ModelMismatch

pytestmark = pytest.mark.integration


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_start_checks_metadata_and_reports_version(grpc_server: Any) -> None:
    client = TFServingEncoder(grpc_server.address)
    await client.start()
    assert client.model_version == "minilm/1"
    result = await client.encode(["adobe photoshop"])
    assert result.model_version == "minilm/1"
    await client.close()


async def test_server_down_raises_unavailable_within_the_budget() -> None:
    client = TFServingEncoder(f"127.0.0.1:{free_port()}", timeout_s=0.5, retries=3, backoff_base_s=0.05)
    started = time.monotonic()
    with pytest.raises(EncoderUnavailable, match="failed 4 times"):
        await client.encode(["anything"])
    assert time.monotonic() - started <= client.deadline_budget_s + 0.5
    await client.close()


async def test_slow_server_hits_the_deadline_and_retries(server_factory: Any) -> None:
    calls = []

    def slow(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        calls.append(ids.shape)
        time.sleep(1.0)
        return np.zeros((ids.shape[0], 384), np.float32)

    server = server_factory(run=slow, workers=2)
    client = TFServingEncoder(server.address, timeout_s=0.3, retries=1, backoff_base_s=0.01)
    await client.start()  # metadata is fast; only Predict is slow
    started = time.monotonic()
    with pytest.raises(EncoderUnavailable, match="DEADLINE_EXCEEDED"):
        await client.encode(["slow"])
    assert time.monotonic() - started <= client.deadline_budget_s + 0.5
    assert len(calls) == 2  # first try and one retry
    await client.close()


async def test_wrong_model_name_is_a_clear_mismatch(grpc_server: Any) -> None:
    client = TFServingEncoder(grpc_server.address, model_name="bert", retries=3)
    with pytest.raises(ModelMismatch, match=r"does not serve model 'bert'.*SIMSTREAM_MODEL_NAME"):
        await client.start()
    await client.close()


async def test_missing_version_is_a_clear_mismatch(grpc_server: Any) -> None:
    client = TFServingEncoder(grpc_server.address, model_version=9)
    with pytest.raises(ModelMismatch, match="version 9"):
        await client.encode(["x"])
    await client.close()


async def test_pinned_version_is_served(grpc_server: Any) -> None:
    client = TFServingEncoder(grpc_server.address, model_version=1)
    assert (await client.encode(["x"])).model_version == "minilm/1"
    await client.close()


async def test_wrong_signature_dimension_fails_the_start_check(server_factory: Any) -> None:
    server = server_factory(run=lambda ids, mask: np.zeros((ids.shape[0], 384), np.float32))
    sig = server.server._signatures["serving_default"]
    sig.outputs["embedding"].tensor_shape.dim[1].size = 768
    client = TFServingEncoder(server.address)
    with pytest.raises(ModelMismatch, match="768"):
        await client.start()
    await client.close()


async def test_invalid_argument_is_reported_without_retry(grpc_server: Any) -> None:
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from encoders.tfserving import int32_tensor_proto

    async with grpc.aio.insecure_channel(grpc_server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "minilm"
        request.inputs["input_ids"].CopyFrom(int32_tensor_proto(np.array([[101, 102]])))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Predict(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    client = TFServingEncoder(grpc_server.address, retries=3)
    await client.start()
    client_call = client._call

    async def bad_predict(ids: np.ndarray, mask: np.ndarray) -> Any:
        request = predict_pb2.PredictRequest()
        client._fill_spec(request.model_spec)
        request.inputs["input_ids"].CopyFrom(int32_tensor_proto(ids))  # no attention_mask
        return await client_call(client._stub().Predict, request, "Predict")

    client._predict = bad_predict  # type: ignore[method-assign]
    with pytest.raises(EncoderRequestError, match="rejected"):
        await client.encode(["x"])
    await client.close()


async def test_model_status(grpc_server: Any) -> None:
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    async with grpc.aio.insecure_channel(grpc_server.address) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "minilm"
        response = await stub.GetModelStatus(request, timeout=5)
    assert response.model_version_status[0].version == 1
    assert response.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def test_encode_blocking_from_sync_code(grpc_server: Any) -> None:
    import asyncio

    client = TFServingEncoder(grpc_server.address)
    assert client.encode_blocking(["a", "b"]).vectors.shape == (2, 384)
    asyncio.run(client.close())


async def test_version_rollover_mid_call_never_mixes_models(server_factory: Any) -> None:
    server = server_factory(run=lambda ids, mask: np.ones((ids.shape[0], 384), np.float32))
    owner = server.server
    calls = 0
    original = owner.fill_spec

    def rolling(spec: Any, signature: str | None, version: int | None = None) -> None:
        nonlocal calls
        calls += 1
        original(spec, signature, version)
        if calls > 2:  # metadata and the first batch see version 1, everything after version 2
            spec.version.value = 2

    owner.fill_spec = rolling
    client = TFServingEncoder(server.address, batch_size=1, concurrency=1)
    await client.start()
    assert client.model_version == "minilm/1"
    result = await client.encode(["a", "b", "c"])
    assert result.model_version == "minilm/2"
    assert calls == 1 + 3 + 3  # metadata, a mixed first pass, a clean second pass
    await client.close()


async def test_an_unpinned_server_serves_every_version_and_picks_up_new_ones(model_base: Any, tmp_path: Any) -> None:
    """Versions 1 and 2 answer side by side; a version exported later is loaded; a bad one is END."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    from tests.encoders.conftest import ServerThread
    from tests.support import write_toy_model

    base = tmp_path / "minilm"
    base.mkdir()
    (base / "1").symlink_to(model_base / "1", target_is_directory=True)
    write_toy_model(base / "2")
    server = ServerThread(base, poll_s=0.2)
    try:
        one = TFServingEncoder(server.address, model_version=1)
        two = TFServingEncoder(server.address, model_version=2)
        latest = TFServingEncoder(server.address)
        a, b, c = [await e.encode(["copper kettle"]) for e in (one, two, latest)]
        assert (a.model_version, b.model_version, c.model_version) == ("minilm/1", "minilm/2", "minilm/2")
        assert float(np.dot(a.vectors[0], b.vectors[0])) < 0.9  # two different models
        assert await one.available_versions() == [1, 2]

        write_toy_model(base / "3", dim=8)  # not a simstream encoder: reported, not served
        write_toy_model(base / "4", seed=4)
        assert (await TFServingEncoder(server.address, model_version=4).encode(["x"])).model_version == "minilm/4"
        async with grpc.aio.insecure_channel(server.address) as channel:
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "minilm"
            response = await model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=30)
        states = {s.version: (s.state, s.status.error_message) for s in response.model_version_status}
        assert sorted(states) == [1, 2, 3, 4]
        assert states[3][0] == get_model_status_pb2.ModelVersionStatus.END and "384" in states[3][1]
        assert await one.available_versions() == [1, 2, 4]
        with pytest.raises(ModelMismatch, match="version 3"):
            await TFServingEncoder(server.address, model_version=3, retries=0).start()
        for encoder in (one, two, latest):
            await encoder.close()
    finally:
        server.stop()
