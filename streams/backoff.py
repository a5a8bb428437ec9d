"""One backoff for every outage the worker waits out (broker, encoder, handover)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0


@dataclass
class Backoff:
    """Exponential backoff: 0.5 s, doubling up to ``cap``; ``reset`` after a success."""

    first: float = FIRST_DELAY_S
    cap: float = MAX_DELAY_S
    delay: float = FIRST_DELAY_S

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)

    def reset(self) -> None:
        self.delay = self.first


async def retry_forever(attempt: Callable[[], Awaitable[T]], what: str,
                        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception) -> T:
    """``attempt()`` until it succeeds, backing off on ``retry_on`` (one log line per failure)."""
    backoff = Backoff()
    while True:
        try:
            return await attempt()
        except asyncio.CancelledError:
            raise
        except retry_on as exc:
            log.error("%s failed, retrying in %.1f s: %s", what, backoff.delay, exc)
            await backoff.sleep()
