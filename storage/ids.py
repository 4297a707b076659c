"""Identifier validation and safe path joining.

Every subject, sample and view id that reaches a path goes through :func:`check_id`;
every path built from ids goes through :func:`safe_join`, which refuses anything that
would leave its root (``..``, absolute parts, separators, symlinks pointing outside).
"""

from __future__ import annotations

import re
from pathlib import Path

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""Allowed ids: 1-64 characters of letters, digits, ``_`` and ``-``, not starting with ``_``/``-``."""


class UnsafeIdError(ValueError):
    """An identifier that does not match :data:`ID_PATTERN`."""


def check_id(value: object, kind: str) -> str:
    """Return ``value`` if it is a valid id, else raise :class:`UnsafeIdError`.

    Parameters
    ----------
    value : object
        The candidate id.
    kind : str
        What it identifies ("subject", "sample", "view"), used in the message.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise UnsafeIdError(
            f"{kind} id {value!r} is not allowed: ids must match {ID_PATTERN.pattern} "
            "(letters, digits, '_' and '-'; no path separators, no '..', no leading dot)"
        )
    return value


def safe_join(root: Path, *parts: str) -> Path:
    """Join ``parts`` below ``root`` and make sure the result stays inside ``root``.

    Symlinks are resolved: a link inside ``root`` that points outside it is refused.

    Raises
    ------
    UnsafeIdError
        When the joined path (after resolving links) is not inside ``root``, or cannot be
        resolved (a symlink loop).
    """
    root_r = Path(root).resolve()
    p = root_r.joinpath(*parts)
    try:
        resolved = p.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise UnsafeIdError(f"path {p} cannot be resolved ({exc})") from None
    if resolved != root_r and root_r not in resolved.parents:
        raise UnsafeIdError(f"path {p} leaves its root {root_r} (resolves to {resolved})")
    return p
