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
    #: Records taken from the stream since the worker started (progress reports read it).
    taken: int = 0

    def start(self, targets: Mapping[int, int], positions: Mapping[int, int]) -> None:
        """Record the end offsets seen at start and the group's positions then."""
        self.targets = dict(targets)
        self.gained(positions)
        self.known = True

    def consumed(self, partition: int, offset: int) -> None:
        """A record at ``offset`` of ``partition`` was taken from the stream and handled."""
        self.taken += 1
        if offset + 1 > self.positions.get(partition, 0):
            self.positions[partition] = offset + 1

    def gained(self, positions: Mapping[int, int]) -> None:
        """Where the group stands (at start, or on partitions a rebalance handed over): a
        position only ever moves forward."""
        for partition, offset in positions.items():
            self.positions[partition] = max(self.positions.get(partition, 0), offset)

    def lag(self, owned: Iterable[int]) -> int:
        """Records still to consume on ``owned`` partitions before the start-time end offsets."""
        return records_behind(self.targets, self.positions, owned)

    def reached(self, owned: Iterable[int]) -> bool:
        """Whether every ``owned`` partition has been consumed up to its start-time end offset."""
        return self.known and self.lag(owned) == 0

    def health(self, owned: Iterable[int]) -> dict[str, Any]:
        return {"caught_up": self.done, "input_lag": 0 if self.done else (self.lag(owned) if self.known else None)}


@dataclass(frozen=True)
class InputProgress:
    """How far the worker is behind its input, and when it will have caught up at this pace."""

    lag: int  #: records of owned partitions not consumed yet
    rate: float  #: records consumed per second since the last report
    eta_s: float | None  #: lag / rate; ``None`` while nothing is being consumed

    def line(self, topic: str) -> str:
        eta = "unknown" if self.eta_s is None else f"{self.eta_s:.0f} s"
        return f"{topic}: {self.lag:,} records behind, consuming {self.rate:,.0f}/s, caught up in {eta}"

    def as_json(self) -> dict[str, Any]:
        return {"lag": self.lag, "rate_per_s": round(self.rate, 1),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1)}


def input_progress(ends: Mapping[int, int], positions: Mapping[int, int], owned: Iterable[int],
                   consumed: int, seconds: float) -> InputProgress:
    """Progress over the ``owned`` partitions: ``ends`` are their end offsets now, ``positions``
    the next offsets to consume, ``consumed`` the records taken in the last ``seconds``."""
    lag = records_behind(ends, positions, owned)
    rate = consumed / seconds if seconds > 0 else 0.0
    eta = lag / rate if rate > 0 else (0.0 if lag == 0 else None)
    return InputProgress(lag, rate, eta)


def records_behind(ends: Mapping[int, int], positions: Mapping[int, int], owned: Iterable[int]) -> int:
    """Records of the ``owned`` partitions between each position and its end offset."""
    return sum(max(0, ends.get(p, 0) - positions.get(p, 0)) for p in owned)
