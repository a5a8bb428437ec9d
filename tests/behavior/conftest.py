"""Fixtures for behaviour tests: event builders."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from serving.catalog import UserEvent, UserEventType

MakeEvent = Callable[..., UserEvent]


@pytest.fixture
def ev() -> MakeEvent:
    """Build a ``UserEvent``: ``ev(user, type, product, ts, session=None)``."""

    def make(user: str, kind: str, product: str | None, ts: float, session: str | None = None) -> UserEvent:
        return UserEvent(
            user_id=user, type=UserEventType(kind), ts=ts, product_id=product, session_id=session
        )

    return make
