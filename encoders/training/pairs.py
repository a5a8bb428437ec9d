"""Training pairs for fine-tuning the encoder on the shop's own signals, and their split by item.

Positive pairs come from three sources, each optional:

* **behaviour**: co-cart and co-purchase partners from a ``serving.behavior.BehaviorModel``
  (the live state, or one rebuilt by replaying ``user-events``), normalised and decayed
  exactly as the stream scores them, above ``min_score``;
* **group**: products that share a ``group_id`` (variants of one product);
* **labelled**: ``left_id,right_id`` rows of a CSV (e.g. known matches).

A pair is unordered; duplicates (across sources too) and self-pairs are dropped and
counted; a pair naming an id that is not in the catalog is counted and skipped, since
fine-tuning needs both texts.

**Holdout by item, never by pair.** Held-out items are chosen first and pairs follow them:
a training pair has neither end held out, a validation pair has both, and a pair that
straddles the split is dropped (counted). So no held-out item ever appears in a training
pair and the validation measures generalisation to unseen items, not to unseen pairings
of items the model was trained on. Items are held out together with their connected
component of the pair graph when it is small (matches of one product: nothing is dropped),
one by one inside a large component (a behaviour graph is often one giant component). The
choice is a keyed hash of the seed and the id, so it is stable when pairs are added.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.errors import InvalidInput

if TYPE_CHECKING:
    from serving.behavior import BehaviorModel
    from serving.catalog import Product

#: Behaviour channels that mean "bought or carted together" (views are too weak a signal).
BEHAVIOR_CHANNELS = ("cart", "purchase")
#: Components up to this many items are held out whole (see the module docstring).
MAX_WHOLE_COMPONENT = 50
#: A group of n variants gives every pair up to this many items, then a ring (n pairs).
MAX_GROUP_FULL = 10
PAIR_FILE_HEADER = ("left_id", "right_id", "source")


class NotEnoughPairs(InvalidInput):
    """Too few pairs (or items) to train or validate; the message says how many are needed."""


@dataclass(frozen=True, slots=True)
class Pair:
    """One positive pair, ``left < right`` so that a pair has one spelling; ``source`` names its origin."""

    left: str
    right: str
    source: str

    @staticmethod
    def of(a: str, b: str, source: str) -> Pair:
        """The pair of ``a`` and ``b`` in canonical order."""
        return Pair(a, b, source) if a <= b else Pair(b, a, source)

    @property
    def key(self) -> tuple[str, str]:
        return self.left, self.right


@dataclass
class PairStats:
    """What building the pairs kept and skipped, per source."""

    candidates: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    unknown_ids: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    self_pairs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidates": dict(sorted(self.candidates.items())),
            "kept": dict(sorted(self.kept.items())),
            "unknown_ids": dict(sorted(self.unknown_ids.items())),
            "duplicates": self.duplicates,
            "self_pairs": self.self_pairs,
        }


@dataclass(frozen=True)
class PairLabel:
    """One ``product-labels`` record: ``positive`` says whether the two are a match."""

    left_id: str
    right_id: str
    positive: bool
    ts: float

    @property
    def key(self) -> tuple[str, str]:
        return (min(self.left_id, self.right_id), max(self.left_id, self.right_id))


class PairBuilder:
    """Collects candidate pairs from any number of sources against one set of known ids."""

    def __init__(self, known_ids: Iterable[str]) -> None:
        self.known = set(known_ids)
        self.stats = PairStats()
        self._pairs: dict[tuple[str, str], Pair] = {}

    def add(self, a: str, b: str, source: str) -> bool:
        """Add one candidate; False (and counted) when unknown, a self-pair or a duplicate."""
        self.stats.candidates[source] += 1
        if a not in self.known or b not in self.known:
            self.stats.unknown_ids[source] += 1
            return False
        if a == b:
            self.stats.self_pairs += 1
            return False
        pair = Pair.of(a, b, source)
        if pair.key in self._pairs:
            self.stats.duplicates += 1
            return False
        self._pairs[pair.key] = pair
        self.stats.kept[source] += 1
        return True

    def add_all(self, pairs: Iterable[tuple[str, str]], source: str) -> None:
        for a, b in pairs:
            self.add(a, b, source)

    @property
    def pairs(self) -> list[Pair]:
        """Every kept pair, sorted (the output order does not depend on the input order)."""
        return sorted(self._pairs.values(), key=lambda p: p.key)


# --- sources ---------------------------------------------------------------------------------
def behavior_pairs(model: BehaviorModel, items: Iterable[str], *, channels: Sequence[str] = BEHAVIOR_CHANNELS,
                   min_score: float = 0.1, per_item: int = 10) -> list[tuple[str, str]]:
    """Co-cart / co-purchase partners of ``items`` scoring at least ``min_score`` (at most ``per_item`` each).

    Scores are the model's normalised per-channel similarity (cosine over sessions, shrunk
    for rare pairs), so one shopper who carts two items once does not make them a pair.
    """
    out: list[tuple[str, str]] = []
    for item in sorted(set(items)):
        for channel in channels:
            for partner, score in model.partners(item, channel, k=per_item):
                if score >= min_score:
                    out.append((item, partner))
    return out


def group_pairs(products: Iterable[Product], *, max_full: int = MAX_GROUP_FULL) -> list[tuple[str, str]]:
    """Products sharing a ``group_id``: every pair in a small group, a ring in a large one (n pairs, not n²)."""
    groups: dict[str, list[str]] = {}
    for p in products:
        if p.group_id:
            groups.setdefault(p.group_id, []).append(p.product_id)
    out: list[tuple[str, str]] = []
    for members in groups.values():
        ids = sorted(set(members))
        if len(ids) < 2:
            continue
        if len(ids) <= max_full:
            out.extend((a, b) for i, a in enumerate(ids) for b in ids[i + 1 :])
        else:
            out.extend((ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids)))
    return out


def read_labelled_csv(path: Path) -> list[tuple[str, str]]:
    """``left_id,right_id`` rows (header required; other columns ignored; blank ids skipped)."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"left_id", "right_id"} <= set(reader.fieldnames):
            raise InvalidInput(f"{path}: a labelled pair CSV needs the header 'left_id,right_id'")
        rows = [((r["left_id"] or "").strip(), (r["right_id"] or "").strip()) for r in reader]
    return [(a, b) for a, b in rows if a and b]


# --- the split by item ------------------------------------------------------------------------
def _unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from the seed and a key: stable across runs and input orders."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _components(pairs: Iterable[Pair]) -> dict[str, str]:
    """Item -> smallest id of its connected component (union-find with path halving)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = find(p.left), find(p.right)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root is the component's smallest id
    return {x: find(x) for x in parent}


@dataclass(frozen=True)
class PairSplit:
    """Training and validation pairs with disjoint items; ``held_out`` is every held-out item."""

    train: list[Pair]
    valid: list[Pair]
    held_out: frozenset[str]
    dropped: int

    def as_dict(self) -> dict[str, int]:
        return {
            "train_pairs": len(self.train),
            "valid_pairs": len(self.valid),
            "held_out_items": len(self.held_out),
            "dropped_straddling": self.dropped,
        }


def split_by_item(pairs: Sequence[Pair], holdout: float, seed: int = 0, *,
                  max_whole_component: int = MAX_WHOLE_COMPONENT) -> PairSplit:
    """Hold out about ``holdout`` of the items (see the module docstring); pairs follow their items."""
    if not 0.0 <= holdout < 1.0:
        raise InvalidInput(f"holdout is a share of the items in [0, 1), got {holdout}")
    root = _components(pairs)
    sizes = Counter(root.values())
    held = frozenset(
        item for item, r in root.items()
        if _unit_hash(seed, r if sizes[r] <= max_whole_component else "item:" + item) < holdout
    )
    train, valid, dropped = [], [], 0
    for p in pairs:
        a, b = p.left in held, p.right in held
        if a and b:
            valid.append(p)
        elif not a and not b:
            train.append(p)
        else:
            dropped += 1
    return PairSplit(train, valid, held, dropped)


# --- files -------------------------------------------------------------------------------------
TRAIN_FILE = "train.csv"
VALID_FILE = "valid.csv"
TEXTS_FILE = "texts.jsonl"
SUMMARY_FILE = "summary.json"


def write_pairs(path: Path, pairs: Iterable[Pair]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PAIR_FILE_HEADER)
        for p in pairs:
            writer.writerow([p.left, p.right, p.source])


def read_pairs(path: Path) -> list[Pair]:
    """Pairs written by ``write_pairs`` (``source`` optional, so a labelled CSV reads too)."""
    if not path.is_file():
        raise InvalidInput(f"{path} does not exist; run `simstream train-pairs --out {path.parent}` first")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"left_id", "right_id"} <= set(reader.fieldnames):
            raise InvalidInput(f"{path}: a pair file needs the header 'left_id,right_id[,source]'")
        return [Pair.of(r["left_id"], r["right_id"], r.get("source") or "file")
                for r in reader if r["left_id"] and r["right_id"]]


def write_texts(path: Path, texts: Mapping[str, str]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for product_id in sorted(texts):
            handle.write(json.dumps({"product_id": product_id, "text": texts[product_id]}, ensure_ascii=False) + "\n")


def read_texts(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise InvalidInput(f"{path} does not exist; run `simstream train-pairs --out {path.parent}` first")
    out: dict[str, str] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["product_id"])] = str(row["text"])
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidInput(f"{path}:{number}: expected {{\"product_id\", \"text\"}}: {exc}") from exc
    return out


@dataclass(frozen=True)
class PairSet:
    """A pairs folder: training and validation pairs plus the text of every item they name."""

    train: list[Pair]
    valid: list[Pair]
    texts: dict[str, str]


def save_pair_set(out_dir: Path, split: PairSplit, texts: Mapping[str, str], summary: Mapping[str, Any]) -> None:
    """Write train.csv, valid.csv, texts.jsonl (only the items pairs name) and summary.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_pairs(out_dir / TRAIN_FILE, split.train)
    write_pairs(out_dir / VALID_FILE, split.valid)
    named = {i for p in [*split.train, *split.valid] for i in p.key}
    write_texts(out_dir / TEXTS_FILE, {i: texts[i] for i in named})
    (out_dir / SUMMARY_FILE).write_text(json.dumps(dict(summary), indent=1) + "\n", encoding="utf-8")


def load_pair_set(pairs_dir: Path) -> tuple[PairSet, int]:
    """Read a pairs folder; pairs naming an id with no text are skipped. Returns (pairs, skipped)."""
    if not pairs_dir.is_dir():
        raise InvalidInput(f"{pairs_dir} is not a folder; pass the --out folder of `simstream train-pairs`")
    texts = read_texts(pairs_dir / TEXTS_FILE)
    train = read_pairs(pairs_dir / TRAIN_FILE)
    valid_path = pairs_dir / VALID_FILE
    valid = read_pairs(valid_path) if valid_path.is_file() else []
    ok_train = [p for p in train if p.left in texts and p.right in texts]
    ok_valid = [p for p in valid if p.left in texts and p.right in texts]
    skipped = len(train) - len(ok_train) + len(valid) - len(ok_valid)
    return PairSet(ok_train, ok_valid, texts), skipped
