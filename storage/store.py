"""The pipeline store: array artifacts (Zarr) + catalog tables (Parquet) under one root.

Layout (``docs/architecture.md``)::

    STORE/
      store-format.json                                       {"format": "pixelface-store", "version": 1}
      arrays/<subject>/<sample>/<view|_sample>/<stage>/<key>.zarr/
          zarr.json, <array>/...                              Zarr v3 group, Blosc-lz4, ~2 MiB row chunks
          pixelface.json                                      manifest, written last (the commit marker)
      tables/{subjects,samples,stage_runs}/part-*.parquet     one part file per write
      tables/<table>/compacted-*.parquet                      merged parts
      .staging/<host>-<pid>-<uuid>/                           writes in progress (garbage after a crash)
      _prefect/results/                                       Prefect's cached task records (JSON)

This package is the only code that reads or writes the store; it imports no Prefect.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from storage.artifacts import STAGING_DIR, ArtifactStore, MemoryArtifactStore, ZarrArtifactStore
from storage.catalog import Catalog, MemoryCatalog, ParquetCatalog

STORE_FORMAT = "pixelface-store"
STORE_VERSION = 1
PREFECT_RESULTS_DIR = "_prefect/results"


class StoreFormatError(ValueError):
    """The folder is not a pixelface store of a supported version."""


@dataclass(frozen=True)
class Store:
    """Artifacts and catalog of one store root (``url`` is ``None`` for the in-memory twin)."""

    artifacts: ArtifactStore
    catalog: Catalog
    url: str | None

    def clean_partial(self, max_age_s: float = 6 * 3600) -> list[str]:
        """Remove leftovers of interrupted writes (artifacts and catalog parts)."""
        out = list(self.artifacts.clean_partial(max_age_s))
        if isinstance(self.catalog, ParquetCatalog):
            out += self.catalog.clean_partial(max_age_s)
        return out

    @property
    def prefect_results(self) -> str | None:
        """Where Prefect keeps the cached task records of builds into this store."""
        return None if self.url is None else f"{self.url}/{PREFECT_RESULTS_DIR}"


_MARKER_FILE = re.compile(r"store-format\.json(\.[0-9a-f-]+\.tmp)?")
"""The store's marker and the temporary file it is written through (see :func:`open_store`)."""


def open_store(url: str | os.PathLike, *, create: bool = True, read_only: bool = False) -> Store:
    """Open (and by default create) the store at a local path or fsspec URL.

    Raises
    ------
    StoreFormatError
        The folder holds something else, or a newer store version.
    FileNotFoundError
        ``create=False`` and there is no store.
    PermissionError
        ``create=True`` (opening to build into it) and the store is not writable
        (:func:`check_writable`).
    """
    import fsspec

    s = os.fspath(url)
    local = "://" not in s or s.startswith("file://")
    if local:
        s = str(Path(s.removeprefix("file://")).resolve())
        fs, root = fsspec.filesystem("file"), s
    else:
        fs, root = fsspec.core.url_to_fs(s)
    marker = f"{root}/store-format.json"
    if fs.exists(marker):
        with fs.open(marker, "r") as f:
            meta = json.load(f)
        if meta.get("format") != STORE_FORMAT or meta.get("version") != STORE_VERSION:
            raise StoreFormatError(f"{marker}: holds {meta}, not {STORE_FORMAT} v{STORE_VERSION}")
    elif not create or read_only:
        raise FileNotFoundError(f"no pixelface store at {s} (missing store-format.json)")
    else:
        # another build may be creating the same store right now: its marker (or the marker's
        # temporary file) is not something else's content
        others = [e for e in (fs.ls(root, detail=False) if fs.exists(root) else [])
                  if not _MARKER_FILE.fullmatch(os.path.basename(str(e).rstrip("/")))]
        if others and not fs.exists(f"{root}/arrays") and not fs.exists(marker):
            raise StoreFormatError(f"{s}: folder exists, is not empty and is not a pixelface store")
        fs.makedirs(root, exist_ok=True)
        tmp = f"{marker}.{os.getpid()}-{uuid.uuid4().hex}.tmp"
        with fs.open(tmp, "w") as f:
            json.dump({"format": STORE_FORMAT, "version": STORE_VERSION}, f)
        fs.mv(tmp, marker)
    if local and create and not read_only:  # opened to build into: refuse a read-only or full store now
        check_writable(Path(root))
    return Store(ZarrArtifactStore(s, read_only=read_only), ParquetCatalog(s, read_only=read_only), s)


def check_writable(root: Path) -> None:
    """Create and remove one small file in ``root/.staging``: a store that cannot take it is refused
    before any work starts.

    Raises
    ------
    PermissionError
        The store (or its file system) is read-only; the message names the store and says how to
        read it anyway (``read_only=True``).
    OSError
        ``ENOSPC`` / ``EDQUOT``: no space left for the store.
    """
    # named like a staging folder, so a probe left by a killed process is removed by ``clean_partial``
    probe = root / STAGING_DIR / f"{socket.gethostname().replace('-', '_')}-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"pixelface")
        probe.unlink()
    except OSError as exc:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _os_error(PermissionError, exc.errno or errno.EACCES,
                            f"store {root} is not writable ({reason}); nothing was changed "
                            "(open it with read_only=True to read it)") from None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _os_error(OSError, exc.errno, f"store {root}: {reason}; nothing was changed") from None
        raise


def _os_error(cls: type[OSError], code: int, message: str) -> OSError:
    """``cls(message)`` with ``errno`` set (``OSError(code, message)`` would print ``[Errno n]``)."""
    exc = cls(message)
    exc.errno = code
    return exc


def memory_store() -> Store:
    """The in-memory twin (tests, dry runs)."""
    return Store(MemoryArtifactStore(), MemoryCatalog(), None)


# -- Prefect cache records -----------------------------------------------------------------------

CACHE_RECORD_SERIALIZER = {"type": "json", "jsonlib": "json",
                           "object_encoder": "prefect.serializers.prefect_json_object_encoder",
                           "object_decoder": "prefect.serializers.prefect_json_object_decoder",
                           "dumps_kwargs": {}, "loads_kwargs": {}}
"""The only serializer a cache record under ``STORE/_prefect/results`` may name (Prefect's JSON
serializer with its own encoder/decoder and no extra arguments, as the unit tasks write them)."""

CACHE_RECORD_CLASSES = frozenset({"tasks.stage.UnitRecord"})
"""Classes a cache record's JSON may name in ``__class__`` (Prefect's decoder imports them)."""

MAX_CACHE_RECORD_BYTES = 16 * 2**20


def _record_problem(path: Path) -> str | None:
    """Why the cache record at ``path`` must not be handed to Prefect, or ``None`` when it is sound."""
    try:
        if path.is_symlink() or not path.is_file():
            return "not a regular file"
        if path.stat().st_size > MAX_CACHE_RECORD_BYTES:
            return f"larger than {MAX_CACHE_RECORD_BYTES} bytes"
        rec = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(rec, dict) or not isinstance(rec.get("metadata"), dict) or not isinstance(rec.get("result"), str):
        return "not a Prefect result record"
    ser = rec["metadata"].get("serializer")
    if ser != CACHE_RECORD_SERIALIZER:
        kind = ser.get("type") if isinstance(ser, dict) else ser
        return f"names serializer {kind!r} / settings other than the JSON serializer of the unit tasks"
    try:
        payload = json.loads(rec["result"])
    except ValueError as exc:
        return f"result is not JSON ({exc})"
    stack, names = [payload], []
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__class__" in node:
                names.append(node["__class__"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    foreign = sorted({str(n) for n in names} - CACHE_RECORD_CLASSES)
    if foreign or not names:
        return f"result names classes {foreign or '(none)'}, expected one of {sorted(CACHE_RECORD_CLASSES)}"
    return None


def vet_cache_record(path: str | os.PathLike) -> str | None:
    """Check a Prefect cache record before Prefect reads it; quarantine it if it is not sound.

    Prefect reads a cached result with whatever serializer **the record** names (``pickle``
    included) and imports whatever classes its JSON names, so a record planted in (or damaged
    in) a shared store could make a build unpickle or import code. Before each unit's cache
    lookup, its record (if any) must name exactly :data:`CACHE_RECORD_SERIALIZER` and only
    :data:`CACHE_RECORD_CLASSES`. A record that does not is renamed to
    ``<name>.rejected-<uuid>`` (kept for inspection, never read) and the unit runs as a cache
    miss (its artifacts are still reused stage by stage).

    Parameters
    ----------
    path : path-like
        The record file (``STORE/_prefect/results/<cache key>``); a missing file is fine.

    Returns
    -------
    str or None
        The reason the record was quarantined (naming the file), or ``None`` (absent or sound).
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return None
    why = _record_problem(p)
    if why is None:
        return None
    dest = p.with_name(f"{p.name}.rejected-{uuid.uuid4().hex[:12]}")
    try:
        os.replace(p, dest)
    except FileNotFoundError:  # another worker quarantined or replaced it meanwhile
        return None
    return f"cache record {p} {why}: moved to {dest.name}, the unit runs as a cache miss"
