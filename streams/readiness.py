"""Readiness after a start: restored, *and* caught up with the input that was there at start.

A restarted worker restores its catalog from a snapshot or the compacted state topics. The
last batches before a stop may not have reached those topics (a crash, or a stop between
applying and publishing); their input offsets were not committed either, so the worker
consumes them again. Until it has, its catalog is a partial one, and lists built from it
differ from what consumers already hold. So:

* ``/health`` answers 200 only once the worker has consumed every partition it owns of
  ``product-changes`` up to the end offset it saw at start (``catching_up`` with the lag
  before that);
* list records produced meanwhile are held back (``Ownership.gate``), one per key, and
  published once when the catch-up ends; by then they are built from the whole catalog.

Nothing here touches Kafka: the offsets are read by the caller (``kafka_io.input_offsets``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CatchUp:
    """Where each input partition must get to before the worker is ready, and where it is."""

    topic: str
    #: End offset of each partition when the worker started: what it must have consumed.
    targets: dict[int, int] = field(default_factory=dict)
    #: Next offset this worker has to consume per partition (committed or log start at
    #: start, then advanced by every consumed record).
    positions: dict[int, int] = field(default_factory=dict)
    #: Whether the targets were read yet; the worker is never ready before.
    known: bool = False
    #: Set once, the first time every owned partition reached its target; stays set.
    done: bool = False

    def start(self, targets: Mapping[int, int], positions: Mapping[int, int]) -> None:
        """Record the end offsets seen at start and the group's positions then."""
        self.targets = dict(targets)
        for partition, offset in positions.items():
            self.positions[partition] = max(self.positions.get(partition, 0), offset)
        self.known = True

    def consumed(self, partition: int, offset: int) -> None:
        """A record at ``offset`` of ``partition`` was taken from the stream and handled."""
        if offset + 1 > self.positions.get(partition, 0):
            self.positions[partition] = offset + 1

    def lag(self, owned: Iterable[int]) -> int:
        """Records still to consume on ``owned`` partitions before the start-time end offsets."""
        return sum(max(0, self.targets.get(p, 0) - self.positions.get(p, 0)) for p in owned)

    def reached(self, owned: Iterable[int]) -> bool:
        """Whether every ``owned`` partition has been consumed up to its start-time end offset."""
        return self.known and self.lag(owned) == 0

    def health(self, owned: Iterable[int]) -> dict[str, Any]:
        return {"caught_up": self.done, "input_lag": 0 if self.done else (self.lag(owned) if self.known else None)}
