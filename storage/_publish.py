"""Publishing a folder written under a temporary name: visible only once complete."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final`` (same file system).

    An existing ``final`` is first renamed aside and removed only after the new folder is in
    place, so a reader sees either the old or the new folder, never a mixture or nothing
    for longer than one rename. Leftovers of a crash are hidden ``.old-*`` folders.
    """
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
