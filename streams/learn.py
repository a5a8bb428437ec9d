"""The learning loop against the topics: what ``simstream learn`` and the worker's timer run.

It reads what the stream already carries, bounded at the end offsets seen when it starts:

* the merged catalog (``simstream-products``, compacted: every live product with its text
  and ``group_id``);
* ``user-events`` (co-view, co-cart, co-purchase partners);
* ``product-labels`` (labelled pairs, positives and negatives; a malformed one is
  dead-lettered once: records before the previous run's end were judged by that run);
* ``simstream-models`` (what earlier runs decided: how many pairs the last training used).

``encoders.training.learn.learn_once`` decides; this module writes its report to the log and
as one record on ``simstream-models`` (key ``run-<unix ms>``). A promoted version is a new
folder in the model base: the workers' model poll rolls over to it and adopts its blend.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoders.export import resolve_version
from encoders.training.learn import LearnConfig, LearnReport, learn_once, mine_pairs
from encoders.training.pairs import PairLabel
from serving.catalog import Product, UserEvent
from serving.config import RecommenderConfig
from serving.errors import SimstreamError
from streams.kafka_io import latest_by_key, producer, read_topic
from streams.records import (
    DecodeError,
    dead_letter,
    decode_product_label,
    decode_user_event,
    iso,
    product_from_wire,
)
from streams.rollover import blend_for
from streams.settings import Settings

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 600.0


@dataclass
class LearnInputs:
    """What one run read from the topics."""

    products: dict[str, Product] = field(default_factory=dict)
    events: list[UserEvent] = field(default_factory=list)
    labels: list[PairLabel] = field(default_factory=list)
    #: ``simstream-dead-letters`` values for malformed labels read for the first time.
    dead_letters: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: product-labels partition -> next offset: where this run's reading ended.
    labels_reached: dict[int, int] = field(default_factory=dict)
    bad_labels: int = 0


def _raw(value: Any) -> str:
    """A record value back as JSON text (``read_topic`` parses it; a string is what did not parse)."""
    return value if isinstance(value, str) else json.dumps(value)


def previous_runs(settings: Settings) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The last run's record and the last record of a run that trained (promoted or refused)."""
    last: dict[str, Any] | None = None
    trained: dict[str, Any] | None = None
    for record in read_topic(settings, settings.topic_models, timeout_s=READ_TIMEOUT_S):
        value = record.value
        if not isinstance(value, dict):
            continue
        last = value
        if value.get("decision") in ("promoted", "refused"):
            trained = value
    return last, trained


def read_inputs(settings: Settings, labels_judged: dict[int, int]) -> LearnInputs:
    """Catalog, events and labels up to their current ends; ``labels_judged``: where the previous run stopped."""
    out = LearnInputs()
    for pid, value in latest_by_key(read_topic(settings, settings.topic_products, timeout_s=READ_TIMEOUT_S)).items():
        try:
            out.products[pid] = product_from_wire(value)
        except (SimstreamError, AssertionError, TypeError) as exc:
            log.warning("learn: skipping the %s record of %s: %s", settings.topic_products, pid, exc)
    for record in read_topic(settings, settings.topic_user_events, timeout_s=READ_TIMEOUT_S):
        with contextlib.suppress(DecodeError):  # the worker dead-lettered it when it arrived
            out.events.append(decode_user_event(_raw(record.value), kafka_ts=record.timestamp, now=float("inf")).to_core())
    now = time.time()
    for record in read_topic(settings, settings.topic_product_labels, timeout_s=READ_TIMEOUT_S,
                             reached=out.labels_reached):
        try:
            out.labels.append(decode_product_label(_raw(record.value), kafka_ts=record.timestamp,
                                                   max_bytes=settings.max_message_bytes, now=now).to_core())
        except DecodeError as exc:
            out.bad_labels += 1
            if record.offset < labels_judged.get(record.partition, 0):
                continue
            log.warning("learn: dead-lettered %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
            value = None if record.value is None else _raw(record.value)
            out.dead_letters.append((f"{record.topic}:{record.partition}:{record.offset}", dead_letter(
                source_topic=record.topic, partition=record.partition, offset=record.offset, key=record.key,
                payload=value, error=str(exc), at=now)))
    return out


def local_embed(max_length: int) -> Any:
    """``embed(model_base, version, texts)`` with the in-process SavedModel (a GPU when TensorFlow sees one)."""
    from encoders.local import LocalEncoder

    def embed(model_base: Path, version: int, texts: Sequence[str]) -> np.ndarray:
        encoder = LocalEncoder(model_base, model_version=version, max_length=max_length)
        return np.asarray(encoder.encode_blocking(list(texts)).vectors, dtype=np.float32)

    return embed


def run_learn(settings: Settings, config: LearnConfig, base_config: RecommenderConfig, *,
              progress: Any = None) -> dict[str, Any]:
    """One run: read, decide (``learn_once``), record on ``simstream-models``; returns the record."""
    from encoders.training.finetune import finetune

    started = time.time()
    say = progress or (lambda message: log.info("%s", message))
    last, trained = previous_runs(settings)
    judged = {int(p): int(o) for p, o in ((last or {}).get("labels_reached") or {}).items()}
    inputs = read_inputs(settings, judged)
    model_base = settings.model_base.expanduser()
    live_version, _ = resolve_version(model_base, settings.model_version)
    mined = mine_pairs(inputs.products, inputs.events, inputs.labels, config)
    before = int(((trained or {}).get("pairs") or {}).get("positives") or 0)
    say(f"learn: {len(inputs.products)} products, {len(inputs.events)} events, {len(inputs.labels)} labels "
        f"({inputs.bad_labels} malformed), live version {live_version}")
    try:
        report = learn_once(inputs.products, mined, model_base=model_base, live_version=live_version,
                            live_config=blend_for(settings, live_version).apply(base_config), config=config,
                            embed=local_embed(settings.max_length), train=finetune,
                            positives_at_last_training=before, events=inputs.events, log=say)
    except Exception as exc:
        report = LearnReport("failed", f"{type(exc).__name__}: {exc}".splitlines()[0], live_version)
        log.error("learn: failed: %s", report.reason, exc_info=not isinstance(exc, SimstreamError))
    record = {**report.as_dict(), "at": iso(time.time()), "started_at": iso(started),
              "model_base": str(model_base), "labels_reached": {str(p): o for p, o in inputs.labels_reached.items()}}
    sink = producer(settings)
    try:
        for key, value in inputs.dead_letters:
            sink.send(settings.topic_dead_letters, key=key.encode(), value=json.dumps(value).encode())
        sink.send(settings.topic_models, key=f"run-{int(started * 1000)}".encode(), value=json.dumps(record).encode())
        sink.flush(timeout=60)
    finally:
        sink.close(timeout=10)
    return record
