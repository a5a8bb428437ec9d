"""Encoder fixtures: the SavedModel is exported once per session, the gRPC server runs once.

The server is the real ``EncoderServer`` (grpc.aio, TF Serving's PredictionService) on a
free loopback port, on its own event-loop thread, so every test's loop can reach it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from encoders.base import Encoder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """An ``EncoderServer`` on a background event loop; ``address`` is ``127.0.0.1:port``."""

    def __init__(self, model_base: Path, **kwargs: Any) -> None:
        from encoders.server import EncoderServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = EncoderServer(model_base, host="127.0.0.1", port=0, **kwargs)
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def model_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SavedModel exported once for the session: ``<base>/1/``."""
    from encoders.export import export_encoder

    base = tmp_path_factory.mktemp("models") / "minilm"
    export_encoder(base, version=1, config_dir=base.parent / "tfserving")
    return base


@pytest.fixture(scope="session")
def local_encoder(model_base: Path) -> Iterator[Any]:
    from encoders.local import LocalEncoder

    encoder = LocalEncoder(model_base)
    encoder.encode_blocking(["warm up"])
    yield encoder


@pytest.fixture(scope="session")
def grpc_server(model_base: Path, local_encoder: Any) -> Iterator[ServerThread]:
    """The real gRPC server over the same SavedModel (it shares the loaded graph to save memory)."""
    from encoders.local import load_servable

    server = ServerThread(model_base, run=load_servable(model_base / "1"))
    yield server
    server.stop()


@pytest.fixture
def server_factory(model_base: Path) -> Iterator[Callable[..., ServerThread]]:
    """Extra servers with a custom ``run`` (slow, broken) over the session's model folder."""
    servers: list[ServerThread] = []

    def start(**kwargs: Any) -> ServerThread:
        server = ServerThread(model_base, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(params=["local", "grpc", "hashing"])
async def encoder(request: pytest.FixtureRequest, local_encoder: Any) -> AsyncIterator[Encoder]:
    """Each adapter of the ``Encoder`` port, for the contract suite."""
    if request.param == "local":
        yield local_encoder
    elif request.param == "grpc":
        from encoders.tfserving import TFServingEncoder

        server: ServerThread = request.getfixturevalue("grpc_server")
        client = TFServingEncoder(server.address, timeout_s=10, retries=1, batch_size=16)
        await client.start()
        yield client
        await client.close()
    else:
        from encoders.hashing import HashingEncoder

        yield HashingEncoder()
