"""Publishing a folder written under a temporary name: visible only once complete."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns ``False`` where the system or file system cannot (then nothing changed).
    """
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final`` (same file system).

    An existing ``final`` is replaced by an atomic exchange where the system offers one (Linux),
    so a reader sees the old or the new folder and never nothing; elsewhere it is first renamed
    aside (a reader may then find nothing for the time of one rename). Either way never a
    mixture. The replaced folder is removed afterwards; leftovers of a crash in between are
    hidden ``.old-*`` folders. A concurrent publisher of the same ``final`` does not make this
    fail: the last one wins, with a complete folder.
    """
    for _ in range(8):
        if final.exists():
            if exchange(tmp, final):
                shutil.rmtree(tmp, ignore_errors=True)  # now holds the replaced folder
                return
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex}"
            try:
                os.replace(final, old)
            except FileNotFoundError:  # a concurrent publisher moved it first
                continue
            try:
                os.replace(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(old, ignore_errors=True)
                continue
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.replace(tmp, final)
            return
        except OSError as exc:  # a concurrent publisher created ``final`` in between: replace it
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise OSError(errno.EBUSY, f"{final}: could not be published (concurrent publishers kept replacing it)")
