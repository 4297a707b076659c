"""Order-independent seeding: one top-level seed, child generators keyed by identifiers."""

from __future__ import annotations

import hashlib

import numpy as np


def key_words(*keys: str | int) -> list[int]:
    """Stable 32-bit words for ``keys`` (strings hashed with SHA-256, ints taken as they are).

    Parameters
    ----------
    *keys : str or int
        Identifiers such as a subject id, a sample id, a view name or a purpose tag.

    Returns
    -------
    list of int
        Words suitable for ``numpy.random.SeedSequence`` entropy.
    """
    words: list[int] = []
    for k in keys:
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            if k < 0:
                raise ValueError(f"seed key: integers must be >= 0, got {k}")
            words.append(int(k))
        elif isinstance(k, str):
            digest = hashlib.sha256(k.encode("utf-8")).digest()
            words.extend(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))
        else:
            raise ValueError(f"seed key: expected str or int, got {type(k).__name__}")
    return words


def derive_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys``, never on call order.

    Parameters
    ----------
    seed : int
        The top-level seed (>= 0).
    *keys : str or int
        Identifiers, e.g. ``derive_rng(seed, "subject", "S0003", "smile", "left")``.

    Returns
    -------
    numpy.random.Generator
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), *key_words(*keys)]))
