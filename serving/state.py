"""A ``Recommender`` as data: ``RecommenderState`` (what a snapshot holds) and
``RecommenderStats`` (counters for metrics and the web view)."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.behavior import BehaviorRow
from serving.candidates import BufferColumns, CandidateBuffer
from serving.catalog import Catalog
from serving.index import Offsets, VectorIndex
from serving.kinds import Kind
from serving.lexical import LexicalModel, SparseVec
from serving.publication import Items


@dataclass
class RecommenderState:
    """Everything a ``Recommender`` cannot recompute: what a snapshot writes and reads.

    * ``index``: the vector index, holding every live product's vector;
    * ``catalog``: the live products, delete timestamps and counters;
    * ``lexical``: the frozen lexical model, and ``lexical_vectors`` every live product's
      lexical vector under it;
    * ``buffers``: the candidate buffer of every owned product (in the order lists are
      rebuilt on import);
    * ``behavior``: the behaviour rows of owned products;
    * ``versions``: the last version published per (kind, product);
    * ``offsets``: the stream offsets the state covers;
    * ``publications``, ``refills``: counters, so that stats continue across a restart;
    * ``lists``: the current lists by kind and product, when the state carries them (a
      snapshot does): ``Recommender.from_state`` then takes them over after recomputing a
      sample, instead of recomputing every list;
    * ``duplicates_known``: with ``lists``, what each duplicates list keeps beyond what it
      publishes (``serving.duplicates.Known``: an exact prefix of its ranking, or all of it);
    * ``buffer_columns``: optionally, ``buffers`` once more as the snapshot stored them
      (``serving.candidates.BufferColumns``), so a restore indexes them by the column.

    Reverse maps, scoring profiles and reasons caches are derived state, recomputed with the
    code that produced them.

    ``Recommender.export_state`` shares the recommender's own objects (a snapshot of a large
    catalog costs no copy): read it before the next change and never modify it.
    ``Recommender.from_state`` takes the objects over in the same way.
    """

    index: VectorIndex
    catalog: Catalog
    lexical: LexicalModel
    lexical_vectors: dict[str, SparseVec]
    buffers: dict[str, CandidateBuffer]
    behavior: dict[str, BehaviorRow] = field(default_factory=dict)
    versions: dict[tuple[Kind, str], int] = field(default_factory=dict)
    offsets: Offsets = field(default_factory=dict)
    publications: int = 0
    refills: int = 0
    lists: dict[Kind, dict[str, Items]] | None = None
    duplicates_known: dict[str, tuple[Items, bool]] | None = None
    buffer_columns: BufferColumns | None = None


@dataclass(frozen=True)
class RecommenderStats:
    """Counters for metrics and the web view."""

    products: int
    index_live: int
    index_deleted: int
    stale_events: int
    unknown_deletes: int
    publications: int
    refills: int
    lists: int
