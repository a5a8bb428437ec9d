"""Settings of the recommendation core, validated once at construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from serving.errors import ConfigurationError


@dataclass(frozen=True)
class RecommenderConfig:
    """Every knob of the core. The streams layer builds one from its settings.

    * ``k``: items per published list.
    * ``candidate_depth`` (C): dense neighbours that HNSW supplies for the hybrid re-rank,
      for both similar items and substitutes. A product whose top-C holds no valid
      substitute gets an empty substitute list.
    * ``candidate_slack``: extra neighbours kept below the top-C per product, so that a
      neighbour that moves away or is deleted can be replaced without a new index query.
    * ``lexical_weight``: share of the lexical evidence inside the content score.
    * ``lexical_floor``: lexical cosines at or below it count as no lexical evidence; above
      it the evidence is ``(lexical - floor) / (1 - floor)`` (``serving.scoring``). Both
      defaults were chosen on every shared evaluation set by the rule in
      ``docs/quality.md``.
    * ``collapse_duplicates``: list one of several listings of the same product (see
      ``serving.scoring.duplicate_keys``): the best ranked is kept and names the others in
      its reasons (``duplicate_of: <id>``).
    * ``duplicate_threshold``: the content score at which two listings count as one product
      in the ``duplicates`` lists (``serving.duplicates``), besides the textual rule;
      calibrated on labelled same-product pairs (``docs/quality.md``). Above 1 no score
      reaches it, and the textual rule alone decides.
    * ``duplicate_max_items``: a ``duplicates`` list holds at most this many, the best
      first. A product listed hundreds of times (a marketplace's phone case) would otherwise
      publish hundreds of items per list and republish them all on every change of one.
    * ``behavior_weight``: share of the behaviour score in the final score.
    * ``price_band``: a substitute's price must be within this fraction of the product's.
    * ``hnsw_ef``: HNSW's search breadth. A list search asks for ``buffer_depth`` (66)
      neighbours; at ef 100 (1.5x that) real embeddings lost candidates the exact search
      finds, enough to put the gift-card lists one query below the encoder alone. At ef 200
      (3x) a few owners in crowded regions of a 100k catalog still missed near neighbours
      (a list at overlap 0.3 with the exact one after churn); 400 (6x) costs 1.3 ms per
      search at 100k instead of 0.8 and lifts recall@50 from 0.9961 to 0.9974
      (``docs/performance.md``, "seventh round").
    * ``exact_build_limit``: a bulk load (a bootstrap's settle, a load, a handover) completes
      each owner's index search from one block matrix product with every owner's vector
      (``CandidateBuffers.complete_hits``) while the owners number at most this many. Its
      cost grows with the square of the catalog: about 0.9 ms per owner at 100k on one core
      (about 90 s in all), ten times that per owner at 1M, where HNSW's recall alone decides. A change in
      the stream is always completed: the reverse check scores every owner anyway.
    * ``join_in_child``: a whole-catalog step (a settle, a bulk load) of at least
      ``serving.propagation.JOIN_AHEAD_MIN_OWNERS`` owners runs the duplicates join in a
      forked child process beside the candidate buffers (``serving.duplicates.JoinAhead``),
      so the two halves of the work use two cores. False: both on the calling thread.
    """

    dim: int = 384
    k: int = 10
    candidate_depth: int = 50
    candidate_slack: int = 16
    lexical_weight: float = 0.6
    lexical_floor: float = 0.4
    behavior_weight: float = 0.0
    collapse_duplicates: bool = True
    duplicate_threshold: float = 0.66
    duplicate_max_items: int = 20
    price_band: float = 0.3
    hnsw_ef: int = 400
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_initial_capacity: int = 1024
    hnsw_seed: int = 100
    exact_build_limit: int = 200_000
    join_in_child: bool = True
    rebuild_deleted_share: float = 0.3
    #: The ``VectorIndex`` adapter, by its name in ``serving.index.INDEX_ADAPTERS``.
    index: str = "hnsw"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigurationError(f"RecommenderConfig: {message}")

        need(self.dim > 0, f"dim must be positive, got {self.dim}")
        need(self.k > 0, f"k must be positive, got {self.k}")
        need(
            self.candidate_depth >= self.k,
            f"candidate_depth ({self.candidate_depth}) must be at least k ({self.k})",
        )
        need(self.candidate_slack >= 0, f"candidate_slack must be >= 0, got {self.candidate_slack}")
        need(0.0 <= self.lexical_weight <= 1.0, f"lexical_weight must be in [0, 1], got {self.lexical_weight}")
        need(
            0.0 <= self.lexical_floor < 1.0, f"lexical_floor must be in [0, 1), got {self.lexical_floor}"
        )
        need(
            0.0 <= self.behavior_weight <= 1.0,
            f"behavior_weight must be in [0, 1], got {self.behavior_weight}",
        )
        need(self.duplicate_max_items > 0, f"duplicate_max_items must be positive, got {self.duplicate_max_items}")
        need(self.duplicate_threshold > 0.0, f"duplicate_threshold must be positive, got {self.duplicate_threshold}")
        need(self.price_band >= 0.0, f"price_band must be >= 0, got {self.price_band}")
        need(self.hnsw_ef > 0, f"hnsw_ef must be positive, got {self.hnsw_ef}")
        need(self.hnsw_m >= 2, f"hnsw_m must be at least 2, got {self.hnsw_m}")
        need(
            self.hnsw_ef_construction > 0,
            f"hnsw_ef_construction must be positive, got {self.hnsw_ef_construction}",
        )
        need(self.hnsw_initial_capacity > 0, "hnsw_initial_capacity must be positive")
        need(self.exact_build_limit >= 0, f"exact_build_limit must be >= 0, got {self.exact_build_limit}")
        need(
            0.0 < self.rebuild_deleted_share <= 1.0,
            f"rebuild_deleted_share must be in (0, 1], got {self.rebuild_deleted_share}",
        )

    @property
    def buffer_depth(self) -> int:
        """Neighbours kept per product: the top-C plus the slack."""
        return self.candidate_depth + self.candidate_slack


@dataclass(frozen=True)
class Blend:
    """The weights a model version's lists use (``serving.scoring``): fitted per catalog by
    ``simstream learn`` and carried in the version's ``simstream.json``, so they change only
    when the model version does (a rollover, which republishes every list)."""

    lexical_weight: float
    lexical_floor: float
    behavior_weight: float

    @staticmethod
    def of(config: RecommenderConfig) -> Blend:
        return Blend(config.lexical_weight, config.lexical_floor, config.behavior_weight)

    def apply(self, config: RecommenderConfig) -> RecommenderConfig:
        return replace(config, lexical_weight=self.lexical_weight, lexical_floor=self.lexical_floor,
                       behavior_weight=self.behavior_weight)

    @staticmethod
    def from_meta(meta: Mapping[str, Any]) -> Blend | None:
        """The ``blend`` a version's ``simstream.json`` carries, or ``None`` (absent or invalid)."""
        value = meta.get("blend")
        if not isinstance(value, Mapping):
            return None
        try:
            blend = Blend(float(value["lexical_weight"]), float(value["lexical_floor"]),
                          float(value["behavior_weight"]))
        except (KeyError, TypeError, ValueError):
            return None
        ok = (0 <= blend.lexical_weight <= 1 and 0 <= blend.lexical_floor < 1 and 0 <= blend.behavior_weight <= 1)
        return blend if ok else None
