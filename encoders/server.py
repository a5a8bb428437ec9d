"""A small gRPC server that speaks TF Serving's ``PredictionService`` over the exported SavedModel.

``simstream serve-encoder`` runs it, so the gRPC path (``TFServingEncoder``) works and is
tested without TF Serving. It implements ``Predict`` and ``GetModelMetadata`` of
``tensorflow.serving.PredictionService`` and ``GetModelStatus`` of ``ModelService``, with TF
Serving's status codes: NOT_FOUND for an unknown model name or version, INVALID_ARGUMENT for a
bad signature name, missing inputs, or wrong dtypes and shapes.

Versions: like TF Serving with ``model_version_policy { all {} }``, an unpinned server serves
every version folder under the base path, watches the base (every ``poll_s`` seconds, and
whenever a request names a version it does not have) and loads new versions as they appear,
so a worker can roll from version N to M while both answer. A request without a version gets
the latest. A version that fails to load (not a simstream encoder) is reported by
``GetModelStatus`` as ``END`` with its error, and is not served. A pinned server
(``model_version``) serves that version only.

Production does not use it: there the client points at ``tensorflow/serving:*-gpu`` with
``infra/tfserving/models.config`` and ``batching_parameters.txt`` (server-side batching, GPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encoders.export import (
    ATTENTION_MASK,
    DEFAULT_MODEL_NAME,
    INPUT_IDS,
    OUTPUT,
    SIGNATURE,
    list_versions,
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


@dataclass(frozen=True)
class Servable:
    """One loaded version: its folder, signatures and forward pass."""

    version: int
    version_dir: Path
    signatures: dict[str, Any]
    run: RunBatch


def load_version(version_dir: Path, version: int, run: RunBatch | None = None) -> Servable:
    """Load one version folder (raises when it is not a simstream encoder SavedModel)."""
    signatures = read_signature_defs(version_dir)
    return Servable(version, version_dir, signatures, run if run is not None else load_servable(version_dir))


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
        poll_s: float = 2.0,
    ) -> None:
        self.model_base = Path(model_base).expanduser()
        self.model_name = model_name
        self.pinned = model_version
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.poll_s = poll_s
        #: Loaded versions, and versions that failed to load with the reason.
        self.servables: dict[int, Servable] = {}
        self.failed: dict[int, str] = {}
        # The first version (pinned, or the latest) must load: it is what the server is for.
        version, version_dir = resolve_version(self.model_base, model_version)
        self.servables[version] = load_version(version_dir, version, run)
        if model_version is None:
            self._load_new(self._wanted())
        # One model run at a time per worker: TensorFlow spreads each batch over the cores.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encoder-server")
        self._server: Any = None
        self._refresh_lock: asyncio.Lock | None = None
        self._watcher: asyncio.Task[None] | None = None

    @property
    def version(self) -> int:
        """The latest loaded version: what a request without a version gets."""
        return max(self.servables)

    @property
    def version_dir(self) -> Path:
        return self.servables[self.version].version_dir

    @property
    def _signatures(self) -> dict[str, Any]:
        return self.servables[self.version].signatures

    def _wanted(self) -> list[int]:
        return [v for v in list_versions(self.model_base) if v not in self.servables and v not in self.failed]

    def _load_new(self, versions: list[int]) -> None:
        for version in versions:
            try:
                self.servables[version] = load_version(self.model_base / str(version), version)
                log.info("loaded model %s version %s", self.model_name, version)
            except Exception as exc:  # noqa: BLE001 - a bad version must not stop the others
                self.failed[version] = f"{type(exc).__name__}: {exc}"
                log.error("not serving model %s version %s: %s", self.model_name, version, exc)

    async def refresh(self) -> None:
        """Load versions that appeared under the base, drop those whose folder is gone (unpinned only)."""
        if self.pinned is not None:
            return
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            present = set(list_versions(self.model_base))
            for gone in [v for v in self.servables if v not in present and len(self.servables) > 1]:
                del self.servables[gone]
                log.info("unloaded model %s version %s (its folder is gone)", self.model_name, gone)
            for gone in [v for v in self.failed if v not in present]:
                del self.failed[gone]
            wanted = self._wanted()
            if wanted:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._load_new, wanted)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep watching
                log.error("scanning %s failed: %s", self.model_base, exc)

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
        if self.pinned is None and self.poll_s > 0:
            self._watcher = asyncio.ensure_future(self._watch())
        log.info("serving model %s version(s) %s from %s on %s:%s", self.model_name, sorted(self.servables),
                 self.model_base, self.host, bound)
        return bound

    async def wait(self) -> None:
        """Serve until the server stops."""
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace_s``, release the executor."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        self._executor.shutdown(wait=False)

    # --- shared checks ----------------------------------------------------------------
    async def check_spec(self, spec: Any, context: Any) -> Servable:
        """The servable a request's ``model_spec`` names; aborts NOT_FOUND when there is none."""
        import grpc

        if spec.name != self.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"Servable not found for request: Latest({spec.name}); "
                                f"this server serves '{self.model_name}'")
        if spec.version_label:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no version label '{spec.version_label}' is assigned")
        if not spec.HasField("version"):
            return self.servables[self.version]
        wanted = spec.version.value
        if wanted not in self.servables:
            await self.refresh()  # it may just have been exported
        servable = self.servables.get(wanted)
        if servable is None:
            reason = f" (it failed to load: {self.failed[wanted]})" if wanted in self.failed else ""
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"Servable not found for request: Specific({spec.name}, {wanted}){reason}; "
                                f"available: {', '.join(map(str, sorted(self.servables)))}")
        assert servable is not None
        return servable

    def fill_spec(self, spec: Any, signature: str | None, version: int | None = None) -> None:
        spec.name = self.model_name
        spec.version.value = self.version if version is None else version
        if signature is not None:
            spec.signature_name = signature

    async def predict(self, ids: np.ndarray, mask: np.ndarray, servable: Servable | None = None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        run = (servable or self.servables[self.version]).run
        return await loop.run_in_executor(self._executor, run, ids, mask)


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
        servable = await owner.check_spec(request.model_spec, context)
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
        vectors = await owner.predict(ids, mask, servable)
        response = predict_pb2.PredictResponse()
        owner.fill_spec(response.model_spec, SIGNATURE, version=servable.version)
        response.outputs[OUTPUT].CopyFrom(_float_proto(vectors))
        return response

    async def GetModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        import grpc
        from tensorflow_serving.apis import get_model_metadata_pb2

        owner = self.owner
        servable = await owner.check_spec(request.model_spec, context)
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Metadata field(s) {fields} not supported; ask for ['signature_def']")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        owner.fill_spec(response.model_spec, None, version=servable.version)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in servable.signatures.items():
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
        """Every version's state (AVAILABLE, or END with the load error), as TF Serving reports them."""
        import grpc
        from tensorflow_serving.apis import get_model_status_pb2, status_pb2

        owner = self.owner
        spec = request.model_spec
        if spec.name != owner.model_name or spec.version_label:
            await owner.check_spec(spec, context)  # aborts with TF Serving's NOT_FOUND
        await owner.refresh()
        states = get_model_status_pb2.ModelVersionStatus
        statuses = [states(version=v, state=states.AVAILABLE) for v in sorted(owner.servables)]
        statuses += [states(version=v, state=states.END,
                            status=status_pb2.StatusProto(error_code=3, error_message=reason))
                     for v, reason in sorted(owner.failed.items())]
        if spec.HasField("version"):
            statuses = [s for s in statuses if s.version == spec.version.value]
            if not statuses:
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"Could not find version {spec.version.value} of model {spec.name}")
        statuses.sort(key=lambda s: s.version)
        return get_model_status_pb2.GetModelStatusResponse(model_version_status=statuses)


async def serve(model_base: Path, *, host: str = "127.0.0.1", port: int = 8500,
                model_name: str = DEFAULT_MODEL_NAME, model_version: int | None = None) -> None:
    """Run the server until cancelled (what ``simstream serve-encoder`` does)."""
    server = EncoderServer(model_base, model_name=model_name, model_version=model_version, host=host, port=port)
    await server.start()
    try:
        await server.wait()
    finally:
        await server.stop()
