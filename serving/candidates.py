"""Candidate buffers: the exact dense top-n neighbours of every owned product.

For each owned product ``p`` a ``CandidateBuffer`` holds the exact dense top-``n``
neighbours (``C <= n <= C + candidate_slack``, or every other product when there are
fewer), with each pair's dense and lexical score; ``CandidateBuffers.holders`` is the
reverse map (which buffers name a product). ``serving.propagation`` keeps them exact as
products change; this module builds them from the index and answers rank queries.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from serving.config import RecommenderConfig
from serving.index import VectorIndex
from serving.lexical import SparseVec, cosine_many
from serving.postings import by_column
from serving.scoring import dense_scores

#: Rank of a product that a buffer does not hold.
ABSENT = 1 << 30

#: Taken off a float32 threshold (an index score, a floor) before selecting owners by their
#: float32 scores: the index and BLAS round differently, and the buffers hold float64 scores.
#: What the margin lets through is scored exactly and cut by the caller.
FLOOR_MARGIN = 1e-5


class CandidateBuffer:
    """Exact dense top-n of one product, best first (ties by id).

    Stored by position: ``ids``, ``neg`` (the negated dense score, so the order is
    ascending ``(neg, id)``) and ``lex`` (the pair's lexical score). Two flat float arrays
    and one list of shared id strings take about 24 bytes per member; the tuples, dict
    entries and complex numbers they replace took about 190 (27 KB per product at 100k).
    Membership and position are linear scans in C over ~60 members, as fast as the dict
    lookups were at this size.
    """

    __slots__ = ("complete", "ids", "lex", "neg")

    def __init__(
        self,
        ids: Iterable[str] = (),
        dense: Iterable[float] = (),
        lexical: Iterable[float] = (),
        complete: bool = False,
    ) -> None:
        self.ids: list[str] = list(ids)
        self.neg = array("d", [-d for d in dense])
        self.lex = array("d", lexical)
        self.complete = complete  # holds every other product

    @classmethod
    def restored(cls, ids: list[str], neg: np.ndarray, lexical: np.ndarray, complete: bool) -> CandidateBuffer:
        """A buffer from saved columns: ``ids`` (taken over), ``neg`` the negated dense
        scores and ``lexical``, both float64, copied bytewise (no float objects made)."""
        buf = cls.__new__(cls)
        buf.ids = ids
        buf.neg = array("d")
        buf.neg.frombytes(np.ascontiguousarray(neg, dtype=np.float64).data.cast("B"))
        buf.lex = array("d")
        buf.lex.frombytes(np.ascontiguousarray(lexical, dtype=np.float64).data.cast("B"))
        buf.complete = complete
        return buf

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, q: object) -> bool:
        return q in self.ids

    def find(self, q: str) -> int:
        """Position of ``q`` (``ABSENT``, a large number, when it is not a member)."""
        try:
            return self.ids.index(q)
        except ValueError:
            return ABSENT

    def dense(self, i: int) -> float:
        return -self.neg[i]

    def pair(self, q: str) -> tuple[float, float]:
        """(dense, lexical) of member ``q`` (``ValueError`` when it is none)."""
        i = self.ids.index(q)
        return -self.neg[i], self.lex[i]

    def last_key(self) -> tuple[float, str]:
        """``(-dense, id)`` of the last member: a newcomer enters when its key is smaller."""
        return self.neg[-1], self.ids[-1]

    def position(self, dense: float, q: str) -> int:
        """Where a member ``q`` with ``dense`` goes to keep the order."""
        neg = -dense
        i = bisect_left(self.neg, neg)
        ids, negs, n = self.ids, self.neg, len(self.ids)
        while i < n and negs[i] == neg and ids[i] < q:
            i += 1
        return i

    def insert(self, i: int, q: str, dense: float, lexical: float) -> None:
        self.ids.insert(i, q)
        self.neg.insert(i, -dense)
        self.lex.insert(i, lexical)

    def delete(self, i: int) -> None:
        del self.ids[i]
        del self.neg[i]
        del self.lex[i]

    def pop(self) -> str:
        """Drop the last member and return its id."""
        self.neg.pop()
        self.lex.pop()
        return self.ids.pop()

    def head(self, n: int) -> list[tuple[str, float, float]]:
        """The first ``n`` members as (id, dense, lexical)."""
        return [(c, -d, lx) for c, d, lx in zip(self.ids[:n], self.neg[:n], self.lex[:n], strict=True)]


@dataclass(frozen=True)
class BufferColumns:
    """Candidate buffers as a snapshot stores them: buffer ``j`` is owned by
    ``names[owners[j]]`` and holds ``names[members[indptr[j]:indptr[j + 1]]]``, best first."""

    names: np.ndarray  # object: the product ids
    owners: np.ndarray  # int32 positions in names
    indptr: np.ndarray  # int64, len(owners) + 1
    members: np.ndarray  # int32 positions in names

    def owner_ids(self) -> list[str]:
        return self.names[self.owners].tolist()  # type: ignore[no-any-return]


class CandidateBuffers:
    """The buffers of the owned products (``by_owner``) and who names whom (``holders``).

    ``holders[c]`` lists the owners whose buffer holds ``c``; every method here keeps it
    in step with the buffers. Lexical vectors (``lex``: product id -> ``SparseVec``, every
    live product) are passed in by the caller, which owns them.

    Each owner also has a *floor* (``note_floor``): the dense score a newcomer must reach to
    enter its buffer. The floors and the owners' vectors live in numpy arrays by slot, so
    ``owners_admitting`` finds every buffer a newcomer enters with one comparison over all
    owners and one product over the contiguous vectors, however far away the owners are (the
    reverse check of ``serving.propagation`` relies on it to stay exact). Gathering the
    vectors of the owners to check instead cost twice a full product at 100k products.

    That product reads every owner's vector (150 MB at 100k) once per text change. ``prime``
    scores a whole batch of newcomers in one matrix product instead; slots written since are
    rescored exactly when read, so a primed check selects what an unprimed one would.
    """

    def __init__(self, config: RecommenderConfig, index: VectorIndex) -> None:
        self.config = config
        self.index = index
        self.by_owner: dict[str, CandidateBuffer] = {}
        # Lists, not sets: every add is of an owner not yet there (the buffers say so), and a
        # list of ~60 references is a quarter of a set's size.
        self.holders: dict[str, list[str]] = {}
        #: Buffers rebuilt from the index because a removal left them shorter than C.
        self.refills = 0
        self._floor: np.ndarray
        self._vec: np.ndarray
        self._slot: dict[str, int]
        self._owner_at: list[str | None]
        self._free: list[int]
        # prime(): newcomer vector (bytes) -> column of the scores computed for it, the
        # slots those scores cover, and the slots whose vector was written since.
        self._primed: dict[bytes, int] = {}
        self._primed_scores = np.zeros((0, 0), dtype=np.float32)
        self._primed_n = 0
        self._primed_dirty: set[int] = set()
        self.clear()

    def prime(self, vectors: np.ndarray) -> None:
        """Score every owner against each row of ``vectors`` (unit float32 rows, as the index
        stores them) in one matrix product, for ``owners_admitting`` to read. Replaces what
        an earlier ``prime`` held; ``unprime`` frees it."""
        n = len(self._owner_at)
        rows = np.ascontiguousarray(vectors, dtype=np.float32)
        if rows.ndim != 2 or not len(rows) or not n:
            self.unprime()
            return
        self._primed_scores = self._vec[:n] @ rows.T
        self._primed = {row.tobytes(): j for j, row in enumerate(rows)}
        self._primed_n = n
        self._primed_dirty = set()

    def unprime(self) -> None:
        """Drop what ``prime`` computed."""
        self._primed = {}
        self._primed_scores = np.zeros((0, 0), dtype=np.float32)
        self._primed_n = 0
        self._primed_dirty = set()

    def note_floor(self, p: str, vector: np.ndarray | None = None) -> None:
        """Record the floor of ``p``'s buffer after it changed, and ``p``'s vector when it is
        given (or when ``p`` is new here: then it is read from the index).

        A complete or empty buffer admits anything (floor -inf); otherwise a newcomer must
        reach the dense score of the last member (a tie is then settled by id).
        """
        buf = self.by_owner[p]
        slot = self._slot.get(p)
        if slot is None:
            if self._free:
                slot = self._free.pop()
                self._owner_at[slot] = p
            else:
                slot = len(self._owner_at)
                self._reserve(slot + 1)
                self._owner_at.append(p)
            self._slot[p] = slot
            if vector is None:
                vector = self.index.get_vector(p)
        if vector is not None:
            self._vec[slot] = vector
            if self._primed:
                self._primed_dirty.add(slot)
        self._floor[slot] = -np.inf if buf.complete or not buf.ids else -buf.neg[-1]

    def _reserve(self, slots: int) -> None:
        """Room for ``slots`` owners in the floor and vector arrays (free slots hold NaN)."""
        have = self._floor.shape[0]
        if slots <= have:
            return
        # By a quarter, not double: at 1M owners the spare rows of a doubling would average
        # 0.5 KB per product.
        size = max(slots, have + max(64, have // 4))
        used = len(self._owner_at)
        floor = np.full(size, np.nan, dtype=np.float64)
        floor[:used] = self._floor[:used]
        vec = np.zeros((size, self._vec.shape[1]), dtype=np.float32)
        vec[:used] = self._vec[:used]
        self._floor, self._vec = floor, vec

    def scores(self, vector: np.ndarray) -> np.ndarray:
        """Every slot's float32 score against ``vector`` (a unit row, as the index stores it):
        the primed column when ``prime`` scored it, otherwise one pass over the owners'
        vectors. ``owners_admitting`` and ``complete_hits`` read it."""
        n = len(self._owner_at)
        v = np.asarray(vector, dtype=np.float32)
        column = self._primed.get(v.tobytes()) if self._primed else None
        return self._primed_scores_for(column, v, n) if column is not None else self._vec[:n] @ v

    def owners_admitting(self, scores: np.ndarray, margin: float) -> list[str]:
        """Every owner whose buffer a newcomer may enter: its float32 score (``scores``, from
        ``scores``) reaches the owner's floor less ``margin``. The caller scores them exactly.

        Every owner is compared, not only those near the newcomer: an approximate index may
        miss an owner from the newcomer's own search, however close, and that owner's list
        must still take the newcomer (issue #14, "exact at scale"). Primed, the scores are a
        column of one matrix product; unprimed, one pass over the owners' vectors.
        """
        n = len(scores)
        if not n:
            return []
        floors = self._floor[:n]  # a free slot holds NaN: never selected
        slots = np.flatnonzero(scores >= floors - margin)
        owner_at = self._owner_at
        return [owner_at[i] for i in slots.tolist()]  # type: ignore[misc]

    def complete_hits(self, hits: list[tuple[str, float]], scores: np.ndarray, depth: int, margin: float) -> list[str]:
        """The ids of ``hits`` (an index search for ``depth`` neighbours, best first) and of
        every owned product that scores at least as well as the last of them.

        An approximate search can miss a neighbour however close it is (an owner's list then
        lacks it until something else changes). The owners' scores (``scores``) are at hand
        anyway, for the reverse check or from the bulk load's block product, so what the
        search missed among them is added here, and ``set_buffer`` keeps the exact best
        ``depth``. Where this worker owns every product (one worker), the buffer is then
        the exact one; in scale-out, it is exact among the owned products.
        """
        ids = [c for c, _ in hits]
        n = len(scores)
        if not n:
            return ids
        owner_at = self._owner_at
        if len(hits) >= depth:
            slots = np.flatnonzero(scores >= hits[-1][1] - margin)
        else:  # the search found fewer than asked (a small or sparse index): the best slots
            take = min(n, depth + 1 + len(self._free))
            slots = np.argpartition(-scores, take - 1)[:take] if take < n else np.arange(n)
        seen = set(ids)
        for i in slots.tolist():
            p = owner_at[i]
            if p is not None and p not in seen:
                ids.append(p)
                seen.add(p)
        return ids

    def _primed_scores_for(self, column: int, v: np.ndarray, n: int) -> np.ndarray:
        """Every slot's float32 score against ``v``: the primed column, rescored where a
        slot's vector was written since (or the slot is newer)."""
        covered = min(n, self._primed_n)
        scores = np.empty(n, dtype=np.float32)
        scores[:covered] = self._primed_scores[:covered, column]
        if n > covered:
            scores[covered:] = self._vec[covered:n] @ v
        if self._primed_dirty:
            dirty = np.fromiter(self._primed_dirty, dtype=np.int64, count=len(self._primed_dirty))
            dirty = dirty[dirty < covered]
            scores[dirty] = self._vec[dirty] @ v
        return scores

    def _release(self, p: str) -> None:
        slot = self._slot.pop(p, None)
        if slot is not None:
            self._floor[slot] = np.nan
            self._owner_at[slot] = None
            self._free.append(slot)

    def clear(self) -> None:
        """Drop every buffer (a rebuild from the index follows)."""
        self.by_owner = {}
        self.holders = {}
        # Floors and vectors by slot; a free slot holds NaN, which no comparison selects.
        self._floor = np.full(64, np.nan, dtype=np.float64)
        self._vec = np.zeros((64, self.index.dim), dtype=np.float32)
        self._slot = {}
        self._owner_at = []
        self._free = []
        self.unprime()

    def adopt(self, owner: str, buf: CandidateBuffer) -> None:
        """Take ``buf`` as ``owner``'s buffer as it is (a restore), and index its members."""
        self.by_owner[owner] = buf
        for c in buf.ids:
            self.add_holder(c, owner)
        self.note_floor(owner)

    def add_holder(self, c: str, p: str) -> None:
        """``p``'s buffer now holds ``c`` (it did not before)."""
        holders = self.holders.get(c)
        if holders is None:
            self.holders[c] = [p]
        else:
            holders.append(p)

    def adopt_all(
        self, buffers: Mapping[str, CandidateBuffer], chunk: int = 8192, *, columns: BufferColumns | None = None
    ) -> None:
        """``adopt`` for many owners at once (a restore): the reverse map in one pass, and the
        owners' vectors and floors written by the block rather than one index read each.

        ``columns``: the same buffers as a snapshot stores them; the reverse map is then
        sorted out by the column (at 100k owners, one dict lookup and append for each of the
        6.6M pairs was the longest part of a restore)."""
        fresh = [p for p in buffers if p not in self._slot]
        for p in buffers:
            if p in self._slot:
                self.adopt(p, buffers[p])
        if not fresh:
            return
        for p in fresh:
            self.by_owner[p] = buffers[p]
        if columns is not None and len(fresh) == len(buffers) and columns.owner_ids() == fresh:
            self._add_holders(columns)
        else:
            holders = self.holders
            for p in fresh:
                for c in buffers[p].ids:
                    held = holders.get(c)
                    if held is None:
                        holders[c] = [p]
                    else:
                        held.append(p)
        start = len(self._owner_at)
        self.register(fresh, chunk)
        self._floor[start : start + len(fresh)] = [
            -np.inf if buf.complete or not buf.ids else -buf.neg[-1] for buf in (buffers[p] for p in fresh)
        ]

    def _add_holders(self, columns: BufferColumns) -> None:
        """Every (member, owner) pair of ``columns`` into ``holders``, each list in owner
        order after what it held: what one ``add_holder`` per pair, owner by owner, gives."""
        members = columns.members
        if not len(members):
            return
        names = columns.names
        # Per member, the buffers holding it in ascending order: each one's owners in owner order.
        indptr, buffers, _ = by_column(columns.indptr, members, np.ones(len(members), np.int8), len(names))
        held_by = names[columns.owners[buffers]].tolist()
        bounds = indptr.tolist()
        holders = self.holders
        for code in np.flatnonzero(np.diff(indptr)).tolist():
            run = held_by[bounds[code] : bounds[code + 1]]
            c = names[code]
            held = holders.get(c)
            if held is None:
                holders[c] = run
            else:
                held.extend(run)

    def discard_holder(self, c: str, p: str) -> None:
        """``p``'s buffer no longer holds ``c``."""
        holders = self.holders.get(c)
        if holders is not None:
            try:
                holders.remove(p)
            except ValueError:
                return
            if not holders:
                del self.holders[c]

    def remove_owner(self, p: str) -> CandidateBuffer | None:
        """Drop ``p``'s own buffer (``None`` when it had none)."""
        buf = self.by_owner.pop(p, None)
        if buf is not None:
            for c in buf.ids:
                self.discard_holder(c, p)
            self._release(p)
        return buf

    def register(self, ids: list[str], chunk: int = 8192) -> None:
        """Give every product of ``ids`` that has no slot one, with its vector and no floor
        yet (NaN: ``owners_admitting`` skips it until its buffer is set). ``build`` checks
        each search against every registered product, so a bulk load registers all the
        owners it will build before the first block."""
        fresh = [p for p in dict.fromkeys(ids) if p not in self._slot]
        if not fresh:
            return
        start = len(self._owner_at)
        self._reserve(start + len(fresh))
        self._owner_at.extend(fresh)
        for i, p in enumerate(fresh, start):
            self._slot[p] = i
        for at in range(0, len(fresh), chunk):
            part = fresh[at : at + chunk]
            self._vec[start + at : start + at + len(part)] = self.index.get_vectors(part)
        self._floor[start : start + len(fresh)] = np.nan
        if self._primed:
            self._primed_dirty.update(range(start, start + len(fresh)))

    def build(self, ids: list[str], lex: Mapping[str, SparseVec], chunk: int = 4096) -> None:
        """Candidate buffers of many products from batched index searches, each completed
        (``complete_hits``) from a block matrix product with every registered owner while
        the owners number at most ``exact_build_limit``."""
        self.register(ids)
        depth = self.config.buffer_depth
        n = len(self._owner_at)
        exact = n - len(self._free) <= self.config.exact_build_limit
        # About 64 MB of block scores at a time, whatever the catalog size.
        rows = max(1, (1 << 24) // max(n, 1))
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            mat = self.index.get_vectors(part)
            found = self.index.query_batch(mat, depth, exclude=part)
            for r0 in range(0, len(part), rows):
                block = mat[r0 : r0 + rows] @ self._vec[:n].T if exact else None
                for j, pid in enumerate(part[r0 : r0 + rows]):
                    hits = found[r0 + j]
                    near = (
                        self.complete_hits(hits, block[j], depth, FLOOR_MARGIN)
                        if block is not None
                        else [c for c, _ in hits]
                    )
                    self.set_buffer(pid, mat[r0 + j], near, lex, reuse_lexical=False)

    def refill(self, p: str, lex: Mapping[str, SparseVec]) -> None:
        """Rebuild a buffer that fell below C from an index query (completed from every
        owner's score, as a newcomer's is), keeping the lexical scores it already had."""
        self.refills += 1
        vp = self.index.get_vector(p)
        depth = self.config.buffer_depth
        hits = self.index.query(vp, depth, exclude=(p,))
        found = self.complete_hits(hits, self.scores(vp), depth, FLOOR_MARGIN)
        self.set_buffer(p, vp, found, lex, reuse_lexical=True)

    def set_buffer(
        self, p: str, vp: np.ndarray, found: list[str], lex: Mapping[str, SparseVec], *, reuse_lexical: bool
    ) -> None:
        """``p``'s buffer from ``found`` (index hits, best first), scored against ``vp``."""
        depth = self.config.buffer_depth
        found = [c for c in found if c in lex and c != p]
        dense = dense_scores(vp, self.index.get_vectors(found)) if found else np.zeros(0)
        old = self.by_owner.get(p)
        own_lex = lex[p]
        known = dict(zip(old.ids, old.lex, strict=True)) if (reuse_lexical and old is not None) else {}
        ranked = sorted(zip((-d for d in dense.tolist()), found, strict=True))[:depth]
        buf = CandidateBuffer()
        buf.ids = [c for _n, c in ranked]
        fresh = [c for c in buf.ids if c not in known]
        lexical = dict(zip(fresh, cosine_many(own_lex, [lex[c] for c in fresh]), strict=True))
        buf.neg = array("d", [n for n, _c in ranked])
        buf.lex = array("d", [known[c] if c in known else lexical[c] for c in buf.ids])
        buf.complete = len(self.index) - 1 <= depth
        old_members = set(old.ids) if old is not None else set()
        new_members = set(buf.ids)
        for c in old_members - new_members:
            self.discard_holder(c, p)
        for c in new_members - old_members:
            self.add_holder(c, p)
        self.by_owner[p] = buf
        self.note_floor(p, vp)

    def rescore_lexical(self, lex: Mapping[str, SparseVec]) -> None:
        """Recompute every pair's lexical score (after the lexical model changed)."""
        for pid, buf in self.by_owner.items():
            buf.lex = array("d", cosine_many(lex[pid], [lex[c] for c in buf.ids]))
