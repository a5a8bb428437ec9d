"""What goes in and out of the worker: consumed records, records to produce, and the port.

``Inbound`` is one consumed Kafka record, ``Outbound`` one record to produce, ``Outputs`` what
one call of the engine produced, sorted by what it is, and ``Send`` the port every record
leaves through. Nothing here touches Kafka: the Faust app adapts its events to ``Inbound``
and provides a ``Send`` that produces to the broker and waits for the acknowledgements.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson


@dataclass(frozen=True, slots=True)
class Inbound:
    """One consumed Kafka record, as the engine sees it.

    ``ack`` acknowledges it to the consumer (its offset may then be committed); the engine's
    callers call it only once every record the input caused is acknowledged by the broker.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None = None  # the record's Kafka timestamp, unix seconds
    ack: Callable[[], Awaitable[Any]] | None = field(default=None, compare=False, repr=False)

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class Outbound:
    """One record to produce. ``value=None`` is a tombstone.

    ``event_ts`` is set on a changed product's own lists, so the publisher can measure
    freshness (event time to acknowledged publication). ``trigger`` is the list's trigger
    (``out_of_stock`` or ``refresh``) when it is a list record, kept here so that nothing
    downstream has to read it back out of ``value``.
    """

    topic: str
    key: str
    value: dict[str, Any] | None
    event_ts: float | None = None
    trigger: str | None = None

    def encoded(self) -> tuple[bytes, bytes | None]:
        """Key and value as UTF-8 bytes (compact JSON, non-ASCII kept as is).

        orjson: the stdlib encoder cost 3.5% of a loaded worker's CPU on list records alone.
        """
        value = None if self.value is None else orjson.dumps(self.value, option=orjson.OPT_SERIALIZE_NUMPY)
        return self.key.encode("utf-8"), value


@dataclass
class Outputs:
    """What one call of the engine produced, typed by what it is.

    * ``state``: records of the internal state topics (merged products, embeddings, IDF);
    * ``lists``: list records of every list kind, a ``None`` value being a tombstone;
    * ``dead_letters``: one per input record that could not be applied;
    * ``gone``: products that went out of stock or were deleted (feeds that list them are
      refreshed);
    * ``done``: input records now fully handled, to acknowledge once the records are;
    * ``changed``: products a change was applied to (competitor offers are re-matched
      against them, ``streams/offers.py``).
    """

    state: list[Outbound] = field(default_factory=list)
    lists: list[Outbound] = field(default_factory=list)
    dead_letters: list[Outbound] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)
    done: list[Inbound] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)

    def records(self) -> list[Outbound]:
        """Every record to produce: dead letters, state, then lists."""
        return [*self.dead_letters, *self.state, *self.lists]

    def extend(self, other: Outputs) -> Outputs:
        self.state += other.state
        self.lists += other.lists
        self.dead_letters += other.dead_letters
        self.gone |= other.gone
        self.done += other.done
        self.changed |= other.changed
        return self

    def __bool__(self) -> bool:
        return bool(self.state or self.lists or self.dead_letters or self.gone or self.done)


class Send(Protocol):
    """The port records leave through: returns once the broker acknowledged every record."""

    async def __call__(self, records: Sequence[Outbound], /) -> None: ...


def last_list_per_key(lists: Sequence[Outbound]) -> list[Outbound]:
    """Within one batch only the last version of a list matters on a compacted topic.

    A bulk of inserts republishes the same neighbour lists many times over; sending each
    once cuts the traffic by an order of magnitude. An ``out_of_stock`` publication is
    always kept, since its trigger is an event of its own.
    """
    last: dict[tuple[str, str], int] = {}
    for i, record in enumerate(lists):
        last[(record.topic, record.key)] = i
    return [record for i, record in enumerate(lists)
            if last[(record.topic, record.key)] == i or record.trigger == "out_of_stock"]
