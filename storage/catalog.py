"""The catalog: Parquet tables with declared schemas, an append-only part-file design, and an in-memory twin.

Tables (:data:`SCHEMAS`): ``subjects``, ``samples`` and ``stage_runs`` (one row per stage
per sample/view per build: artifact key, input keys, parameter hash, code version,
status, error, start/finish, duration, kernel CPU, QC metrics).

Concurrent writers never lose or duplicate rows: every :meth:`Catalog.append` writes its
own part file ``tables/<table>/part-<utc>-<uuid>.parquet`` (temporary name, then rename),
so writers never touch the same file. :meth:`Catalog.compact` merges parts into one
``compacted-*.parquet`` and only then deletes the merged parts; every row carries a
unique ``row_id`` and readers drop duplicates, so a reader that lists the folder during a
compaction (or after a crash in the middle of one) still sees each row once.
"""

from __future__ import annotations

import abc
import errno
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

TS = pa.timestamp("us", tz="UTC")

SCHEMAS: dict[str, pa.Schema] = {
    "subjects": pa.schema([
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("build_id", pa.string(), nullable=False),
        pa.field("recorded_at", TS, nullable=False),
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("gender", pa.string()),
        pa.field("age", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("n_samples", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]),
    "samples": pa.schema([
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("build_id", pa.string(), nullable=False),
        pa.field("recorded_at", TS, nullable=False),
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("expression", pa.string()),
        pa.field("category", pa.string()),
        pa.field("views", pa.list_(pa.string())),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("raw_keys", pa.map_(pa.string(), pa.string())),
        pa.field("status", pa.string(), nullable=False),
        pa.field("n_failed", pa.int32()),
    ]),
    "stage_runs": pa.schema([
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("build_id", pa.string(), nullable=False),
        pa.field("recorded_at", TS, nullable=False),
        pa.field("flow_run_id", pa.string()),
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("view_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("artifact_key", pa.string()),
        pa.field("input_keys", pa.map_(pa.string(), pa.string())),
        pa.field("param_hash", pa.string()),
        pa.field("code_version", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("started_at", TS),
        pa.field("finished_at", TS),
        pa.field("duration_s", pa.float64()),
        pa.field("kernel_cpu_s", pa.float64()),
        pa.field("qc", pa.map_(pa.string(), pa.float64())),
    ]),
}
"""Declared schemas; :meth:`Catalog.append` refuses rows that do not fit."""

NATURAL_KEYS: dict[str, tuple[str, ...]] = {
    "subjects": ("subject_id",),
    "samples": ("subject_id", "sample_id"),
    "stage_runs": ("subject_id", "sample_id", "view_id", "stage"),
}
"""Columns identifying a row's subject of record; :meth:`Catalog.latest` keeps the newest row per key."""

STATUSES = ("completed", "failed")
OUTCOMES = ("computed", "reused", "cached", "failed", "upstream_failed")
"""``computed``: the kernel ran; ``cached``: not run, because its artifact (same key, written from
the current writes of its inputs) is in the store: the unit's Prefect task was a cache hit, or the
unit ran and found this stage fresh; ``failed``: the stage raised; ``upstream_failed``: an input
stage failed, so this one never ran. ``reused`` is kept for rows of builds before chain units
(one Prefect task per stage), which used it for the second case."""


class CatalogError(ValueError):
    """Rows that do not fit a table's declared schema, or an unknown table."""


def _schema(table: str) -> pa.Schema:
    try:
        return SCHEMAS[table]
    except KeyError:
        raise CatalogError(f"unknown table {table!r} (tables: {sorted(SCHEMAS)})") from None


def to_arrow(table: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Validate ``rows`` against the declared schema of ``table``; fills ``row_id``/``recorded_at``.

    Raises
    ------
    CatalogError
        Unknown or missing columns, values of the wrong type, nulls in non-nullable columns.
    """
    schema = _schema(table)
    names = set(schema.names)
    now = datetime.now(timezone.utc)
    prepared = []
    for i, r in enumerate(rows):
        extra = set(r) - names
        if extra:
            raise CatalogError(f"{table} row {i}: unknown column(s) {sorted(extra)}")
        row = {"row_id": uuid.uuid4().hex, "recorded_at": now, **r}
        for f in schema:
            if not f.nullable and row.get(f.name) is None:
                raise CatalogError(f"{table} row {i}: column {f.name!r} is required")
            if isinstance(row.get(f.name), Mapping) and pa.types.is_map(f.type):
                row[f.name] = list(row[f.name].items())
        if table == "stage_runs":
            if row["status"] not in STATUSES or row["outcome"] not in OUTCOMES:
                raise CatalogError(f"stage_runs row {i}: status {row['status']!r} / outcome "
                                   f"{row['outcome']!r} not in {STATUSES} / {OUTCOMES}")
        prepared.append(row)
    try:
        return pa.Table.from_pylist(prepared, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise CatalogError(f"{table}: rows do not fit the declared schema: {exc}") from None


def _dedupe_sorted(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    if not tables:
        return schema.empty_table()
    t = pa.concat_tables([x.cast(schema) for x in tables])
    if t.num_rows == 0:
        return t
    t = t.sort_by([("recorded_at", "ascending"), ("row_id", "ascending")])
    ids = t.column("row_id").to_pylist()
    seen: set[str] = set()
    keep = []
    for i, rid in enumerate(ids):
        if rid not in seen:
            seen.add(rid)
            keep.append(i)
    return t if len(keep) == t.num_rows else t.take(pa.array(keep, pa.int64()))


class Catalog(abc.ABC):
    """The contract every catalog implements."""

    read_only: bool = False

    def append(self, table: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Add rows (validated against :data:`SCHEMAS`) as one new part; returns the row count."""
        if self.read_only:
            raise PermissionError(f"{self!r} is read-only")
        t = to_arrow(table, rows)
        if t.num_rows:
            self._append(table, t)
        return t.num_rows

    @abc.abstractmethod
    def _append(self, table: str, t: pa.Table) -> None:
        ...

    @abc.abstractmethod
    def _parts(self, table: str) -> list[pa.Table]:
        ...

    def read(self, table: str) -> pa.Table:
        """Every row of ``table`` exactly once, ordered by ``recorded_at`` then ``row_id``."""
        schema = _schema(table)
        return _dedupe_sorted(self._parts(table), schema)

    def latest(self, table: str) -> pa.Table:
        """The newest row per natural key (:data:`NATURAL_KEYS`), ordered by that key."""
        t = self.read(table)
        keys = NATURAL_KEYS[table]
        cols = [t.column(k).to_pylist() for k in keys]
        last: dict[tuple, int] = {}
        for i, k in enumerate(zip(*cols)):
            last[k] = i  # read() is ordered by time: the last one wins
        order = sorted(last, key=lambda k: tuple("" if v is None else v for v in k))
        return t.take(pa.array([last[k] for k in order], pa.int64()))

    @abc.abstractmethod
    def compact(self, table: str) -> int:
        """Merge the parts of ``table`` into one file; returns how many files were merged."""

    def n_parts(self, table: str) -> int:
        return len(self._parts(table))


class MemoryCatalog(Catalog):
    """In-memory twin of :class:`ParquetCatalog`."""

    def __init__(self, read_only: bool = False):
        self.read_only = read_only
        self._tables: dict[str, list[pa.Table]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "MemoryCatalog()"

    def _append(self, table, t):
        with self._lock:
            self._tables.setdefault(table, []).append(t)

    def _parts(self, table):
        _schema(table)
        with self._lock:
            return list(self._tables.get(table, []))

    def compact(self, table):
        with self._lock:
            parts = self._tables.get(table, [])
            if len(parts) <= 1:
                return 0
            self._tables[table] = [_dedupe_sorted(parts, _schema(table))]
            return len(parts)


class ParquetCatalog(Catalog):
    """Parquet part files under ``<root>/tables/<table>/`` (local path or fsspec URL).

    Parameters
    ----------
    root : path or URL
        The store root.
    compression : str
        Parquet codec (default zstd).
    """

    def __init__(self, root: str | os.PathLike, *, read_only: bool = False, compression: str = "zstd"):
        import fsspec

        s = os.fspath(root)
        if "://" not in s or s.startswith("file://"):
            self.fs = fsspec.filesystem("file")
            self.root = str(Path(s.removeprefix("file://")).resolve())
        else:
            self.fs, self.root = fsspec.core.url_to_fs(s)
        self.read_only = read_only
        self.compression = compression
        self._tag = f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"

    def __repr__(self) -> str:
        return f"ParquetCatalog({self.root!r})"

    def table_dir(self, table: str) -> str:
        _schema(table)
        return f"{self.root}/tables/{table}"

    def _files(self, table: str) -> list[str]:
        d = self.table_dir(table)
        try:
            names = self.fs.ls(d, detail=False)
        except FileNotFoundError:
            return []
        return sorted(p for p in names if p.rsplit("/", 1)[-1].startswith(("part-", "compacted-"))
                      and p.endswith(".parquet"))

    def _put(self, table: str, t: pa.Table, prefix: str) -> str:
        d = self.table_dir(table)
        self.fs.makedirs(d, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{prefix}-{stamp}-{uuid.uuid4().hex}.parquet"
        tmp = f"{d}/.tmp-{self._tag}-{name}"
        try:
            with self.fs.open(tmp, "wb") as f:
                pq.write_table(t, f, compression=self.compression)
            self.fs.mv(tmp, f"{d}/{name}")
        except OSError as exc:
            try:
                self.fs.rm(tmp)
            except OSError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                err = OSError(f"catalog {self.root}: cannot write {table} rows ({os.strerror(exc.errno)}); "
                              "nothing was recorded")
                err.errno = exc.errno
                raise err from exc
            raise
        return f"{d}/{name}"

    def _append(self, table, t):
        self._put(table, t, "part")

    def _read_file(self, path: str) -> pa.Table | None:
        try:
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f)
        except FileNotFoundError:  # merged and removed by a concurrent compaction
            return None

    def _parts(self, table):
        """Every file's rows; a file removed by a concurrent compaction while this reads is replaced by
        re-listing: the compaction wrote its merged file before removing any part, so a re-list finds it."""
        out, seen = [], set()
        while True:
            vanished = False
            for p in self._files(table):
                if p in seen:
                    continue
                seen.add(p)
                t = self._read_file(p)
                if t is None:
                    vanished = True
                else:
                    out.append(t)
            if not vanished:
                return out

    def compact(self, table):
        if self.read_only:
            raise PermissionError(f"{self!r} is read-only")
        files = self._files(table)
        if len(files) <= 1:
            return 0
        tables = [t for t in (self._read_file(p) for p in files) if t is not None]
        merged = _dedupe_sorted(tables, _schema(table))
        self._put(table, merged, "compacted")  # visible before the parts go: rows are never missing
        for p in files:
            try:
                self.fs.rm(p)
            except FileNotFoundError:
                pass
        return len(files)

    def clean_partial(self, max_age_s: float = 6 * 3600) -> list[str]:
        """Remove temporary part files of dead writers of this host, or older than ``max_age_s``."""
        removed = []
        host = self._tag.split("-")[0]
        for table in SCHEMAS:
            d = self.table_dir(table)
            if os.path.islink(d):  # never follow a link out of the store
                continue
            try:
                entries = self.fs.ls(d, detail=True)
            except FileNotFoundError:
                continue
            for e in entries:
                name = e["name"].rsplit("/", 1)[-1]
                if not name.startswith(".tmp-"):
                    continue
                parts = name.split("-")
                dead = False
                if len(parts) > 3 and parts[1] == host and parts[2].isdigit():
                    try:
                        os.kill(int(parts[2]), 0)
                    except ProcessLookupError:
                        dead = True
                    except PermissionError:
                        pass
                mtime = e.get("mtime") or 0
                if dead or time.time() - float(getattr(mtime, "timestamp", lambda: mtime)()) > max_age_s:
                    self.fs.rm(e["name"])
                    removed.append(e["name"])
        return removed
