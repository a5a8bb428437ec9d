"""The shared IDF on ``simstream-lexical``: what one worker fits, every other reads back exactly."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.errors import InvalidInput
from serving.lexical import LEGACY_SCHEME, N_BUCKETS, SCHEME, LexicalModel
from streams.wire import lexical_from_wire, lexical_to_wire

TEXTS = [f"wireless headphones model {i} by brand {i % 5}" for i in range(200)]


@pytest.fixture(scope="module")
def fitted() -> LexicalModel:
    return LexicalModel.fit(TEXTS)


def test_a_fitted_idf_round_trips_bit_for_bit_through_json(fitted: LexicalModel) -> None:
    value = json.loads(json.dumps(lexical_to_wire(fitted, at=1_795_000_000.0)))
    back = lexical_from_wire(value)
    assert back is not None and back.same_as(fitted)
    assert back.n_docs == fitted.n_docs == len(TEXTS)
    assert np.array_equal(back.idf, fitted.idf)


def test_the_record_fits_in_a_default_kafka_message(fitted: LexicalModel) -> None:
    # 2^18 float32 weights would be 1 MiB; the record carries distinct values and a compressed index.
    assert len(json.dumps(lexical_to_wire(fitted, at=0.0))) < 1_000_000


def test_no_idf_yet_is_shared_too_and_read_back_unfitted() -> None:
    # A restart never fits an IDF, so "none fitted yet" must travel: later starts weigh alike.
    value = lexical_to_wire(LexicalModel(), at=0.0)
    assert value["fitted"] is False and value["n_docs"] == 0
    back = lexical_from_wire(value)
    assert back is not None and not back.fitted and back.same_as(LexicalModel())
    with pytest.raises(InvalidInput):
        lexical_from_wire({**value, "n_docs": 7})


def test_a_corrupted_index_fails_its_checksum(fitted: LexicalModel) -> None:
    value = lexical_to_wire(fitted, at=0.0)
    index = np.frombuffer(zlib.decompress(base64.b64decode(value["index"])), value["index_dtype"]).copy()
    index[0] = (int(index[0]) + 1) % (int(index.max()) + 1)
    value["index"] = base64.b64encode(zlib.compress(index.tobytes())).decode()
    with pytest.raises(InvalidInput, match="checksum"):
        lexical_from_wire(value)


def test_an_index_that_does_not_cover_every_bucket_is_refused(fitted: LexicalModel) -> None:
    value = lexical_to_wire(fitted, at=0.0)
    value["index"] = base64.b64encode(zlib.compress(np.zeros(N_BUCKETS - 1, "<u2").tobytes())).decode()
    with pytest.raises(InvalidInput, match="every bucket"):
        lexical_from_wire(value)


def test_a_decompression_bomb_is_cut_off(fitted: LexicalModel) -> None:
    value = lexical_to_wire(fitted, at=0.0)
    value["index"] = base64.b64encode(zlib.compress(bytes(64 * 1024 * 1024))).decode()
    with pytest.raises(InvalidInput):
        lexical_from_wire(value)


FIELDS = ("n_docs", "values", "index_dtype", "index", "sha256", "fitted_at")


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(st.none(), st.integers(), st.text(max_size=30),
                                                       st.floats(allow_nan=True), st.lists(st.integers()))),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10)),
))
def test_arbitrary_records_are_refused_with_invalid_input_never_a_crash(value: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        lexical_from_wire({**value, "scheme": SCHEME})  # of this scheme, else it is not even read
    for junk in ([value], "idf", 3, None):
        with pytest.raises(InvalidInput):
            lexical_from_wire(junk)  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", [None, LEGACY_SCHEME, "something newer", 7])
def test_an_idf_of_another_lexical_scheme_is_treated_as_absent(fitted: LexicalModel, scheme: Any) -> None:
    """An IDF weighs the features of the transform it was fitted with: one of another scheme
    (an older version's, or a record from before schemes were named, which has none) reads
    back as no IDF at all, never as weights for this version's features."""
    value = lexical_to_wire(fitted, at=0.0)
    assert value["scheme"] == SCHEME == fitted.scheme
    assert lexical_from_wire(value) is not None
    foreign = {k: v for k, v in value.items() if k != "scheme"}
    if scheme is not None:
        foreign["scheme"] = scheme
    assert lexical_from_wire(json.loads(json.dumps(foreign))) is None
    unfitted = lexical_to_wire(LexicalModel(), at=0.0)
    assert unfitted["scheme"] == SCHEME
    assert lexical_from_wire({**unfitted, "scheme": "something newer"}) is None
