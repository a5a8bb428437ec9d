"""Reading the compacted state topics back at a start (blocking; run it in an executor).

``StateReader`` remembers where each read of a state topic stopped (``reached``): the
replica (``streams/replica.py``) goes on from there, so it misses nothing and reads
nothing twice.
"""

from __future__ import annotations

import logging
from typing import Any

from serving.errors import ConfigurationError, SimstreamError
from serving.lexical import SCHEME, LexicalModel
from streams.kafka_io import partition_count, read_latest
from streams.settings import Settings
from streams.wire import LEXICAL_KEY, lexical_from_wire, lexical_scheme

log = logging.getLogger(__name__)


class StateReader:
    """Reads state and list topics for a restore; ``reached`` says where the state reads ended."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: topic -> partition -> next offset, for the state topics read so far.
        self.reached: dict[str, dict[int, int]] = {}

    def read(self, topic: str, offsets: dict[int, int] | None = None) -> dict[str, Any]:
        """The last value per key of ``topic``: the compacted view, or with ``offsets`` the
        changes since them (tombstones kept as ``None``)."""
        reached = self.reached.setdefault(topic, {}) if topic in self.settings.state_topics else None
        return read_latest(self.settings, topic, keep_tombstones=offsets is not None,
                           from_offsets=offsets, timeout_s=300, reached=reached)

    def shared_lexical(self) -> LexicalModel | None:
        """The IDF on ``simstream-lexical``, or ``None`` when no worker has fitted one (or only
        one of another lexical scheme, an older version's, which is never mixed in)."""
        topic = self.settings.topic_lexical
        try:
            partition_count(self.settings, topic, timeout_s=30.0)
        except TimeoutError as exc:
            raise ConfigurationError(
                f"topic {topic} does not exist: run `simstream topics create` "
                "(it holds the lexical IDF every worker shares)") from exc
        value = self.read(topic).get(LEXICAL_KEY)
        if value is None:
            return None
        try:
            model = lexical_from_wire(value)
        except SimstreamError as exc:
            log.error("ignoring the %s record (it will be fitted anew): %s", topic, exc)
            return None
        if model is None:
            log.warning("ignoring the %s record: its IDF is of lexical scheme %s, this version uses %s "
                        "(it will be fitted anew)", topic, lexical_scheme(value), SCHEME)
        return model
