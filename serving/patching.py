"""Exact shortcuts for one swap in a product's top-C, so most changes need no list rebuild.

When one product enters or leaves a product ``p``'s top-C (its candidate buffer's head),
``may_change`` says whether ``p``'s lists can differ at all, and ``patched_lists`` gives the
lists after the swap by editing the published ones. Both are exact: ``patched_lists`` equals
a rebuild by ``serving.lists.build_lists``. Neither applies to a product with a behaviour
row (behaviour re-weights the ranking), which ``serving.propagation`` always rebuilds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from operator import itemgetter

from serving.candidates import CandidateBuffer
from serving.config import RecommenderConfig
from serving.lists import (
    ReasonCache,
    cached_reasons,
    collapsed_ids,
    has_duplicates,
    kept_duplicate,
    with_duplicates,
)
from serving.publication import Items, ScoredItem, with_reasons
from serving.rules import profile_is_substitute
from serving.scoring import (
    DUPLICATE_OF,
    Profile,
    blend,
    content_score,
    final_score,
    profile_reasons,
    rank_candidates,
)

#: A list item's product id (``ScoredItem`` is a named tuple, its id first).
_product_id = itemgetter(0)


def names_substitute(subs: Items, q: str, collapsed_marker: str | None) -> bool:
    """Whether ``subs`` lists ``q``, or holds it collapsed under a listing of its product
    (``collapsed_marker`` is ``DUPLICATE_OF + q``, ``None`` when listings are not collapsed).

    A product that goes out of stock, its price unchanged, changes no list that does not
    name it so: it ranks where it did, gives no reason to its holders, and was no substitute
    anywhere else. Of its holders (about 50 per product at 10k), only those whose list of
    k reaches it are read further.
    """
    if q in map(_product_id, subs):
        return True
    return collapsed_marker is not None and any(collapsed_marker in i.reasons for i in subs)


def may_change(
    similar: Items,
    subs: Items,
    buf: CandidateBuffer,
    owner: Profile | None,
    profiles: Mapping[str, Profile],
    config: RecommenderConfig,
    *,
    left: Iterable[str],
    entered: Iterable[str],
) -> bool:
    """Whether ``p``'s lists can differ after ``left`` left its top-C and ``entered`` entered.

    Exact, not a heuristic: a list is the top-k by content of the top-C (filtered for
    substitutes), so it is unchanged when nothing it lists left (or was touched) and
    nothing that entered beats its last item or fills a short list. ``entered`` ids
    must already be in ``p``'s buffer ``buf`` with their current scores. ``similar`` and
    ``subs`` are ``p``'s lists, ``owner`` its profile, and ``p`` has no behaviour row (behaviour
    re-weights the ranking: the caller rebuilds rather than reason about it).
    """
    listed = {i.product_id for i in similar}
    listed.update(i.product_id for i in subs)
    if config.collapse_duplicates:
        # A listing collapsed into a listed one counts as listed: its going changes reasons.
        listed |= collapsed_ids(similar) | collapsed_ids(subs)
    if any(x in listed for x in left):
        return True
    k = config.k
    for e in entered:
        if e in listed:
            return True
        dense, lexical = buf.pair(e)
        key = (-content_score(dense, lexical, config), e)
        if len(similar) < k or key < (-similar[-1].content, similar[-1].product_id):
            return True
        cand = profiles.get(e)
        if (
            owner is not None
            and cand is not None
            and (len(subs) < k or key < (-subs[-1].content, subs[-1].product_id))
            and profile_is_substitute(owner, cand, config)
        ):
            return True
    return False


def patch_attributes(
    similar: Items,
    subs: Items,
    buf: CandidateBuffer,
    owner: Profile,
    q: str,
    before: Profile,
    after: Profile,
    profiles: Mapping[str, Profile],
    config: RecommenderConfig,
) -> tuple[Items, Items] | None:
    """``p``'s lists after ``q``, in ``p``'s top-C, changed its stock or price and nothing
    else (same group, same text), or ``None`` when they must be rebuilt. ``before`` and
    ``after`` are ``q``'s profiles, ``owner`` is ``p``'s, ``similar`` and ``subs`` its lists
    (returned as the same objects when they cannot change).

    Exact: the ranking and the duplicate collapse read neither stock nor price, so
    ``similar`` can only change in the reasons of ``q``'s own item (a price gap), and so
    can ``subs`` while ``q`` stays a substitute. A substitute that leaves ``subs`` is
    patched out (``_without``), and one that becomes a substitute is patched in at its rank
    (``_with_entered``). A rebuild is needed only where a collapsed listing is involved:
    which listing stands for which may then change. A stock flip thus leaves every
    similar-items list alone, and a price change rewrites one item's reasons, where a
    rebuild of every list naming ``q`` cost most of such a change.
    """
    # This runs for every list whose top-C holds q (about 50 per change): the scans run in C.
    in_subs = q in map(_product_id, subs)
    reasons = None
    new_similar = similar
    if before.price != after.price:  # a stock flip changes no reason
        in_similar = q in map(_product_id, similar)
        if in_similar or in_subs:
            reasons = profile_reasons(owner, after)
            if reasons == profile_reasons(owner, before):
                reasons = None
        if in_similar:
            new_similar = _with_reasons(similar, q, reasons)
    now_sub = profile_is_substitute(owner, after, config)
    if in_subs:
        if not now_sub:
            left = _without(subs, q, buf, owner, profiles, config)
            return None if left is None else (new_similar, left)
        return new_similar, _with_reasons(subs, q, reasons)
    was_sub = profile_is_substitute(owner, before, config)
    # Listed nowhere in subs, q may still stand collapsed under a listing of its product
    # (only a substitute ever does).
    if was_sub and config.collapse_duplicates and any(DUPLICATE_OF + q in i.reasons for i in subs):
        return (new_similar, subs) if now_sub else (new_similar, _without_collapsed(subs, q))
    if not now_sub or was_sub:
        # Still no substitute; or one already, unlisted and not collapsed, so it ranked
        # after a full list's last item, and its content score did not move.
        return new_similar, subs
    return None if (entered := _with_entered(subs, q, buf, owner, after, profiles, config)) is None \
        else (new_similar, entered)


def _with_entered(
    subs: Items, q: str, buf: CandidateBuffer, owner: Profile, after: Profile, profiles: Mapping[str, Profile],
    config: RecommenderConfig,
) -> Items | None:
    """``subs`` after ``q``, a top-C member, became a substitute (back in stock, into the
    price band), or ``None`` when only a rebuild can tell. ``q`` takes its rank when it
    beats the last item or the list is short (a short list held every substitute of the
    top-C, so nothing else enters with it); the item is built as ``build_lists`` builds it.

    With collapsed listings in the list, a rebuild decides when ``q`` shares a duplicate key
    with a listed or a collapsed listing (which stands for which may change), or when a
    collapsed listing would rank after the list's new last item (a rebuild stops there and
    would no longer name it)."""
    dense, lexical = buf.pair(q)
    content = content_score(dense, lexical, config)
    key = (-content, q)
    k = config.k
    if len(subs) >= k and not key < (-subs[-1].content, subs[-1].product_id):
        return subs
    item = ScoredItem(product_id=q, score=final_score(content, 0.0, config), content=content, dense=dense,
                      lexical=lexical, behavior=0.0, reasons=profile_reasons(owner, after))
    at = bisect_left([(-i.content, i.product_id) for i in subs], key)
    out = (*subs[:at], item, *subs[at:])[:k]
    if not config.collapse_duplicates:
        return out
    collapsed = collapsed_ids(subs)
    if collapsed and not _collapsed_stay(out, collapsed, after, buf, profiles, config):
        return None
    if has_duplicates(out, profiles):
        return None
    return out


def _collapsed_stay(
    out: Items, collapsed: set[str], entered: Profile, buf: CandidateBuffer, profiles: Mapping[str, Profile],
    config: RecommenderConfig,
) -> bool:
    """Whether the listings collapsed in a list stay as they are after ``entered`` was
    inserted (``out``): it shares no duplicate key with any of them, and each still ranks
    before the last item of a full list (a rebuild examines every candidate up to there)."""
    keys = set(entered.dup_keys)
    if keys:
        for c in collapsed:
            prof = profiles.get(c)
            if prof is None or keys.intersection(prof.dup_keys):
                return False
    if len(out) < config.k:
        return True
    last = (-out[-1].content, out[-1].product_id)
    for c in collapsed:
        try:
            dense, lexical = buf.pair(c)
        except ValueError:
            return False
        if (-content_score(dense, lexical, config), c) > last:
            return False
    return True


def _without(
    subs: Items, q: str, buf: CandidateBuffer, owner: Profile, profiles: Mapping[str, Profile],
    config: RecommenderConfig,
) -> Items | None:
    """``subs`` after its item ``q`` stopped being a substitute (out of stock, out of the
    price band), or ``None`` when only a rebuild can tell (listings stood collapsed under
    ``q``: which of them takes its place is a rebuild's to decide).

    A short list already held every substitute there was. A full list takes the next
    substitute of the top-C in rank order, as ``build_lists`` would find it: every
    substitute it did not list ranks after its last item or stands collapsed, so the
    search goes on from there, and a substitute on the way that is a listing of a listed
    product is collapsed under it (a ``duplicate_of`` reason), as a rebuild does.
    """
    collapse = config.collapse_duplicates
    collapsed = collapsed_ids(subs) if collapse else set()
    rest = [i for i in subs if i.product_id != q]
    if collapsed and any(
        r.startswith(DUPLICATE_OF) for i in subs if i.product_id == q for r in i.reasons
    ):
        return None
    if len(subs) < config.k:
        return tuple(rest)
    kept: dict[str, tuple[int, str | None]] = {}
    if collapse:
        for at, item in enumerate(rest):
            prof = profiles[item.product_id]
            for key in prof.dup_keys:
                kept.setdefault(key, (at, prof.group_id))
    skip = {i.product_id for i in subs} | collapsed
    # Every substitute ranked before the last item is listed or collapsed (only q moved):
    # the rules are checked from there on.
    last = (subs[-1].content, subs[-1].product_id)
    noted: dict[int, list[str]] = {}
    for c, content, dense, lexical in rank_candidates(
        (m for m in buf.head(config.candidate_depth) if m[0] not in skip), config
    ):
        if content > last[0] or (content == last[0] and c < last[1]):
            continue
        cand = profiles.get(c)
        if cand is None or not profile_is_substitute(owner, cand, config):
            continue
        if collapse and cand.dup_keys and kept_duplicate(cand, kept, noted, c):
            continue
        rest.append(ScoredItem(product_id=c, score=final_score(content, 0.0, config), content=content,
                               dense=dense, lexical=lexical, behavior=0.0, reasons=profile_reasons(owner, cand)))
        break
    return with_duplicates(rest, noted)


def _without_collapsed(subs: Items, q: str) -> Items:
    """``subs`` after ``q``, which stood collapsed under one of its listings, stopped being a
    substitute: that listing no longer names it; nothing else moves (a collapsed listing
    holds no place and lends no key)."""
    gone = DUPLICATE_OF + q
    return tuple(
        with_reasons(i, tuple(r for r in i.reasons if r != gone)) if gone in i.reasons else i for i in subs
    )


def _with_reasons(items: Items, q: str, reasons: tuple[str, ...] | None) -> Items:
    """``items`` with ``q``'s item giving ``reasons`` (plus the ``duplicate_of`` reasons it
    had); ``items`` itself when ``reasons`` is ``None`` or ``q`` is not listed."""
    if reasons is None:
        return items
    for at, item in enumerate(items):
        if item.product_id == q:
            collapsed = tuple(r for r in item.reasons if r.startswith(DUPLICATE_OF))
            fresh = with_reasons(item, (*reasons, *collapsed) if collapsed else reasons)
            return (*items[:at], fresh, *items[at + 1 :])
    return items


def patched_lists(
    p: str,
    q: str | None,
    dense: float,
    lexical: float,
    pushed_out: tuple[str, ...],
    *,
    similar: Items,
    subs: Items,
    owner: Profile,
    cand: Profile | None,
    buf: CandidateBuffer,
    profiles: Mapping[str, Profile],
    reasons: dict[str, tuple[Profile, ReasonCache]],
    config: RecommenderConfig,
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
    ``None``) and ``pushed_out`` what left it.

    ``similar`` and ``subs`` are ``p``'s current lists (or those already patched in this
    change), ``owner`` and ``cand`` the profiles of ``p`` and ``q``, ``buf`` ``p``'s buffer
    (already swapped), and ``p`` has no behaviour row. ``reasons`` (owner -> (owner profile,
    cache)) is the reasons cache of every owner, updated in place.
    """
    collapse = config.collapse_duplicates
    if collapse and (collapsed_ids(similar) or collapsed_ids(subs)):
        return None  # which listing stands for which may change: rebuild
    k = config.k
    q_content = content_score(dense, lexical, config)
    q_key = (-q_content, q or "")
    made: dict[str, ScoredItem] = {}

    def make(c: str, d: float, lx: float) -> ScoredItem:
        item = made.get(c)
        if item is None:
            held = reasons.get(p)
            if held is None or held[0] is not owner:
                held = (owner, {})
                reasons[p] = held
            content = q_content if c == q else content_score(d, lx, config)
            item = made[c] = ScoredItem(
                product_id=c,
                score=final_score(content, 0.0, config),
                content=content,
                dense=d,
                lexical=lx,
                behavior=0.0,
                reasons=cached_reasons(owner, profiles[c], c, held[1]),
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
            fill = best_unlisted(buf, owner, listed, substitutes, profiles, config)
            if fill is not None:
                pool.append(make(*fill))
        pool.sort(key=lambda i: (-i.content, i.product_id))
        return tuple(pool[:k])

    new_similar = patch(similar, q is not None, substitutes=False)
    new_subs = patch(subs, cand is not None and profile_is_substitute(owner, cand, config), substitutes=True)
    if new_similar is None or new_subs is None:
        return None
    # Without two listings of one product among them, the lists are what build_lists gives
    # (it collapses nothing then); with them, the rebuild decides which one stays.
    if collapse and (has_duplicates(new_similar, profiles) or has_duplicates(new_subs, profiles)):
        return None
    held = reasons.get(p)
    if held is not None:
        for gone in pushed_out:  # out of the top-C, so in neither list: its reasons go too
            held[1].pop(gone, None)
    return new_similar, new_subs


def best_unlisted(
    buf: CandidateBuffer,
    owner: Profile,
    listed: set[str],
    substitutes: bool,
    profiles: Mapping[str, Profile],
    config: RecommenderConfig,
) -> tuple[str, float, float] | None:
    """The best (content, id) member of the top-C of ``buf`` (``owner``'s buffer) not in
    ``listed``, as (id, dense, lexical).

    With ``substitutes``, only members that pass the substitute rules count. The rule
    check runs only for members that would beat the best found so far.
    """
    w_dense, w_ev, floor = blend(config)
    best: tuple[float, str] | None = None
    found: tuple[str, float, float] | None = None
    for c, d, lx in buf.head(config.candidate_depth):
        if c in listed:
            continue
        key = (-(w_dense * d + w_ev * (lx - floor if lx > floor else 0.0)), c)
        if best is not None and key >= best:
            continue
        if substitutes:
            prof = profiles.get(c)
            if prof is None or not profile_is_substitute(owner, prof, config):
                continue
        best = key
        found = (c, d, lx)
    return found
