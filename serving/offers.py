"""Competitor offers matched to the shop's own products, kept exact as either side changes.

A competitor's offer (``Offer``: competitor, offer id, title, brand, price, currency, url) is
matched to the own product with the highest **content score**, the very hybrid the lists use
(``serving.scoring``: ``(1 - w)·dense + w·max(0, lexical - f) / (1 - f)``, the dense half on
the encoder's embeddings of ``product_text``, the lexical half on the core's frozen IDF).
Offers live in an index of their own (``OfferMatcher.index``), never in the shop's catalog or
lists, so they never appear in ``similar-items`` and never move a list.

**The match of one offer** (``best_product``) is the exact arg-max of the content score over
the catalog, ties by product id, found without scoring the whole catalog: the dense top-C of
the core's index and the lexical top-C of its postings are scored on both halves; any product
outside both scores at most ``(1 - w)·d_C + w_ev·max(0, l_C - f)`` (the C-th dense and
lexical scores), so when the best candidate beats that bound it is the arg-max, else C
grows fourfold. Exact with an exact index, and as exact as the index's recall with HNSW.

**Confidence.** The score, and the gap between the offer's price and the product's, are
mapped to a probability-like confidence by a logistic curve (``Calibration``, fitted on
labelled pairs by ``simstream eval offers``); an offer whose best product's confidence is
below ``Calibration.threshold`` is published with ``no_match`` (its best candidate is still
named in the reasons). The price never picks the product, it only says how sure the match is.

**Exact re-matching** (``OfferMatcher.on_products_changed``). When an own product ``p`` is
upserted, changed or deleted, the offers re-matched are:

* every offer whose best candidate was ``p`` (its score, price gap or existence changed);
* every offer that ``p`` now scores at least as high as its current best (within ``EPS``),
  found by one scan of the offer index (``OfferVectors``) with ``p``'s vector and one pass
  over the offers' lexical postings (``serving.postings.LexicalPostings``) with ``p``'s
  lexical vector.

No other offer's arg-max can move: their best is unchanged and ``p`` still scores below it.
A refit of the IDF moves every lexical score, so the first call after one re-vectorises
every offer and re-matches all of them (``sync``). ``exact_offer_matches`` is the
from-scratch definition that the property tests compare against.

**Publications.** A match is published (``OfferPublication``, with a per-offer increasing
version) only when it differs from the last one published; a deleted offer gets a tombstone.
Each own product with matched offers has a ``PricePublication`` (the competitors' matched
offers with their prices), republished whenever that set or any of its entries changes.

Not thread-safe: call everything on the core thread, like the ``Recommender`` it reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.catalog import Product
from serving.config import RecommenderConfig
from serving.errors import InvalidInput
from serving.index import normalize_rows
from serving.lexical import LexicalModel, SparseVec, codes, cosine_many, words
from serving.postings import LexicalPostings
from serving.recommender import Recommender
from serving.scoring import blend, content_score, dense_scores
from serving.text import product_text

#: Separates the competitor from the offer id in an offer's key (``competitor|offer_id``).
KEY_SEPARATOR = "|"
#: Float noise tolerated when deciding whether a changed product might beat an offer's best:
#: such offers are re-matched from scratch rather than decided on a borderline comparison.
EPS = 1e-9
#: Largest difference between a float32 and a float64 inner product of two unit vectors of the
#: encoder's dimension (about 1e-7 in practice), with a wide margin.
DENSE_SLACK = 1e-4
#: Decimal digits a candidate's dense and content scores are rounded to (see ``_arg_max``).
SCORE_DIGITS = 12
#: Shared words named, at most, in a match's reasons.
MAX_REASON_WORDS = 5
#: Largest ``|ln(offer price / own price)|`` the confidence looks at: a 20-fold gap (e^3) says
#: as much as any larger one.
MAX_LOG_PRICE_GAP = 3.0


def offer_key(competitor: str, offer_id: str) -> str:
    """The key of an offer on ``competitor-offers`` and ``offer-matches``: ``competitor|offer_id``."""
    return f"{competitor}{KEY_SEPARATOR}{offer_id}"


@dataclass(frozen=True, slots=True)
class Offer:
    """A competitor's offer, as the matcher stores it."""

    competitor: str
    offer_id: str
    title: str
    ts: float
    brand: str | None = None
    price: float | None = None
    currency: str | None = None
    url: str | None = None

    @property
    def key(self) -> str:
        return offer_key(self.competitor, self.offer_id)

    @property
    def text(self) -> str:
        """What the encoder and the lexical half see: the template of the shop's own products
        (``serving.text.product_text``: title, then the brand unless the title names it)."""
        return product_text(Product(product_id=self.key, title=self.title, ts=self.ts, brand=self.brand))


@dataclass(frozen=True, slots=True)
class OfferDelete:
    """The competitor withdrew the offer."""

    competitor: str
    offer_id: str
    ts: float

    @property
    def key(self) -> str:
        return offer_key(self.competitor, self.offer_id)


OfferChange = Offer | OfferDelete


def log_price_gap(offer: Offer, product: Product | None) -> float | None:
    """``min(|ln(offer price / own price)|, MAX_LOG_PRICE_GAP)``, or ``None`` when either price is
    unknown (or not positive) or the currencies differ."""
    if product is None or offer.price is None or product.price is None or offer.price <= 0 or product.price <= 0:
        return None
    if offer.currency and product.currency and offer.currency != product.currency:
        return None
    return min(abs(math.log(offer.price / product.price)), MAX_LOG_PRICE_GAP)


@dataclass(frozen=True, slots=True)
class Calibration:
    """The confidence that an offer's best own product is the same product, and the confidence
    below which it has no match. Fitted by ``simstream eval offers`` (logistic regression):

    ``confidence = 1 / (1 + exp(-(slope·score - price_weight·gap + intercept)))``

    where ``score`` is the content score and ``gap`` the ``log_price_gap`` of the offer and the
    product (``unknown_price_gap`` when a price is unknown). The gap only moves the
    confidence, never which product is the match: the same product sells at similar prices,
    and a very different price is evidence of another edition or bundle.
    """

    slope: float
    intercept: float
    threshold: float
    price_weight: float = 0.0
    unknown_price_gap: float = 0.0

    def __post_init__(self) -> None:
        numbers = (self.slope, self.intercept, self.price_weight, self.unknown_price_gap)
        if not all(math.isfinite(x) for x in numbers) or self.slope <= 0:
            raise InvalidInput(f"a calibration needs finite numbers and a positive slope, got {numbers!r}")
        if self.price_weight < 0 or not 0.0 <= self.unknown_price_gap <= MAX_LOG_PRICE_GAP:
            raise InvalidInput(f"price_weight must be at least 0 and unknown_price_gap in [0, {MAX_LOG_PRICE_GAP:g}]")
        if not 0.0 <= self.threshold <= 1.0:
            raise InvalidInput(f"the match threshold is a confidence in [0, 1], got {self.threshold!r}")

    def confidence(self, score: float, gap: float | None = None) -> float:
        """The calibrated confidence of a content score and a log price gap (0 for no candidate)."""
        if not math.isfinite(score):
            return 0.0
        g = self.unknown_price_gap if gap is None else min(gap, MAX_LOG_PRICE_GAP)
        z = self.slope * score - self.price_weight * g + self.intercept
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclass(frozen=True, slots=True)
class Candidate:
    """The best own product for an offer and its scores; ``product_id`` is ``None`` when the
    catalog is empty (then ``score`` is ``-inf``)."""

    product_id: str | None
    score: float
    dense: float
    lexical: float


NO_CANDIDATE = Candidate(None, -math.inf, 0.0, 0.0)


@dataclass(frozen=True, slots=True)
class PriceGap:
    """The offer's price less the own product's, in the offer's currency, and in percent of
    the own price (``None`` when the own price is 0). Negative: the competitor is cheaper."""

    amount: float
    percent: float | None
    currency: str | None


@dataclass(frozen=True, slots=True)
class OfferMatch:
    """What ``offer-matches`` says about one offer."""

    offer: Offer
    candidate: Candidate
    confidence: float
    no_match: bool
    price_gap: PriceGap | None
    reasons: tuple[str, ...]

    @property
    def product_id(self) -> str | None:
        """The matched own product, ``None`` with ``no_match``."""
        return None if self.no_match else self.candidate.product_id


@dataclass(frozen=True, slots=True)
class OfferPublication:
    """A changed match (``match``) or a withdrawn offer's tombstone (``match is None``)."""

    key: str
    match: OfferMatch | None
    version: int


@dataclass(frozen=True, slots=True)
class PricePublication:
    """The competitors' matched offers of one own product (best confidence first), with the own
    price; no offers (or the product gone) is a tombstone."""

    product_id: str
    price: float | None
    currency: str | None
    offers: tuple[OfferMatch, ...]
    version: int


@dataclass
class OfferUpdate:
    """What one call changed: offer matches and competitor-price lists to publish."""

    matches: list[OfferPublication] = field(default_factory=list)
    prices: list[PricePublication] = field(default_factory=list)
    stale: int = 0

    def __bool__(self) -> bool:
        return bool(self.matches or self.prices)


# --- matching one offer ------------------------------------------------------------------------
def best_product(core: Recommender, vector: np.ndarray, lexical: SparseVec) -> Candidate:
    """The own product with the highest content score for an offer (ties by id); see the
    module docstring for why the bounded search is exact."""
    n = len(core.index)
    if n == 0:
        return NO_CANDIDATE
    config = core.config
    w_dense, w_ev, floor = blend(config)
    depth = max(1, config.candidate_depth)
    while True:
        found = core.index.query(vector, min(depth, n))
        lex_top = core.lexical_top(lexical, depth)
        ids = list(dict.fromkeys([*(pid for pid, _ in found), *(pid for pid, _ in lex_top)]))
        best = _best_of(core, vector, lexical, ids)
        if len(found) >= n:
            return best
        # A product outside both top lists has a dense score at most the last one found and a
        # lexical cosine at most the last one of the lexical top (or none, when fewer came).
        lex_bound = lex_top[-1][1] if len(lex_top) >= depth else 0.0
        bound = w_dense * found[-1][1] + w_ev * (lex_bound - floor if lex_bound > floor else 0.0)
        if best.score > bound + EPS:
            return best
        depth *= 4


def _best_of(core: Recommender, vector: np.ndarray, lexical: SparseVec, ids: Sequence[str]) -> Candidate:
    if not ids:
        return NO_CANDIDATE
    dense = dense_scores(vector, core.index.get_vectors(ids)).tolist()
    lex_vectors = core.lexical_vectors
    lex = cosine_many(lexical, [lex_vectors[pid] for pid in ids])
    return _arg_max(ids, dense, lex, core.config)


def _arg_max(ids: Sequence[str], dense: Sequence[float], lex: Sequence[float],
             config: RecommenderConfig) -> Candidate:
    """The best of these products (ties by id). Scores are rounded to ``SCORE_DIGITS``: BLAS may
    sum one pair's inner product in another order inside another matrix, and a last-bit
    difference must neither move a match nor republish an unchanged one."""
    best = NO_CANDIDATE
    for pid, raw_dense, lx in zip(ids, dense, lex, strict=True):
        d = round(raw_dense, SCORE_DIGITS)
        score = round(content_score(d, lx, config), SCORE_DIGITS)
        if best.product_id is None or score > best.score or (score == best.score and pid < best.product_id):
            best = Candidate(pid, score, d, lx)
    return best


def exact_offer_matches(
    products: Mapping[str, Product],
    product_vectors: Mapping[str, np.ndarray],
    offers: Mapping[str, Offer],
    offer_vectors: Mapping[str, np.ndarray],
    lexical: LexicalModel,
    config: RecommenderConfig,
) -> dict[str, Candidate]:
    """The from-scratch definition: for every offer, the arg-max of the content score over every
    product (dense on the unit vectors, lexical with ``lexical`` on both texts), ties by id."""
    ids = sorted(products)
    matrix = (normalize_rows(np.stack([product_vectors[pid] for pid in ids]), config.dim) if ids
              else np.zeros((0, config.dim), np.float32))
    product_lex = [lexical.vectorize(product_text(products[pid])) for pid in ids]
    out: dict[str, Candidate] = {}
    for key, offer in offers.items():
        qv = normalize_rows(np.asarray(offer_vectors[key]), config.dim)[0]
        dense = dense_scores(qv, matrix).tolist()
        lex = cosine_many(lexical.vectorize(offer.text), product_lex)
        out[key] = _arg_max(ids, dense, lex, config)
    return out


# --- reasons and price gaps ----------------------------------------------------------------------
def price_gap(offer: Offer, product: Product | None) -> PriceGap | None:
    """The offer's price against the own product's, when both are known in one currency
    (a missing currency on either side counts as the same)."""
    if product is None or offer.price is None or product.price is None:
        return None
    if offer.currency and product.currency and offer.currency != product.currency:
        return None
    amount = round(offer.price - product.price, 2)
    percent = round(amount / product.price * 100.0, 1) if product.price > 0 else None
    return PriceGap(amount, percent, offer.currency or product.currency)


def match_reasons(offer: Offer, product: Product | None, candidate: Candidate, confidence: float,
                  calibration: Calibration, gap: PriceGap | None) -> tuple[str, ...]:
    """Why an offer matches its best product (or does not), in words."""
    if product is None or candidate.product_id is None:
        return ("no own product to match yet",)
    out = [f"confidence {confidence:.2f}", f"dense {candidate.dense:.3f}", f"lexical {candidate.lexical:.3f}"]
    if offer.brand and product.brand and offer.brand.strip().casefold() == product.brand.strip().casefold():
        out.append("same brand")
    own_text = product_text(product)
    shared_codes = sorted(set(codes(offer.text)) & set(codes(own_text)))
    if shared_codes:
        out.append("model number: " + ", ".join(shared_codes[:MAX_REASON_WORDS]))
    own_words = words(own_text)
    shared = [w for w in words(offer.text) if w in own_words and (len(w) >= 3 or any(c.isdigit() for c in w))]
    if shared:
        out.append("words: " + ", ".join(shared[:MAX_REASON_WORDS]))
    if gap is not None and gap.percent is not None:
        side = "cheaper" if gap.amount < 0 else "dearer" if gap.amount > 0 else "the same price"
        out.append(f"competitor {abs(gap.percent):g}% {side}" if gap.amount else "same price")
    if confidence < calibration.threshold:
        out.append(f"no match: best candidate {candidate.product_id} below the threshold {calibration.threshold:.2f}")
    return tuple(out)


# --- the offer index -----------------------------------------------------------------------------
class OfferVectors:
    """The offers' index: their unit vectors in one growable float32 matrix, and beside each
    the content score of its current best product.

    A changed own product is scored against every offer at once (``scores``), exactly: that
    scan is what keeps re-matching exact, so no approximate index stands in for it. Inserts
    are amortised O(1) (the matrix doubles when full) and deletes move the last row into the
    gap, so a bulk of offers costs no more than its rows.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._keys: list[str] = []
        self._pos: dict[str, int] = {}
        self._mat = np.zeros((16, dim), dtype=np.float32)
        self._best = np.full(16, -math.inf)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._pos

    def upsert(self, key: str, vector: np.ndarray) -> None:
        """Store (or replace) an offer's vector; raises ``InvalidVector`` on a bad one."""
        row = normalize_rows(np.asarray(vector), self.dim)[0]
        pos = self._pos.get(key)
        if pos is None:
            pos = len(self._keys)
            if pos == self._mat.shape[0]:
                self._mat = np.concatenate([self._mat, np.zeros_like(self._mat)])
                self._best = np.concatenate([self._best, np.full(pos, -math.inf)])
            self._keys.append(key)
            self._pos[key] = pos
            self._best[pos] = -math.inf
        self._mat[pos] = row

    def delete(self, key: str) -> None:
        pos = self._pos.pop(key, None)
        if pos is None:
            return
        last = len(self._keys) - 1
        if pos != last:
            moved = self._keys[last]
            self._keys[pos], self._pos[moved] = moved, pos
            self._mat[pos], self._best[pos] = self._mat[last], self._best[last]
        self._keys.pop()

    def get(self, key: str) -> np.ndarray:
        """The offer's unit vector (``KeyError`` when absent)."""
        return self._mat[self._pos[key]].copy()

    def set_best(self, key: str, score: float) -> None:
        """Record the content score of the offer's best product (``-inf``: none)."""
        self._best[self._pos[key]] = score

    def scores(self, vector: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Every offer's key, its dense score with ``vector`` in float32 (within ``DENSE_SLACK``
        of the float64 one ``dense_scores`` gives: a float64 copy of the matrix per call
        cost more than the rest of a re-match), and its best score."""
        n = len(self._keys)
        dense = self._mat[:n] @ np.asarray(vector, dtype=np.float32)
        return list(self._keys), dense.astype(np.float64), self._best[:n].copy()

    def exact_dense(self, vector: np.ndarray, keys: Sequence[str]) -> np.ndarray:
        """``dense_scores`` of ``vector`` with these offers (float64)."""
        return dense_scores(vector, self._mat[[self._pos[k] for k in keys]])


# --- the matcher ---------------------------------------------------------------------------------
class OfferMatcher:
    """The offers, their index and matches, and the exact incremental re-matching (module doc)."""

    def __init__(self, calibration: Calibration, config: RecommenderConfig | None = None) -> None:
        self.calibration = calibration
        self.config = config or RecommenderConfig()
        self.offers: dict[str, Offer] = {}
        #: The offers' unit vectors: an index of their own, never the shop's.
        self.index = OfferVectors(self.config.dim)
        self.lex: dict[str, SparseVec] = {}
        #: The offers' lexical vectors by feature: a changed product's cosine with every offer.
        self.postings = LexicalPostings()
        self.matches: dict[str, OfferMatch] = {}
        #: own product -> offers whose best candidate it is (matched or not).
        self.by_candidate: dict[str, set[str]] = {}
        #: Last event time per offer key (deletes included), so reordered input is harmless.
        self.ts: dict[str, float] = {}
        self.versions: dict[str, int] = {}
        self.price_versions: dict[str, int] = {}
        #: product -> the offers last published on its competitor-prices list.
        self.prices: dict[str, tuple[OfferMatch, ...]] = {}
        self.stale_events = 0
        #: The IDF and the core the lexical vectors and matches were computed against.
        self._lexical: LexicalModel | None = None
        self._core: Recommender | None = None

    def __len__(self) -> int:
        return len(self.offers)

    def needs_embedding(self, offer: Offer) -> bool:
        """Whether ``offer`` needs a vector: it is new, or its text changed."""
        held = self.offers.get(offer.key)
        return held is None or held.text != offer.text or offer.key not in self.index

    def offers_of(self, product_id: str) -> tuple[OfferMatch, ...]:
        """The offers matched to an own product now, best confidence first (ties by key)."""
        keys = self.by_candidate.get(product_id, set())
        found = [self.matches[k] for k in keys if not self.matches[k].no_match]
        return tuple(sorted(found, key=lambda m: (-m.confidence, m.offer.key)))

    # ------------------------------------------------------------------ changes

    def apply(self, core: Recommender, changes: Iterable[tuple[OfferChange, np.ndarray | None]]) -> OfferUpdate:
        """Apply offer changes in order (a vector with every upsert that ``needs_embedding``)
        and say what to publish. An older ``ts`` than the one held is ignored and counted."""
        update = self.sync(core)
        touched: set[str] = set()
        for change, vector in changes:
            key = change.key
            if change.ts < self.ts.get(key, -math.inf):
                self.stale_events += 1
                update.stale += 1
                continue
            if isinstance(change, OfferDelete):
                self.ts[key] = change.ts
                if key in self.offers:
                    self._forget(key, touched)
                    update.matches.append(OfferPublication(key, None, self._next_version(key)))
                continue
            if self.needs_embedding(change):
                if vector is None:
                    raise InvalidInput(f"offer {key!r} is new or its text changed: pass its vector")
                self.index.upsert(key, vector)  # raises InvalidVector before anything changed
                self.lex[key] = core.lexical.vectorize(change.text)
                self.postings.mark(key)
            self.ts[key] = change.ts
            self.offers[key] = change
            self._rematch(core, key, update, touched)
        update.prices += self._price_publications(core, touched)
        return update

    def on_products_changed(self, core: Recommender, product_ids: Iterable[str]) -> OfferUpdate:
        """Re-match every offer whose match a change of these own products could move.

        An offer whose best product changed is searched again (``best_product``). An offer
        whose best product ``b`` did not change, but that a changed product may now beat
        (``_could_prefer``), needs no search: every other product still scores at most ``b``'s
        unchanged score, so its match is the best of ``b`` and the changed products.
        """
        update = self.sync(core)
        if not self.offers:
            return update
        changed = list(dict.fromkeys(product_ids))
        live = [pid for pid in changed if pid in core.catalog and pid in core.index]
        lost: set[str] = set()
        for pid in changed:
            lost |= self.by_candidate.get(pid, set())
        gained: set[str] = set()
        for pid in live:
            gained |= self._could_prefer(core, pid)
        touched: set[str] = set()
        for key in sorted(lost | gained):
            held = self.matches[key].candidate.product_id
            if key in lost or held is None:
                self._rematch(core, key, update, touched)
            else:
                pool = list(dict.fromkeys([held, *live]))
                self._settle(core, key, _best_of(core, self.index.get(key), self.lex[key], pool), update, touched)
        update.prices += self._price_publications(core, touched)
        return update

    def sync(self, core: Recommender) -> OfferUpdate:
        """After an IDF refit or a swapped core: re-vectorise the offers' lexical half and
        re-match every offer. Nothing to do (an empty update) otherwise."""
        update = OfferUpdate()
        if core.lexical is self._lexical and core is self._core:
            return update
        if core.lexical is not self._lexical:
            self.lex = {key: core.lexical.vectorize(offer.text) for key, offer in self.offers.items()}
            self.postings.reset()
            self._lexical = core.lexical
        self._core = core
        touched: set[str] = set()
        for key in sorted(self.offers):
            self._rematch(core, key, update, touched)
        update.prices += self._price_publications(core, touched)
        return update

    def use_vectors(self, core: Recommender, vectors: Mapping[str, np.ndarray]) -> OfferUpdate:
        """New vectors for every offer (a model rollover re-embedded them); re-match them all."""
        if set(vectors) != set(self.offers):
            raise InvalidInput("use_vectors needs one vector per held offer")
        for key, vector in vectors.items():
            self.index.upsert(key, vector)
        self._core = None  # forces the full re-match
        return self.sync(core)

    def seed_version(self, key: str, version: int) -> None:
        """Continue an offer's version counter from what ``offer-matches`` holds (a restore)."""
        self.versions[key] = max(self.versions.get(key, 0), version)

    def seed_price_version(self, product_id: str, version: int) -> None:
        """Continue a product's ``competitor-prices`` version counter (a restore)."""
        self.price_versions[product_id] = max(self.price_versions.get(product_id, 0), version)

    # ------------------------------------------------------------------ internals

    def _could_prefer(self, core: Recommender, pid: str) -> set[str]:
        """Offers for which ``pid`` scores at least their current best (less ``EPS``)."""
        w_dense, w_ev, floor = blend(core.config)
        pv = core.index.get_vectors([pid])[0]
        keys, dense, best = self.index.scores(pv)
        # A float32 dense score is a bound within DENSE_SLACK: offers far below their best are out.
        near = np.flatnonzero(w_dense * (dense + DENSE_SLACK) + w_ev * (1.0 - floor) >= best - EPS)
        if not near.size:
            return set()
        keys = [keys[i] for i in near.tolist()]
        dense, best = self.index.exact_dense(pv, keys), best[near]
        # The product's lexical cosine with every offer, from the offers' postings: bit for bit
        # what cosine_many gives, touching only the offers that share a feature with it.
        ids, built, marked = self.postings.scores(self.lex, core.lexical_vectors[pid])
        by_key = dict(zip(ids, built.tolist(), strict=True))
        by_key.update(marked)
        lex = np.fromiter((by_key.get(k, 0.0) for k in keys), dtype=np.float64, count=len(keys))
        # content_score, element-wise: the same float64 operations in the same order.
        content = w_dense * dense + w_ev * np.where(lex > floor, lex - floor, 0.0)
        return {keys[i] for i in np.flatnonzero(content >= best - EPS).tolist()}

    def _rematch(self, core: Recommender, key: str, update: OfferUpdate, touched: set[str]) -> None:
        self._settle(core, key, best_product(core, self.index.get(key), self.lex[key]), update, touched)

    def _settle(self, core: Recommender, key: str, candidate: Candidate, update: OfferUpdate,
                touched: set[str]) -> None:
        """Make ``candidate`` the offer's match; publish it when the match changed."""
        offer = self.offers[key]
        self.index.set_best(key, candidate.score)
        product = core.catalog.get(candidate.product_id) if candidate.product_id is not None else None
        confidence = self.calibration.confidence(candidate.score, log_price_gap(offer, product))
        no_match = candidate.product_id is None or confidence < self.calibration.threshold
        gap = price_gap(offer, product)
        match = OfferMatch(offer, candidate, confidence, no_match, gap,
                           match_reasons(offer, product, candidate, confidence, self.calibration, gap))
        old = self.matches.get(key)
        if old == match:
            return
        if old is not None and old.candidate.product_id is not None:
            self._unlink(old.candidate.product_id, key)
            touched.add(old.candidate.product_id)
        if candidate.product_id is not None:
            self.by_candidate.setdefault(candidate.product_id, set()).add(key)
            touched.add(candidate.product_id)
        self.matches[key] = match
        update.matches.append(OfferPublication(key, match, self._next_version(key)))

    def _forget(self, key: str, touched: set[str]) -> None:
        self.offers.pop(key)
        self.index.delete(key)
        self.lex.pop(key, None)
        self.postings.mark(key)
        old = self.matches.pop(key, None)
        if old is not None and old.candidate.product_id is not None:
            self._unlink(old.candidate.product_id, key)
            touched.add(old.candidate.product_id)

    def _unlink(self, pid: str, key: str) -> None:
        keys = self.by_candidate.get(pid)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_candidate[pid]

    def _next_version(self, key: str) -> int:
        self.versions[key] = self.versions.get(key, 0) + 1
        return self.versions[key]

    def _price_publications(self, core: Recommender, touched: Iterable[str]) -> list[PricePublication]:
        out: list[PricePublication] = []
        for pid in sorted(touched):
            offers = self.offers_of(pid)
            if offers == self.prices.get(pid, ()):
                continue
            if offers:
                self.prices[pid] = offers
            else:
                self.prices.pop(pid, None)
            self.price_versions[pid] = self.price_versions.get(pid, 0) + 1
            product = core.catalog.get(pid)
            out.append(PricePublication(pid, product.price if product else None,
                                        product.currency if product else None, offers, self.price_versions[pid]))
        return out
