"""Content-addressed artifact keys and the deterministic store layout.

An artifact's key is a hash of everything that determines its content (``docs/architecture.md``)::

    key = H(stage name, stage code version, the stage's own parameters, the keys of its inputs)

and a raw input's key is a hash of its bytes (:func:`raw_view_key`). Two runs that would
compute the same thing therefore agree on its key, and changing one parameter changes the
key of that stage and of everything downstream of it, nothing upstream.

Paths are a pure function of ``(layer, subject, sample, scope, stage, key)``
(:meth:`ArtifactRef.path`); tests assert the layout.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

from storage.ids import check_id

KEY_BYTES = 20
"""Digest size of every key: 20 bytes, shown as 40 hex characters."""

KEY_PATTERN = re.compile(r"^[0-9a-f]{40}$")
STAGE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
SAMPLE_SCOPE = "_sample"
"""Scope folder of sample-level artifacts (a leading ``_`` cannot collide with a view id)."""

ARRAYS_LAYER = "arrays"
TABLES_LAYER = "tables"


def _hasher():
    return hashlib.blake2b(digest_size=KEY_BYTES)


def canonical(obj: Any) -> Any:
    """A JSON-ready, order-independent form of parameters (dataclasses, pydantic models, tuples, paths).

    Floats are kept as floats (``json`` writes them with ``repr``, which round-trips), so
    ``1`` and ``1.0`` hash differently only when their types differ in the parameters too.

    Raises
    ------
    TypeError
        For values without a canonical form (arbitrary objects, NaN/inf floats).
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__,
                **{f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if hasattr(obj, "model_dump") and callable(obj.model_dump):  # pydantic model
        return {"__type__": type(obj).__name__, **{k: canonical(v) for k, v in obj.model_dump().items()}}
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return canonical(obj.value)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise TypeError(f"parameter value {obj!r} has no canonical form (not finite)")
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return canonical(obj.item())
    raise TypeError(f"parameter value of type {type(obj).__name__} has no canonical form")


def canonical_json(obj: Any) -> str:
    """Compact, key-sorted JSON text of :func:`canonical` ``(obj)``."""
    return json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def params_hash(params: Any) -> str:
    """Key-sized hash of a stage's parameters (recorded in the stage-run table)."""
    h = _hasher()
    h.update(canonical_json(params).encode())
    return h.hexdigest()


def artifact_key(stage: str, version: str | int, params: Any, inputs: Mapping[str, str]) -> str:
    """The content address of a stage's output.

    Parameters
    ----------
    stage : str
        Stage name (``decode``, ``landmarks``, ...).
    version : str or int
        The stage's code version: bump it whenever the kernel's output for the same
        inputs changes.
    params : dataclass, pydantic model, mapping or None
        The stage's own parameters only (not those of upstream stages: those are
        already in the input keys).
    inputs : mapping of str -> key
        Role -> key of every input (raw inputs: :func:`raw_view_key`).

    Returns
    -------
    str
        40 lowercase hex characters.
    """
    check_stage(stage)
    for role, k in inputs.items():
        check_key(k, f"input {role!r}")
    doc = {"stage": stage, "version": str(version), "params": canonical(params), "inputs": dict(inputs)}
    h = _hasher()
    h.update(json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    return h.hexdigest()


def hash_bytes(*chunks: bytes) -> str:
    """Key-sized hash of some bytes."""
    h = _hasher()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def hash_files(files: Mapping[str, Path]) -> str:
    """Hash of named files: names (sorted) and bytes; a missing file hashes as absent.

    Absent files still change the hash (so a repaired input gets a new key), and the
    missing file itself is reported by the validating reader, not here.
    """
    h = _hasher()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        try:
            with open(files[name], "rb") as f:
                h.update(b"F")
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            h.update(b"-")
        except OSError as exc:  # unreadable (permissions, ...): the reader reports it; the key still differs
            h.update(b"!" + str(exc.errno).encode())
        h.update(b"\0")
    return h.hexdigest()


def raw_view_files(raw_root: Path, subject: str, sample: str, view: str) -> dict[str, Path]:
    """The files a raw view's key covers: ``sample.json`` and every regular, non-hidden file of the view
    folder (an unexpected extra file changes the key as well, and the reader then refuses it); never a
    symlink that leaves the raw root, nor a FIFO."""
    for v, kind in ((subject, "subject"), (sample, "sample"), (view, "view")):
        check_id(v, kind)
    root = Path(raw_root)
    files = {"sample.json": root / subject / sample / "sample.json"}
    vdir = root / subject / sample / view
    inside = root.resolve()
    if vdir.is_dir() and not vdir.is_symlink():
        for p in vdir.iterdir():
            if p.name.startswith("."):
                continue
            if p.is_symlink():
                try:
                    if inside not in p.resolve().parents:
                        continue
                except (OSError, RuntimeError):   # a symlink loop: the reader reports it
                    continue
            if p.is_file():
                files[f"{view}/{p.name}"] = p
    return files


def raw_view_key(raw_root: Path, subject: str, sample: str, view: str) -> str:
    """Key of one raw view: a hash of the bytes of its files (:func:`raw_view_files`) and of its
    ``sample.json``. :class:`storage.rawkeys.RawKeyMemo` gives the same key without reading unchanged
    files again."""
    return hash_files(raw_view_files(raw_root, subject, sample, view))


def check_key(key: object, what: str = "key") -> str:
    """Return ``key`` if it is 40 lowercase hex characters, else raise ``ValueError``."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"{what}: expected 40 lowercase hex characters, got {key!r}")
    return key


def check_stage(stage: object) -> str:
    """Return ``stage`` if it matches ``[a-z][a-z0-9_]{0,31}``, else raise ``ValueError``."""
    if not isinstance(stage, str) or not STAGE_PATTERN.fullmatch(stage):
        raise ValueError(f"stage name {stage!r} must match {STAGE_PATTERN.pattern}")
    return stage


@dataclasses.dataclass(frozen=True, order=True)
class ArtifactRef:
    """The address of one artifact: where it belongs and its content key.

    ``view`` is ``None`` for sample-level artifacts (fused cloud, mesh, registration).
    """

    stage: str
    subject: str
    sample: str
    view: str | None
    key: str

    def __post_init__(self):
        check_stage(self.stage)
        check_id(self.subject, "subject")
        check_id(self.sample, "sample")
        if self.view is not None:
            check_id(self.view, "view")
        check_key(self.key, f"{self.stage} key")

    @property
    def scope(self) -> str:
        """The view id, or ``_sample`` for sample-level artifacts."""
        return self.view if self.view is not None else SAMPLE_SCOPE

    def path(self) -> str:
        """Relative POSIX path: ``arrays/<subject>/<sample>/<scope>/<stage>/<key>.zarr``."""
        return f"{ARRAYS_LAYER}/{self.subject}/{self.sample}/{self.scope}/{self.stage}/{self.key}.zarr"

    def where(self) -> str:
        """``subject/sample/view`` for messages and run names."""
        return f"{self.subject}/{self.sample}/{self.scope}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_path(cls, path: str) -> "ArtifactRef":
        """Inverse of :meth:`path` (raises ``ValueError`` for anything else)."""
        parts = path.strip("/").split("/")
        if len(parts) != 6 or parts[0] != ARRAYS_LAYER or not parts[5].endswith(".zarr"):
            raise ValueError(f"not an artifact path: {path!r}")
        _, subject, sample, scope, stage, name = parts
        return cls(stage, subject, sample, None if scope == SAMPLE_SCOPE else scope, name[: -len(".zarr")])
