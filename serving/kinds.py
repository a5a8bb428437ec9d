"""The kinds of list the worker publishes, declared once.

Every place that needs "each kind of list" (its output topic, whether every owned product
has one) reads ``LIST_KINDS`` instead of spelling the kinds out again. The order of
``LIST_KINDS`` is the order of ``Kind`` and the order in which a product's lists are
published when it changes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.StrEnum):
    SIMILAR = "similar"
    SUBSTITUTES = "substitutes"
    COMPLEMENTS = "complements"
    DUPLICATES = "duplicates"


@dataclass(frozen=True, slots=True)
class ListKindSpec:
    """What the rest of the system needs to know about one kind of list.

    * ``topic_setting``: the name of the ``streams.settings.Settings`` attribute holding the
      compacted output topic of this kind.
    * ``content``: whether every owned product has this list (it is computed from content
      alone, and restore and handover reconcile it against its topic); ``False`` for a kind
      that exists only where behaviour does.
    """

    kind: Kind
    topic_setting: str
    content: bool
    description: str


LIST_KINDS: tuple[ListKindSpec, ...] = (
    ListKindSpec(
        Kind.SIMILAR,
        topic_setting="topic_similar_items",
        content=True,
        description="the nearest products by hybrid content score (and behaviour, when weighted in)",
    ),
    ListKindSpec(
        Kind.SUBSTITUTES,
        topic_setting="topic_substitutes",
        content=True,
        description="the same candidates that pass the substitute rules (serving.rules), ranked the same way",
    ),
    ListKindSpec(
        Kind.COMPLEMENTS,
        topic_setting="topic_complements",
        content=False,
        description="products often carted or bought together with it, live and in stock",
    ),
    ListKindSpec(
        Kind.DUPLICATES,
        topic_setting="topic_duplicates",
        content=True,
        description="the other listings of the same product (textual rule, or content score at the "
        "calibrated threshold; serving.duplicates)",
    ),
)

_BY_KIND = {spec.kind: spec for spec in LIST_KINDS}


def spec_of(kind: Kind | str) -> ListKindSpec:
    """The spec of ``kind`` (a ``Kind`` or its value); ``ValueError`` for an unknown kind."""
    return _BY_KIND[Kind(kind)]


#: The kinds every owned product has; complements exist only where behaviour does.
CONTENT_KINDS: tuple[Kind, ...] = tuple(spec.kind for spec in LIST_KINDS if spec.content)
