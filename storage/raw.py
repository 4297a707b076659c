"""Raw capture format, version 1: writer (used by the simulator) and validating reader.

Layout (see ``docs/raw-format.md``)::

    RAW/raw-format.json
    RAW/<subject>/subject.json
    RAW/<subject>/<sample>/sample.json
    RAW/<subject>/<sample>/<view>/calibration.json
    RAW/<subject>/<sample>/<view>/fringe_f<i>_n<n>.png     (uint8, H x W)
    RAW/<subject>/<sample>/<view>/rgb.png                  (uint8, H x W x 3)
    RAW/<subject>/<sample>/<view>/landmarks.csv            (106 rows: index,x,y,visible)

A sample becomes visible only when complete: it is written under a hidden temporary
folder and renamed into place. Every reader error is a :class:`RawFormatError` naming
the subject, sample, view and file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import stat
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from kernels.camera import Camera
from storage import png
from storage._publish import publish_dir
from storage.ids import UnsafeIdError, check_id, safe_join

FORMAT_NAME = "pixelface-raw"
FORMAT_VERSION = 1
N_LANDMARKS = 106
GENDERS = ("female", "male", "unknown")
SPLITS = ("train", "eval")
CATEGORIES = ("neutral", "positive", "negative")


class RawFormatError(ValueError):
    """A defect in the raw input, located by subject / sample / view / file."""

    def __init__(self, message: str, *, subject: str | None = None, sample: str | None = None,
                 view: str | None = None, file: str | os.PathLike | None = None):
        self.defect = message
        self.subject, self.sample, self.view = subject, sample, view
        self.file = str(file) if file is not None else None
        where = [f"{k} {v}" for k, v in (("subject", subject), ("sample", sample), ("view", view),
                                         ("file", self.file)) if v is not None]
        super().__init__((" / ".join(where) + ": " if where else "") + message)


# -- records ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubjectMeta:
    """Per-subject metadata (``subject.json``)."""

    subject_id: str
    gender: str
    age: int | None
    split: str

    def __post_init__(self):
        # the writer never writes what the reader refuses
        check_id(self.subject_id, "subject")
        if self.gender not in GENDERS:
            raise ValueError(f"gender: expected one of {GENDERS}, got {self.gender!r}")
        if self.age is not None and (not _is_int(self.age) or not 0 < self.age < 130):
            raise ValueError(f"age: expected an integer in 1..129 or None, got {self.age!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {self.split!r}")

    def to_dict(self) -> dict:
        return {"subject_id": self.subject_id, "gender": self.gender, "age": self.age, "split": self.split}


@dataclass(frozen=True)
class FringeSpec:
    """What the projector showed: ``steps`` phase steps at each of ``frequencies``."""

    steps: int
    frequencies: tuple[int, ...]
    projector_width: int
    phase_model: int = 1

    def file_names(self) -> list[str]:
        return [f"fringe_f{i}_n{n}.png" for i in range(len(self.frequencies)) for n in range(self.steps)]


@dataclass(frozen=True)
class SampleMeta:
    """Per-sample metadata (``sample.json``)."""

    subject_id: str
    sample_id: str
    expression: str
    category: str
    views: tuple[str, ...]
    fringe: FringeSpec
    width: int
    height: int

    def to_dict(self) -> dict:
        return {
            "subject_id": self.subject_id, "sample_id": self.sample_id, "expression": self.expression,
            "category": self.category, "views": list(self.views),
            "fringe": {"steps": self.fringe.steps, "frequencies": list(self.fringe.frequencies),
                       "projector_width": self.fringe.projector_width, "phase_model": self.fringe.phase_model},
            "image": {"width": self.width, "height": self.height},
        }


@dataclass(frozen=True)
class ViewCalibration:
    """The stored calibration of one camera group: IR camera, projector, RGB camera."""

    group: str
    ir: Camera
    projector: Camera
    rgb: Camera

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "group": self.group, "ir": self.ir.to_dict(),
                "projector": self.projector.to_dict(), "rgb": self.rgb.to_dict()}


@dataclass(frozen=True)
class RawView:
    """Everything captured by one group for one sample."""

    fringe: np.ndarray  # (L, N, H, W) uint8
    rgb: np.ndarray  # (H, W, 3) uint8
    calibration: ViewCalibration
    landmarks_px: np.ndarray  # (106, 2) float64, NaN rows where not visible
    landmark_visible: np.ndarray  # (106,) bool
    files: dict[str, Path] = field(default_factory=dict)


# -- writer -------------------------------------------------------------------------------------

def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bytes(img: np.ndarray, compress_level: int) -> bytes:
    """Encode an 8-bit grey (H, W) or RGB (H, W, 3) image as PNG.

    A minimal encoder (filter type 0 on every row, one IDAT chunk): about 3x faster than
    Pillow's adaptive filtering on noisy fringe images, at nearly the same size. Any PNG
    reader decodes it (the tests read it back with Pillow).
    """
    img = np.ascontiguousarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"image: expected uint8 (H, W) or (H, W, 3), got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    colour_type = 0 if img.ndim == 2 else 2
    rows = np.empty((h, 1 + img[0].size), np.uint8)
    rows[:, 0] = 0  # filter type None
    rows[:, 1:] = img.reshape(h, -1)
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)) + _png_chunk(b"IEND", b""))


def landmarks_csv(landmarks_px: np.ndarray, visible: np.ndarray) -> str:
    """Text of a ``landmarks.csv``: header then 106 rows ``index,x,y,visible``."""
    lines = ["index,x,y,visible"]
    for i in range(N_LANDMARKS):
        if visible[i] and np.all(np.isfinite(landmarks_px[i])):
            lines.append(f"{i},{landmarks_px[i, 0]:.3f},{landmarks_px[i, 1]:.3f},1")
        else:
            lines.append(f"{i},nan,nan,0")
    return "\n".join(lines) + "\n"


def init_root(root: Path) -> None:
    """Create ``root`` with its ``raw-format.json`` (idempotent; refuses another format)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "raw-format.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise RawFormatError(f"existing folder holds {meta}, not {FORMAT_NAME} v{FORMAT_VERSION}", file=marker)
    else:
        _write_json(marker, {"format": FORMAT_NAME, "version": FORMAT_VERSION})


def write_subject(root: Path, meta: SubjectMeta) -> Path:
    """Write ``<root>/<subject>/subject.json`` atomically (temporary file + rename)."""
    check_id(meta.subject_id, "subject")
    init_root(root)
    d = safe_join(Path(root), meta.subject_id)
    d.mkdir(exist_ok=True)
    tmp = d / f".subject.json.{uuid.uuid4().hex}.tmp"
    _write_json(tmp, meta.to_dict())
    os.replace(tmp, d / "subject.json")
    return d


def write_sample(root: Path, meta: SampleMeta, views: dict[str, RawView], *, overwrite: bool = False,
                 png_compress_level: int = 1) -> Path:
    """Write one sample; it appears under its final name only once complete.

    Parameters
    ----------
    root : Path
        The raw root (with ``subject.json`` of the subject already written).
    meta : SampleMeta
    views : dict of str -> RawView
        One entry per view named in ``meta.views``.
    overwrite : bool
        Replace an existing sample (the old one is removed only after the new one is complete).
    png_compress_level : int
        zlib level for the PNG files (1 is fast; images are noisy and compress little).

    Returns
    -------
    Path
        The sample folder.
    """
    check_id(meta.subject_id, "subject")
    check_id(meta.sample_id, "sample")
    subj_dir = safe_join(Path(root), meta.subject_id)
    if not (subj_dir / "subject.json").exists():
        raise RawFormatError("write the subject before its samples", subject=meta.subject_id, file="subject.json")
    final = subj_dir / meta.sample_id
    if final.exists() and not overwrite:
        raise FileExistsError(f"subject {meta.subject_id} / sample {meta.sample_id}: already exists at {final}")
    if set(views) != set(meta.views):
        raise ValueError(f"views {sorted(views)} do not match sample.json views {list(meta.views)}")
    tmp = subj_dir / f".tmp-{meta.sample_id}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _write_json(tmp / "sample.json", meta.to_dict())
        names = meta.fringe.file_names()
        for view in meta.views:
            check_id(view, "view")
            v = views[view]
            vd = tmp / view
            vd.mkdir()
            L, N = len(meta.fringe.frequencies), meta.fringe.steps
            if v.fringe.shape != (L, N, meta.height, meta.width) or v.fringe.dtype != np.uint8:
                raise ValueError(f"view {view}: fringe must be uint8 {(L, N, meta.height, meta.width)}, "
                                 f"got {v.fringe.dtype} {v.fringe.shape}")
            k = 0
            for i in range(L):
                for n in range(N):
                    (vd / names[k]).write_bytes(_png_bytes(v.fringe[i, n], png_compress_level))
                    k += 1
            (vd / "rgb.png").write_bytes(_png_bytes(v.rgb, png_compress_level))
            _write_json(vd / "calibration.json", v.calibration.to_dict())
            (vd / "landmarks.csv").write_text(landmarks_csv(v.landmarks_px, v.landmark_visible))
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# -- reader -------------------------------------------------------------------------------------

_PNG_EXTRA_BYTES = 1 << 20
"""Room for a PNG's chunks other than image data (text, profiles) when bounding a file's size."""
_MODE_COLOUR_TYPE = {"L": 0, "RGB": 2}


def _expression_categories() -> dict[str, str]:
    """The known expression names and their categories (``kernels.synth.expressions``)."""
    from kernels.synth.expressions import EXPRESSIONS

    return {e.name: e.category for e in EXPRESSIONS}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class RawDataset:
    """Validating reader of a raw root.

    Every method raises :class:`RawFormatError` (a ``ValueError``) naming the subject,
    sample, view and file of the first defect it finds. Hidden entries (names starting
    with ``.``, e.g. an interrupted write) are ignored. Every file is checked to be a
    regular file inside the root before it is opened (no FIFOs, devices, or links leaving
    the root), text files are size-limited, and PNG headers are checked before decoding.
    """

    #: refuse images (and cameras) claiming more pixels than this (decompression bombs)
    max_pixels: int = 4096 * 4096
    #: refuse JSON / CSV files larger than this many bytes
    max_text_bytes: int = 1 << 20
    #: refuse samples with more fringe images per view (frequencies x steps) than this
    max_fringe_images: int = 64
    #: the largest image side a sample may declare
    max_side: int = 16384

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        marker = self.root / "raw-format.json"
        if not self.root.is_dir():
            raise RawFormatError(f"raw root {self.root} is not a directory", file=self.root)
        if not (marker.exists() or marker.is_symlink()):
            raise RawFormatError("missing raw-format.json: not a pixelface raw folder", file=marker)
        meta = self._json(self._dir("raw-format.json"))
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise RawFormatError(f"unsupported format {meta.get('format')!r} version {meta.get('version')!r} "
                                 f"(this reader reads {FORMAT_NAME} v{FORMAT_VERSION})", file=marker)

    # paths and files
    def _dir(self, *parts: str, subject=None, sample=None, view=None) -> Path:
        try:
            return safe_join(self.root, *parts)
        except UnsafeIdError as exc:
            file = self.root.joinpath(*parts) if parts and parts[-1] else None
            raise RawFormatError(str(exc), subject=subject, sample=sample, view=view, file=file) from None

    @staticmethod
    def _id(value: object, kind: str, **where) -> str:
        try:
            return check_id(value, kind)
        except UnsafeIdError as exc:
            raise RawFormatError(str(exc), **where) from None

    @staticmethod
    def _regular(path: Path, **where) -> int:
        """Size in bytes of ``path`` if it is a regular file (links followed), else raise."""
        try:
            st = path.stat()
        except FileNotFoundError:
            raise RawFormatError("missing file", file=path, **where) from None
        except OSError as exc:
            raise RawFormatError(f"unreadable ({exc.strerror or exc})", file=path, **where) from None
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) \
                else "a device or socket"
            raise RawFormatError(f"not a regular file ({kind})", file=path, **where)
        return st.st_size

    def _text(self, path: Path, **where) -> str:
        size = self._regular(path, **where)
        if size > self.max_text_bytes:
            raise RawFormatError(f"file is {size} bytes, more than the {self.max_text_bytes} allowed",
                                 file=path, **where)
        try:
            with open(path, "rb") as f:
                data = f.read(self.max_text_bytes + 1)
            if len(data) > self.max_text_bytes:  # grew since the stat
                raise RawFormatError(f"file is more than the {self.max_text_bytes} bytes allowed", file=path, **where)
            return data.decode("utf-8")
        except FileNotFoundError:
            raise RawFormatError("missing file", file=path, **where) from None
        except UnicodeDecodeError as exc:
            raise RawFormatError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=path, **where) from None
        except OSError as exc:
            raise RawFormatError(f"unreadable ({exc.strerror or exc})", file=path, **where) from None

    def _json(self, path: Path, **where) -> dict:
        text = self._text(path, **where)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RawFormatError(f"not valid JSON ({exc.msg} at line {exc.lineno})", file=path, **where) from None
        except RecursionError:
            raise RawFormatError("not valid JSON (nested too deeply)", file=path, **where) from None
        if not isinstance(obj, dict):
            raise RawFormatError(f"expected a JSON object, got {type(obj).__name__}", file=path, **where)
        return obj

    def _case_twins(self, parent: Path, name: str, kind: str, **where) -> None:
        """Refuse ``name`` when a sibling differs from it only in letter case (one folder on
        case-insensitive file systems, and in the store)."""
        twins = sorted(p.name for p in parent.iterdir()
                       if p.name != name and p.name.casefold() == name.casefold())
        if twins:
            raise RawFormatError(f"{kind} id {name!r} differs only in letter case from {twins} "
                                 "(ids must be unique ignoring case)", file=parent / name, **where)

    # listing
    def subjects(self) -> list[str]:
        """Sorted subject ids (folders with a valid id; others raise)."""
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            try:
                check_id(p.name, "subject")
            except UnsafeIdError as exc:
                raise RawFormatError(str(exc), file=p) from None
            out.append(p.name)
        return out

    def samples(self, subject: str) -> list[str]:
        """Sorted names of the sample folders of ``subject``.

        Every non-hidden folder (or link) is listed, also one whose name is not a valid
        id: :meth:`sample` then refuses it, so only that sample fails.
        """
        self._id(subject, "subject", subject=subject)
        d = self._dir(subject, subject=subject)
        if not d.is_dir():
            raise RawFormatError("no such subject folder", subject=subject, file=d)
        return [p.name for p in sorted(d.iterdir())
                if not p.name.startswith(".") and (p.is_dir() or p.is_symlink())]

    # metadata
    def subject(self, subject: str) -> SubjectMeta:
        """Read and validate ``subject.json``."""
        self._id(subject, "subject", file=self.root / str(subject))
        path = self._dir(subject, "subject.json", subject=subject)
        self._case_twins(self.root, subject, "subject", subject=subject)
        d = self._json(path, subject=subject)
        where = dict(subject=subject, file=path)
        for k in ("subject_id", "gender", "age", "split"):
            if k not in d:
                raise RawFormatError(f"missing field {k!r}", **where)
        if d["subject_id"] != subject:
            raise RawFormatError(f"subject_id {d['subject_id']!r} does not match its folder", **where)
        if d["gender"] not in GENDERS:
            raise RawFormatError(f"gender {d['gender']!r} not in {GENDERS}", **where)
        age = d["age"]
        if age is not None and (not _is_int(age) or not 0 < age < 130):
            raise RawFormatError(f"age {age!r} is not an integer in 1..129 or null", **where)
        if d["split"] not in SPLITS:
            raise RawFormatError(f"split {d['split']!r} not in {SPLITS}", **where)
        return SubjectMeta(subject, d["gender"], age, d["split"])

    def sample(self, subject: str, sample: str, expressions: Iterable[str] | None = None) -> SampleMeta:
        """Read and validate ``sample.json`` and the sample folder's entries.

        ``expressions`` restricts the allowed expression names (default: the 22 of
        ``kernels.synth.expressions``, whose categories must then match).
        """
        self._id(subject, "subject", subject=subject)
        d_subject = self._dir(subject, subject=subject)
        self._id(sample, "sample", subject=subject, sample=sample, file=d_subject / str(sample))
        sdir = self._dir(subject, sample, subject=subject, sample=sample)
        self._case_twins(d_subject, sample, "sample", subject=subject, sample=sample)
        path = self._dir(subject, sample, "sample.json", subject=subject, sample=sample)
        d = self._json(path, subject=subject, sample=sample)
        where = dict(subject=subject, sample=sample, file=path)
        for k in ("subject_id", "sample_id", "expression", "category", "views", "fringe", "image"):
            if k not in d:
                raise RawFormatError(f"missing field {k!r}", **where)
        if d["subject_id"] != subject or d["sample_id"] != sample:
            raise RawFormatError(f"subject_id/sample_id {d['subject_id']!r}/{d['sample_id']!r} do not match "
                                 "the folders", **where)
        known = _expression_categories()
        allowed = set(known) if expressions is None else set(expressions)
        if not isinstance(d["expression"], str) or d["expression"] not in allowed:
            raise RawFormatError(f"unknown expression {d['expression']!r}", **where)
        if d["category"] not in CATEGORIES:
            raise RawFormatError(f"category {d['category']!r} not in {CATEGORIES}", **where)
        if d["expression"] in known and d["category"] != known[d["expression"]]:
            raise RawFormatError(f"category {d['category']!r} does not match expression {d['expression']!r} "
                                 f"({known[d['expression']]!r})", **where)
        views = d["views"]
        if not isinstance(views, list) or not views or len(set(map(repr, views))) != len(views):
            raise RawFormatError(f"views must be a non-empty list of distinct ids, got {views!r}", **where)
        for v in views:
            self._id(v, "view", **where)
        f, img = d["fringe"], d["image"]
        if not isinstance(f, dict) or not isinstance(img, dict):
            raise RawFormatError("fields 'fringe' and 'image' must be JSON objects", **where)
        ints = {"fringe.steps": f.get("steps"), "fringe.projector_width": f.get("projector_width"),
                "fringe.phase_model": f.get("phase_model", 1), "image.width": img.get("width"),
                "image.height": img.get("height")}
        bad = {k: v for k, v in ints.items() if not _is_int(v)}
        freqs = f.get("frequencies")
        if not isinstance(freqs, list) or not all(_is_int(x) for x in freqs):
            bad["fringe.frequencies"] = freqs
        if bad:
            raise RawFormatError(f"malformed fringe/image block: expected integers, got {bad}", **where)
        steps, pw, width, height = ints["fringe.steps"], ints["fringe.projector_width"], ints["image.width"], \
            ints["image.height"]
        freqs = tuple(freqs)
        if steps < 3 or not freqs or freqs[0] != 1 or any(b <= a for a, b in zip(freqs, freqs[1:])) or pw <= 0 \
                or len(freqs) * steps > self.max_fringe_images:
            raise RawFormatError(f"invalid fringe settings steps={steps} frequencies={list(freqs)} "
                                 f"projector_width={pw} (steps >= 3, frequencies increasing from 1, at most "
                                 f"{self.max_fringe_images} images)", **where)
        if ints["fringe.phase_model"] != 1:
            raise RawFormatError(f"unsupported fringe.phase_model {ints['fringe.phase_model']} (image model v1)",
                                 **where)
        if not (0 < width <= self.max_side and 0 < height <= self.max_side and width * height <= self.max_pixels):
            raise RawFormatError(f"invalid image size {width}x{height} (at most {self.max_pixels} pixels)", **where)
        entries = [p for p in sdir.iterdir() if not p.name.startswith(".") and p.name != "sample.json"]
        extra_dirs = sorted(p.name for p in entries if p.name not in views and (p.is_dir() or p.is_symlink()))
        if extra_dirs:
            raise RawFormatError(f"view folder(s) {extra_dirs} not listed in sample.json views {views}",
                                 file=sdir / extra_dirs[0], subject=subject, sample=sample)
        extra = sorted(p.name for p in entries if p.name not in views)
        if extra:
            raise RawFormatError(f"unexpected file(s) {extra}", file=sdir / extra[0], subject=subject, sample=sample)
        return SampleMeta(subject, sample, d["expression"], d["category"], tuple(views),
                          FringeSpec(steps, freqs, pw, 1), width, height)

    def calibration(self, subject: str, sample: str, view: str) -> ViewCalibration:
        """Read and validate ``calibration.json`` of a view."""
        where = dict(subject=subject, sample=sample, view=view)
        path = self._dir(subject, sample, view, "calibration.json", **where)
        d = self._json(path, **where)
        if d.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise RawFormatError(f"unsupported format_version {d.get('format_version')!r}", file=path, **where)
        group = d.get("group", view)
        if group != view:
            raise RawFormatError(f"calibration of group {group!r} in the folder of view {view!r}", file=path, **where)
        cams = {}
        for k in ("ir", "projector", "rgb"):
            if k not in d or not isinstance(d[k], dict):
                raise RawFormatError(f"missing camera {k!r}", file=path, **where)
            try:
                cams[k] = Camera.from_dict(d[k])
            except (ValueError, TypeError, KeyError, OverflowError) as exc:
                raise RawFormatError(f"camera {k!r}: {exc}", file=path, **where) from None
            if cams[k].width * cams[k].height > self.max_pixels:
                raise RawFormatError(f"camera {k!r} claims {cams[k].width}x{cams[k].height} pixels, more than the "
                                     f"{self.max_pixels} allowed", file=path, **where)
        if cams["projector"].has_distortion:
            raise RawFormatError("projector must have zero distortion (image model v1)", file=path, **where)
        return ViewCalibration(view, cams["ir"], cams["projector"], cams["rgb"])

    def _image(self, path: Path, shape: tuple[int, int], mode: str, out: np.ndarray | None = None,
               **where) -> np.ndarray:
        """Read, check and decode one 8-bit PNG (:mod:`storage.png`; Pillow only for interlaced files).

        Its header is checked (size, mode, the pixel limit: a decompression bomb is refused
        before anything is inflated) and its file size bounded before the file is read whole.
        """
        size = self._regular(path, **where)
        try:
            with open(path, "rb") as f:
                head = f.read(33)
                hdr = png.read_header(head)
                w, h, depth, ctype = hdr.width, hdr.height, hdr.bit_depth, hdr.colour_type
                if w * h > self.max_pixels:
                    raise RawFormatError(f"image header claims {w}x{h} pixels, more than the {self.max_pixels} "
                                         f"allowed (expected {shape[1]}x{shape[0]}; refused before decoding)",
                                         file=path, **where)
                if (h, w) != shape:
                    raise RawFormatError(f"image is {w}x{h}, expected {shape[1]}x{shape[0]}", file=path, **where)
                if (depth, ctype) != (8, _MODE_COLOUR_TYPE[mode]):
                    raise RawFormatError(
                        f"image mode: {depth}-bit {png.COLOUR_TYPES.get(ctype, f'colour type {ctype}')}, expected "
                        f"8-bit {png.COLOUR_TYPES[_MODE_COLOUR_TYPE[mode]]} (mode {mode!r})", file=path, **where)
                limit = h * (1 + w * (3 if mode == "RGB" else 1)) * 101 // 100 + _PNG_EXTRA_BYTES
                if size > limit:
                    raise RawFormatError(f"file is {size} bytes, more than a {w}x{h} {mode} PNG can need "
                                         f"({limit})", file=path, **where)
                data = head + f.read(limit + 1 - len(head))
        except png.PNGError as exc:
            raise RawFormatError(f"not a readable image ({exc})", file=path, **where) from None
        except FileNotFoundError:
            raise RawFormatError("missing file", file=path, **where) from None
        except OSError as exc:
            raise RawFormatError(f"unreadable ({exc.strerror or exc})", file=path, **where) from None
        if len(data) > limit:
            raise RawFormatError(f"file grew past {limit} bytes while being read", file=path, **where)
        if hdr.interlace:
            return self._image_pillow(io.BytesIO(data), path, shape, mode, out, **where)
        try:
            return png.decode(data, out)
        except png.PNGError as exc:
            raise RawFormatError(f"not a readable image ({exc})", file=path, **where) from None

    @staticmethod
    def _image_pillow(data: io.BytesIO, path: Path, shape: tuple[int, int], mode: str, out: np.ndarray | None,
                      **where) -> np.ndarray:
        try:
            with Image.open(data, formats=["PNG"]) as im:
                if im.size != (shape[1], shape[0]) or im.mode != mode:
                    raise RawFormatError(f"image is {im.size[0]}x{im.size[1]} mode {im.mode!r}, expected "
                                         f"{shape[1]}x{shape[0]} mode {mode!r}", file=path, **where)
                arr = np.asarray(im)
        except RawFormatError:
            raise
        except Exception as exc:  # PIL raises many types for corrupt files
            raise RawFormatError(f"not a readable image ({type(exc).__name__}: {exc})", file=path, **where) from None
        if arr.dtype != np.uint8 or arr.shape[:2] != shape:
            raise RawFormatError(f"image decoded as {arr.dtype} {arr.shape}, expected uint8 {shape}", file=path,
                                 **where)
        if out is not None:
            out[...] = arr
            return out
        return arr

    def landmarks(self, subject: str, sample: str, view: str, width: int, height: int
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Read ``landmarks.csv``: (106, 2) pixel coordinates (NaN where not visible) and (106,) bool."""
        where = dict(subject=subject, sample=sample, view=view)
        path = self._dir(subject, sample, view, "landmarks.csv", **where)
        text = self._text(path, **where)
        try:
            rows = list(csv.reader(io.StringIO(text)))
        except csv.Error as exc:
            raise RawFormatError(f"not a CSV file ({exc})", file=path, **where) from None
        if not rows or [c.strip() for c in rows[0]] != ["index", "x", "y", "visible"]:
            raise RawFormatError("header must be 'index,x,y,visible'", file=path, **where)
        body = [r for r in rows[1:] if r]
        if len(body) != N_LANDMARKS:
            raise RawFormatError(f"expected {N_LANDMARKS} landmark rows, got {len(body)}", file=path, **where)
        pts = np.full((N_LANDMARKS, 2), np.nan)
        vis = np.zeros(N_LANDMARKS, bool)
        for k, r in enumerate(body):
            try:
                if len(r) != 4:
                    raise ValueError
                idx, x, y, v = int(r[0]), float(r[1]), float(r[2]), int(r[3])
            except ValueError:
                raise RawFormatError(f"row {k + 1}: malformed {r!r} (expected index,x,y,visible)", file=path,
                                     **where) from None
            if idx != k or v not in (0, 1):
                raise RawFormatError(f"row {k + 1}: index must be {k} and visible 0/1, got {r!r}", file=path, **where)
            if v:
                if not (math.isfinite(x) and math.isfinite(y)):
                    raise RawFormatError(f"landmark {k}: visible but x/y is NaN", file=path, **where)
                if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
                    raise RawFormatError(f"landmark {k}: ({x}, {y}) outside the {width}x{height} image",
                                         file=path, **where)
                pts[k] = (x, y)
                vis[k] = True
        return pts, vis

    def rgb(self, subject: str, sample: str, view: str, calibration: ViewCalibration | None = None) -> np.ndarray:
        """Read and validate ``rgb.png`` of a view: (h, w, 3) uint8 of the calibration's RGB camera size."""
        where = dict(subject=subject, sample=sample, view=view)
        cal = calibration or self.calibration(subject, sample, view)
        path = self._dir(subject, sample, view, "rgb.png", **where)
        return self._image(path, (cal.rgb.height, cal.rgb.width), "RGB", **where)

    def read_view(self, subject: str, sample: str, view: str, meta: SampleMeta | None = None) -> RawView:
        """Read and validate every file of one view of a sample."""
        meta = meta or self.sample(subject, sample)
        where = dict(subject=subject, sample=sample, view=view)
        if view not in meta.views:
            raise RawFormatError(f"view not listed in sample.json ({list(meta.views)})", **where)
        vdir = self._dir(subject, sample, view, **where)
        if not vdir.is_dir():
            raise RawFormatError("missing view folder" if not vdir.exists() else "not a folder", file=vdir, **where)
        names = meta.fringe.file_names()
        expected = set(names) | {"rgb.png", "calibration.json", "landmarks.csv"}
        extra = sorted(p.name for p in vdir.iterdir() if p.name not in expected and not p.name.startswith("."))
        if extra:
            raise RawFormatError(f"unexpected file(s) {extra}", file=vdir / extra[0], **where)
        calib = self.calibration(subject, sample, view)
        if (calib.ir.width, calib.ir.height) != (meta.width, meta.height):
            raise RawFormatError(f"IR camera is {calib.ir.width}x{calib.ir.height} but sample.json says "
                                 f"{meta.width}x{meta.height}", file=vdir / "calibration.json", **where)
        if calib.projector.width != meta.fringe.projector_width:
            raise RawFormatError("projector width differs from sample.json", file=vdir / "calibration.json", **where)
        L, N = len(meta.fringe.frequencies), meta.fringe.steps
        fringe = np.empty((L, N, meta.height, meta.width), np.uint8)
        files: dict[str, Path] = {}
        for k, name in enumerate(names):
            p = self._dir(subject, sample, view, name, **where)
            self._image(p, (meta.height, meta.width), "L", out=fringe[k // N, k % N], **where)
            files[name] = p
        rgb_path = self._dir(subject, sample, view, "rgb.png", **where)
        rgb = self._image(rgb_path, (calib.rgb.height, calib.rgb.width), "RGB", **where)
        files["rgb.png"] = rgb_path
        files["calibration.json"] = vdir / "calibration.json"
        lm, vis = self.landmarks(subject, sample, view, calib.rgb.width, calib.rgb.height)
        files["landmarks.csv"] = vdir / "landmarks.csv"
        return RawView(fringe, rgb, calib, lm, vis, files)

    def clean_partial(self) -> list[Path]:
        """Remove leftovers of interrupted writes (hidden ``.tmp-*``/``.old-*`` folders); returns them."""
        removed = []
        for subj in self.root.iterdir():
            if not subj.is_dir() or subj.is_symlink():
                continue
            for p in subj.iterdir():
                if p.name.startswith((".tmp-", ".old-", ".subject.json.")):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
        return removed
