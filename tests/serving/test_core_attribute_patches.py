"""A stock or price change patches the lists it touches, exactly as a rebuild gives them.

The patches (``serving.patching``) are the attribute stream's fast path: a stock flip of a
listed substitute takes the next substitute in rank order, a listing collapsed under another
one drops out of its ``duplicate_of`` reasons, and the owner's own lists stay as they are.
Each case is checked against a recommender built from scratch on the same catalog, and
against the rebuild count (a patch that silently fell back to rebuilding would pass the
first check only).
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from serving.catalog import ProductUpsert
from serving.config import RecommenderConfig
from serving.index import ExactIndex
from serving.propagation import Propagator
from serving.recommender import Recommender

#: Dense only, so the ranking is the one the vectors below spell out.
CONFIG = RecommenderConfig(dim=4, k=3, candidate_depth=8, candidate_slack=0, lexical_weight=0.0)

TITLES = {
    "owner": "Disney's 1st & 2nd grade bundle",
    "x1": "Reader Rabbit 2nd grade",
    "x2": "Stuffit Deluxe 11",
    "x3": "Math Blaster grade 2",
    "dup": "stuffit deluxe 11",
    "z": "Jumpstart 2nd grade adventure",
}
VECTORS = {"owner": [1, 0, 0, 0], "x1": [0.95, 0.05, 0, 0], "x2": [0.9, 0.1, 0, 0], "x3": [0.85, 0.15, 0, 0],
           "dup": [0.8, 0.2, 0, 0], "z": [0.7, 0.3, 0, 0]}


def build(in_stock: dict[str, bool] | None = None) -> Recommender:
    rec = Recommender(CONFIG, ExactIndex(CONFIG.dim))
    for pid, title in TITLES.items():
        stock = (in_stock or {}).get(pid, True)
        rec.apply(ProductUpsert(pid, 1.0, title=title, price=20.0, in_stock=stock),
                  np.array(VECTORS[pid], dtype=np.float32))
    return rec


def ids(items: object) -> list[str]:
    assert isinstance(items, tuple)
    return [i.product_id for i in items]


@pytest.fixture
def rebuilds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The owners whose lists were rebuilt rather than patched, in order."""
    seen: list[str] = []
    compute = Propagator._compute

    def counting(self: Propagator, p: str) -> object:
        seen.append(p)
        return compute(self, p)

    monkeypatch.setattr(Propagator, "_compute", counting)
    return seen


def test_a_listed_substitute_out_of_stock_gives_its_place_to_the_next_collapsing_duplicates_on_the_way(
    rebuilds: list[str],
) -> None:
    rec = build()
    assert ids(rec.substitutes("owner")) == ["x1", "x2", "x3"]  # full: "dup" was never reached
    rebuilds.clear()
    rec.apply(ProductUpsert("x1", 2.0, in_stock=False))
    subs = rec.substitutes("owner")
    # Searching on for x1's place, "dup" is a listing of x2: it stands collapsed under it.
    assert ids(subs) == ["x2", "x3", "z"]
    assert subs is not None and "duplicate_of: dup" in subs[0].reasons
    assert "owner" not in rebuilds and "x1" not in rebuilds
    assert subs == build({"x1": False}).substitutes("owner")


def test_a_collapsed_listing_out_of_stock_leaves_its_kept_listings_reasons(rebuilds: list[str]) -> None:
    rec = build({"x1": False})
    subs = rec.substitutes("owner")
    assert subs is not None and "duplicate_of: dup" in subs[0].reasons
    rebuilds.clear()
    rec.apply(ProductUpsert("dup", 2.0, in_stock=False))
    subs = rec.substitutes("owner")
    assert subs is not None and all(not r.startswith("duplicate_of") for i in subs for r in i.reasons)
    assert "owner" not in rebuilds
    assert subs == build({"x1": False, "dup": False}).substitutes("owner")


def test_a_substitute_back_in_stock_takes_its_rank(rebuilds: list[str]) -> None:
    rec = build({"x1": False, "dup": False})
    rebuilds.clear()
    rec.apply(ProductUpsert("x1", 2.0, in_stock=True))
    assert ids(rec.substitutes("owner")) == ["x1", "x2", "x3"]
    assert "owner" not in rebuilds
    assert rec.substitutes("owner") == build({"dup": False}).substitutes("owner")


def test_a_substitute_back_in_stock_takes_its_rank_beside_a_collapsed_listing(rebuilds: list[str]) -> None:
    rec = build({"x1": False, "x3": False})
    subs = rec.substitutes("owner")
    assert ids(subs) == ["x2", "z"] and subs is not None and "duplicate_of: dup" in subs[0].reasons
    rebuilds.clear()
    rec.apply(ProductUpsert("x3", 2.0, in_stock=True))
    # "dup" still ranks before the list's new last item, so it stays collapsed under x2.
    assert ids(rec.substitutes("owner")) == ["x2", "x3", "z"]
    assert "owner" not in rebuilds
    assert rec.substitutes("owner") == build({"x1": False}).substitutes("owner")


def test_a_stock_flip_leaves_the_products_own_lists_unrebuilt_and_still_republishes_its_substitutes(
    rebuilds: list[str],
) -> None:
    rec = build()
    held = rec.substitutes("owner")
    rebuilds.clear()
    pubs = rec.apply(ProductUpsert("owner", 2.0, in_stock=False))
    assert rebuilds == []
    assert rec.substitutes("owner") is held
    out_of_stock = [p for p in pubs if p.product_id == "owner"]
    assert [str(p.trigger) for p in out_of_stock] == ["out_of_stock"]


@pytest.mark.parametrize("seed", range(6))
def test_random_stock_and_price_changes_among_duplicates_equal_a_build_from_scratch(seed: int) -> None:
    """Many listings of few products, in and out of stock and across the price band."""
    rng = random.Random(seed)
    config = RecommenderConfig(dim=8, k=4, candidate_depth=12, candidate_slack=0, lexical_weight=0.0)
    names = ["Stuffit Deluxe 11", "Reader Rabbit 2nd grade", "Math Blaster grade 2", "Jumpstart Advanced 3"]
    vectors: dict[str, np.ndarray] = {}
    state: dict[str, ProductUpsert] = {}
    rec = Recommender(config, ExactIndex(config.dim))
    for i in range(40):
        pid = f"p{i:02d}"
        title = rng.choice(names) if rng.random() < 0.7 else f"{rng.choice(names)} {rng.choice('ABCDEFG')}{i}"
        base = rng.randrange(4)
        v = np.random.default_rng(seed * 100 + i).normal(size=config.dim).astype(np.float32)
        v[base] += 3.0  # four clusters, so top-C lists overlap a lot
        vectors[pid] = v / np.linalg.norm(v)
        state[pid] = ProductUpsert(pid, 1.0, title=title, price=float(rng.choice([10, 12, 15, 20])),
                                   in_stock=rng.random() < 0.8)
        rec.apply(state[pid], vectors[pid])
    for step in range(150):
        pid = rng.choice(sorted(state))
        ts = 2.0 + step
        if rng.random() < 0.5:
            field: dict[str, object] = {"in_stock": not state[pid].in_stock}
        else:
            field = {"price": float(rng.choice([10, 12, 15, 20, 30]))}
        rec.apply(ProductUpsert(pid, ts, **field))  # type: ignore[arg-type]
        state[pid] = replace(state[pid], **field)  # type: ignore[arg-type]
    fresh = Recommender(config, ExactIndex(config.dim))
    for pid, product in state.items():
        fresh.apply(product, vectors[pid])
    for pid in state:
        assert rec.similar(pid) == fresh.similar(pid), pid
        assert rec.substitutes(pid) == fresh.substitutes(pid), pid


def test_out_of_stock_reads_only_the_lists_that_name_it_as_a_substitute(monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.propagation as propagation

    rec = build()
    naming = {p for p in TITLES if p != "z" and "z" in ids(rec.substitutes(p))}
    passed_over = {p for p in TITLES if p != "z"} - naming
    assert naming and "owner" in passed_over  # the owner's full list stops before z
    patched: list[str] = []
    patch = propagation.patch_attributes

    def spying(similar: object, subs: object, buf: object, owner: object, *args: object) -> object:
        patched.append(owner.product_id)  # type: ignore[attr-defined]
        return patch(similar, subs, buf, owner, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(propagation, "patch_attributes", spying)
    rec.apply(ProductUpsert("z", 2.0, in_stock=False))
    assert set(patched) == naming
    fresh = build({"z": False})
    for p in TITLES:
        assert rec.substitutes(p) == fresh.substitutes(p) and rec.similar(p) == fresh.similar(p), p
