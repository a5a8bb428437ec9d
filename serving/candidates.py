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
    enter its buffer. The floors live in one numpy array, so ``owners_reaching`` finds every
    buffer a newcomer may enter with one comparison over all owners, however far away they
    are (the reverse check of ``serving.propagation`` relies on it to stay exact).
    """

    def __init__(self, config: RecommenderConfig, index: VectorIndex) -> None:
        self.config = config
        self.index = index
        self.by_owner: dict[str, CandidateBuffer] = {}
        self.holders: dict[str, set[str]] = {}
        #: Buffers rebuilt from the index because a removal left them shorter than C.
        self.refills = 0
        # Floors by slot; a free slot holds NaN, which no comparison selects.
        self._floor = np.full(64, np.nan, dtype=np.float64)
        self._slot: dict[str, int] = {}
        self._owner_at: list[str | None] = []
        self._free: list[int] = []

    def note_floor(self, p: str) -> None:
        """Record the floor of ``p``'s buffer after it changed.

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
                    grown = np.full(self._floor.shape[0] * 2, np.nan, dtype=np.float64)
                    grown[:slot] = self._floor[:slot]
                    self._floor = grown
            self._slot[p] = slot
        self._floor[slot] = -np.inf if buf.complete or not buf.keys else -buf.keys[-1][0]

    def owners_reaching(self, score: float) -> tuple[list[str], np.ndarray]:
        """Owners whose floor is at most ``score``, with their floors: every buffer that a
        newcomer scoring ``score`` (or less) against its owner might enter."""
        slots = np.flatnonzero(self._floor[: len(self._owner_at)] <= score)
        owner_at = self._owner_at
        return [owner_at[i] for i in slots.tolist()], self._floor[slots]  # type: ignore[misc]

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
        self._floor = np.full(64, np.nan, dtype=np.float64)
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

    def fill(self, p: str, lex: Mapping[str, SparseVec], *, reuse_lexical: bool) -> None:
        """(Re)build ``p``'s buffer from an index query."""
        vp = self.index.get_vector(p)
        found = [c for c, _ in self.index.query(vp, self.config.buffer_depth, exclude=(p,))]
        self.set_buffer(p, vp, found, lex, reuse_lexical=reuse_lexical)

    def refill(self, p: str, lex: Mapping[str, SparseVec]) -> None:
        """Rebuild a buffer that fell below C, keeping the lexical scores it already had."""
        self.refills += 1
        self.fill(p, lex, reuse_lexical=True)

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
        self.note_floor(p)

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
