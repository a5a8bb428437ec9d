"""Index files: atomic writes, checksums, the ``.meta.json`` sidecar and offsets as JSON.

``save(path, offsets)`` of an adapter writes two files, ``path`` (the vectors) and
``path + META_SUFFIX`` (ids, settings, the stream offsets the file covers and the sha256
of the vector file), each to a temporary name renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from serving.errors import SnapshotError
from serving.index.base import Offsets

META_SUFFIX = ".meta.json"
#: Format of the metadata sidecar.
FORMAT = 1


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    atomic_write_bytes(Path(str(path) + META_SUFFIX), json.dumps(meta, sort_keys=True).encode("utf-8"))


def read_meta(path: Path, kind: str, *, checked: bool = False) -> dict[str, Any]:
    """The sidecar of the index file ``path`` of adapter ``kind``, once the file matches
    its checksum (not computed again when ``checked``: the caller verified it)."""
    meta_path = Path(str(path) + META_SUFFIX)
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SnapshotError(
            f"index metadata {meta_path} is missing or corrupt ({exc}); restore the snapshot or rebuild "
            "the index from the simstream-embeddings topic"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise SnapshotError(f"{meta_path} is not a {kind} index file of format {FORMAT}")
    if checked:
        if not Path(path).is_file():
            raise SnapshotError(f"index file {path} is missing")
        return meta
    try:
        digest = sha256_file(Path(path))
    except OSError as exc:
        raise SnapshotError(f"index file {path} cannot be read ({exc})") from exc
    if digest != meta.get("sha256"):
        raise SnapshotError(
            f"index file {path} does not match its checksum (truncated or corrupt); "
            "restore the snapshot or rebuild the index from the simstream-embeddings topic"
        )
    return meta


def offsets_to_json(offsets: Mapping[str, Mapping[int, int]]) -> dict[str, dict[str, int]]:
    """JSON object keys are strings: partitions are written as decimal strings."""
    return {str(t): {str(p): int(o) for p, o in parts.items()} for t, parts in offsets.items()}


def offsets_from_json(raw: Any) -> Offsets:
    """Inverse of ``offsets_to_json``; raises ``SnapshotError`` on a malformed value."""
    try:
        return {str(t): {int(p): int(o) for p, o in parts.items()} for t, parts in raw.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise SnapshotError(f"malformed offsets in snapshot: {exc}") from exc
