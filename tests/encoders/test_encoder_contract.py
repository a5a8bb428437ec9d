"""One contract suite for every ``Encoder`` adapter: local SavedModel, gRPC, hashing twin."""

from __future__ import annotations

import time

import numpy as np
import pytest

from encoders.base import Embeddings, Encoder
from serving.errors import InvalidInput

TEXTS = [
    "clickart 950 000 - premier image pack (dvd-rom)",
    "Adobe Photoshop CS3 Extended [Mac]",
    "noah's ark activity center (jewel case ages 3-8)",
    "peachtree by sage premium accounting for nonprofits 2007 " * 3,
    "Pokémon ® 1054.99",
    "x",
    "norton internet security 2008 3-user " + "with antivirus and firewall protection " * 40,
]


async def test_is_an_encoder_of_unit_rows_in_input_order(encoder: Encoder) -> None:
    assert isinstance(encoder, Encoder)
    assert encoder.dim == 384
    result = await encoder.encode(TEXTS)
    assert isinstance(result, Embeddings)
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert result.model_version and result.model_version == encoder.model_version
    reversed_ = await encoder.encode(TEXTS[::-1])
    np.testing.assert_allclose(reversed_.vectors[::-1], result.vectors, atol=1e-5)


async def test_batching_equals_one_by_one(encoder: Encoder) -> None:
    rng = np.random.default_rng(7)
    words = ["photo", "editing", "deluxe", "suite", "2007", "windows", "mac", "upgrade", "license", "user", "pack"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 60, size=40)] + TEXTS
    batched = (await encoder.encode(texts)).vectors
    single = np.stack([(await encoder.encode([t])).vectors[0] for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


async def test_empty_and_whitespace_text_get_one_defined_embedding(encoder: Encoder) -> None:
    vectors = (await encoder.encode(["", "   ", "\t\n"])).vectors
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)


async def test_no_texts_gives_an_empty_matrix(encoder: Encoder) -> None:
    assert (await encoder.encode([])).vectors.shape == (0, 384)


async def test_huge_text_is_truncated_quickly(encoder: Encoder) -> None:
    huge = "adobe acrobat professional 8 " * 200_000  # ~5.8 MB
    started = time.perf_counter()
    result = await encoder.encode([huge, "adobe acrobat professional 8"])
    assert time.perf_counter() - started < 5.0
    assert result.vectors.shape == (2, 384) and np.all(np.isfinite(result.vectors))


@pytest.mark.parametrize("bad", [[None], ["ok", 3], [b"bytes"], "a plain string"])
async def test_non_strings_are_rejected_clearly(encoder: Encoder, bad: object) -> None:
    with pytest.raises(InvalidInput, match=r"str|sequence"):
        await encoder.encode(bad)  # type: ignore[arg-type]


async def test_similar_titles_are_closer_than_unrelated(encoder: Encoder) -> None:
    v = (await encoder.encode(["adobe photoshop cs3", "photoshop cs3 by adobe", "noah's ark activity center"])).vectors
    assert v[0] @ v[1] > v[0] @ v[2]


def test_local_and_grpc_adapters_agree(local_encoder: Encoder, grpc_server: object) -> None:
    from encoders.tfserving import TFServingEncoder

    client = TFServingEncoder(grpc_server.address, batch_size=3)  # type: ignore[attr-defined]
    remote = client.encode_blocking(TEXTS)
    local = local_encoder.encode_blocking(TEXTS)
    np.testing.assert_allclose(remote.vectors, local.vectors, atol=1e-5)
    assert remote.model_version == local.model_version == "minilm/1"


def test_hashing_is_deterministic() -> None:
    from encoders.hashing import HashingEncoder

    a = HashingEncoder().encode_blocking(TEXTS).vectors
    b = HashingEncoder().encode_blocking(TEXTS).vectors
    assert np.array_equal(a, b)


async def test_local_encode_does_not_block_the_event_loop(local_encoder: Encoder) -> None:
    import asyncio

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    await local_encoder.encode([f"adobe photoshop cs{i % 5} upgrade for mac and windows" for i in range(400)])
    elapsed = time.perf_counter() - started
    task.cancel()
    assert ticks >= int(elapsed / 0.005 * 0.3)  # the loop kept ticking while the model ran
