"""How a list is built from its candidates, and what every published list must equal.

* ``build_lists``: similar items and substitutes of one product from its candidates (the
  dense top-C with pair scores, plus behaviour partners when behaviour is weighted in).
* ``build_complements``: the complements of one product from its behaviour row.
* ``exact_lists``: every list computed from scratch by brute force (duplicates by
  ``serving.duplicates.exact_duplicates``); the definition the
  incremental maintenance (``serving.propagation``) must match, used by the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from serving.behavior import BehaviorRow
from serving.catalog import Product
from serving.config import RecommenderConfig
from serving.duplicates import exact_duplicates
from serving.index import normalize_rows
from serving.kinds import LIST_KINDS, Kind
from serving.lexical import LexicalModel, cosine_many
from serving.publication import Items, ScoredItem, with_reasons
from serving.rules import profile_is_substitute
from serving.scoring import (
    DUPLICATE_OF,
    Profile,
    content_score,
    final_score,
    profile,
    profile_reasons,
    rank_candidates,
    variants,
)
from serving.text import product_text

#: The reason every complement carries, before the content reasons.
BOUGHT_TOGETHER = "often bought together"

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
    collapse = config.collapse_duplicates
    # Per list: duplicate key -> (position, group) of the listing kept for it, and what each
    # kept listing stands for.
    similar_keys: dict[str, tuple[int, str | None]] = {}
    subs_keys: dict[str, tuple[int, str | None]] = {}
    similar_dups: dict[int, list[str]] = {}
    subs_dups: dict[int, list[str]] = {}
    for pid, score, content, dense, lexical in rows:
        cand = profiles(pid)
        if cand is None:
            continue
        want_similar = len(similar) < config.k
        want_sub = len(subs) < config.k and profile_is_substitute(owner, cand, config)
        if collapse and cand.dup_keys:
            if want_similar and kept_duplicate(cand, similar_keys, similar_dups, pid):
                want_similar = False
            if want_sub and kept_duplicate(cand, subs_keys, subs_dups, pid):
                want_sub = False
        if not (want_similar or want_sub):
            continue
        item = ScoredItem(
            product_id=pid,
            score=score,
            content=content,
            dense=dense,
            lexical=lexical,
            behavior=behavior.get(pid, 0.0) if behavior else 0.0,
            reasons=cached_reasons(owner, cand, pid, cache),
        )
        if want_similar:
            if collapse:
                for key in cand.dup_keys:
                    similar_keys.setdefault(key, (len(similar), cand.group_id))
            similar.append(item)
        if want_sub:
            if collapse:
                for key in cand.dup_keys:
                    subs_keys.setdefault(key, (len(subs), cand.group_id))
            subs.append(item)
        if len(similar) >= config.k and len(subs) >= config.k:
            break
    return with_duplicates(similar, similar_dups), with_duplicates(subs, subs_dups)


def kept_duplicate(
    cand: Profile, kept: dict[str, tuple[int, str | None]], dups: dict[int, list[str]], pid: str
) -> bool:
    """Whether a listing already kept stands for ``cand`` (then ``pid`` is noted under it).
    Variants of one group are never duplicates of each other."""
    for key in cand.dup_keys:
        hit = kept.get(key)
        if hit is not None and not variants(hit[1], cand.group_id):
            dups.setdefault(hit[0], []).append(pid)
            return True
    return False


def with_duplicates(items: list[ScoredItem], dups: dict[int, list[str]]) -> Items:
    """``items`` as a list, each kept listing at position ``at`` naming the listings
    ``dups[at]`` it stands for (``duplicate_of`` reasons, after the reasons it has)."""
    for at, others in dups.items():
        kept = items[at]
        items[at] = with_reasons(kept, (*kept.reasons, *(DUPLICATE_OF + o for o in others)))
    return tuple(items)


def collapsed_ids(items: Items) -> set[str]:
    """The listings that the items of a list stand for (``duplicate_of`` reasons)."""
    return {r[len(DUPLICATE_OF):] for i in items for r in i.reasons if r.startswith(DUPLICATE_OF)}


def has_duplicates(items: Items, profiles: Mapping[str, Profile]) -> bool:
    """Whether two items of a list are listings of the same product (see ``build_lists``)."""
    seen: dict[str, str | None] = {}
    for i in items:
        prof = profiles[i.product_id]
        for key in prof.dup_keys:
            if key in seen and not variants(seen[key], prof.group_id):
                return True
        for key in prof.dup_keys:
            seen.setdefault(key, prof.group_id)
    return False


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


def cached_reasons(owner: Profile, cand: Profile, pid: str, cache: ReasonCache | None) -> tuple[str, ...]:
    """``profile_reasons(owner, cand)``, taken from ``cache`` while ``cand`` is the very profile
    the entry was computed for, and stored there otherwise (``cache=None``: no caching)."""
    if cache is None:
        return profile_reasons(owner, cand)
    hit = cache.get(pid)
    if hit is not None and hit[0] is cand:
        return hit[1]
    found = profile_reasons(owner, cand)
    cache[pid] = (cand, found)
    return found


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
    out[Kind.DUPLICATES] = exact_duplicates(
        prods.values(), {pid: mat[j] for j, pid in enumerate(ids)}, config, lexical, owns=owns
    )
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
