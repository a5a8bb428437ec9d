"""Snapshots of a ``Recommender``: checksummed, atomic, and free of pickle.

Layout under the snapshot root directory::

    CURRENT                    name of the latest complete snapshot (replaced atomically)
    snap-<unix ms>-<rand>/     one complete snapshot
        manifest.json          format, index kind, dim, offsets, sha256 + size of every file
        catalog.json           products, delete timestamps, stale/unknown-delete counters
        state.json             product id table, versions, counters, lexical document count
        buf_*.npy              candidate buffers (owner, members, dense and lexical scores)
        lex_*.npy, idf.npy     lexical vectors of every product and the frozen IDF
        list_*.npy             the current lists of every kind (items, score parts, reason tuple)
        list_known_*.npy       what each duplicates list keeps beyond its cap, and whether
                               that is all of its duplicates (``serving.duplicates.Known``)
        list_reason_sets.json  the distinct reason tuples those lists use, as indices into
        list_reasons.json      the reason strings, once each
        index.bin(.meta.json)  the vector index in its own format (hnswlib or .npy); with
                               hnswlib, index.bin.vectors.npy holds each node's vector

A save writes a hidden temporary directory, fsyncs it, renames it to ``snap-...``, and only
then points ``CURRENT`` at it; the previous snapshot is kept until the new one is complete
(one previous snapshot is kept after that, the older ones are pruned). A load verifies
every checksum before parsing anything and builds a new ``Recommender``, so a corrupt or
truncated file raises ``SnapshotError`` and never yields a half-loaded state.

The lists are stored, so a load need not recompute every one of them (at 100k products
that was most of a 40 s load): it recomputes a random sample from the saved candidate
buffers and takes the lists over only when the sample matches exactly (``ListsDiffer``, a
``SnapshotError``, otherwise: the worker then rebuilds from the topics). The duplicates kept
beyond each list's cap are checked the same way (each list must be their head, and on the
sample they must be an exact prefix of the recomputed ranking); a snapshot written before
they were saved loads without them, and each full list searches again the first time one
of its listings leaves. The checksums cover the rest. The reverse map is derived state, rebuilt from the buffers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from serving.behavior import BehaviorRow
from serving.candidates import BufferColumns, CandidateBuffer
from serving.catalog import Catalog, Product
from serving.config import RecommenderConfig
from serving.errors import InvalidInput, SnapshotError
from serving.index import (
    INDEX_ADAPTERS,
    VectorIndex,
    atomic_write_bytes,
    create_index,
    index_name,
    offsets_from_json,
    offsets_to_json,
    sha256_file,
)
from serving.kinds import Kind
from serving.lexical import LEGACY_SCHEME, SCHEME, LexicalModel, SparseVec
from serving.publication import Items, ScoredItem
from serving.scoring import intern_reasons
from serving.state import RecommenderState

FORMAT = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
INDEX_FILE = "index.bin"
KEEP_PREVIOUS = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_snapshot(state: RecommenderState, config: RecommenderConfig, root: Path) -> Path:
    """Write ``state`` (``Recommender.export_state``) under ``root``; return the new snapshot directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _write_files(state, config, tmp)
        final = root / f"snap-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_bytes(root / CURRENT, final.name.encode("utf-8"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep=final.name)
    return final


class ChildSave:
    """A snapshot being written by a forked child (``save_in_child``); ``wait`` for its path."""

    def __init__(self, pid: int, reader: int) -> None:
        self.pid = pid
        self._reader = reader
        self._result: Path | SnapshotError | None = None

    def wait(self) -> Path:
        """Block until the child is done; its snapshot directory, or ``SnapshotError`` with
        the child's one-line reason."""
        if self._result is None:
            chunks = []
            while chunk := os.read(self._reader, 65536):
                chunks.append(chunk)
            os.close(self._reader)
            _, status = os.waitpid(self.pid, 0)
            message = b"".join(chunks).decode("utf-8", errors="replace")
            if os.waitstatus_to_exitcode(status) == 0 and message.startswith("ok "):
                self._result = Path(message[3:])
            else:
                self._result = SnapshotError(message.removeprefix("error: ") or f"snapshot child exited with {status}")
        if isinstance(self._result, SnapshotError):
            raise self._result
        return self._result


def save_in_child(save: Callable[[], Path]) -> ChildSave:
    """Run ``save`` in a forked child and return at once (what Redis does for BGSAVE).

    The child sees the process's memory as it was at the fork, copy-on-write, so the caller
    may change its state right away: the snapshot is of the instant of the fork, and the
    caller pauses only for the fork itself (page tables: tens of ms for GBs), not for the
    write. Memory grows by the pages the caller touches while the child writes. The child
    touches no lock, thread or socket of the parent's beyond what ``save`` does, and ends
    with ``os._exit`` so no exit handler or buffered output of the parent runs twice.
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(reader)
            try:
                message = f"ok {save()}"
                code = 0
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, whatever it is
                message = f"error: {type(exc).__name__}: {exc}".replace("\n", " ")
            os.write(writer, message.encode("utf-8")[:65536])
        finally:
            os._exit(code)
    os.close(writer)
    return ChildSave(pid, reader)


def _prune(root: Path, keep: str) -> None:
    snaps = sorted(p for p in root.glob("snap-*") if p.is_dir() and p.name != keep)
    for old in snaps[: max(0, len(snaps) - KEEP_PREVIOUS)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale_tmp in root.glob(".tmp-*"):
        # Left by a crash during an earlier save; never referenced by CURRENT.
        if stale_tmp.is_dir() and time.time() - stale_tmp.stat().st_mtime > 3600:
            shutil.rmtree(stale_tmp, ignore_errors=True)


def _write_files(state: RecommenderState, config: RecommenderConfig, out: Path) -> None:
    # Each file is written as soon as it is built and the buffers are filled into preallocated
    # arrays: holding every file at once (and the scores as lists of Python floats) made a
    # snapshot of 20k products a +200 MB spike in the worker's memory.
    products = sorted(state.catalog, key=lambda p: p.product_id)
    ids = [p.product_id for p in products]
    pos = {pid: i for i, pid in enumerate(ids)}

    def write(name: str, data: bytes | np.ndarray) -> None:
        if isinstance(data, np.ndarray):
            with open(out / name, "wb") as fh:  # straight to the file: no in-memory copy
                np.save(fh, data, allow_pickle=False)
        else:
            (out / name).write_bytes(data)

    write("catalog.json", json.dumps(
        {
            "products": [asdict(p) for p in products],
            "deleted_at": state.catalog.deletions(),
            "stale_events": state.catalog.stale_events,
            "unknown_deletes": state.catalog.unknown_deletes,
        },
        sort_keys=True,
    ).encode("utf-8"))
    del products

    buffers = state.buffers
    owners = sorted(buffers)
    indptr = np.zeros(len(owners) + 1, dtype=np.int64)
    for i, owner in enumerate(owners):
        indptr[i + 1] = indptr[i] + len(buffers[owner])
    total = int(indptr[-1])
    cand = np.empty(total, dtype=np.int32)
    dense = np.empty(total, dtype=np.float64)
    lexical = np.empty(total, dtype=np.float64)
    at = 0
    for owner in owners:
        buf = buffers[owner]
        size = len(buf)
        cand[at : at + size] = [pos[c] for c in buf.ids]
        dense[at : at + size] = buf.neg
        lexical[at : at + size] = buf.lex
        at += size
    write("buf_owner.npy", np.array([pos[o] for o in owners], dtype=np.int32))
    write("buf_indptr.npy", indptr)
    write("buf_cand.npy", cand)
    np.negative(dense, out=dense)  # the buffers hold negated dense scores
    write("buf_dense.npy", dense)
    write("buf_lex.npy", lexical)
    write("buf_complete.npy", np.array([buffers[o].complete for o in owners], dtype=np.bool_))
    del cand, dense, lexical

    lex = state.lexical_vectors
    lex_ptr = np.zeros(len(ids) + 1, dtype=np.int64)
    for i, pid in enumerate(ids):
        lex_ptr[i + 1] = lex_ptr[i] + len(lex[pid][0])
    write("lex_indptr.npy", lex_ptr)
    write("lex_indices.npy",
          np.concatenate([lex[pid][0] for pid in ids], dtype=np.int32) if ids else np.zeros(0, np.int32))
    write("lex_values.npy",
          np.concatenate([lex[pid][1] for pid in ids], dtype=np.float32) if ids else np.zeros(0, np.float32))
    if state.lexical.idf is not None:
        write("idf.npy", state.lexical.idf)

    write("behavior.json", json.dumps(
        {
            pid: {"partners": [list(t) for t in row.partners], "complements": [list(t) for t in row.complements]}
            for pid, row in sorted(state.behavior.items())
        },
        sort_keys=True,
    ).encode("utf-8"))

    if state.lists is not None:
        _write_lists(state.lists, pos, write, state.duplicates_known)

    write("state.json", json.dumps(
        {
            "ids": ids,
            "versions": [[str(kind), pid, v] for (kind, pid), v in sorted(state.versions.items())],
            "publications": state.publications,
            "refills": state.refills,
            "lexical_docs": state.lexical.n_docs,
            "lexical_scheme": state.lexical.scheme,
        },
        sort_keys=True,
    ).encode("utf-8"))

    state.index.save(out / INDEX_FILE, state.offsets)

    manifest = {
        "format": FORMAT,
        "created_at": time.time(),
        "index_kind": index_name(state.index),
        "dim": config.dim,
        "offsets": offsets_to_json(state.offsets),
        "files": {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(out.iterdir())
            if p.is_file()
        },
    }
    for p in out.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8"))


#: The score parts of a list item, in the order a snapshot stores them.
_ITEM_FLOATS = ("score", "content", "dense", "lexical", "behavior")


#: The group of list files holding what each duplicates list keeps beyond what it shows.
_KNOWN = "known"


def _write_lists(
    lists: Mapping[Kind, Mapping[str, Items]], pos: Mapping[str, int], write: Callable[[str, Any], None],
    known: Mapping[str, tuple[Items, bool]] | None = None,
) -> None:
    """Every current list, so a load need not recompute them: per kind, the owners, their
    items (product positions, score parts) and their reasons (an index into one table of
    distinct reason tuples, each a list of indices into one table of reason strings); and the
    duplicates each list keeps (``known``), in the same layout, with their flags.

    A few thousand distinct reason tuples stand for millions of items, so a load builds each
    tuple once and the items by the column (``_read_group``)."""
    table: dict[str, int] = {}
    sets: dict[tuple[str, ...], int] = {}
    groups: dict[str, Mapping[str, Items]] = {str(kind): lists[kind] for kind in sorted(lists)}
    if known is not None:
        groups[_KNOWN] = {pid: items for pid, (items, _) in known.items()}
        write(f"list_{_KNOWN}_complete.npy", np.array([known[p][1] for p in sorted(known)], dtype=np.bool_))
    for kind, group in groups.items():
        owners = sorted(group)
        indptr = np.zeros(len(owners) + 1, dtype=np.int64)
        items: list[ScoredItem] = []
        for i, owner in enumerate(owners):
            items.extend(group[owner])
            indptr[i + 1] = len(items)
        write(f"list_{kind}_owner.npy", np.array([pos[o] for o in owners], dtype=np.int32))
        write(f"list_{kind}_indptr.npy", indptr)
        write(f"list_{kind}_item.npy", np.array([pos[i.product_id] for i in items], dtype=np.int32))
        write(f"list_{kind}_scores.npy", np.array(
            [getattr(i, f) for i in items for f in _ITEM_FLOATS], dtype=np.float64))
        write(f"list_{kind}_reason_set.npy",
              np.array([sets.setdefault(i.reasons, len(sets)) for i in items], dtype=np.int32))
    for reasons in sets:
        for r in reasons:
            table.setdefault(r, len(table))
    write("list_reason_sets.json", json.dumps([[table[r] for r in reasons] for reasons in sets]).encode("utf-8"))
    write("list_reasons.json", json.dumps(sorted(table, key=table.__getitem__)).encode("utf-8"))


def _read_lists(
    snap: Path, files: Mapping[str, Any], id_of: np.ndarray
) -> tuple[dict[Kind, dict[str, Items]] | None, dict[str, tuple[Items, bool]] | None]:
    """The lists ``_write_lists`` stored and the duplicates kept beyond them, each ``None``
    where the snapshot holds none (the kept duplicates are newer than the lists). ``id_of``:
    the product id table, as an object array."""
    if "list_reason_sets.json" not in files:
        # None stored, or stored by a version that kept each item's reasons (before
        # 2026-12): the lists are recomputed, once, and the next snapshot stores them.
        return None, None
    table = [sys.intern(str(r)) for r in json.loads((snap / "list_reasons.json").read_text("utf-8"))]
    sets = [intern_reasons(tuple(table[r] for r in reasons))
            for reasons in json.loads((snap / "list_reason_sets.json").read_text("utf-8"))]
    # Each item is one object wherever it stands for the same thing: a substitute is usually
    # the very item of the owner's similar-items list (a live build shares it), and the
    # duplicates shown are the first of those kept.
    groups: dict[str, _Group | None] = {}
    for kind in [*map(str, Kind), _KNOWN]:  # each group after the one it shares with
        like = groups.get(_SHARES_WITH.get(kind, ""))
        groups[kind] = _read_group(snap, files, id_of, kind, sets, like=like)
    lists = {kind: group.lists for kind in Kind if (group := groups[str(kind)]) is not None}
    known = groups[_KNOWN]
    if known is None:
        return lists, None
    kept = known.lists
    complete = _npy(snap, f"list_{_KNOWN}_complete.npy", np.bool_).tolist()
    if len(complete) != len(kept):
        raise _fail(snap, "the kept duplicates and their flags do not match")
    return lists, {pid: (kept[pid], bool(flag)) for pid, flag in zip(sorted(kept), complete, strict=True)}


_tuple_new = tuple.__new__
#: Where a group's items usually are the same objects as another group's.
_SHARES_WITH = {str(Kind.SUBSTITUTES): str(Kind.SIMILAR), _KNOWN: str(Kind.DUPLICATES)}


@dataclass(frozen=True)
class _Group:
    """One group of lists as read: the lists, and per item (in stored order) the item, its
    (owner, product) code, its floats and its reason set, to find the same item in another
    group."""

    lists: dict[str, Items]
    items: np.ndarray  # object: the ScoredItems
    codes: np.ndarray  # int64, owner row * products + item row
    scores: np.ndarray  # float64 [n, len(_ITEM_FLOATS)]
    reason_set: np.ndarray


def _read_group(snap: Path, files: Mapping[str, Any], id_of: np.ndarray, kind: str,
                sets: list[tuple[str, ...]], like: _Group | None = None) -> _Group | None:
    """One group of lists ``_write_lists`` stored (a kind, or the kept duplicates); ``sets``
    is the table of reason tuples its items index. An item equal to ``like``'s item of the
    same owner and product (same floats, same reasons) is that very object."""
    if f"list_{kind}_owner.npy" not in files:
        return None
    owner = _npy(snap, f"list_{kind}_owner.npy", np.int32)
    indptr_arr = _npy(snap, f"list_{kind}_indptr.npy", np.int64)
    indptr = indptr_arr.tolist()
    item = _npy(snap, f"list_{kind}_item.npy", np.int32)
    scores = _npy(snap, f"list_{kind}_scores.npy", np.float64)
    reason_set = _npy(snap, f"list_{kind}_reason_set.npy", np.int32)
    n = len(item)
    if (len(indptr) != len(owner) + 1 or indptr[-1] != n or len(scores) != n * len(_ITEM_FLOATS)
            or len(reason_set) != n):
        raise _fail(snap, f"the stored {kind} lists do not match each other")
    if n and not (int(reason_set.min()) >= 0 and int(reason_set.max()) < len(sets)
                  and int(item.min()) >= 0 and int(item.max()) < len(id_of)
                  and int(owner.min()) >= 0 and int(owner.max()) < len(id_of)
                  and bool((np.diff(indptr_arr) >= 0).all())):
        raise _fail(snap, f"the stored {kind} lists name products or reasons that do not exist")
    scores = scores.reshape(n, len(_ITEM_FLOATS))
    codes = np.repeat(owner.astype(np.int64), np.diff(indptr_arr)) * len(id_of) + item
    made = np.empty(n, dtype=object)
    fresh = np.ones(n, dtype=bool)
    if like is not None and n and len(like.codes):
        order = np.argsort(like.codes, kind="stable")
        at = np.minimum(np.searchsorted(like.codes, codes, sorter=order), len(order) - 1)
        source = order[at]
        same = ((like.codes[source] == codes) & (like.reason_set[source] == reason_set)
                & (like.scores[source] == scores).all(axis=1))
        made[same] = like.items[source[same]]
        fresh = ~same
    rows = np.flatnonzero(fresh)
    reasons = list(map(sets.__getitem__, reason_set[rows].tolist()))
    columns = scores[rows].T.tolist()
    behavior = scores[rows, _ITEM_FLOATS.index("behavior")]
    if not behavior.any() and not np.signbit(behavior).any():
        columns[_ITEM_FLOATS.index("behavior")] = [0.0] * len(rows)  # one float object, not one per item
    # tuple.__new__ on zip's tuples: ScoredItem's own __new__ is a Python call per item.
    made[rows] = np.fromiter(map(_tuple_new, repeat(ScoredItem), zip(id_of[item[rows]].tolist(), *columns, reasons,
                                                                   strict=True)), dtype=object, count=len(rows))
    listed = made.tolist()
    names = id_of[owner].tolist()
    lists = {name: tuple(listed[indptr[j] : indptr[j + 1]]) for j, name in enumerate(names)}
    return _Group(lists, made, codes, scores, reason_set)


def _fail(snap: Path, what: str) -> SnapshotError:
    return SnapshotError(
        f"snapshot {snap} is unusable: {what}. Load an earlier snapshot from the same directory, "
        "or start empty and replay the compacted topics from offset 0"
    )


def resolve_snapshot(root: Path) -> Path:
    """The directory ``CURRENT`` names (or ``root`` itself when it is a snapshot directory)."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return root
    try:
        name = (root / CURRENT).read_text("utf-8").strip()
    except OSError as exc:
        raise SnapshotError(f"no snapshot under {root}: {CURRENT} cannot be read ({exc})") from exc
    if not name.startswith("snap-") or "/" in name or not (root / name).is_dir():
        raise SnapshotError(f"{root / CURRENT} names {name!r}, which is not a snapshot directory")
    return root / name


def _verify(snap: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((snap / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(snap, f"{MANIFEST} is missing or corrupt ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(snap, f"{MANIFEST} is not format {FORMAT}")
    files = manifest.get("files")
    if not isinstance(files, dict) or INDEX_FILE not in files or "catalog.json" not in files:
        raise _fail(snap, f"{MANIFEST} lists no files")
    for name, entry in files.items():
        path = snap / name
        if "/" in name or not path.is_file():
            raise _fail(snap, f"file {name} is missing")
        if path.stat().st_size != entry.get("bytes"):
            raise _fail(snap, f"file {name} is truncated or has the wrong size")
        if sha256_file(path) != entry.get("sha256"):
            raise _fail(snap, f"file {name} does not match its sha256 checksum")
    return manifest


def _npy(snap: Path, name: str, dtype: Any) -> np.ndarray:
    try:
        arr = np.load(snap / name, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _fail(snap, f"{name} cannot be read ({exc})") from exc
    if arr.dtype != dtype or arr.ndim != 1:
        raise _fail(snap, f"{name} has dtype {arr.dtype}, expected a 1-D {np.dtype(dtype)}")
    return arr


def _product(raw: dict[str, Any]) -> Product:
    raw = dict(raw)
    raw["category"] = tuple(raw.get("category") or ())
    raw["attributes"] = tuple((str(k), str(v)) for k, v in raw.get("attributes") or ())
    return Product(**raw)


def load_snapshot(root: Path, config: RecommenderConfig) -> RecommenderState:
    """Read the snapshot ``root`` points at (``Recommender.from_state`` builds the core).

    Raises ``SnapshotError`` on any missing, corrupt or
    inconsistent file; nothing is returned half-built.
    """
    snap = resolve_snapshot(Path(root))
    manifest = _verify(snap)
    if manifest.get("dim") != config.dim:
        raise _fail(snap, f"its dimension {manifest.get('dim')} differs from the configured {config.dim}")
    kind = manifest.get("index_kind")
    if not isinstance(kind, str) or kind not in INDEX_ADAPTERS:
        raise _fail(snap, f"unknown index kind {kind!r}")
    index = create_index(kind, config)
    try:
        return _build(snap, manifest, config, index)
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, AssertionError) as exc:
        raise _fail(snap, f"inconsistent content ({type(exc).__name__}: {exc})") from exc


def _build(
    snap: Path,
    manifest: dict[str, Any],
    config: RecommenderConfig,
    index: VectorIndex,
) -> RecommenderState:
    offsets = offsets_from_json(manifest.get("offsets", {}))
    index.load(snap / INDEX_FILE, checked=True)  # _verify hashed every file the manifest names
    catalog_raw = json.loads((snap / "catalog.json").read_text("utf-8"))
    state = json.loads((snap / "state.json").read_text("utf-8"))
    ids: list[str] = [str(i) for i in state["ids"]]

    catalog = Catalog()
    for raw in catalog_raw["products"]:
        catalog.restore(_product(raw))
    catalog.restore_deletions({str(k): float(v) for k, v in catalog_raw["deleted_at"].items()})
    catalog.stale_events = int(catalog_raw["stale_events"])
    catalog.unknown_deletes = int(catalog_raw["unknown_deletes"])
    if sorted(p.product_id for p in catalog) != ids or sorted(index.ids()) != ids:
        raise _fail(snap, "catalog, index and state name different products")

    # The stored lexical vectors and IDF belong to the transform that wrote them: a snapshot of
    # another scheme (an older version's) is not used, the topics rebuild every vector.
    scheme = state.get("lexical_scheme", LEGACY_SCHEME)
    if scheme != SCHEME:
        raise _fail(snap, f"its lexical vectors are of scheme {scheme}, this version uses {SCHEME}")
    idf_path = snap / "idf.npy"
    idf = None
    if "idf.npy" in manifest["files"]:
        idf = np.load(idf_path, allow_pickle=False)
    lexical = LexicalModel(idf, int(state.get("lexical_docs", 0)))

    lex_ptr = _npy(snap, "lex_indptr.npy", np.int64)
    lex_idx = _npy(snap, "lex_indices.npy", np.int32)
    lex_val = _npy(snap, "lex_values.npy", np.float32)
    if len(lex_ptr) != len(ids) + 1 or lex_ptr[-1] != len(lex_idx) or len(lex_idx) != len(lex_val):
        raise _fail(snap, "lexical arrays do not match the product table")
    lexical_vectors: dict[str, SparseVec] = {}
    for i, pid in enumerate(ids):
        a, b = int(lex_ptr[i]), int(lex_ptr[i + 1])
        lexical_vectors[pid] = (lex_idx[a:b].copy(), lex_val[a:b].copy())

    owner = _npy(snap, "buf_owner.npy", np.int32)
    indptr = _npy(snap, "buf_indptr.npy", np.int64)
    cand = _npy(snap, "buf_cand.npy", np.int32)
    dense = _npy(snap, "buf_dense.npy", np.float64)
    lex = _npy(snap, "buf_lex.npy", np.float64)
    complete = _npy(snap, "buf_complete.npy", np.bool_)
    if (
        len(indptr) != len(owner) + 1
        or len(complete) != len(owner)
        or indptr[-1] != len(cand)
        or not len(cand) == len(dense) == len(lex)
    ):
        raise _fail(snap, "candidate buffer arrays do not match each other")
    if len(cand) and not (int(cand.min()) >= 0 and int(cand.max()) < len(ids)):
        raise _fail(snap, "the candidate buffers name products that do not exist")
    id_of = np.array(ids, dtype=object)
    cand_ids = id_of[cand].tolist()
    neg = np.negative(dense)
    bounds = indptr.tolist()
    buffers: dict[str, CandidateBuffer] = {}
    for j, (name, done) in enumerate(zip(id_of[owner].tolist(), complete.tolist(), strict=True)):
        a, b = bounds[j], bounds[j + 1]
        buffers[name] = CandidateBuffer.restored(cand_ids[a:b], neg[a:b], lex[a:b], done)
    behavior: dict[str, BehaviorRow] = {}
    if "behavior.json" in manifest["files"]:  # absent in snapshots written before behaviour existed
        try:
            for pid, raw in json.loads((snap / "behavior.json").read_text("utf-8")).items():
                row = BehaviorRow(
                    partners=tuple((str(c), float(v)) for c, v in raw["partners"]),
                    complements=tuple((str(c), float(v)) for c, v in raw["complements"]),
                )
                row.validate(pid)
                behavior[pid] = row
        except (KeyError, TypeError, ValueError, InvalidInput) as exc:
            raise _fail(snap, f"behaviour rows are malformed ({exc})") from exc
    lists, duplicates_known = _read_lists(snap, manifest["files"], id_of)
    kinds = {str(kind): kind for kind in Kind}  # a lookup per version, not an Enum call
    restored = RecommenderState(
        index=index,
        catalog=catalog,
        lexical=lexical,
        lexical_vectors=lexical_vectors,
        buffers=buffers,
        behavior=behavior,
        versions={(kinds[k], str(pid)): int(v) for k, pid, v in state["versions"]},
        offsets=offsets,
        publications=int(state.get("publications", 0)),
        refills=int(state.get("refills", 0)),
        lists=lists,
        duplicates_known=duplicates_known,
        buffer_columns=BufferColumns(id_of, owner, indptr, cand),
    )
    return restored
