"""Exact propagation: the lists of the owned products, kept equal to their definition.

The definition every published list must match (DESIGN.md, "Propagation invariant";
``serving.lists.exact_lists`` computes it from scratch):

* ``similar[p]``: the dense top-C neighbours of ``p`` (C = ``candidate_depth``, ties by
  id), re-ranked by the hybrid content score, first ``k``;
* ``substitutes[p]``: the same top-C, filtered by ``serving.rules.is_substitute``, ranked
  the same way, first ``k``.

``Propagator`` maintains it incrementally over the candidate buffers
(``serving.candidates``). When ``q`` changes:

* **vector (text) change or insert**: ``q`` is taken out of every buffer that named it
  (a buffer that drops below C is refilled from the index), ``q``'s own buffer is rebuilt,
  and ``q`` enters every buffer whose last member it beats. Every buffer is checked: the
  owners among ``q``'s index neighbours, and every other owner whose floor (the score its
  last member holds) the neighbourhood's last score does not exceed.
* **delete**: the same removal, then tombstones for ``q``'s own lists.
* **stock, price, group or other non-text change**: the lists whose buffers name ``q``
  (and ``q``'s own) are re-evaluated, since substitute rules and reasons depend on them.

``duplicates[p]`` (``serving.duplicates``) is pair-wise, so a change of ``q`` can only
change ``q``'s own list and the entry for ``q`` in others: ``q``'s list is recomputed from
its candidates (key mates and the pairs that may reach the threshold), and every owned list
that named ``q`` before (``dup_holders``) or names it now is patched. A list publishes its
``duplicate_max_items`` best and keeps as many again in reserve (``dup_known``), so an item
that leaves it is replaced without a search; one whose known items fall below the published
count is searched again. A group change moves variants; no other non-text change touches
duplicates. Whole-state steps recompute them all in one ``DuplicateBatch``.

A list that one swap in its top-C cannot change is left alone, and one that the swap
changes in a known way is patched (``serving.patching``); the rest are rebuilt. Only lists
that differ from the last published ones are returned, except that a product going out of
stock always gets its substitutes published with ``trigger="out_of_stock"``.

Because a removal from an exact top-n leaves an exact top-(n-1), and an insertion is only
made when it beats the last member (or the buffer holds everything), the buffers stay
exact with ``ExactIndex``; with ``HnswIndex`` they are as good as its recall.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np

from serving.behavior import BehaviorRow
from serving.candidates import FLOOR_MARGIN, BufferColumns, CandidateBuffer, CandidateBuffers
from serving.catalog import CatalogUpdate
from serving.config import RecommenderConfig
from serving.duplicates import (
    RESERVE_FACTOR,
    DuplicateBatch,
    DuplicateKeys,
    JoinAhead,
    Known,
    batch_usable,
    candidate_ids,
    capped,
    duplicate_item,
    known_of,
    rank_key,
    ranked,
    score_pairs,
)
from serving.errors import ListsDiffer
from serving.index import VectorIndex
from serving.kinds import LIST_KINDS, Kind
from serving.lexical import SparseVec, cosine_many
from serving.lists import ReasonCache, build_complements, build_lists
from serving.patching import may_change, names_substitute, patch_attributes, patched_lists
from serving.postings import LexicalPostings
from serving.publication import Items, Publication, ScoredItem, Trigger
from serving.scoring import DUPLICATE_OF, Profile, dense_scores

log = logging.getLogger(__name__)

#: Owners rebuilt per step of a settle (``Propagator.settle_steps``).
SETTLE_CHUNK = 1000
#: Owners from which a duplicates refresh uses one ``DuplicateBatch`` instead of one
#: candidate search each (below it, building the batch's matrices costs more).
BATCH_MIN_OWNERS = 256

#: Owners from which a whole-catalog step (a settle, a bulk load) computes the duplicates
#: join in a forked child, beside the candidate buffers (``serving.duplicates.JoinAhead``):
#: below it the fork and the transfer of the results cost more than the overlap saves.
JOIN_AHEAD_MIN_OWNERS = 5000

#: Owners whose saved lists are recomputed and compared when a restore takes lists over.
RESTORE_SAMPLE = 200
#: Of those, the owners whose duplicates are searched again and compared too: a search
#: costs about 30 times a list's recomputation (11 ms at 100k; 200 of them were 3 s of a load).
RESTORE_DUPLICATES_SAMPLE = 50


class Propagator:
    """Candidate buffers, behaviour rows and the published lists of the owned products.

    The ``Recommender`` owns one and feeds it every change after merging it into the
    catalog and the index. ``lex`` and ``profiles`` hold the lexical vector and the scoring
    profile of every live product (owned or not); ``rows`` the behaviour rows of owned
    products; ``lists`` the current list of every kind by product; ``versions`` the last
    version published per (kind, product). Not thread-safe.
    """

    def __init__(
        self,
        config: RecommenderConfig,
        index: VectorIndex,
        owns: Callable[[str], bool],
        postings: LexicalPostings | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.owns = owns
        self.buffers = CandidateBuffers(config, index)
        self.lex: dict[str, SparseVec] = {}
        self.profiles: dict[str, Profile] = {}
        self.lists: dict[Kind, dict[str, Items]] = {spec.kind: {} for spec in LIST_KINDS}
        self.versions: dict[tuple[Kind, str], int] = {}
        self.publications = 0
        # Behaviour rows of owned products, and which rows name a product (so a change of
        # that product reaches every list it may sit in through behaviour alone).
        self.rows: dict[str, BehaviorRow] = {}
        self._brev: dict[str, set[str]] = {}
        #: Rows of products that are unknown, deleted or not owned, skipped by ``apply_behavior``.
        self.behavior_ignored = 0
        # Per owner: (owner profile the reasons were computed for, reasons by candidate).
        self._reasons: dict[str, tuple[Profile, ReasonCache]] = {}
        #: Changes were merged without propagation (``defer_change``): buffers and lists
        #: are stale until ``settle``.
        self.unsettled = False
        self._unsettled_out_of_stock: set[str] = set()
        #: The lexical postings (shared with search), where duplicates find their candidates.
        self.postings = postings if postings is not None else LexicalPostings()
        #: Duplicate keys of every live product, and which owned lists name each product.
        self.dup_keys = DuplicateKeys()
        #: What each owned duplicates list keeps (its published items and a reserve), and
        #: which lists keep each product.
        self.dup_known: dict[str, Known] = {}
        self.dup_holders: dict[str, set[str]] = {}

    # ------------------------------------------------------------------ whole-state steps

    def restore(
        self,
        lex: dict[str, SparseVec],
        profiles: dict[str, Profile],
        buffers: Mapping[str, CandidateBuffer],
        rows: Mapping[str, BehaviorRow],
        *,
        lists: Mapping[Kind, Mapping[str, Items]] | None = None,
        known: Mapping[str, Known] | None = None,
        sample: int = RESTORE_SAMPLE,
        columns: BufferColumns | None = None,
    ) -> None:
        """Take over saved buffers and behaviour rows (rows of products without a buffer are
        skipped) and recompute every list from them, publishing nothing.

        With ``lists`` (what the saved recommender held), the lists are taken over instead,
        after ``sample`` of the owners, chosen at random, recompute to exactly the lists
        given (``ListsDiffer`` otherwise: the caller rebuilds from scratch). ``known``, the
        duplicates each list keeps beyond what it publishes (``serving.duplicates.Known``),
        is taken over with them, checked the same way; without it a full duplicates list
        knows only what it shows, and the first of its items to leave makes it search again.
        """
        self.lex = lex
        self.profiles = profiles
        self.dup_keys.rebuild(profiles)
        self.buffers.adopt_all(buffers, columns=columns)
        for pid, row in rows.items():
            if pid in self.buffers.by_owner:
                self._set_row(pid, row)
        if lists is not None:
            self._adopt_lists(lists, sample, known)
            if known is not None:  # the lists are its prefixes (checked): share their items
                self.lists[Kind.DUPLICATES] = {p: capped(items, self.config) for p, (items, _) in known.items()}
            self._adopt_known(dict(known) if known is not None else None)
        else:
            for pid in self.buffers.by_owner:
                similar, subs = self._compute(pid)
                self.lists[Kind.SIMILAR][pid] = similar
                self.lists[Kind.SUBSTITUTES][pid] = subs
                if pid in self.rows:
                    self.lists[Kind.COMPLEMENTS][pid] = self._compute_complements(pid)
            known = self._many_duplicates(self.buffers.by_owner)
            self.lists[Kind.DUPLICATES] = {p: capped(items, self.config) for p, (items, _) in known.items()}
            self._adopt_known(known)

    def _adopt_lists(self, lists: Mapping[Kind, Mapping[str, Items]], sample: int,
                     known: Mapping[str, Known] | None = None) -> None:
        owners = self.buffers.by_owner
        for spec in LIST_KINDS:
            held = lists.get(spec.kind, {})
            if spec.content and held.keys() != owners.keys():
                raise ListsDiffer(f"the {spec.kind} lists name other products than the candidate buffers")
            self.lists[spec.kind] = dict(held)
        if known is not None:
            if known.keys() != self.lists[Kind.DUPLICATES].keys():
                raise ListsDiffer("the kept duplicates name other products than the duplicates lists")
            for pid, (items, _complete) in known.items():
                if capped(items, self.config) != self.lists[Kind.DUPLICATES][pid]:
                    raise ListsDiffer(f"the kept duplicates of {pid} do not begin with its list")
        picked = random.Random(len(owners)).sample(sorted(owners), min(sample, len(owners)))
        for i, pid in enumerate(picked):
            similar, subs = self._compute(pid)
            complements = self._compute_complements(pid) if pid in self.rows else ()
            held_complements = self.lists[Kind.COMPLEMENTS].get(pid, ())
            if (similar, subs, complements) != (
                self.lists[Kind.SIMILAR][pid], self.lists[Kind.SUBSTITUTES][pid], held_complements,
            ):
                raise ListsDiffer(f"the saved lists of {pid} differ from a recomputation")
            if i >= RESTORE_DUPLICATES_SAMPLE:
                continue
            duplicates, complete = self._duplicates(pid)
            if capped(duplicates, self.config) != self.lists[Kind.DUPLICATES][pid]:
                raise ListsDiffer(f"the saved duplicates of {pid} differ from a recomputation")
            if known is not None:
                # What a list keeps is an exact prefix of its ranking, or all of it.
                kept, kept_complete = known[pid]
                if duplicates[: len(kept)] != kept or (kept_complete and (not complete or duplicates != kept)):
                    raise ListsDiffer(f"the kept duplicates of {pid} differ from a recomputation")

    def load(self, lex: dict[str, SparseVec], profiles: dict[str, Profile], owned: list[str]) -> list[Publication]:
        """Start from a whole catalog already in the index: buffers and lists of ``owned``."""
        self.lex = lex
        self.profiles = profiles
        self.dup_keys.rebuild(profiles)
        everyone = sorted(owned)
        with self._duplicates_of([everyone]) as duplicates:
            self.buffers.build(owned, self.lex)
            return self.refresh(owned) + self.set_many_duplicates(duplicates(everyone))

    def use_lexical_vectors(self, lex: dict[str, SparseVec]) -> list[Publication]:
        """Rescore every pair with new lexical vectors and republish the lists that changed."""
        self.lex = lex
        self.buffers.rescore_lexical(self.lex)
        owned = set(self.buffers.by_owner)
        return self.refresh(owned) + self.refresh_duplicates(owned)

    def apply_behavior(self, rows: Mapping[str, BehaviorRow]) -> list[Publication]:
        """Store validated behaviour rows and return the lists that changed; rows of products
        without a buffer (unknown, deleted or not owned) are counted in ``behavior_ignored``."""
        affected: set[str] = set()
        for pid, row in rows.items():
            if pid not in self.buffers.by_owner:
                self.behavior_ignored += 1
                continue
            old = self.rows.get(pid)
            if old == row:
                continue
            self._set_row(pid, row)
            affected.add(pid)
        return self.refresh(affected)

    def _set_row(self, pid: str, row: BehaviorRow | None) -> None:
        old = self.rows.pop(pid, None)
        if old is not None:
            for c in old.names():
                holders = self._brev.get(c)
                if holders is not None:
                    holders.discard(pid)
                    if not holders:
                        del self._brev[c]
        if row is not None and (row.partners or row.complements):
            self.rows[pid] = row
            for c in row.names():
                self._brev.setdefault(c, set()).add(pid)

    def _behavior_holders(self, q: str) -> set[str]:
        """Owned products whose behaviour row names ``q``."""
        return {p for p in self._brev.get(q, ()) if p in self.buffers.by_owner and p != q}

    def set_ownership(
        self, owns: Callable[[str], bool], product_ids: Iterable[str], behavior: Mapping[str, BehaviorRow],
        reclaim: Callable[[str], bool] | None = None,
    ) -> list[Publication]:
        """Maintain exactly the products of ``product_ids`` (the catalog) that ``owns`` accepts.

        See ``Recommender.set_ownership``; ``behavior`` (validated) holds the rows the previous
        owners published, and applies to the products kept here that ``reclaim`` accepts too.
        """
        kept = [p for p in self.buffers.by_owner if owns(p) and reclaim(p)] if reclaim is not None else []
        self.owns = owns
        for p in [p for p in self.buffers.by_owner if not owns(p)]:
            self._forget_duplicates(p)
            self.buffers.remove_owner(p)
            self._reasons.pop(p, None)
            self._set_row(p, None)
            for spec in LIST_KINDS:
                self.lists[spec.kind].pop(p, None)
        gained = sorted(pid for pid in product_ids if owns(pid) and pid not in self.buffers.by_owner)
        self.buffers.build(gained, self.lex)
        changed, emptied = self._take_rows([*gained, *kept], behavior)
        return emptied + self.refresh({*gained, *changed}) + self.refresh_duplicates(gained)

    def _take_rows(self, pids: Iterable[str], behavior: Mapping[str, BehaviorRow]) -> tuple[list[str], list[Publication]]:
        """Owned products take their rows from ``behavior`` (none where it has none): returns
        those whose row changed, and the empty complements published for those whose topic
        holds the old owner's complements while no row says what they are."""
        changed: list[str] = []
        emptied: list[Publication] = []
        for pid in pids:
            row = behavior.get(pid)
            stored = row if row is not None and (row.partners or row.complements) else None  # as _set_row keeps it
            if self.rows.get(pid) != stored:
                self._set_row(pid, row)
                changed.append(pid)
            if row is None and (Kind.COMPLEMENTS, pid) in self.versions and pid not in self.lists[Kind.COMPLEMENTS]:
                self.lists[Kind.COMPLEMENTS][pid] = ()
                emptied.append(self.publish(Kind.COMPLEMENTS, pid, (), None))
        return changed, emptied

    # ------------------------------------------------------------------ changes

    def on_vector_change(self, q: str, *, out_of_stock: bool = False) -> list[Publication]:
        """``q`` is new or has a new vector (already in the index, ``lex`` and ``profiles``)."""
        affected: set[str] = set()
        patched: dict[str, tuple[Items, Items]] = {}
        old_rev = self.buffers.holders.pop(q, [])
        for p in old_rev:
            if self._drop(p, q, patched):
                affected.add(p)
        vq = self.index.get_vector(q)
        # q against every owner, once: q's own buffer is completed from it and the reverse
        # check reads it (the other owners' vectors do not change meanwhile; q's own slot,
        # which may, is never a candidate of either).
        scores = self.buffers.scores(vq)
        if self.owns(q):
            # Only q's own buffer needs a search: the reverse check compares q with every
            # owner's floor (``_enter``), so a worker that does not own q searches nothing.
            depth = self.config.buffer_depth
            hits = self.index.query(vq, depth, exclude=(q,))
            near = self.buffers.complete_hits(hits, scores, depth, FLOOR_MARGIN)
            self.buffers.set_buffer(q, vq, near, self.lex, reuse_lexical=False)
            affected.add(q)
        affected |= self._behavior_holders(q)
        self._enter(q, vq, scores, old_rev, affected, patched)
        pubs = self.refresh(affected, out_of_stock=(q,) if out_of_stock else (), patched=patched)
        return pubs + self._duplicates_changed(q)

    def on_delete(self, q: str) -> list[Publication]:
        """``q`` is gone from the catalog: out of the index, every buffer and its own lists."""
        self._forget_duplicates(q)
        self.buffers.remove_owner(q)
        self._reasons.pop(q, None)
        self.lex.pop(q, None)
        self.profiles.pop(q, None)
        self._set_row(q, None)
        old_rev = self.buffers.holders.pop(q, [])
        self.index.delete(q)
        patched: dict[str, tuple[Items, Items]] = {}
        affected = {p for p in old_rev if self._drop(p, q, patched)}
        affected |= self._behavior_holders(q)
        pubs = self._own_tombstones(q)
        pubs.extend(self.refresh(affected, patched=patched))
        pubs.extend(self._duplicates_gone(q))
        return pubs

    def on_attributes_change(
        self, q: str, update: CatalogUpdate, *, before: Profile | None = None
    ) -> list[Publication]:
        """``q`` changed without a new vector (stock, price, group...; ``profiles`` updated).

        ``before`` is ``q``'s profile before the change; with it, a stock or price change
        patches the lists it changes in place where it can (``patch_attributes``) and
        rebuilds only the rest.
        """
        # Only lists whose top-C holds q can change: those that list q (reasons, rules) and
        # those q may now enter as a substitute.
        c_depth = self.config.candidate_depth
        after = self.profiles.get(q)
        narrow = before is not None and after is not None and before.group_id == after.group_id
        affected: set[str] = set()
        patched: dict[str, tuple[Items, Items]] = {}
        # About 50 owners per change hold q: the loop reads what it needs once, up front.
        by_owner = self.buffers.by_owner
        similar_lists, subs_lists = self.lists[Kind.SIMILAR], self.lists[Kind.SUBSTITUTES]
        profiles, rows, config, reason_caches = self.profiles, self.rows, self.config, self._reasons
        stock_out = (narrow and before is not None and after is not None and before.in_stock
                     and not after.in_stock and before.price == after.price)
        marker = DUPLICATE_OF + q if config.collapse_duplicates else None
        for p in self.buffers.holders.get(q, ()):
            buf = by_owner.get(p)
            if buf is None or buf.find(q) >= c_depth:
                continue
            if (stock_out and p not in rows and (subs := subs_lists.get(p)) is not None and p in similar_lists
                    and p in profiles and not names_substitute(subs, q, marker)):
                continue  # patch_attributes would return both lists as they are
            if not narrow:
                if self._may_change(p, left=(), entered=(q,)):
                    affected.add(p)
                continue
            similar, subs, owner = similar_lists.get(p), subs_lists.get(p), profiles.get(p)
            if similar is None or subs is None or owner is None or p in rows:
                affected.add(p)  # behaviour re-weights the ranking: rebuild
                continue
            lists = patch_attributes(similar, subs, buf, owner, q, before, after, profiles, config)  # type: ignore[arg-type]
            if lists is None:
                affected.add(p)
                continue
            held = reason_caches.get(p)
            if held is not None:
                held[1].pop(q, None)  # computed for q's old profile
            if lists[0] is not similar or lists[1] is not subs:
                patched[p] = lists
        if q in self.buffers.by_owner:
            own = self._own_lists_if_stock_only(q, before, after)
            if own is None:
                affected.add(q)
            else:
                patched[q] = own
        affected |= self._behavior_holders(q)
        for p in affected:
            patched.pop(p, None)
        pubs = self.refresh(affected, out_of_stock=(q,) if update.went_out_of_stock else (), patched=patched)
        if update.before is None or update.after is None or update.before.group_id != update.after.group_id:
            pubs += self._duplicates_changed(q)  # variants of one group are never duplicates
        return pubs

    # ------------------------------------------------------------------ deferred changes

    def defer_change(self, q: str, *, out_of_stock: bool = False) -> None:
        """``q`` is new or changed (already in the index, ``lex`` and ``profiles``), and
        propagating it is left to ``settle``: buffers and lists stay as they are."""
        self.unsettled = True
        if out_of_stock:
            self._unsettled_out_of_stock.add(q)

    def defer_delete(self, q: str) -> list[Publication]:
        """``q`` is gone: out of the index and its own lists (tombstones returned now); the
        buffers that still name it are rebuilt by ``settle``."""
        self.unsettled = True
        self._unsettled_out_of_stock.discard(q)
        self._forget_duplicates(q)
        self.dup_keys.discard(q)
        self.buffers.remove_owner(q)
        self._reasons.pop(q, None)
        self.lex.pop(q, None)
        self.profiles.pop(q, None)
        self._set_row(q, None)
        self.index.delete(q)
        return self._own_tombstones(q)

    def settle(self) -> list[Publication]:
        """Propagate every deferred change at once: the buffers of all owned products are
        rebuilt from the index (batched searches) and the lists that differ are returned,
        each once; substitutes of products that went out of stock meanwhile are always
        returned, with ``trigger="out_of_stock"``."""
        return [pub for step in self.settle_steps() for pub in step]

    def settle_steps(self, chunk: int = SETTLE_CHUNK) -> Iterator[list[Publication]]:
        """``settle`` in steps of ``chunk`` owners, each step's publications in turn, so a
        caller can let reads in between; nothing else may change the state meanwhile."""
        if not self.unsettled:
            return
        owned = sorted(p for p in self.profiles if self.owns(p))
        # Buffers name products deleted meanwhile: start them all afresh.
        self.buffers.clear()
        # Every owner's vector first: each block's searches are completed against all of them.
        self.buffers.register(owned)
        self.dup_keys.rebuild(self.profiles)
        forced = self._unsettled_out_of_stock & self.profiles.keys()
        parts = [owned[start : start + chunk] for start in range(0, len(owned), chunk)]
        with self._duplicates_of(parts) as duplicates:
            for part in parts:
                self.buffers.build(part, self.lex)
                yield self.refresh(part, out_of_stock=forced) + self.set_many_duplicates(duplicates(part))
        self.unsettled = False
        self._unsettled_out_of_stock = set()

    @contextmanager
    def _duplicates_of(self, parts: list[list[str]]) -> Iterator[Callable[[list[str]], dict[str, Known]]]:
        """For a whole-catalog step over ``parts`` (owners, sorted, in the order the step takes
        them): a function giving each part's duplicates (``Known``), asked for in that order.

        From ``JOIN_AHEAD_MIN_OWNERS`` owners the join runs in a forked child
        (``JoinAhead``) while the step builds the buffers here; otherwise, or once the child
        fails, here, with one ``DuplicateBatch`` of the state at the start.
        """
        owners = sum(len(part) for part in parts)
        depth = RESERVE_FACTOR * self.config.duplicate_max_items
        batch: DuplicateBatch | None = None
        ahead = None
        if owners >= JOIN_AHEAD_MIN_OWNERS and self.config.join_in_child and batch_usable(self.config):
            ahead = JoinAhead.start(self.duplicate_batch, parts, depth)
        elif owners >= BATCH_MIN_OWNERS:
            batch = self.duplicate_batch()

        def duplicates(part: list[str]) -> dict[str, Known]:
            nonlocal ahead, batch
            if ahead is not None:
                known = ahead.take()
                if known is not None:
                    return known
                log.warning("the duplicates join in a child process failed (%s); computing it here", ahead.failure)
                ahead = None
                batch = self.duplicate_batch()
            return self._many_duplicates(part, batch)

        try:
            yield duplicates
        finally:
            if ahead is not None:
                ahead.close()

    def _own_tombstones(self, q: str) -> list[Publication]:
        pubs: list[Publication] = []
        for spec in LIST_KINDS:
            held = self.lists[spec.kind].pop(q, None)
            # A behaviour-only list (complements) may sit on the topic without a list here
            # (a row lost in a handover).
            stale = not spec.content and self.owns(q) and (spec.kind, q) in self.versions
            if held is not None or stale:
                pubs.append(self.publish(spec.kind, q, None, None))
        return pubs

    def _drop(self, p: str, q: str, patched: dict[str, tuple[Items, Items]] | None = None) -> bool:
        """Take ``q`` out of ``p``'s buffer (the caller fixes ``buffers.holders[q]``); refill if too short.

        Returns whether ``p``'s lists must be rebuilt. With ``patched``, lists that only lose
        ``q`` (and take what moved into the top-C) are patched there instead.
        """
        buf = self.buffers.by_owner.get(p)
        if buf is None:
            return False
        i = buf.find(q)
        if i >= len(buf):
            return False
        buf.delete(i)
        c_depth = self.config.candidate_depth
        if not buf.complete and len(buf) < c_depth:
            self.buffers.refill(p, self.lex)
            return True
        self.buffers.note_floor(p)
        if i >= c_depth:
            return False
        moved_in = (buf.ids[c_depth - 1],) if len(buf) >= c_depth else ()
        if patched is not None:
            entered = moved_in[0] if moved_in else None
            dense, lexical = (buf.dense(c_depth - 1), buf.lex[c_depth - 1]) if moved_in else (0.0, 0.0)
            fast = self._patched_lists(p, entered, dense, lexical, (q,), base=patched.get(p))
            if fast is not None:
                patched[p] = fast
                return False
        return self._may_change(p, left=(q,), entered=moved_in)

    def _may_change(self, p: str, *, left: Iterable[str], entered: Iterable[str]) -> bool:
        """Whether ``p``'s lists can differ after ``left`` left its top-C and ``entered``
        entered (``serving.patching.may_change``); always for a product with behaviour."""
        similar = self.lists[Kind.SIMILAR].get(p)
        subs = self.lists[Kind.SUBSTITUTES].get(p)
        if similar is None or subs is None or p in self.rows:
            return True  # behaviour re-weights the ranking: rebuild rather than reason about it
        return may_change(
            similar, subs, self.buffers.by_owner[p], self.profiles.get(p), self.profiles, self.config,
            left=left, entered=entered,
        )

    def _own_lists_if_stock_only(self, q: str, before: Profile | None, after: Profile | None) -> tuple[Items, Items] | None:
        """``q``'s own lists, unchanged, when only its stock changed; ``None`` to rebuild them.

        No rule or reason reads the owner's stock (``profile_is_substitute`` and
        ``profile_reasons`` read the candidate's), so a stock flip leaves the owner's lists
        as they are; an out-of-stock flip still republishes its substitutes (``refresh``).
        Behaviour and complements are rebuilt as before.
        """
        similar = self.lists[Kind.SIMILAR].get(q)
        subs = self.lists[Kind.SUBSTITUTES].get(q)
        if (
            before is None or after is None or similar is None or subs is None
            or q in self.rows or q in self.lists[Kind.COMPLEMENTS]
            or before._replace(in_stock=after.in_stock) != after
        ):
            return None
        return similar, subs

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
        """``p``'s lists after one swap in its top-C (``serving.patching.patched_lists``), or
        ``None`` when they must be rebuilt. ``base`` holds lists already patched in this
        change, which stand in for the published ones."""
        similar, subs = base if base is not None else (self.lists[Kind.SIMILAR].get(p), self.lists[Kind.SUBSTITUTES].get(p))
        owner = self.profiles.get(p)
        cand = self.profiles.get(q) if q is not None else None
        if similar is None or subs is None or owner is None or (q is not None and cand is None) or p in self.rows:
            return None
        return patched_lists(
            p, q, dense, lexical, pushed_out,
            similar=similar, subs=subs, owner=owner, cand=cand, buf=self.buffers.by_owner[p],
            profiles=self.profiles, reasons=self._reasons, config=self.config,
        )

    def _enter(
        self,
        q: str,
        vq: np.ndarray,
        scores: np.ndarray,
        extra: Iterable[str],
        affected: set[str],
        patched: dict[str, tuple[Items, Items]],
    ) -> None:
        """Insert ``q`` into every buffer whose last member it now beats.

        ``extra`` holds the owners that held ``q`` before. The others whose floor ``q``
        reaches are found by comparing ``q``'s float32 score with every owner (``scores``;
        ``CandidateBuffers.owners_admitting``), not from ``q``'s own index search: an
        approximate index can miss an owner from that search however close it is, so the
        check does not depend on the index's recall. A list that only gains
        ``q`` is patched in place (``patched``); one that needs more is marked for a
        rebuild (``affected``).
        """
        bufs = self.buffers.by_owner
        far = self.buffers.owners_admitting(scores, FLOOR_MARGIN)
        seen: set[str] = {q}
        cands: list[str] = []
        cand_bufs: list[CandidateBuffer] = []
        for pool in (extra, far):
            for p in pool:
                if p in seen:
                    continue
                seen.add(p)
                b = bufs.get(p)
                if b is not None and q not in b:
                    cands.append(p)
                    cand_bufs.append(b)
        if not cands:
            return
        scores = dense_scores(vq, self.index.get_vectors(cands)).tolist()
        admitted: list[tuple[str, float, CandidateBuffer]] = []
        for p, d, buf in zip(cands, scores, cand_bufs, strict=True):
            if buf.complete or not buf.ids or (-d, q) < buf.last_key():
                admitted.append((p, d, buf))
        if not admitted:
            return
        # cosine_many is bitwise symmetric (matches are summed in bucket order), so one batch
        # from q's side stores exactly what CandidateBuffers.fill computes from each owner's side.
        lexical = cosine_many(self.lex[q], [self.lex[p] for p, _d, _b in admitted])
        depth = self.config.buffer_depth
        c_depth = self.config.candidate_depth
        buffers = self.buffers
        for (p, d, buf), lx in zip(admitted, lexical, strict=True):
            pos = buf.position(d, q)
            buf.insert(pos, q, d, lx)
            buffers.add_holder(q, p)
            # Read what q pushed out of the top-C before the tail is trimmed (C may equal depth).
            if pos < c_depth and p not in affected:
                pushed_out = (buf.ids[c_depth],) if len(buf) > c_depth else ()
                fast = self._patched_lists(p, q, d, lx, pushed_out, base=patched.get(p))
                if fast is None:
                    affected.add(p)
                else:
                    patched[p] = fast
            if len(buf) > depth:
                dropped = buf.pop()
                buffers.discard_holder(dropped, p)
                buf.complete = False
            buffers.note_floor(p)

    def _compute(self, p: str) -> tuple[Items, Items]:
        buf = self.buffers.by_owner[p]
        cands = buf.head(self.config.candidate_depth)
        owner = self.profiles[p]
        row = self.rows.get(p)
        partners = dict(row.partners) if row is not None else None
        if partners and self.config.behavior_weight > 0:
            listed_now = {c for c, _d, _lx in cands}
            extra = [c for c in sorted(partners) if c not in listed_now and c != p and c in self.lex]
            cands += [(c, d, lx) for c, (d, lx) in zip(extra, self._pair_parts(p, extra), strict=True)]
        held = self._reasons.get(p)
        cache: ReasonCache = held[1] if held is not None and held[0] is owner else {}
        similar, subs = build_lists(owner, cands, self.profiles.get, self.config, cache, behavior=partners)
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
        lexical = cosine_many(self.lex[p], [self.lex[o] for o in others])
        return list(zip(dense, lexical, strict=True))

    def _compute_complements(self, p: str) -> Items:
        row = self.rows.get(p)
        if row is None:
            return ()
        return build_complements(
            self.profiles[p], row, self.profiles.get, lambda others: self._pair_parts(p, others), self.config
        )

    def refresh(
        self,
        affected: Iterable[str],
        *,
        out_of_stock: Collection[str] = (),
        patched: Mapping[str, tuple[Items, Items]] | None = None,
    ) -> list[Publication]:
        """Rebuild the lists of ``affected``, take those of ``patched`` as given, and publish
        what differs from the current lists (the substitutes of ``out_of_stock`` always)."""
        patched = patched or {}
        rebuild = set(affected)
        pubs: list[Publication] = []
        for p in sorted(rebuild | patched.keys()):
            if p not in self.buffers.by_owner:
                continue
            similar, subs = self._compute(p) if p in rebuild else patched[p]
            if self.lists[Kind.SIMILAR].get(p) != similar:
                self.lists[Kind.SIMILAR][p] = similar
                pubs.append(self.publish(Kind.SIMILAR, p, similar, None))
            forced = p in out_of_stock
            if forced or self.lists[Kind.SUBSTITUTES].get(p) != subs:
                self.lists[Kind.SUBSTITUTES][p] = subs
                trigger = Trigger.OUT_OF_STOCK if forced else Trigger.REFRESH
                pubs.append(self.publish(Kind.SUBSTITUTES, p, subs, trigger))
            # A list once published stays (possibly empty) while the product lives, so a
            # consumer never keeps complements that behaviour or stock took away.
            held = self.lists[Kind.COMPLEMENTS].get(p)
            if p in rebuild and (p in self.rows or held is not None):
                comp = self._compute_complements(p)
                if held != comp and (held is not None or comp):
                    self.lists[Kind.COMPLEMENTS][p] = comp
                    pubs.append(self.publish(Kind.COMPLEMENTS, p, comp, None))
        return pubs

    # ------------------------------------------------------------------ duplicates

    def _all_duplicates(self, p: str) -> Items:
        """Every duplicate of ``p``, ranked and uncapped, from its candidates (``serving.duplicates``)."""
        ids = self.dup_keys.mates(p)
        ids |= candidate_ids(p, index=self.index, lex=self.lex, postings=self.postings, config=self.config)
        return score_pairs(self.profiles[p], ids, vector=self.index.get_vector(p), vectors=self.index.get_vectors,
                           lex=self.lex, profiles=self.profiles, config=self.config)

    def _duplicates(self, p: str) -> Known:
        """What ``p``'s list keeps of its duplicates (``serving.duplicates.Known``)."""
        return known_of(self._all_duplicates(p), self.config)

    def duplicate_batch(self) -> DuplicateBatch | None:
        """A ``DuplicateBatch`` of the current state, or ``None`` where the threshold cannot
        use one (then lists are computed one by one)."""
        batch = DuplicateBatch(self.lex, self.profiles, self.index.get_vectors, self.config)
        return batch if batch.usable else None

    def _many_duplicates(self, owners: Iterable[str], batch: DuplicateBatch | None = None) -> dict[str, Known]:
        """What the lists of ``owners`` keep: one batch for many, one by one for a few."""
        owners = sorted(owners)
        if batch is None and len(owners) >= BATCH_MIN_OWNERS:
            batch = self.duplicate_batch()
        if batch is None:
            return {p: self._duplicates(p) for p in owners}
        return batch.known(owners, RESERVE_FACTOR * self.config.duplicate_max_items)

    def _set_duplicates(self, p: str, known: Known) -> list[Publication]:
        """Keep ``known`` for ``p``; its publication when the listed best differ from the held ones."""
        items, _ = known
        old = {i.product_id for i in self.dup_known.get(p, ((), True))[0]}
        new = {i.product_id for i in items}
        for gone in old - new:
            self._drop_holder(gone, p)
        for came in new - old:
            self.dup_holders.setdefault(came, set()).add(p)
        self.dup_known[p] = known
        listed = capped(items, self.config)
        if self.lists[Kind.DUPLICATES].get(p) == listed:
            return []
        self.lists[Kind.DUPLICATES][p] = listed
        return [self.publish(Kind.DUPLICATES, p, listed, None)]

    def _adopt_known(self, known: dict[str, Known] | None) -> None:
        """Keep ``known`` after a restore, or else the held lists (a full one as a prefix)."""
        cap = self.config.duplicate_max_items
        self.dup_known = known if known is not None else {
            p: (items, len(items) < cap) for p, items in self.lists[Kind.DUPLICATES].items()}
        self.dup_holders = {}
        for pid, (items, _) in self.dup_known.items():
            for item in items:
                self.dup_holders.setdefault(item.product_id, set()).add(pid)

    def _drop_holder(self, q: str, p: str) -> None:
        holders = self.dup_holders.get(q)
        if holders is not None:
            holders.discard(p)
            if not holders:
                del self.dup_holders[q]

    def _forget_duplicates(self, p: str) -> None:
        """``p``'s own duplicates list is about to go (deleted, handed over): unregister it."""
        for item in self.dup_known.pop(p, ((), True))[0]:
            self._drop_holder(item.product_id, p)

    def refresh_duplicates(self, owners: Iterable[str], batch: DuplicateBatch | None = None) -> list[Publication]:
        """Recompute the duplicates of ``owners`` and publish those that changed (``batch``: a
        ``DuplicateBatch`` of the current state to take them from)."""
        owned = [p for p in owners if p in self.buffers.by_owner]
        return self.set_many_duplicates(self._many_duplicates(owned, batch))

    def set_many_duplicates(self, known: Mapping[str, Known]) -> list[Publication]:
        """Keep each owned product's ``known`` duplicates; publish the lists that changed."""
        pubs: list[Publication] = []
        for p, kept in sorted(known.items()):
            if p in self.buffers.by_owner:
                pubs += self._set_duplicates(p, kept)
        return pubs

    def _duplicates_changed(self, q: str) -> list[Publication]:
        """``q`` is new or changed: its own duplicates, and its entry in every owned list that
        named it or names it now (the relation is pair-wise and symmetric).

        Each list keeps more than it publishes (``Known``); one that ``q`` leaves takes the
        next from there, and only one whose known items fall below the published count is
        searched again from scratch.
        """
        self.dup_keys.put(q, self.profiles[q].dup_keys)
        if not self.buffers.by_owner:
            return []  # no list here can name q (a replica, a worker before its assignment)
        every = self._all_duplicates(q)
        pubs = self._set_duplicates(q, known_of(every, self.config)) if q in self.buffers.by_owner else []
        found = {i.product_id: i for i in every}
        owner_q = self.profiles[q]
        for p in sorted(self.dup_holders.get(q, set()) | found.keys()):
            if p == q or p not in self.buffers.by_owner:
                continue
            hit = found.get(p)
            item = None if hit is None else duplicate_item(self.profiles[p], owner_q, hit.dense, hit.lexical, self.config)
            pubs += self._move_in_known(p, q, item)
        return pubs

    def _move_in_known(self, p: str, q: str, item: ScoredItem | None) -> list[Publication]:
        """``q``'s entry in ``p``'s list is now ``item`` (``None``: not a duplicate)."""
        items, complete = self.dup_known.get(p, ((), True))
        rest = [i for i in items if i.product_id != q]
        # An incomplete list knows an exact prefix of the ranking: q joins it only when it
        # ranks before the prefix's last item (after it, the prefix stays exact without q).
        if item is not None and (complete or (rest and rank_key(item) < rank_key(rest[-1]))):
            rest = list(ranked([*rest, item]))
            depth = RESERVE_FACTOR * self.config.duplicate_max_items
            if len(rest) > depth:
                rest, complete = rest[:depth], False
        if not complete and len(rest) < self.config.duplicate_max_items:
            return self._set_duplicates(p, self._duplicates(p))
        return self._set_duplicates(p, (tuple(rest), complete))

    def _duplicates_gone(self, q: str) -> list[Publication]:
        """``q`` is deleted: out of every owned list that named it."""
        self.dup_keys.discard(q)
        pubs: list[Publication] = []
        for p in sorted(self.dup_holders.get(q, set())):
            if p in self.buffers.by_owner:
                pubs += self._move_in_known(p, q, None)
        self.dup_holders.pop(q, None)
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
        return self.publish(Kind(kind), product_id, self.lists[Kind(kind)].get(product_id), None)

    def publish(self, kind: Kind, p: str, items: Items | None, trigger: Trigger | None) -> Publication:
        """A publication of ``items`` with the next version of (kind, p)."""
        version = self.versions.get((kind, p), 0) + 1
        self.versions[(kind, p)] = version
        self.publications += 1
        return Publication(kind=kind, product_id=p, items=items, trigger=trigger, version=version)
