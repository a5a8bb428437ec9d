"""Fuzzing the decoders: arbitrary bytes and JSON give a valid record or a DecodeError, never a crash."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.hashing import HashingEncoder
from serving.config import RecommenderConfig
from serving.index import ExactIndex
from serving.recommender import Recommender
from streams.engine import Engine
from streams.metrics import Metrics
from streams.outputs import Inbound
from streams.records import DecodeError, decode_competitor_offer, decode_product_change, decode_user_event
from streams.settings import Settings

NOW = 1_795_000_000.0

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
FIELDS = ["op", "product_id", "title", "description", "brand", "category", "price", "currency", "in_stock",
          "group_id", "attributes", "image_url", "ts", "user_id", "type", "session_id", "competitor", "offer_id",
          "url"]
plausible = st.fixed_dictionaries(
    {},
    optional={name: json_values | st.sampled_from(["upsert", "delete", "view", "purchase", "forget", "2026-11-01T00:00:00Z"])
              for name in FIELDS},
)


def decode_all(raw: bytes) -> None:
    for decode in (decode_product_change, decode_user_event, decode_competitor_offer):
        try:
            record = decode(raw, now=NOW)
        except DecodeError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            record.to_core()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_a_decoder(raw: bytes) -> None:
    decode_all(raw)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_never_crashes_a_decoder(value: Any) -> None:
    decode_all(json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(plausible)
def test_objects_with_the_right_field_names_and_wrong_values_never_crash(obj: dict[str, Any]) -> None:
    decode_all(json.dumps(obj).encode())


@settings(max_examples=100, deadline=None)
@given(st.lists(plausible | json_values, min_size=1, max_size=6))
def test_the_pipeline_turns_any_batch_into_records_or_dead_letters(batch: list[Any]) -> None:
    config = RecommenderConfig(k=3, candidate_depth=5)
    pipeline = Engine(Settings(), Metrics(), clock=lambda: NOW,
                      recommender=Recommender(config, ExactIndex(config.dim)), encoder=HashingEncoder())
    messages = [Inbound("product-changes", 0, i, None, json.dumps(v).encode(), NOW) for i, v in enumerate(batch)]
    out = asyncio.run(pipeline.handle(messages)).records()
    letters = [r for r in out if r.topic == "simstream-dead-letters"]
    assert all(r.value is not None and "internal error" not in r.value["error"] for r in letters)
