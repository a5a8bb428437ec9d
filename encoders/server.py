"""A small gRPC server that speaks TF Serving's ``PredictionService`` over the exported SavedModel.

``simstream serve-encoder`` runs it, so the gRPC path (``TFServingEncoder``) works and is
tested without TF Serving. It implements ``Predict`` and ``GetModelMetadata`` of
``tensorflow.serving.PredictionService`` and ``GetModelStatus`` of ``ModelService``, with TF
Serving's status codes: NOT_FOUND for an unknown model name or version, INVALID_ARGUMENT for a
bad signature name, missing inputs, or wrong dtypes and shapes.

Production does not use it: there the client points at ``tensorflow/serving:*-gpu`` with
``infra/tfserving/models.config`` and ``batching_parameters.txt`` (server-side batching, GPU).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from encoders.export import (
    ATTENTION_MASK,
    DEFAULT_MODEL_NAME,
    INPUT_IDS,
    OUTPUT,
    SIGNATURE,
    read_signature_defs,
    resolve_version,
)
from encoders.local import RunBatch, load_servable

log = logging.getLogger(__name__)

#: Largest request or response the server accepts (matches the client's default).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Largest batch x length a request may ask for; guards memory against a hostile client.
MAX_TOKENS_PER_REQUEST = 1024 * 512


def _int32_matrix(proto: Any, name: str) -> np.ndarray:
    from tensorflow.core.framework import types_pb2

    if proto.dtype != types_pb2.DT_INT32:
        raise ValueError(f"input '{name}' must be DT_INT32, got {types_pb2.DataType.Name(proto.dtype)}")
    shape = [d.size for d in proto.tensor_shape.dim]
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"input '{name}' must be [batch, length] with both > 0, got {shape}")
    if shape[0] * shape[1] > MAX_TOKENS_PER_REQUEST:
        raise ValueError(f"input '{name}' has {shape[0] * shape[1]} tokens, more than {MAX_TOKENS_PER_REQUEST}")
    if proto.tensor_content:
        flat = np.frombuffer(proto.tensor_content, dtype="<i4")
    else:
        flat = np.asarray(proto.int_val, dtype=np.int32)
    if flat.size != shape[0] * shape[1]:
        raise ValueError(f"input '{name}' holds {flat.size} values for shape {shape}")
    return flat.reshape(shape)


def _float_proto(array: np.ndarray) -> Any:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    array = np.ascontiguousarray(array, dtype="<f4")
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in array.shape]
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
        tensor_content=array.tobytes(),
    )


class EncoderServer:
    """PredictionService + ModelService over ``model_base/<version>/`` on ``host:port``."""

    def __init__(
        self,
        model_base: Path,
        *,
        model_name: str = DEFAULT_MODEL_NAME,
        model_version: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        workers: int = 1,
        run: RunBatch | None = None,
    ) -> None:
        self.model_base = Path(model_base).expanduser()
        self.model_name = model_name
        self.version, self.version_dir = resolve_version(self.model_base, model_version)
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self._signatures = read_signature_defs(self.version_dir)
        self._run = run if run is not None else load_servable(self.version_dir)
        # One model run at a time per worker: TensorFlow spreads each batch over the cores.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encoder-server")
        self._server: Any = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with ``port=0``)."""
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        self._server = grpc.aio.server(options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Prediction(self), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelStatus(self), self._server)
        bound = self._server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise OSError(f"cannot bind {self.host}:{self.port}; is the port in use?")
        self.port = bound
        await self._server.start()
        log.info("serving model %s version %s from %s on %s:%s", self.model_name, self.version,
                 self.version_dir, self.host, bound)
        return bound

    async def wait(self) -> None:
        """Serve until the server stops."""
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace_s``, release the executor."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        self._executor.shutdown(wait=False)

    # --- shared checks ----------------------------------------------------------------
    async def check_spec(self, spec: Any, context: Any) -> None:
        import grpc

        if spec.name != self.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"Servable not found for request: Latest({spec.name}); "
                                f"this server serves '{self.model_name}'")
        if spec.HasField("version") and spec.version.value != self.version:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"Servable not found for request: Specific({spec.name}, {spec.version.value}); "
                                f"available: {self.version}")
        if spec.version_label:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no version label '{spec.version_label}' is assigned")

    def fill_spec(self, spec: Any, signature: str | None) -> None:
        spec.name = self.model_name
        spec.version.value = self.version
        if signature is not None:
            spec.signature_name = signature

    async def predict(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, ids, mask)


def _servicer_base() -> type:
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    return prediction_service_pb2_grpc.PredictionServiceServicer  # type: ignore[no-any-return]


class _Prediction(_servicer_base()):  # type: ignore[misc]
    def __init__(self, owner: EncoderServer) -> None:
        self.owner = owner

    async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802  (gRPC method name)
        import grpc
        from tensorflow_serving.apis import predict_pb2

        owner = self.owner
        await owner.check_spec(request.model_spec, context)
        signature = request.model_spec.signature_name or SIGNATURE
        if signature != SIGNATURE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Serving signature key \"{signature}\" not found; use \"{SIGNATURE}\"")
        missing = [n for n in (INPUT_IDS, ATTENTION_MASK) if n not in request.inputs]
        extra = [n for n in request.inputs if n not in (INPUT_IDS, ATTENTION_MASK)]
        if missing or extra:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"inputs must be exactly {INPUT_IDS!r} and {ATTENTION_MASK!r}; "
                                f"missing {missing}, unexpected {extra}")
        if any(name != OUTPUT for name in request.output_filter):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"output_filter may only name '{OUTPUT}', got {list(request.output_filter)}")
        try:
            ids = _int32_matrix(request.inputs[INPUT_IDS], INPUT_IDS)
            mask = _int32_matrix(request.inputs[ATTENTION_MASK], ATTENTION_MASK)
            if ids.shape != mask.shape:
                raise ValueError(f"{INPUT_IDS} {list(ids.shape)} and {ATTENTION_MASK} {list(mask.shape)} differ")
            if ids.min() < 0 or ids.max() >= 30522:
                raise ValueError("token ids must be in [0, 30522)")
            if ids.shape[1] > 512:
                raise ValueError(f"length {ids.shape[1]} exceeds the model's 512 positions")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        vectors = await owner.predict(ids, mask)
        response = predict_pb2.PredictResponse()
        owner.fill_spec(response.model_spec, SIGNATURE)
        response.outputs[OUTPUT].CopyFrom(_float_proto(vectors))
        return response

    async def GetModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        import grpc
        from tensorflow_serving.apis import get_model_metadata_pb2

        owner = self.owner
        await owner.check_spec(request.model_spec, context)
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Metadata field(s) {fields} not supported; ask for ['signature_def']")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        owner.fill_spec(response.model_spec, None)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in owner._signatures.items():
            sig_map.signature_def[name].CopyFrom(sig)
        response.metadata["signature_def"].Pack(sig_map)
        return response


def _status_base() -> type:
    from tensorflow_serving.apis import model_service_pb2_grpc

    return model_service_pb2_grpc.ModelServiceServicer  # type: ignore[no-any-return]


class _ModelStatus(_status_base()):  # type: ignore[misc]
    def __init__(self, owner: EncoderServer) -> None:
        self.owner = owner

    async def GetModelStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
        from tensorflow_serving.apis import get_model_status_pb2

        await self.owner.check_spec(request.model_spec, context)
        status = get_model_status_pb2.ModelVersionStatus(
            version=self.owner.version, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE
        )
        return get_model_status_pb2.GetModelStatusResponse(model_version_status=[status])


async def serve(model_base: Path, *, host: str = "127.0.0.1", port: int = 8500,
                model_name: str = DEFAULT_MODEL_NAME, model_version: int | None = None) -> None:
    """Run the server until cancelled (what ``simstream serve-encoder`` does)."""
    server = EncoderServer(model_base, model_name=model_name, model_version=model_version, host=host, port=port)
    await server.start()
    try:
        await server.wait()
    finally:
        await server.stop()
