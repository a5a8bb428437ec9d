"""Neighbour lists with exact propagation: ``Recommender.apply(change) -> list[Publication]``.

``Recommender`` is the public face of the recommendation core: it merges product changes
into the catalog and the vector index, and the lists of the owned products follow
(``serving.propagation``), each equal to its definition (``serving.lists.exact_lists``)
after every change. Its parts:

* ``serving.kinds``: the kinds of list (``Kind``, ``LIST_KINDS``);
* ``serving.publication``: what is published (``Publication``, ``ScoredItem``, ``Trigger``);
* ``serving.lists``: how a list is built from its candidates, and ``exact_lists``;
* ``serving.candidates``: the candidate buffers (exact dense top-n per owned product);
* ``serving.patching``: exact shortcuts for one swap in a top-C;
* ``serving.propagation``: the incremental maintenance of every list;
* ``serving.state``: ``RecommenderState`` (``export_state``/``from_state``, what snapshots
  hold) and ``RecommenderStats``.

This module re-exports the names the streams layer and the tests use.

Ownership: ``owns(product_id)`` decides which products get lists (scale-out: a worker
replicates the whole index but maintains and publishes only the lists of its partitions).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from serving.behavior import COMPLEMENT_CHANNELS, BehaviorRow
from serving.catalog import Catalog, Outcome, Product, ProductChange, ProductUpsert
from serving.config import RecommenderConfig
from serving.errors import ConfigurationError, InvalidInput, InvalidVector, MissingVector, SimstreamError
from serving.index import DEFAULT_INDEX, Offsets, VectorIndex, create_index, normalize_rows
from serving.kinds import CONTENT_KINDS, LIST_KINDS, Kind
from serving.lexical import LexicalModel, SparseVec
from serving.lists import BOUGHT_TOGETHER, build_complements, build_lists, exact_lists
from serving.postings import LexicalPostings
from serving.propagation import SETTLE_CHUNK, Propagator
from serving.publication import Items, Publication, ScoredItem, Trigger, last_per_key
from serving.scoring import profile
from serving.state import RecommenderState, RecommenderStats
from serving.text import product_text

__all__ = [
    "BOUGHT_TOGETHER",
    "COMPLEMENT_CHANNELS",
    "CONTENT_KINDS",
    "LIST_KINDS",
    "BehaviorRow",
    "Items",
    "Kind",
    "Publication",
    "Recommender",
    "RecommenderState",
    "RecommenderStats",
    "ScoredItem",
    "Trigger",
    "build_complements",
    "build_lists",
    "exact_lists",
    "last_per_key",
]


#: Deferred text changes staged before one batched index insert (``Recommender.apply``).
STAGE_BATCH = 512


class Recommender:
    """Catalog, vector index, candidate buffers and the published lists of one worker.

    Not thread-safe: the stream applies changes one at a time (the index is locked on its
    own for readers such as the web view).
    """

    def __init__(
        self,
        config: RecommenderConfig,
        index: VectorIndex | None = None,
        *,
        owns: Callable[[str], bool] | None = None,
        lexical: LexicalModel | None = None,
    ) -> None:
        index = index if index is not None else create_index(config.index or DEFAULT_INDEX, config)
        if index.dim != config.dim:
            raise ConfigurationError(f"index dimension {index.dim} differs from RecommenderConfig.dim {config.dim}")
        if len(index):
            raise ConfigurationError("Recommender needs an empty index; use Recommender.load to restore state")
        self._setup(config, index, owns, lexical if lexical is not None else LexicalModel())

    def _setup(
        self,
        config: RecommenderConfig,
        index: VectorIndex,
        owns: Callable[[str], bool] | None,
        lexical: LexicalModel,
    ) -> None:
        self.config = config
        self.index: VectorIndex = index
        self.catalog = Catalog()
        self.lexical = lexical
        #: Counts the IDF models adopted since construction (``use_lexical``), so a caller can
        #: tell that a new one arrived without comparing models.
        self.lexical_adoptions = 0
        self.offsets: Offsets = {}
        #: Vectors of deferred text changes not yet written to the index, in arrival order:
        #: a bulk catch-up inserts them in batches (hnswlib adds a batch on every core,
        #: outside the GIL) instead of one insert per change.
        self._staged: dict[str, np.ndarray] = {}
        #: Products whose deferred text change has no lexical vector yet: made at the settle,
        #: or never when an IDF refit (which vectorizes the whole catalog) comes first.
        self._unvectorized: set[str] = set()
        #: The lexical vectors by feature, for search (built at the first search).
        self.postings = LexicalPostings()
        self._propagation = Propagator(
            config, index, owns if owns is not None else (lambda _pid: True), postings=self.postings
        )

    # ------------------------------------------------------------------ state

    @property
    def owns(self) -> Callable[[str], bool]:
        """Whether this recommender maintains a product's lists (see ``set_ownership``)."""
        return self._propagation.owns

    @property
    def versions(self) -> dict[tuple[Kind, str], int]:
        """The last version published per (kind, product id)."""
        return self._propagation.versions

    @property
    def behavior_ignored(self) -> int:
        """Behaviour rows skipped because their product is unknown, deleted or not owned."""
        return self._propagation.behavior_ignored

    def export_state(self) -> RecommenderState:
        """Everything a snapshot needs (``serving.snapshot``); see ``RecommenderState``.

        The state shares this recommender's objects: read it before the next change and do
        not modify it. Deferred changes must be settled first (``settle``): their buffers
        are stale.
        """
        core = self._propagation
        if core.unsettled:
            raise ConfigurationError("export_state with deferred changes: call settle() first")
        self._catch_up_deferred()
        return RecommenderState(
            index=self.index,
            catalog=self.catalog,
            lexical=self.lexical,
            lexical_vectors=core.lex,
            buffers=core.buffers.by_owner,
            behavior=core.rows,
            versions=core.versions,
            offsets=self.offsets,
            publications=core.publications,
            refills=core.buffers.refills,
            lists=core.lists,
            duplicates_known=core.dup_known,
        )

    @classmethod
    def from_state(
        cls, state: RecommenderState, config: RecommenderConfig, *, owns: Callable[[str], bool] | None = None
    ) -> Recommender:
        """A recommender that takes ``state`` over (no copy) and recomputes its lists; see
        ``import_state``."""
        rec = cls.__new__(cls)
        rec.import_state(state, config, owns=owns)
        return rec

    def import_state(
        self, state: RecommenderState, config: RecommenderConfig, *, owns: Callable[[str], bool] | None = None
    ) -> None:
        """Replace everything this recommender holds with ``state`` (taken over, no copy) and
        recompute the lists from it, or take over the lists it carries once a sample of them
        recomputes identically (``ListsDiffer`` otherwise).

        ``owns`` must be the ownership the state was exported under (buffers exist only for
        owned products); behaviour rows of products without a buffer are skipped. Nothing is
        published: the lists are those the exporting recommender had. Raises ``KeyError`` or
        ``ValueError`` when the parts of ``state`` do not name the same products.
        """
        if state.index.dim != config.dim:
            raise ConfigurationError(
                f"index dimension {state.index.dim} differs from RecommenderConfig.dim {config.dim}"
            )
        self._setup(config, state.index, owns, state.lexical)
        self.catalog = state.catalog
        self.offsets = state.offsets
        core = self._propagation
        core.versions = state.versions
        core.publications = state.publications
        core.buffers.refills = state.refills
        profiles = {p.product_id: profile(p) for p in state.catalog}
        core.restore(state.lexical_vectors, profiles, state.buffers, state.behavior, lists=state.lists,
                     known=state.duplicates_known, columns=state.buffer_columns)

    # ------------------------------------------------------------------ queries

    def similar(self, product_id: str) -> Items | None:
        """The current similar-items list, or ``None`` for an unknown or unowned product."""
        return self._propagation.lists[Kind.SIMILAR].get(product_id)

    def substitutes(self, product_id: str) -> Items | None:
        """The current substitutes list, or ``None`` for an unknown or unowned product."""
        return self._propagation.lists[Kind.SUBSTITUTES].get(product_id)

    def complements(self, product_id: str) -> Items | None:
        """The current complements list, or ``None`` where no behaviour was seen."""
        return self._propagation.lists[Kind.COMPLEMENTS].get(product_id)

    def duplicates(self, product_id: str) -> Items | None:
        """The other listings of the same product (``serving.duplicates``), or ``None`` for an
        unknown or unowned product."""
        return self._propagation.lists[Kind.DUPLICATES].get(product_id)

    def behavior_rows(self) -> dict[str, BehaviorRow]:
        """A copy of the stored behaviour rows (for ``exact_lists`` and snapshots)."""
        return dict(self._propagation.rows)

    def list_of(self, kind: Kind, product_id: str) -> Items | None:
        """The current list of one kind for ``product_id``, or ``None`` (unknown, unowned, none)."""
        return self._propagation.lists[Kind(kind)].get(product_id)

    def lists(self, kind: Kind) -> dict[str, Items]:
        """A copy of every current list of one kind."""
        return dict(self._propagation.lists[Kind(kind)])

    def indexed_vector(self, product_id: str) -> np.ndarray | None:
        """The vector ``product_id`` is indexed with (also while a bulk catch-up still holds
        it back from the index), or ``None`` when it is not indexed."""
        staged = self._staged.get(product_id)
        if staged is not None:
            return staged
        if product_id in self.index:
            return self.index.get_vector(product_id)
        return None

    def vectors(self) -> dict[str, np.ndarray]:
        """Every stored unit vector by id (for ``exact_lists`` in tests)."""
        self._catch_up_deferred()
        ids = list(self.index.ids())
        mat = self.index.get_vectors(ids)
        return {pid: mat[i] for i, pid in enumerate(ids)}

    @property
    def lexical_vectors(self) -> Mapping[str, SparseVec]:
        """Every live product's lexical vector (read only: the core keeps them current)."""
        self._vectorize_deferred()
        return self._propagation.lex

    def lexical_top(
        self, query: SparseVec, n: int, accept: Callable[[str], bool] | None = None, *, limit: int | None = None
    ) -> list[tuple[str, float]]:
        """The ``n`` products with the highest lexical cosine to ``query`` (positive only, ties
        by id) that ``accept``, looking at no more than ``limit``; exact (``LexicalPostings``)."""
        self._vectorize_deferred()
        return self.postings.top(self._propagation.lex, query, n, accept, limit=limit)

    def stats(self) -> RecommenderStats:
        core = self._propagation
        return RecommenderStats(
            products=len(self.catalog),
            index_live=self.index.live_count,
            index_deleted=self.index.deleted_count,
            stale_events=self.catalog.stale_events,
            unknown_deletes=self.catalog.unknown_deletes,
            publications=core.publications,
            refills=core.buffers.refills,
            lists=len(core.lists[Kind.SIMILAR]),
        )

    # ------------------------------------------------------------------ changes

    def needs_embedding(self, change: ProductChange) -> Product | None:
        """The merged product when ``change`` needs a (new) embedding, else ``None``.

        Embed ``serving.text.product_text(product)``. Raises ``InvalidChange`` like
        ``Catalog.preview``.
        """
        update = self.catalog.preview(change)
        if update.applied and update.text_changed:
            return update.after
        return None

    def apply(
        self, change: ProductChange, vector: np.ndarray | None = None, *, defer: bool = False
    ) -> list[Publication]:
        """Merge one change and return every list that must be republished.

        ``vector`` is required exactly when ``needs_embedding(change)`` returns a product;
        otherwise it is ignored (a price or stock change is never re-embedded). On any
        error (``InvalidChange``, ``MissingVector``, ``InvalidVector``) nothing changes.
        Stale events and deletes of unknown ids are counted and return ``[]``.

        With ``defer`` the change is merged into the catalog, the index and the lexical
        vectors, but the lists are left for ``settle`` (only a deleted product's own lists
        are tombstoned at once): a worker far behind its input converges once instead of
        rebuilding lists that later changes rebuild again. Any call without ``defer``
        settles first, and its result starts with what the settle published.
        """
        settled = [] if defer else self.settle()
        update = self.catalog.preview(change)
        pid = change.product_id
        core = self._propagation
        if update.outcome in (Outcome.STALE, Outcome.UNKNOWN_DELETE):
            self.catalog.commit(update, change.ts)
            return settled
        if update.outcome is Outcome.DELETED:
            self.catalog.commit(update, change.ts)
            self.postings.mark(pid)
            self._staged.pop(pid, None)
            self._unvectorized.discard(pid)
            return settled + (core.defer_delete(pid) if defer else core.on_delete(pid))
        after = update.after
        assert after is not None
        if update.text_changed:
            if vector is None:
                raise MissingVector(
                    f"product {pid!r} is new or its text changed: embed product_text(product) "
                    "and pass the vector to apply()"
                )
            unit = normalize_rows(vector, self.config.dim)  # raises InvalidVector before any state changes
            if len(unit) != 1:
                raise InvalidVector(f"product {pid!r}: pass one vector, got {len(unit)}")
            row = unit[0]
            if defer:
                self.catalog.commit(update, change.ts)
                core.lex.pop(pid, None)
                self._unvectorized.add(pid)
                self._staged.pop(pid, None)  # re-inserted last: the index sees arrival order
                self._staged[pid] = row
                if len(self._staged) >= STAGE_BATCH:
                    self._write_staged()
            else:
                lex = self.lexical.vectorize(product_text(after))
                self.index.upsert([pid], row[None, :])
                self.catalog.commit(update, change.ts)
                core.lex[pid] = lex
            self.postings.mark(pid)
            core.profiles[pid] = profile(after)
            if defer:
                core.defer_change(pid, out_of_stock=update.went_out_of_stock)
                return settled
            return settled + core.on_vector_change(pid, out_of_stock=update.went_out_of_stock)
        self.catalog.commit(update, change.ts)
        before = core.profiles.get(pid)
        core.profiles[pid] = profile(after)
        if defer:
            core.defer_change(pid, out_of_stock=update.went_out_of_stock)
            return settled
        return settled + core.on_attributes_change(pid, update, before=before)

    def prime(self, vectors: np.ndarray | Sequence[np.ndarray]) -> None:
        """Prepare for a batch whose text changes bring ``vectors``: the reverse check of
        every owner against all of them runs as one matrix product instead of one pass over
        the owners' vectors per change (``CandidateBuffers.prime``). Results are the same
        with or without it; ``unprime`` frees it once the batch is applied."""
        rows = np.asarray(vectors, dtype=np.float32)
        if rows.ndim != 2 or len(rows) < 2 or self._propagation.unsettled:
            return
        self._propagation.buffers.prime(normalize_rows(rows, self.config.dim))

    def unprime(self) -> None:
        """Free what ``prime`` prepared."""
        self._propagation.buffers.unprime()

    @property
    def unsettled(self) -> bool:
        """Whether deferred changes wait for ``settle``."""
        return self._propagation.unsettled

    def settle(self) -> list[Publication]:
        """Propagate every change applied with ``defer`` since the last settle, at once.

        The candidate buffers of all owned products are rebuilt from the index in batched
        searches (as ``bulk_load`` builds them), and every list that differs from the last
        published one is returned once. A no-op when nothing was deferred.
        """
        self._catch_up_deferred()
        return self._propagation.settle()

    def settle_steps(self, chunk: int = SETTLE_CHUNK) -> Iterator[list[Publication]]:
        """``settle`` in steps of ``chunk`` owners, each step's publications in turn: a
        caller may let reads in between the steps, but no change."""
        self._catch_up_deferred()
        return self._propagation.settle_steps(chunk)

    def _catch_up_deferred(self) -> None:
        """What deferred text changes left for later: their index inserts and lexical vectors."""
        self._write_staged()
        self._vectorize_deferred()

    def _vectorize_deferred(self) -> None:
        if self._unvectorized:
            lex = self._propagation.lex
            for pid in sorted(self._unvectorized):
                product = self.catalog.get(pid)
                assert product is not None, "a deleted product leaves _unvectorized"
                lex[pid] = self.lexical.vectorize(product_text(product))
            self._unvectorized = set()

    def _write_staged(self) -> None:
        """Insert the staged vectors of deferred text changes into the index, in one batch."""
        if self._staged:
            ids = list(self._staged)
            rows = np.stack([self._staged[pid] for pid in ids])
            self._staged = {}
            self.index.upsert(ids, rows)

    def apply_many(
        self,
        items: Sequence[tuple[ProductChange, np.ndarray | None]],
        *,
        on_error: Callable[[int, SimstreamError], None] | None = None,
    ) -> list[Publication]:
        """Apply a batch in order and return the last publication per key.

        Without ``on_error`` the first bad item raises, and the publications of the items
        before it are lost to the caller (their state is kept): streams should pass
        ``on_error`` (item index, error) to dead-letter bad items and keep going.
        """
        pubs: list[Publication] = []
        for i, (change, vector) in enumerate(items):
            try:
                pubs.extend(self.apply(change, vector))
            except SimstreamError as exc:
                if on_error is None:
                    raise
                on_error(i, exc)
        return last_per_key(pubs)

    def apply_behavior(self, rows: Mapping[str, BehaviorRow]) -> list[Publication]:
        """Store the behaviour rows of some items and return the lists that changed.

        Rows of products that are unknown, deleted or not owned are counted in
        ``behavior_ignored`` and skipped, so behaviour never creates a phantom item; partners
        that are not (yet) products are kept and listed once they exist. An empty row clears
        the item's behaviour. All rows are checked before any is stored (``InvalidInput``).
        """
        for pid, row in rows.items():
            row.validate(pid)
        settled = self.settle()
        return settled + self._propagation.apply_behavior(rows)

    def set_ownership(
        self, owns: Callable[[str], bool], behavior: Mapping[str, BehaviorRow] | None = None, *,
        reclaim: Callable[[str], bool] | None = None,
    ) -> list[Publication]:
        """Hand lists over after a rebalance: maintain exactly the products ``owns`` accepts.

        Products no longer owned lose their buffers, lists and behaviour rows here, with no
        tombstones (their new owner keeps publishing them). Newly owned products get their
        buffers from the replicated index (one batched search) and their lists; the
        publications of those lists are returned with versions continuing from what this
        recommender last published, so call ``seed_version`` first with what the list topics
        hold, or reconcile with ``republish``. ``behavior`` holds the behaviour rows the
        previous owners published (rows of products this worker keeps are ignored); a gained
        product whose topic holds complements but that has no row gets an empty list. The
        index and catalog are untouched: every worker replicates all of them.

        ``reclaim``: products this recommender already maintains whose lists its worker
        starts publishing again (a snapshot restored under the partitions it is given back).
        They keep their buffers and lists, which are current, and take their rows from
        ``behavior`` as gained products do; only lists whose row changed are returned, so
        compare the others with their topics (``streams.scaleout.hand_over``).
        """
        for pid, row in (behavior or {}).items():
            row.validate(pid)
        settled = self.settle()
        return settled + self._propagation.set_ownership(
            owns, (p.product_id for p in self.catalog), behavior or {}, reclaim)

    def maintained(self) -> Collection[str]:
        """The products whose lists this recommender maintains (the owned ones in its catalog)."""
        return self._propagation.buffers.by_owner.keys()

    def bulk_load(self, products: Sequence[ProductUpsert], vectors: np.ndarray) -> list[Publication]:
        """Load a whole catalog into an empty recommender at once (start-up, benchmarks).

        Equivalent to applying every upsert in turn, but the index is built in one batch and
        the candidate buffers come from one batched query. Ids must be unique and every
        product needs a title; on any error nothing changes. Returns the lists of every
        owned product.
        """
        if len(self.catalog) or len(self.index):
            raise ConfigurationError("bulk_load needs an empty Recommender; apply() changes one at a time")
        ids = [c.product_id for c in products]
        if len(set(ids)) != len(ids):
            raise InvalidInput("bulk_load: product ids must be unique; merge duplicates first")
        if len(ids) != len(vectors):
            raise InvalidInput(f"bulk_load: got {len(vectors)} vectors for {len(ids)} products")
        if not ids:
            return []
        normalize_rows(vectors, self.config.dim)  # InvalidVector before anything changes
        catalog = Catalog()
        for change in products:
            catalog.apply(change)  # InvalidChange before anything changes
        lex = {p.product_id: self.lexical.vectorize(product_text(p)) for p in catalog}
        self.index.upsert(ids, vectors)
        self.catalog = catalog
        owned = [pid for pid in ids if self.owns(pid)]
        return self._propagation.load(lex, {p.product_id: profile(p) for p in catalog}, owned)

    def refit_lexical(self) -> list[Publication]:
        """Refit the IDF on the current catalog and republish every list that changed.

        Every lexical score moves, so this is an explicit, whole-catalog step (run it at
        start-up after a replay, or when the catalog has grown a lot), never a side
        effect of one streamed change.
        """
        return self.use_lexical(LexicalModel.fit(product_text(p) for p in self.catalog))

    def use_lexical(self, model: LexicalModel) -> list[Publication]:
        """Score with ``model`` (an IDF fitted elsewhere: every worker of a group shares one)
        and republish every list that changed; nothing happens when it is the model in use.

        With deferred changes waiting, only the model and the lexical vectors change here:
        the ``settle`` that follows rebuilds every list with them, once.
        """
        if model.same_as(self.lexical):
            return self.settle()
        self.lexical = model
        self.lexical_adoptions += 1
        self.postings.reset()  # its rows hold the old model's weights
        lex = {p.product_id: self.lexical.vectorize(product_text(p)) for p in self.catalog}
        self._unvectorized = set()
        if self.unsettled:
            self._propagation.lex = lex
            return []
        return self._propagation.use_lexical_vectors(lex)

    # ------------------------------------------------------------------ versions

    def seed_version(self, kind: Kind, product_id: str, version: int) -> None:
        """Continue a list's version counter from ``version`` (what its topic already holds).

        Used after a rebuild from the topics, so ``version`` keeps increasing across restarts.
        A lower value than the one held is ignored.
        """
        self._propagation.seed_version(kind, product_id, version)

    def republish(self, kind: Kind, product_id: str) -> Publication:
        """A publication of the current list (a tombstone when there is none), with the next version.

        For reconciling with a topic that holds something else, e.g. after a crash between
        ``apply`` and the publish, or for a list whose product is gone.
        """
        return self._propagation.republish(kind, product_id)

    # ------------------------------------------------------------------ snapshots

    def save(self, directory: Path) -> Path:
        """Write a checksummed snapshot; see ``serving.snapshot.save_snapshot``."""
        from serving.snapshot import save_snapshot

        return save_snapshot(self.export_state(), self.config, Path(directory))

    @classmethod
    def load(
        cls, directory: Path, config: RecommenderConfig, *, owns: Callable[[str], bool] | None = None
    ) -> Recommender:
        """Restore the latest complete snapshot; see ``serving.snapshot.load_snapshot``.

        The cyclic collector is paused meanwhile, and what the load made is then moved out of
        its reach (``gc.freeze``, as the worker does after every restore): a load makes
        millions of objects that live as long as the recommender, and collections scanning
        them were a third of a load's time, the first one after it 2 s more at 100k. Frozen
        objects are still freed by reference counting.
        """
        from serving.snapshot import load_snapshot

        with _collector_paused():
            rec = cls.from_state(load_snapshot(Path(directory), config), config, owns=owns)
            gc.freeze()
            return rec


@contextmanager
def _collector_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
