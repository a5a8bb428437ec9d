"""``TFServingEncoder``: the encoder behind TF Serving's gRPC ``PredictionService``.

Tokenization happens here, on the client, so the server is a stock ``tensorflow/serving``
(or ``simstream serve-encoder`` for development). Every RPC has a deadline of ``timeout_s``;
UNAVAILABLE and DEADLINE_EXCEEDED are retried ``retries`` times with full-jitter exponential
backoff (``backoff_base_s * 2**i``, capped at ``backoff_cap_s``). So one batch never takes
longer than ``deadline_budget_s = (retries + 1) * timeout_s + sum(backoff caps)``, after which
``EncoderUnavailable`` is raised. NOT_FOUND (wrong model name or version) raises
``ModelMismatch`` and INVALID_ARGUMENT raises ``EncoderRequestError``, without retrying.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from encoders.base import (
    CHARS_PER_TOKEN,
    EMBEDDING_DIM,
    Embeddings,
    backoff_delays,
    check_texts,
    empty_embeddings,
    l2_normalize,
    pack_batch,
    plan_batches,
)
from encoders.export import ATTENTION_MASK, DEFAULT_MODEL_NAME, INPUT_IDS, OUTPUT, SIGNATURE
from encoders.tokenizer import DEFAULT_MAX_LENGTH, WordPieceTokenizer
from serving.errors import EncoderError, EncoderUnavailable, ModelMismatch

#: Default cap on gRPC messages both ways; a batch of 128 x 512 tokens is 0.5 MB.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_BATCH_SIZE = 64
#: Batches in flight at once: lets TF Serving's batcher merge them, bounds memory.
DEFAULT_CONCURRENCY = 4

T = TypeVar("T")


class EncoderRequestError(EncoderError):
    """The server refused a request as malformed (INVALID_ARGUMENT); retrying will not help."""


def int32_tensor_proto(array: np.ndarray) -> Any:
    """A ``TensorProto`` for an int32 matrix, as raw little-endian bytes (what TF Serving sends)."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    array = np.ascontiguousarray(array, dtype="<i4")
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in array.shape])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32, tensor_shape=shape, tensor_content=array.tobytes())


def float_matrix(proto: Any) -> np.ndarray:
    """Decode a float32 ``TensorProto`` (``tensor_content`` or ``float_val``) into a 2-D array."""
    from tensorflow.core.framework import types_pb2

    if proto.dtype != types_pb2.DT_FLOAT:
        raise ModelMismatch(f"'{OUTPUT}' came back as dtype {proto.dtype}, expected DT_FLOAT; re-export the model")
    shape = [d.size for d in proto.tensor_shape.dim]
    if len(shape) != 2:
        raise ModelMismatch(f"'{OUTPUT}' came back with shape {shape}, expected [batch, {EMBEDDING_DIM}]")
    if proto.tensor_content:
        flat = np.frombuffer(proto.tensor_content, dtype="<f4")
    else:
        flat = np.asarray(proto.float_val, dtype=np.float32)
    if flat.size != shape[0] * shape[1]:
        raise ModelMismatch(f"'{OUTPUT}' holds {flat.size} values for shape {shape}")
    return flat.reshape(shape).astype(np.float32, copy=False)


class TFServingEncoder:
    """Encoder client of TF Serving's ``PredictionService`` over ``grpc.aio``."""

    dim = EMBEDDING_DIM

    def __init__(
        self,
        target: str,
        *,
        model_name: str = DEFAULT_MODEL_NAME,
        model_version: int | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = DEFAULT_BATCH_SIZE,
        timeout_s: float = 5.0,
        retries: int = 4,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
        vocab_path: Path | None = None,
    ) -> None:
        if target.startswith("grpc://"):
            target = target[len("grpc://") :]
        if timeout_s <= 0 or retries < 0 or batch_size < 1 or concurrency < 1:
            raise EncoderError("timeout_s must be > 0, retries >= 0, batch_size and concurrency >= 1")
        self.target = target
        self.model_name = model_name
        self.pinned_version = model_version
        self.max_length = max_length
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_message_bytes = max_message_bytes
        self.concurrency = concurrency
        self._tokenizer = WordPieceTokenizer(vocab_path, max_length=max_length)
        self._channels: dict[asyncio.AbstractEventLoop, tuple[Any, Any]] = {}
        self._version = ""
        self._checked = False
        self._blocking_loop: asyncio.AbstractEventLoop | None = None
        self._blocking_thread: threading.Thread | None = None

    # --- public API -------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        """``<model_name>/<version>`` as the server last reported it ("" before the first call)."""
        return self._version

    @property
    def deadline_budget_s(self) -> float:
        """The longest one RPC can take, all retries and backoffs included."""
        return (self.retries + 1) * self.timeout_s + sum(
            backoff_delays(self.retries, self.backoff_base_s, self.backoff_cap_s)
        )

    async def start(self) -> None:
        """Open the channel and check ``GetModelMetadata``: signature and dimension must match."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        from encoders.export import signature_problems

        stub = self._stub()
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._fill_spec(request.model_spec)
        response = await self._call(stub.GetModelMetadata, request, "GetModelMetadata")
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        if "signature_def" not in response.metadata or not response.metadata["signature_def"].Unpack(sig_map):
            raise ModelMismatch(f"{self.target} returned no signature_def metadata for model '{self.model_name}'")
        sig = sig_map.signature_def.get(SIGNATURE)
        if sig is None:
            raise ModelMismatch(
                f"model '{self.model_name}' at {self.target} has no '{SIGNATURE}' signature; "
                "serve a model written by `simstream export-encoder`"
            )
        problems = signature_problems(sig)
        if problems:
            raise ModelMismatch(f"model '{self.model_name}' at {self.target}: " + "; ".join(problems))
        self._version = self._version_of(response.model_spec)
        self._checked = True

    async def available_versions(self) -> list[int]:
        """The versions of ``model_name`` the server reports AVAILABLE (``ModelService.GetModelStatus``)."""
        from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

        self._stub()  # opens this loop's channel
        channel = self._channels[asyncio.get_running_loop()][0]
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        response = await self._call(stub.GetModelStatus, request, "GetModelStatus")
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return sorted(s.version for s in response.model_version_status if s.state == available)

    async def close(self) -> None:
        """Close this loop's channel and stop the private loop of ``encode_blocking``."""
        entry = self._channels.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[0].close()
        if self._blocking_loop is not None:
            loop, thread = self._blocking_loop, self._blocking_thread
            self._blocking_loop = self._blocking_thread = None
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._close_here(), loop))
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                await asyncio.to_thread(thread.join, 5.0)

    async def _close_here(self) -> None:
        entry = self._channels.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[0].close()

    async def encode(self, texts: Sequence[str]) -> Embeddings:
        """Embed texts: tokenized here, batches sent concurrently, vectors in input order."""
        cut = check_texts(texts, self.max_length * CHARS_PER_TOKEN)
        if not cut:
            return empty_embeddings(self.dim, self._version)
        if not self._checked:
            await self.start()
        # The Rust tokenizer is fast, but thousands of texts would still stall the loop.
        if len(cut) > 256:
            token_ids = await asyncio.to_thread(self._tokenizer.encode, cut)
        else:
            token_ids = self._tokenizer.encode(cut)
        batches = plan_batches([len(t) for t in token_ids], self.batch_size)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
            async with gate:
                ids, mask = pack_batch([token_ids[i] for i in idx], self.max_length)
                vectors, version = await self._predict(ids, mask)
                return idx, vectors, version

        # Vectors of two models must never mix. When the server rolls to a new version in the
        # middle of a call, the whole call is sent once more (it then lands on the new one).
        for attempt in range(2):
            results = await asyncio.gather(*(one(idx) for idx in batches))
            versions = {version for _, _, version in results}
            if len(versions) == 1:
                break
            if attempt == 1:
                raise EncoderUnavailable(
                    f"the served model version changed twice during one encode call ({sorted(versions)}); "
                    "retry when the rollout has finished"
                )
        out = np.empty((len(cut), self.dim), dtype=np.float32)
        for idx, vectors, _ in results:
            out[idx] = vectors
        self._version = versions.pop()
        return Embeddings(l2_normalize(out), self._version)

    def encode_blocking(self, texts: Sequence[str]) -> Embeddings:
        """Embed texts from synchronous code. The RPCs run on a private event-loop thread,
        because a grpc.aio channel belongs to one loop; the caller's thread just waits."""
        if self._blocking_loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="simstream-tfserving", daemon=True)
            thread.start()
            self._blocking_loop, self._blocking_thread = loop, thread
        future = asyncio.run_coroutine_threadsafe(self.encode(texts), self._blocking_loop)
        return future.result()

    # --- internals --------------------------------------------------------------------
    def _stub(self) -> Any:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        loop = asyncio.get_running_loop()
        for stale in [lp for lp in self._channels if lp.is_closed()]:
            del self._channels[stale]  # a finished loop's channel is unusable and already gone
        entry = self._channels.get(loop)
        if entry is None:
            options = [
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                # Fail fast on a dead peer instead of waiting for TCP timeouts.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.enable_retries", 0),  # retries are ours, with our backoff and budget
            ]
            channel = grpc.aio.insecure_channel(self.target, options=options)
            entry = (channel, prediction_service_pb2_grpc.PredictionServiceStub(channel))
            self._channels[loop] = entry
        return entry[1]

    def _fill_spec(self, spec: Any) -> None:
        spec.name = self.model_name
        spec.signature_name = SIGNATURE
        if self.pinned_version is not None:
            spec.version.value = self.pinned_version

    def _version_of(self, spec: Any) -> str:
        if spec.HasField("version"):
            return f"{spec.name or self.model_name}/{spec.version.value}"
        return f"{self.model_name}/{self.pinned_version or 'unknown'}"

    async def _predict(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, str]:
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest(output_filter=[OUTPUT])
        self._fill_spec(request.model_spec)
        request.inputs[INPUT_IDS].CopyFrom(int32_tensor_proto(ids))
        request.inputs[ATTENTION_MASK].CopyFrom(int32_tensor_proto(mask))
        response = await self._call(self._stub().Predict, request, "Predict")
        if OUTPUT not in response.outputs:
            raise ModelMismatch(f"the response has no '{OUTPUT}' output; outputs: {list(response.outputs)}")
        vectors = float_matrix(response.outputs[OUTPUT])
        if vectors.shape != (ids.shape[0], self.dim):
            raise ModelMismatch(f"expected {ids.shape[0]} x {self.dim} vectors, got {vectors.shape}")
        return vectors, self._version_of(response.model_spec)

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, what: str) -> T:
        import grpc

        retryable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        delays = backoff_delays(self.retries, self.backoff_base_s, self.backoff_cap_s)
        last: grpc.aio.AioRpcError | None = None
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                last = exc
                if exc.code() not in retryable:
                    raise self._translate(exc, what) from exc
                if attempt < self.retries:
                    await asyncio.sleep(random.uniform(0.0, delays[attempt]))
        assert last is not None
        raise EncoderUnavailable(
            f"{what} to {self.target} failed {self.retries + 1} times ({last.code().name}: {last.details()}); "
            "check that TF Serving (or `simstream serve-encoder`) runs there, or raise "
            "SIMSTREAM_ENCODER_TIMEOUT_S / SIMSTREAM_ENCODER_RETRIES"
        ) from last

    def _translate(self, exc: Any, what: str) -> EncoderError:
        import grpc

        code, details = exc.code(), exc.details()
        version = f" version {self.pinned_version}" if self.pinned_version is not None else ""
        if code == grpc.StatusCode.NOT_FOUND:
            return ModelMismatch(
                f"{self.target} does not serve model '{self.model_name}'{version} ({details}); "
                "check SIMSTREAM_MODEL_NAME / SIMSTREAM_MODEL_VERSION against the server's models.config"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return EncoderRequestError(
                f"{what} rejected by {self.target}: {details}; the served model does not take "
                f"'{INPUT_IDS}'/'{ATTENTION_MASK}' int32 [batch, length]: serve a `simstream export-encoder` model"
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return EncoderError(
                f"{what} to {self.target}: {details}; lower the batch size or raise max_message_bytes"
            )
        return EncoderError(f"{what} to {self.target} failed with {code.name}: {details}")

    def __repr__(self) -> str:
        return f"TFServingEncoder({self.target!r}, model={self.model_name!r}, version={self.pinned_version})"
