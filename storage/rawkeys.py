"""Raw view keys remembered by file metadata, so that a rebuild does not hash the raw files again.

A raw view's key (:func:`storage.keys.raw_view_key`) hashes the bytes of its files. Planning a
rebuild of an unchanged dataset would read all of them again (~36 MB per sample at full size; 0.2 s
of CPU per subject of three samples, about a third of a cached rerun's driver CPU). Like git's
index, :class:`RawKeyMemo` keeps, per subject, each view's key with the metadata of every file
that went into it -- name, size, modification and change times in nanoseconds, inode and device
-- and uses the key again only when all of them are unchanged. Writing a file changes its change
time (``st_ctime_ns``), which a user cannot set back, so a modified file is always hashed again.
A file modified within :data:`RACY_S` of its hashing is not remembered ("racy git": the time
stamp may not have moved yet).

The memo lives in ``STORE/_cache/raw-keys/<subject>.json``, local stores only, written by rename.
It is a cache: a missing, unreadable, foreign or stale file just means hashing, and deleting
the folder is always safe. Write access to a store is trusted (as for its artifacts).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from storage.ids import check_id
from storage.keys import KEY_PATTERN, hash_files, raw_view_files

MEMO_DIR = "_cache/raw-keys"
MEMO_VERSION = 1
RACY_S = 2.0
"""Files changed less than this long before they were hashed are not remembered."""


def _signature(files: dict[str, Path]) -> list[list] | None:
    """Metadata of the files of a view, or ``None`` when one cannot be stat-ed (always hash then)."""
    sig = []
    for name in sorted(files):
        try:
            st = os.stat(files[name])
        except OSError:
            return None
        sig.append([name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    return sig


class RawKeyMemo:
    """The remembered raw view keys of one subject (:mod:`storage.rawkeys`).

    ``RawKeyMemo(None, ...)`` (a remote or in-memory store) remembers nothing and always hashes.
    """

    def __init__(self, store_url: str | None, raw_root: str | os.PathLike, subject: str, racy_s: float = RACY_S):
        check_id(subject, "subject")
        self.racy_s = racy_s
        self.subject = subject
        self.raw_root = str(Path(raw_root).resolve())
        local = store_url is not None and ("://" not in store_url or store_url.startswith("file://"))
        self.path = (Path(store_url.removeprefix("file://")) / MEMO_DIR / f"{subject}.json") if local else None
        self._views: dict[str, dict] = {}
        self._changed = False
        self.hits = self.misses = 0
        if self.path is not None:
            self._views = self._load()

    def _load(self) -> dict[str, dict]:
        try:
            if self.path.is_symlink() or not self.path.is_file() or self.path.stat().st_size > 4 << 20:
                return {}
            memo = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(memo, dict) or memo.get("version") != MEMO_VERSION or memo.get("raw_root") != self.raw_root \
                or memo.get("subject") != self.subject or not isinstance(memo.get("views"), dict):
            return {}
        return {k: v for k, v in memo["views"].items()
                if isinstance(v, dict) and isinstance(v.get("key"), str) and KEY_PATTERN.fullmatch(v["key"])}

    def key(self, sample: str, view: str) -> str:
        """The key of a raw view: remembered when its files are unchanged, else hashed (and remembered)."""
        files = raw_view_files(Path(self.raw_root), self.subject, sample, view)
        sig = _signature(files)
        name = f"{sample}/{view}"
        entry = self._views.get(name)
        if sig is not None and entry is not None and entry.get("files") == sig:
            self.hits += 1
            return entry["key"]
        self.misses += 1
        started_ns = time.time_ns()
        key = hash_files(files)
        if sig is not None and sig == _signature(files) \
                and all(max(s[2], s[3]) < started_ns - self.racy_s * 1e9 for s in sig):
            self._views[name] = {"files": sig, "key": key}
            self._changed = True
        elif self._views.pop(name, None) is not None:
            self._changed = True
        return key

    def save(self) -> None:
        """Write the memo (if anything changed) by rename; an unwritable store just keeps no memo."""
        if self.path is None or not self._changed:
            return
        body = json.dumps({"version": MEMO_VERSION, "subject": self.subject, "raw_root": self.raw_root,
                           "views": self._views}, separators=(",", ":"))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{time.time_ns()}.tmp")
        try:
            for d in (self.path.parents[1], self.path.parent):  # _cache, _cache/raw-keys: never through a link
                if d.is_symlink():
                    return
                d.mkdir(exist_ok=True)
            if self.path.is_symlink():
                return
            tmp.write_text(body)
            os.replace(tmp, self.path)
            self._changed = False
        except OSError:
            tmp.unlink(missing_ok=True)
