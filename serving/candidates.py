"""Candidate buffers: the exact dense top-n neighbours of every owned product.

For each owned product ``p`` a ``CandidateBuffer`` holds the exact dense top-``n``
neighbours (``C <= n <= C + candidate_slack``, or every other product when there are
fewer), with each pair's dense and lexical score; ``CandidateBuffers.holders`` is the
reverse map (which buffers name a product). ``serving.propagation`` keeps them exact as
products change; this module builds them from the index and answers rank queries.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping

import numpy as np

from serving.config import RecommenderConfig
from serving.index import VectorIndex
from serving.lexical import SparseVec, cosine_many
from serving.scoring import dense_scores

#: Rank of a product that a buffer does not hold.
ABSENT = 1 << 30


class CandidateBuffer:
    """Exact dense top-n of one product: keys ``(-dense, id)`` ascending, and pair scores."""

    __slots__ = ("complete", "keys", "parts")

    def __init__(
        self,
        keys: list[tuple[float, str]] | None = None,
        parts: dict[str, complex] | None = None,
        complete: bool = False,
    ) -> None:
        self.keys: list[tuple[float, str]] = keys if keys is not None else []
        # id -> complex(dense, lexical): a complex is not a GC container, so the dict stays
        # untracked by the cyclic GC. With tuple values every insert re-tracked the dict and
        # each young collection walked ~60 of them per change (cache misses over a GB heap).
        self.parts: dict[str, complex] = parts if parts is not None else {}
        self.complete = complete  # holds every other product


class CandidateBuffers:
    """The buffers of the owned products (``by_owner``) and who names whom (``holders``).

    ``holders[c]`` is the set of owners whose buffer holds ``c``; every method here keeps it
    in step with the buffers. Lexical vectors (``lex``: product id -> ``SparseVec``, every
    live product) are passed in by the caller, which owns them.

    Each owner also has a *floor* (``note_floor``): the dense score a newcomer must reach to
    enter its buffer. The floors and the owners' vectors live in numpy arrays by slot, so
    ``owners_admitting`` finds every buffer a newcomer enters with one comparison over all
    owners and one product over the contiguous vectors, however far away the owners are (the
    reverse check of ``serving.propagation`` relies on it to stay exact). Gathering the
    vectors of the owners to check instead cost twice a full product at 100k products.
    """

    def __init__(self, config: RecommenderConfig, index: VectorIndex) -> None:
        self.config = config
        self.index = index
        self.by_owner: dict[str, CandidateBuffer] = {}
        self.holders: dict[str, set[str]] = {}
        #: Buffers rebuilt from the index because a removal left them shorter than C.
        self.refills = 0
        self._floor: np.ndarray
        self._vec: np.ndarray
        self._slot: dict[str, int]
        self._owner_at: list[str | None]
        self._free: list[int]
        self.clear()

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
                self._owner_at.append(p)
                if slot >= self._floor.shape[0]:
                    size = self._floor.shape[0] * 2
                    floor = np.full(size, np.nan, dtype=np.float64)
                    floor[:slot] = self._floor[:slot]
                    vec = np.zeros((size, self._vec.shape[1]), dtype=np.float32)
                    vec[:slot] = self._vec[:slot]
                    self._floor, self._vec = floor, vec
            self._slot[p] = slot
            if vector is None:
                vector = self.index.get_vector(p)
        if vector is not None:
            self._vec[slot] = vector
        self._floor[slot] = -np.inf if buf.complete or not buf.keys else -buf.keys[-1][0]

    def owners_admitting(self, vector: np.ndarray, edge: float, margin: float) -> list[str]:
        """Owners whose buffer ``vector`` (a newcomer's) may enter, among those whose floor
        is at most ``edge`` (what the newcomer scores, at most, against anyone outside the
        neighbourhood the caller checks itself): their float32 score reaches the floor less
        ``margin``. The caller scores them exactly."""
        n = len(self._owner_at)
        floors = self._floor[:n]
        below = floors <= edge  # a free slot holds NaN: never selected
        count = int(np.count_nonzero(below))
        if not count:
            return []
        v = np.asarray(vector, dtype=np.float32)
        if count * 4 > n:
            # Many to check: one pass over the contiguous vectors beats gathering their rows.
            slots = np.flatnonzero(below & (self._vec[:n] @ v >= floors - margin))
        else:
            slots = np.flatnonzero(below)
            slots = slots[self._vec[slots] @ v >= floors[slots] - margin]
        owner_at = self._owner_at
        return [owner_at[i] for i in slots.tolist()]  # type: ignore[misc]

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

    def adopt(self, owner: str, buf: CandidateBuffer) -> None:
        """Take ``buf`` as ``owner``'s buffer as it is (a restore), and index its members."""
        self.by_owner[owner] = buf
        for c in buf.parts:
            self.holders.setdefault(c, set()).add(owner)
        self.note_floor(owner)

    def discard_holder(self, c: str, p: str) -> None:
        """``p``'s buffer no longer holds ``c``."""
        holders = self.holders.get(c)
        if holders is not None:
            holders.discard(p)
            if not holders:
                del self.holders[c]

    def remove_owner(self, p: str) -> CandidateBuffer | None:
        """Drop ``p``'s own buffer (``None`` when it had none)."""
        buf = self.by_owner.pop(p, None)
        if buf is not None:
            for c in buf.parts:
                self.discard_holder(c, p)
            self._release(p)
        return buf

    def build(self, ids: list[str], lex: Mapping[str, SparseVec], chunk: int = 4096) -> None:
        """Candidate buffers of many products from batched index searches."""
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            mat = self.index.get_vectors(part)
            found = self.index.query_batch(mat, self.config.buffer_depth, exclude=part)
            for pid, vp, hits in zip(part, mat, found, strict=True):
                self.set_buffer(pid, vp, [c for c, _ in hits], lex, reuse_lexical=False)

    def refill(self, p: str, lex: Mapping[str, SparseVec]) -> None:
        """Rebuild a buffer that fell below C from an index query, keeping the lexical scores
        it already had."""
        self.refills += 1
        vp = self.index.get_vector(p)
        found = [c for c, _ in self.index.query(vp, self.config.buffer_depth, exclude=(p,))]
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
        known = old.parts if (reuse_lexical and old is not None) else {}
        fresh = [c for c in found if c not in known]
        lexical = dict(zip(fresh, cosine_many(own_lex, [lex[c] for c in fresh]), strict=True))
        parts: dict[str, complex] = {}
        for c, d in zip(found, dense.tolist(), strict=True):
            parts[c] = complex(d, known[c].imag if c in known else lexical[c])
        buf = CandidateBuffer()
        buf.keys = sorted((-z.real, c) for c, z in parts.items())[:depth]
        buf.parts = {c: parts[c] for _d, c in buf.keys}
        buf.complete = len(self.index) - 1 <= depth
        old_members = set(old.parts) if old is not None else set()
        for c in old_members - buf.parts.keys():
            self.discard_holder(c, p)
        for c in buf.parts.keys() - old_members:
            self.holders.setdefault(c, set()).add(p)
        self.by_owner[p] = buf
        self.note_floor(p, vp)

    def rescore_lexical(self, lex: Mapping[str, SparseVec]) -> None:
        """Recompute every pair's lexical score (after the lexical model changed)."""
        for pid, buf in self.by_owner.items():
            members = list(buf.parts)
            lexical = cosine_many(lex[pid], [lex[c] for c in members])
            buf.parts = {c: complex(buf.parts[c].real, lx) for c, lx in zip(members, lexical, strict=True)}

    def rank_of(self, p: str, q: str) -> int:
        """Position of ``q`` in ``p``'s buffer (``ABSENT``, a large number, when absent)."""
        buf = self.by_owner.get(p)
        if buf is None or q not in buf.parts:
            return ABSENT
        key = (-buf.parts[q].real, q)
        i = bisect_left(buf.keys, key)
        if i < len(buf.keys) and buf.keys[i] == key:
            return i
        return next(j for j, k in enumerate(buf.keys) if k[1] == q)  # safety net, never expected
