"""Neighbour lists with exact propagation: ``Recommender.apply(change) -> list[Publication]``.

The definition every published list must match (DESIGN.md, "Propagation invariant"):

* ``similar[p]``: the dense top-C neighbours of ``p`` (C = ``candidate_depth``, ties by
  id), re-ranked by the hybrid content score, first ``k``;
* ``substitutes[p]``: the same top-C, filtered by ``serving.rules.is_substitute``, ranked
  the same way, first ``k``.

``exact_lists`` computes exactly that from scratch; the recommender maintains it
incrementally. For each owned product ``p`` it keeps a *candidate buffer*: the exact dense
top-``n`` neighbours (``C <= n <= C + candidate_slack``, or every other product when there
are fewer), with each pair's dense and lexical score. A reverse map says which buffers
name a product. When ``q`` changes:

* **vector (text) change or insert**: ``q`` is taken out of every buffer that named it
  (a buffer that drops below C is refilled from the index), ``q``'s own buffer is rebuilt,
  and ``q`` enters every buffer whose last member it beats. With an exact index every
  buffer is checked; with HNSW the ``reverse_depth`` nearest neighbours of ``q`` are.
* **delete**: the same removal, then tombstones for ``q``'s own lists.
* **stock, price, group or other non-text change**: the lists whose buffers name ``q``
  (and ``q``'s own) are re-evaluated, since substitute rules and reasons depend on them.

Only lists that differ from the last published ones are returned, except that a product
going out of stock always gets its substitutes published with ``trigger="out_of_stock"``.
Because a removal from an exact top-n leaves an exact top-(n-1), and an insertion is only
made when it beats the last member (or the buffer holds everything), the buffers stay
exact with ``ExactIndex``; with ``HnswIndex`` they are as good as its recall.

Ownership: ``owns(product_id)`` decides which products get lists (scale-out: a worker
replicates the whole index but maintains and publishes only the lists of its partitions).
"""

from __future__ import annotations

import enum
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.behavior import BehaviorModel
from serving.catalog import Catalog, CatalogUpdate, Outcome, Product, ProductChange, ProductUpsert
from serving.config import RecommenderConfig
from serving.errors import ConfigurationError, InvalidInput, MissingVector, SimstreamError
from serving.index import DEFAULT_INDEX, Offsets, VectorIndex, create_index, normalize_rows
from serving.kinds import CONTENT_KINDS, LIST_KINDS, Kind
from serving.lexical import LexicalModel, SparseVec, cosine_many
from serving.rules import profile_is_substitute
from serving.scoring import (
    Profile,
    content_score,
    dense_scores,
    final_score,
    profile,
    profile_reasons,
    rank_candidates,
)
from serving.text import product_text

__all__ = [
    "BOUGHT_TOGETHER",
    "COMPLEMENT_CHANNELS",
    "CONTENT_KINDS",
    "BehaviorRow",
    "Items",
    "Kind",
    "Publication",
    "Recommender",
    "RecommenderStats",
    "ScoredItem",
    "Trigger",
    "build_complements",
    "build_lists",
    "exact_lists",
    "last_per_key",
]

COMPLEMENT_CHANNELS = ("cart", "purchase")


#: The reason every complement carries, before the content reasons.
BOUGHT_TOGETHER = "often bought together"


class Trigger(enum.StrEnum):
    OUT_OF_STOCK = "out_of_stock"
    REFRESH = "refresh"


@dataclass(frozen=True, slots=True)
class ScoredItem:
    """One entry of a list, with the parts of its score and why it is there."""

    product_id: str
    score: float
    content: float
    dense: float
    lexical: float
    behavior: float
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Publication:
    """A whole list to put on the wire; ``items is None`` is a tombstone."""

    kind: Kind
    product_id: str
    items: tuple[ScoredItem, ...] | None
    trigger: Trigger | None
    version: int

    @property
    def key(self) -> tuple[Kind, str]:
        return (self.kind, self.product_id)


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


Items = tuple[ScoredItem, ...]


@dataclass(frozen=True, slots=True)
class BehaviorRow:
    """One owned item's behaviour partners, as the stream last computed them.

    ``partners``: (id, score in [0, 1]) over every channel (co-view, co-cart, co-purchase),
    which feeds the ``behavior`` part of similar-items and substitutes. ``complements``:
    (id, score in [0, 1]) over co-cart and co-purchase only, which makes the complements
    list. The recommender stores rows as given, so its lists are a deterministic function
    of catalog, vectors and rows (the behaviour model's clock never leaks in).
    """

    partners: tuple[tuple[str, float], ...] = ()
    complements: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_model(cls, model: BehaviorModel, item: str, k: int) -> BehaviorRow:
        """The row of ``item`` now: top-``k`` partners, and top-``k`` complements.

        A complement's score is the event-weighted mean of its co-cart and co-purchase
        scores, so a pair bought together outranks one only carted together.
        """
        cfg = model.config
        weights = {ch: cfg.channel_weight(ch) for ch in COMPLEMENT_CHANNELS}
        total = sum(weights.values())
        mixed: dict[str, float] = {}
        for ch, w in weights.items():
            for other, score in model.partners(item, ch, k):
                mixed[other] = mixed.get(other, 0.0) + w * score
        complements = sorted(((o, min(1.0, s / total)) for o, s in mixed.items()), key=lambda t: (-t[1], t[0]))
        return cls(partners=tuple(model.partners(item, "all", k)), complements=tuple(complements[:k]))

    def names(self) -> set[str]:
        """Every product the row mentions."""
        return {c for c, _s in self.partners} | {c for c, _s in self.complements}

    def validate(self, owner: str) -> None:
        """Raise ``InvalidInput`` for a row no behaviour model could have produced."""
        for label, pairs in (("partners", self.partners), ("complements", self.complements)):
            for other, score in pairs:
                if not isinstance(other, str) or not other:
                    raise InvalidInput(f"behaviour row of {owner!r}: {label} ids must be non-empty strings")
                if not (isinstance(score, float | int) and math.isfinite(score) and 0.0 <= score <= 1.0):
                    raise InvalidInput(
                        f"behaviour row of {owner!r}: {label} score for {other!r} must be in [0, 1], got {score!r}"
                    )


class _Buffer:
    """Exact dense top-n of one product: keys ``(-dense, id)`` ascending, and pair scores."""

    __slots__ = ("complete", "keys", "parts")

    def __init__(self) -> None:
        self.keys: list[tuple[float, str]] = []
        # id -> complex(dense, lexical): a complex is not a GC container, so the dict stays
        # untracked by the cyclic GC. With tuple values every insert re-tracked the dict and
        # each young collection walked ~60 of them per change (cache misses over a GB heap).
        self.parts: dict[str, complex] = {}
        self.complete = False  # holds every other product


#: Reasons already computed for one owner: candidate id -> (candidate profile, reasons).
ReasonCache = dict[str, tuple[Profile, tuple[str, ...]]]


def build_lists(
    owner: Profile,
    candidates: Iterable[tuple[str, float, float]],
    profiles: Callable[[str], Profile | None],
    config: RecommenderConfig,
    cache: ReasonCache | None = None,
    behavior: Mapping[str, float] | None = None,
) -> tuple[Items, Items]:
    """(similar, substitutes) for ``owner`` from its (id, dense, lexical) candidates.

    The candidates are the top-C by dense score, plus (when ``behavior_weight > 0``) the
    owner's behaviour partners. ``behavior`` maps candidate id to its behaviour score; the
    ranking is by ``final_score(content, behavior)``, then id. ``profiles`` gives
    ``serving.scoring.profile(product)`` by id. ``cache`` (optional) holds reasons from the
    last build for the same owner profile; an entry is reused only while the candidate's
    profile is the very same object, and is refreshed in place.
    """
    ranked = rank_candidates(candidates, config)
    if behavior:
        # With behaviour the blend can reorder content ranks; without it, the content
        # order already is the score order and the extra sort is skipped.
        scored = sorted(
            (-final_score(content, behavior.get(pid, 0.0), config), pid, content, dense, lexical)
            for pid, content, dense, lexical in ranked
        )
        rows = ((pid, -neg, content, dense, lexical) for neg, pid, content, dense, lexical in scored)
    else:
        rows = ((pid, final_score(content, 0.0, config), content, dense, lexical) for pid, content, dense, lexical in ranked)
    similar: list[ScoredItem] = []
    subs: list[ScoredItem] = []
    for pid, score, content, dense, lexical in rows:
        cand = profiles(pid)
        if cand is None:
            continue
        want_similar = len(similar) < config.k
        want_sub = len(subs) < config.k and profile_is_substitute(owner, cand, config)
        if not (want_similar or want_sub):
            continue
        item = ScoredItem(
            product_id=pid,
            score=score,
            content=content,
            dense=dense,
            lexical=lexical,
            behavior=behavior.get(pid, 0.0) if behavior else 0.0,
            reasons=_cached_reasons(owner, cand, pid, cache),
        )
        if want_similar:
            similar.append(item)
        if want_sub:
            subs.append(item)
        if len(similar) >= config.k and len(subs) >= config.k:
            break
    return tuple(similar), tuple(subs)


def build_complements(
    owner: Profile,
    row: BehaviorRow,
    profiles: Callable[[str], Profile | None],
    parts: Callable[[list[str]], list[tuple[float, float]]],
    config: RecommenderConfig,
) -> Items:
    """The complements list of ``owner``: its bought-together partners that are live and in
    stock, best behaviour score first (ties by id), first ``k``.

    ``parts(ids)`` gives each listed id's (dense, lexical) pair with the owner, so every
    complement explains itself like a similar item does.
    """
    picked: list[tuple[str, float, Profile]] = []
    for other, score in sorted(row.complements, key=lambda t: (-t[1], t[0])):
        cand = profiles(other)
        if cand is None or not cand.in_stock or other == owner.product_id:
            continue
        picked.append((other, float(score), cand))
        if len(picked) >= config.k:
            break
    if not picked:
        return ()
    scored = parts([o for o, _s, _c in picked])
    return tuple(
        ScoredItem(
            product_id=other,
            score=score,
            content=content_score(dense, lexical, config),
            dense=dense,
            lexical=lexical,
            behavior=score,
            reasons=(BOUGHT_TOGETHER, *profile_reasons(owner, cand)),
        )
        for (other, score, cand), (dense, lexical) in zip(picked, scored, strict=True)
    )


def _cached_reasons(owner: Profile, cand: Profile, pid: str, cache: ReasonCache | None) -> tuple[str, ...]:
    if cache is None:
        return profile_reasons(owner, cand)
    hit = cache.get(pid)
    if hit is not None and hit[0] is cand:
        return hit[1]
    found = profile_reasons(owner, cand)
    cache[pid] = (cand, found)
    return found


def _beats(item: ScoredItem, last: ScoredItem) -> bool:
    """Whether ``item`` ranks before ``last`` by (content, id)."""
    return (-item.content, item.product_id) < (-last.content, last.product_id)


def exact_lists(
    products: Iterable[Product],
    vectors: Mapping[str, np.ndarray],
    config: RecommenderConfig,
    lexical: LexicalModel | None = None,
    *,
    owns: Callable[[str], bool] | None = None,
    behavior: Mapping[str, BehaviorRow] | None = None,
) -> dict[Kind, dict[str, Items]]:
    """The lists a quiet service must have published, computed from scratch by brute force.

    ``vectors`` maps every product id to its (not necessarily normalised) embedding;
    ``lexical`` must be the recommender's frozen model (``Recommender.lexical``);
    ``behavior`` the rows given to ``Recommender.apply_behavior`` (owned, live products).
    Dense scores are float64 inner products of the float32 unit vectors the index stores,
    so they agree with the incremental ones to about 1e-12; compare scores with a tolerance.
    """
    lexical = lexical or LexicalModel()
    behavior = behavior or {}
    prods = {p.product_id: p for p in products}
    ids = sorted(prods)
    out: dict[Kind, dict[str, Items]] = {spec.kind: {} for spec in LIST_KINDS}
    if not ids:
        return out
    mat = normalize_rows(np.stack([np.asarray(vectors[i], dtype=np.float64) for i in ids]), config.dim)
    m64 = mat.astype(np.float64)
    sims = m64 @ m64.T
    lex = {i: lexical.vectorize(product_text(prods[i])) for i in ids}
    profs = {i: profile(prods[i]) for i in ids}
    pos = {pid: j for j, pid in enumerate(ids)}
    id_arr = np.array(ids, dtype=object)
    c = config.candidate_depth
    for row, pid in enumerate(ids):
        if owns is not None and not owns(pid):
            continue
        scores = sims[row].copy()
        order = [j for j in np.lexsort((id_arr, -scores)) if j != row][:c]
        beh = behavior.get(pid)
        partners = dict(beh.partners) if beh is not None else {}
        if partners and config.behavior_weight > 0:
            listed = set(order)
            order += [pos[o] for o in sorted(partners) if o in pos and o != pid and pos[o] not in listed]
        lexical_scores = cosine_many(lex[pid], [lex[ids[j]] for j in order])
        cands = [(ids[j], float(scores[j]), lx) for j, lx in zip(order, lexical_scores, strict=True)]
        similar, subs = build_lists(profs[pid], cands, profs.get, config, behavior=partners)
        out[Kind.SIMILAR][pid] = similar
        out[Kind.SUBSTITUTES][pid] = subs
        if beh is not None:

            def parts(others: list[str], row: int = row, pid: str = pid) -> list[tuple[float, float]]:
                lx = cosine_many(lex[pid], [lex[o] for o in others])
                return [(float(sims[row][pos[o]]), v) for o, v in zip(others, lx, strict=True)]

            out[Kind.COMPLEMENTS][pid] = build_complements(profs[pid], beh, profs.get, parts, config)
    return out


def last_per_key(publications: Iterable[Publication]) -> list[Publication]:
    """Keep the last publication per (kind, product_id), in order of last appearance."""
    last: dict[tuple[Kind, str], Publication] = {}
    for pub in publications:
        last.pop(pub.key, None)
        last[pub.key] = pub
    return list(last.values())


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
        self.config = config
        self.index: VectorIndex = index if index is not None else create_index(DEFAULT_INDEX, config)
        if self.index.dim != config.dim:
            raise ConfigurationError(
                f"index dimension {self.index.dim} differs from RecommenderConfig.dim {config.dim}"
            )
        if len(self.index):
            raise ConfigurationError("Recommender needs an empty index; use Recommender.load to restore state")
        self._init_state(owns, lexical)

    @classmethod
    def _restored(
        cls,
        config: RecommenderConfig,
        index: VectorIndex,
        *,
        owns: Callable[[str], bool] | None,
        lexical: LexicalModel,
    ) -> Recommender:
        """An instance around an already-filled index, for ``serving.snapshot`` to populate."""
        rec = cls.__new__(cls)
        rec.config = config
        rec.index = index
        rec._init_state(owns, lexical)
        return rec

    def _init_state(self, owns: Callable[[str], bool] | None, lexical: LexicalModel | None) -> None:
        self.owns: Callable[[str], bool] = owns if owns is not None else (lambda _pid: True)
        self.catalog = Catalog()
        self.lexical = lexical if lexical is not None else LexicalModel()
        self.offsets: Offsets = {}
        self.versions: dict[tuple[Kind, str], int] = {}
        self._lex: dict[str, SparseVec] = {}
        self._prof: dict[str, Profile] = {}
        # Per owner: (owner profile the reasons were computed for, reasons by candidate).
        self._reasons: dict[str, tuple[Profile, ReasonCache]] = {}
        self._buf: dict[str, _Buffer] = {}
        self._rev: dict[str, set[str]] = {}
        self._lists: dict[Kind, dict[str, Items]] = {spec.kind: {} for spec in LIST_KINDS}
        # Behaviour rows of owned products, and which rows name a product (so a change of
        # that product reaches every list it may sit in through behaviour alone).
        self._beh: dict[str, BehaviorRow] = {}
        self._brev: dict[str, set[str]] = {}
        self._publications = 0
        self._refills = 0
        self.behavior_ignored = 0

    # ------------------------------------------------------------------ queries

    def similar(self, product_id: str) -> Items | None:
        """The current similar-items list, or ``None`` for an unknown or unowned product."""
        return self._lists[Kind.SIMILAR].get(product_id)

    def substitutes(self, product_id: str) -> Items | None:
        """The current substitutes list, or ``None`` for an unknown or unowned product."""
        return self._lists[Kind.SUBSTITUTES].get(product_id)

    def complements(self, product_id: str) -> Items | None:
        """The current complements list, or ``None`` where no behaviour was seen."""
        return self._lists[Kind.COMPLEMENTS].get(product_id)

    def behavior_rows(self) -> dict[str, BehaviorRow]:
        """A copy of the stored behaviour rows (for ``exact_lists`` and snapshots)."""
        return dict(self._beh)

    def lists(self, kind: Kind) -> dict[str, Items]:
        """A copy of every current list of one kind."""
        return dict(self._lists[Kind(kind)])

    def vectors(self) -> dict[str, np.ndarray]:
        """Every stored unit vector by id (for ``exact_lists`` in tests)."""
        ids = list(self.index.ids())
        mat = self.index.get_vectors(ids)
        return {pid: mat[i] for i, pid in enumerate(ids)}

    def stats(self) -> RecommenderStats:
        return RecommenderStats(
            products=len(self.catalog),
            index_live=self.index.live_count,
            index_deleted=self.index.deleted_count,
            stale_events=self.catalog.stale_events,
            unknown_deletes=self.catalog.unknown_deletes,
            publications=self._publications,
            refills=self._refills,
            lists=len(self._lists[Kind.SIMILAR]),
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

    def apply(self, change: ProductChange, vector: np.ndarray | None = None) -> list[Publication]:
        """Merge one change and return every list that must be republished.

        ``vector`` is required exactly when ``needs_embedding(change)`` returns a product;
        otherwise it is ignored (a price or stock change is never re-embedded). On any
        error (``InvalidChange``, ``MissingVector``, ``InvalidVector``) nothing changes.
        Stale events and deletes of unknown ids are counted and return ``[]``.
        """
        update = self.catalog.preview(change)
        pid = change.product_id
        if update.outcome in (Outcome.STALE, Outcome.UNKNOWN_DELETE):
            self.catalog.commit(update, change.ts)
            return []
        if update.outcome is Outcome.DELETED:
            self.catalog.commit(update, change.ts)
            return self._on_delete(pid)
        after = update.after
        assert after is not None
        if update.text_changed:
            if vector is None:
                raise MissingVector(
                    f"product {pid!r} is new or its text changed: embed product_text(product) "
                    "and pass the vector to apply()"
                )
            normalize_rows(vector, self.config.dim)  # raises InvalidVector before any state changes
            lex = self.lexical.vectorize(product_text(after))
            self.index.upsert([pid], np.asarray(vector)[None, :] if np.ndim(vector) == 1 else vector)
            self.catalog.commit(update, change.ts)
            self._lex[pid] = lex
            self._prof[pid] = profile(after)
            return self._on_vector_change(pid, out_of_stock=update.went_out_of_stock)
        self.catalog.commit(update, change.ts)
        self._prof[pid] = profile(after)
        return self._on_attributes_change(pid, update)

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
        affected: set[str] = set()
        for pid, row in rows.items():
            if pid not in self._buf:
                self.behavior_ignored += 1
                continue
            old = self._beh.get(pid)
            if old == row:
                continue
            self._set_row(pid, row)
            affected.add(pid)
        return self._refresh(affected)

    def _set_row(self, pid: str, row: BehaviorRow | None) -> None:
        old = self._beh.pop(pid, None)
        if old is not None:
            for c in old.names():
                holders = self._brev.get(c)
                if holders is not None:
                    holders.discard(pid)
                    if not holders:
                        del self._brev[c]
        if row is not None and (row.partners or row.complements):
            self._beh[pid] = row
            for c in row.names():
                self._brev.setdefault(c, set()).add(pid)

    def _behavior_holders(self, q: str) -> set[str]:
        """Owned products whose behaviour row names ``q``."""
        return {p for p in self._brev.get(q, ()) if p in self._buf and p != q}

    def set_ownership(
        self, owns: Callable[[str], bool], behavior: Mapping[str, BehaviorRow] | None = None
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
        """
        for pid, row in (behavior or {}).items():
            row.validate(pid)
        self.owns = owns
        for p in [p for p in self._buf if not owns(p)]:
            buf = self._buf.pop(p)
            for c in buf.parts:
                self._rev_discard(c, p)
            self._reasons.pop(p, None)
            self._set_row(p, None)
            for spec in LIST_KINDS:
                self._lists[spec.kind].pop(p, None)
        gained = sorted(p.product_id for p in self.catalog if owns(p.product_id) and p.product_id not in self._buf)
        self._build_buffers(gained)
        emptied: list[Publication] = []
        for pid in gained:
            handed = (behavior or {}).get(pid)
            if handed is not None:
                self._set_row(pid, handed)
            elif (Kind.COMPLEMENTS, pid) in self.versions:
                # The topic holds the old owner's complements, and no row says what they are.
                self._lists[Kind.COMPLEMENTS][pid] = ()
                emptied.append(self._publish(Kind.COMPLEMENTS, pid, (), None))
        return emptied + self._refresh(gained)

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
        self._lex = lex
        self._prof = {p.product_id: profile(p) for p in catalog}
        owned = [pid for pid in ids if self.owns(pid)]
        self._build_buffers(owned)
        return self._refresh(owned)

    def _build_buffers(self, ids: list[str], chunk: int = 4096) -> None:
        """Candidate buffers of many products from batched index searches."""
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            mat = self.index.get_vectors(part)
            found = self.index.query_batch(mat, self.config.buffer_depth, exclude=part)
            for pid, vp, hits in zip(part, mat, found, strict=True):
                self._set_buffer(pid, vp, [c for c, _ in hits], reuse_lexical=False)

    def refit_lexical(self) -> list[Publication]:
        """Refit the IDF on the current catalog and republish every list that changed.

        Every lexical score moves, so this is an explicit, whole-catalog step (run it at
        start-up after a replay, or when the catalog has grown a lot), never a side
        effect of one streamed change.
        """
        return self.use_lexical(LexicalModel.fit(product_text(p) for p in self.catalog))

    def use_lexical(self, model: LexicalModel) -> list[Publication]:
        """Score with ``model`` (an IDF fitted elsewhere: every worker of a group shares one)
        and republish every list that changed; nothing happens when it is the model in use."""
        if model.same_as(self.lexical):
            return []
        self.lexical = model
        self._lex = {p.product_id: self.lexical.vectorize(product_text(p)) for p in self.catalog}
        for pid, buf in self._buf.items():
            members = list(buf.parts)
            lexical = cosine_many(self._lex[pid], [self._lex[c] for c in members])
            buf.parts = {c: complex(buf.parts[c].real, lx) for c, lx in zip(members, lexical, strict=True)}
        return self._refresh(set(self._buf))

    # ------------------------------------------------------------------ internals

    def _on_vector_change(self, q: str, *, out_of_stock: bool = False) -> list[Publication]:
        affected: set[str] = set()
        patched: dict[str, tuple[Items, Items]] = {}
        old_rev = self._rev.pop(q, set())
        for p in old_rev:
            if self._drop(p, q, patched):
                affected.add(p)
        vq = self.index.get_vector(q)
        near: list[str] | None = None
        if not self.index.exact:
            # One search serves q's own buffer (its head) and the reverse check (all of it).
            depth = max(self.config.buffer_depth, self.config.reverse_depth)
            near = [c for c, _ in self.index.query(vq, depth, exclude=(q,))]
        if self.owns(q):
            if near is None:
                self._fill(q, reuse_lexical=False)
            else:
                self._set_buffer(q, vq, near[: self.config.buffer_depth], reuse_lexical=False)
            affected.add(q)
        affected |= self._behavior_holders(q)
        self._enter(q, vq, old_rev, affected, patched, near=near)
        return self._refresh(affected, out_of_stock=q if out_of_stock else None, patched=patched)

    def _on_delete(self, q: str) -> list[Publication]:
        own = self._buf.pop(q, None)
        self._reasons.pop(q, None)
        if own is not None:
            for c in own.parts:
                self._rev_discard(c, q)
        self._lex.pop(q, None)
        self._prof.pop(q, None)
        self._set_row(q, None)
        old_rev = self._rev.pop(q, set())
        self.index.delete(q)
        patched: dict[str, tuple[Items, Items]] = {}
        affected = {p for p in old_rev if self._drop(p, q, patched)}
        affected |= self._behavior_holders(q)
        pubs: list[Publication] = []
        for spec in LIST_KINDS:
            held = self._lists[spec.kind].pop(q, None)
            # A behaviour-only list (complements) may sit on the topic without a list here
            # (a row lost in a handover).
            stale = not spec.content and self.owns(q) and (spec.kind, q) in self.versions
            if held is not None or stale:
                pubs.append(self._publish(spec.kind, q, None, None))
        pubs.extend(self._refresh(affected, patched=patched))
        return pubs

    def _on_attributes_change(self, q: str, update: CatalogUpdate) -> list[Publication]:
        # Only lists whose top-C holds q can change: those that list q (reasons, rules) and
        # those q may now enter as a substitute.
        c_depth = self.config.candidate_depth
        affected = {
            p
            for p in self._rev.get(q, ())
            if self._rank_of(p, q) < c_depth and self._may_change(p, left=(), entered=(q,))
        }
        if q in self._buf:
            affected.add(q)
        affected |= self._behavior_holders(q)
        return self._refresh(affected, out_of_stock=q if update.went_out_of_stock else None)

    def _rev_discard(self, c: str, p: str) -> None:
        holders = self._rev.get(c)
        if holders is not None:
            holders.discard(p)
            if not holders:
                del self._rev[c]

    def _fill(self, p: str, *, reuse_lexical: bool) -> None:
        """(Re)build ``p``'s buffer from an index query."""
        vp = self.index.get_vector(p)
        found = [c for c, _ in self.index.query(vp, self.config.buffer_depth, exclude=(p,))]
        self._set_buffer(p, vp, found, reuse_lexical=reuse_lexical)

    def _set_buffer(self, p: str, vp: np.ndarray, found: list[str], *, reuse_lexical: bool) -> None:
        depth = self.config.buffer_depth
        found = [c for c in found if c in self._lex and c != p]
        dense = dense_scores(vp, self.index.get_vectors(found)) if found else np.zeros(0)
        old = self._buf.get(p)
        own_lex = self._lex[p]
        known = old.parts if (reuse_lexical and old is not None) else {}
        fresh = [c for c in found if c not in known]
        lexical = dict(zip(fresh, cosine_many(own_lex, [self._lex[c] for c in fresh]), strict=True))
        parts: dict[str, complex] = {}
        for c, d in zip(found, dense.tolist(), strict=True):
            parts[c] = complex(d, known[c].imag if c in known else lexical[c])
        buf = _Buffer()
        buf.keys = sorted((-z.real, c) for c, z in parts.items())[:depth]
        buf.parts = {c: parts[c] for _d, c in buf.keys}
        buf.complete = len(self.index) - 1 <= depth
        old_members = set(old.parts) if old is not None else set()
        for c in old_members - buf.parts.keys():
            self._rev_discard(c, p)
        for c in buf.parts.keys() - old_members:
            self._rev.setdefault(c, set()).add(p)
        self._buf[p] = buf

    def _rank_of(self, p: str, q: str) -> int:
        """Position of ``q`` in ``p``'s buffer (a large number when absent)."""
        buf = self._buf.get(p)
        if buf is None or q not in buf.parts:
            return 1 << 30
        key = (-buf.parts[q].real, q)
        i = bisect_left(buf.keys, key)
        if i < len(buf.keys) and buf.keys[i] == key:
            return i
        return next(j for j, k in enumerate(buf.keys) if k[1] == q)  # safety net, never expected

    def _drop(self, p: str, q: str, patched: dict[str, tuple[Items, Items]] | None = None) -> bool:
        """Take ``q`` out of ``p``'s buffer (the caller fixes ``rev[q]``); refill if too short.

        Returns whether ``p``'s lists must be rebuilt. With ``patched``, lists that only lose
        ``q`` (and take what moved into the top-C) are patched there instead.
        """
        i = self._rank_of(p, q)
        buf = self._buf.get(p)
        if buf is None or i >= len(buf.keys):
            return False
        del buf.keys[i]
        del buf.parts[q]
        c_depth = self.config.candidate_depth
        if not buf.complete and len(buf.keys) < c_depth:
            self._refills += 1
            self._fill(p, reuse_lexical=True)
            return True
        if i >= c_depth:
            return False
        moved_in = (buf.keys[c_depth - 1][1],) if len(buf.keys) >= c_depth else ()
        if patched is not None:
            entered = moved_in[0] if moved_in else None
            z = buf.parts[entered] if entered is not None else 0j
            fast = self._patched_lists(p, entered, z.real, z.imag, (q,), base=patched.get(p))
            if fast is not None:
                patched[p] = fast
                return False
        return self._may_change(p, left=(q,), entered=moved_in)

    def _may_change(self, p: str, *, left: Iterable[str], entered: Iterable[str]) -> bool:
        """Whether ``p``'s lists can differ after ``left`` left its top-C and ``entered`` entered.

        Exact, not a heuristic: a list is the top-k by content of the top-C (filtered for
        substitutes), so it is unchanged when nothing it lists left (or was touched) and
        nothing that entered beats its last item or fills a short list. ``entered`` ids
        must already be in ``p``'s buffer with their current scores.
        """
        similar = self._lists[Kind.SIMILAR].get(p)
        subs = self._lists[Kind.SUBSTITUTES].get(p)
        if similar is None or subs is None or p in self._beh:
            return True  # behaviour re-weights the ranking: rebuild rather than reason about it
        listed = {i.product_id for i in similar}
        listed.update(i.product_id for i in subs)
        if any(x in listed for x in left):
            return True
        k = self.config.k
        buf = self._buf[p]
        owner = self._prof.get(p)
        for e in entered:
            if e in listed:
                return True
            z = buf.parts[e]
            dense, lexical = z.real, z.imag
            key = (-content_score(dense, lexical, self.config), e)
            if len(similar) < k or key < (-similar[-1].content, similar[-1].product_id):
                return True
            cand = self._prof.get(e)
            if (
                owner is not None
                and cand is not None
                and (len(subs) < k or key < (-subs[-1].content, subs[-1].product_id))
                and profile_is_substitute(owner, cand, self.config)
            ):
                return True
        return False

    def _enter(
        self,
        q: str,
        vq: np.ndarray,
        extra: Iterable[str],
        affected: set[str],
        patched: dict[str, tuple[Items, Items]],
        *,
        near: list[str] | None = None,
    ) -> None:
        """Insert ``q`` into every buffer whose last member it now beats.

        A list that only gains ``q`` is patched in place (``patched``); one that needs more
        is marked for a rebuild (``affected``).
        """
        if self.index.exact:
            pool: Iterable[str] = self._buf.keys()
        else:
            if near is None:
                near = [c for c, _ in self.index.query(vq, self.config.reverse_depth, exclude=(q,))]
            pool = [*near[: self.config.reverse_depth], *extra]
        bufs = self._buf
        seen: set[str] = {q}
        cands: list[str] = []
        cand_bufs: list[_Buffer] = []
        for p in pool:
            if p in seen:
                continue
            seen.add(p)
            b = bufs.get(p)
            if b is not None and q not in b.parts:
                cands.append(p)
                cand_bufs.append(b)
        if not cands:
            return
        scores = dense_scores(vq, self.index.get_vectors(cands)).tolist()
        admitted: list[tuple[str, float, _Buffer]] = []
        for p, d, buf in zip(cands, scores, cand_bufs, strict=True):
            if buf.complete or not buf.keys or (-d, q) < buf.keys[-1]:
                admitted.append((p, d, buf))
        if not admitted:
            return
        # cosine_many is bitwise symmetric (matches are summed in bucket order), so one batch
        # from q's side stores exactly what _fill computes from each owner's side.
        lexical = cosine_many(self._lex[q], [self._lex[p] for p, _d, _b in admitted])
        depth = self.config.buffer_depth
        c_depth = self.config.candidate_depth
        rev = self._rev
        for (p, d, buf), lx in zip(admitted, lexical, strict=True):
            key = (-d, q)
            pos = bisect_left(buf.keys, key)
            buf.keys.insert(pos, key)
            buf.parts[q] = complex(d, lx)
            # Looked up each time: trimming below can drop q again and delete its entry.
            rev.setdefault(q, set()).add(p)
            # Read what q pushed out of the top-C before the tail is trimmed (C may equal depth).
            if pos < c_depth and p not in affected:
                pushed_out = (buf.keys[c_depth][1],) if len(buf.keys) > c_depth else ()
                fast = self._patched_lists(p, q, d, lx, pushed_out, base=patched.get(p))
                if fast is None:
                    affected.add(p)
                else:
                    patched[p] = fast
            if len(buf.keys) > depth:
                _d, dropped = buf.keys.pop()
                del buf.parts[dropped]
                self._rev_discard(dropped, p)
                buf.complete = False

    def _patched_lists(
        self,
        p: str,
        q: str | None,
        dense: float,
        lexical: float,
        pushed_out: tuple[str, ...],
        *,
        base: tuple[Items, Items] | None = None,
    ) -> tuple[Items, Items] | None:
        """``p``'s lists after ``q`` entered its top-C, without a rebuild; ``None`` if unsafe.

        Each list is the top-k by (content, id) of the top-C (valid substitutes only, for
        the substitutes list), and the top-C changed by exactly one swap: ``q`` in, and
        ``pushed_out`` (when the buffer was full) out. So a list keeps its other items and
        takes, in rank order, ``q`` and, when ``pushed_out`` leaves a gap, the best top-C
        member it did not list. A substitute list that is not full holds *every* valid
        candidate of the top-C, so nothing unlisted can fill its gap. Items are built exactly
        as ``build_lists`` builds them, so the result equals a rebuild; a list that does not
        change comes back as the very same tuple.

        The same swap describes a removal: ``q`` is then what moved up into the top-C (or
        ``None``) and ``pushed_out`` what left it. ``base`` holds lists already patched in
        this change, which stand in for the published ones.
        """
        similar, subs = base if base is not None else (self._lists[Kind.SIMILAR].get(p), self._lists[Kind.SUBSTITUTES].get(p))
        owner = self._prof.get(p)
        cand = self._prof.get(q) if q is not None else None
        if similar is None or subs is None or owner is None or (q is not None and cand is None) or p in self._beh:
            return None
        k = self.config.k
        q_content = content_score(dense, lexical, self.config)
        q_key = (-q_content, q or "")
        made: dict[str, ScoredItem] = {}

        def make(c: str, d: float, lx: float) -> ScoredItem:
            item = made.get(c)
            if item is None:
                held = self._reasons.get(p)
                if held is None or held[0] is not owner:
                    held = (owner, {})
                    self._reasons[p] = held
                content = q_content if c == q else content_score(d, lx, self.config)
                item = made[c] = ScoredItem(
                    product_id=c,
                    score=final_score(content, 0.0, self.config),
                    content=content,
                    dense=d,
                    lexical=lx,
                    behavior=0.0,
                    reasons=_cached_reasons(owner, self._prof[c], c, held[1]),
                )
            return item

        def patch(items: Items, q_valid: bool, substitutes: bool) -> Items | None:
            gap = False
            for i in items:
                if i.product_id == q:
                    return None  # listed without being in the buffer: never expected, rebuild
                if i.product_id in pushed_out:
                    gap = True
            if not gap:
                if not q_valid or (len(items) >= k and not q_key < (-items[-1].content, items[-1].product_id)):
                    return items
                assert q is not None  # q_valid implies it
                at = bisect_left([(-i.content, i.product_id) for i in items], q_key)
                return (*items[:at], make(q, dense, lexical), *items[at:])[:k]
            pool = [i for i in items if i.product_id not in pushed_out]
            if q_valid:
                assert q is not None
                pool.append(make(q, dense, lexical))
            if len(items) >= k or not substitutes:
                # The slot pushed_out left goes to the best unlisted top-C member (or q).
                listed = {i.product_id for i in items}
                if q is not None:
                    listed.add(q)
                fill = self._best_unlisted(p, owner, listed, substitutes)
                if fill is not None:
                    pool.append(make(*fill))
            pool.sort(key=lambda i: (-i.content, i.product_id))
            return tuple(pool[:k])

        new_similar = patch(similar, q is not None, substitutes=False)
        new_subs = patch(subs, cand is not None and profile_is_substitute(owner, cand, self.config), substitutes=True)
        if new_similar is None or new_subs is None:
            return None
        held = self._reasons.get(p)
        if held is not None:
            for gone in pushed_out:  # out of the top-C, so in neither list: its reasons go too
                held[1].pop(gone, None)
        return new_similar, new_subs

    def _best_unlisted(
        self, p: str, owner: Profile, listed: set[str], substitutes: bool
    ) -> tuple[str, float, float] | None:
        """The best (content, id) member of ``p``'s top-C not in ``listed``, as (id, dense, lexical).

        With ``substitutes``, only members that pass the substitute rules count. The rule
        check runs only for members that would beat the best found so far.
        """
        buf = self._buf[p]
        w_lex = self.config.lexical_weight
        w_dense = 1.0 - w_lex
        best: tuple[float, str] | None = None
        found: tuple[str, float, float] | None = None
        for _key, c in buf.keys[: self.config.candidate_depth]:
            if c in listed:
                continue
            z = buf.parts[c]
            d, lx = z.real, z.imag
            key = (-(w_dense * d + w_lex * lx), c)
            if best is not None and key >= best:
                continue
            if substitutes:
                prof = self._prof.get(c)
                if prof is None or not profile_is_substitute(owner, prof, self.config):
                    continue
            best = key
            found = (c, d, lx)
        return found

    def _compute(self, p: str) -> tuple[Items, Items]:
        buf = self._buf[p]
        top = buf.keys[: self.config.candidate_depth]
        parts = buf.parts
        cands = [(c, parts[c].real, parts[c].imag) for _d, c in top]
        owner = self._prof[p]
        row = self._beh.get(p)
        partners = dict(row.partners) if row is not None else None
        if partners and self.config.behavior_weight > 0:
            listed_now = {c for _d, c in top}
            extra = [c for c in sorted(partners) if c not in listed_now and c != p and c in self._lex]
            cands += [(c, d, lx) for c, (d, lx) in zip(extra, self._pair_parts(p, extra), strict=True)]
        held = self._reasons.get(p)
        cache: ReasonCache = held[1] if held is not None and held[0] is owner else {}
        similar, subs = build_lists(owner, cands, self._prof.get, self.config, cache, behavior=partners)
        # Keep reasons only for what is listed now, so the cache stays as small as the lists.
        listed = {i.product_id for i in similar}
        listed.update(i.product_id for i in subs)
        self._reasons[p] = (owner, {c: cache[c] for c in listed if c in cache})
        return similar, subs

    def _pair_parts(self, p: str, others: list[str]) -> list[tuple[float, float]]:
        """(dense, lexical) of ``p`` with each of ``others``, computed as the buffers do."""
        if not others:
            return []
        dense = dense_scores(self.index.get_vector(p), self.index.get_vectors(others)).tolist()
        lexical = cosine_many(self._lex[p], [self._lex[o] for o in others])
        return list(zip(dense, lexical, strict=True))

    def _compute_complements(self, p: str) -> Items:
        row = self._beh.get(p)
        if row is None:
            return ()
        return build_complements(
            self._prof[p], row, self._prof.get, lambda others: self._pair_parts(p, others), self.config
        )

    def _refresh(
        self,
        affected: Iterable[str],
        *,
        out_of_stock: str | None = None,
        patched: Mapping[str, tuple[Items, Items]] | None = None,
    ) -> list[Publication]:
        patched = patched or {}
        rebuild = set(affected)
        pubs: list[Publication] = []
        for p in sorted(rebuild | patched.keys()):
            if p not in self._buf:
                continue
            similar, subs = self._compute(p) if p in rebuild else patched[p]
            if self._lists[Kind.SIMILAR].get(p) != similar:
                self._lists[Kind.SIMILAR][p] = similar
                pubs.append(self._publish(Kind.SIMILAR, p, similar, None))
            forced = p == out_of_stock
            if forced or self._lists[Kind.SUBSTITUTES].get(p) != subs:
                self._lists[Kind.SUBSTITUTES][p] = subs
                trigger = Trigger.OUT_OF_STOCK if forced else Trigger.REFRESH
                pubs.append(self._publish(Kind.SUBSTITUTES, p, subs, trigger))
            # A list once published stays (possibly empty) while the product lives, so a
            # consumer never keeps complements that behaviour or stock took away.
            held = self._lists[Kind.COMPLEMENTS].get(p)
            if p in rebuild and (p in self._beh or held is not None):
                comp = self._compute_complements(p)
                if held != comp and (held is not None or comp):
                    self._lists[Kind.COMPLEMENTS][p] = comp
                    pubs.append(self._publish(Kind.COMPLEMENTS, p, comp, None))
        return pubs

    def seed_version(self, kind: Kind, product_id: str, version: int) -> None:
        """Continue a list's version counter from ``version`` (what its topic already holds).

        Used after a rebuild from the topics, so ``version`` keeps increasing across restarts.
        A lower value than the one held is ignored.
        """
        key = (Kind(kind), product_id)
        self.versions[key] = max(self.versions.get(key, 0), int(version))

    def republish(self, kind: Kind, product_id: str) -> Publication:
        """A publication of the current list (a tombstone when there is none), with the next version.

        For reconciling with a topic that holds something else, e.g. after a crash between
        ``apply`` and the publish, or for a list whose product is gone.
        """
        return self._publish(Kind(kind), product_id, self._lists[Kind(kind)].get(product_id), None)

    def _publish(self, kind: Kind, p: str, items: Items | None, trigger: Trigger | None) -> Publication:
        version = self.versions.get((kind, p), 0) + 1
        self.versions[(kind, p)] = version
        self._publications += 1
        return Publication(kind=kind, product_id=p, items=items, trigger=trigger, version=version)

    # ------------------------------------------------------------------ snapshots

    def save(self, directory: Path) -> Path:
        """Write a checksummed snapshot; see ``serving.snapshot.save_snapshot``."""
        from serving.snapshot import save_snapshot

        return save_snapshot(self, Path(directory))

    @classmethod
    def load(
        cls, directory: Path, config: RecommenderConfig, *, owns: Callable[[str], bool] | None = None
    ) -> Recommender:
        """Restore the latest complete snapshot; see ``serving.snapshot.load_snapshot``."""
        from serving.snapshot import load_snapshot

        return load_snapshot(Path(directory), config, owns=owns)
