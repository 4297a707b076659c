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
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from kernels.camera import Camera
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

class RawDataset:
    """Validating reader of a raw root.

    Every method raises :class:`RawFormatError` (a ``ValueError``) naming the subject,
    sample, view and file of the first defect it finds. Hidden entries (names starting
    with ``.``, e.g. an interrupted write) are ignored.
    """

    #: refuse images claiming more pixels than this (decompression bombs)
    max_pixels: int = 4096 * 4096

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        marker = self.root / "raw-format.json"
        if not self.root.is_dir():
            raise RawFormatError(f"raw root {self.root} is not a directory", file=self.root)
        try:
            meta = json.loads(marker.read_text())
        except FileNotFoundError:
            raise RawFormatError("missing raw-format.json: not a pixelface raw folder", file=marker) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RawFormatError(f"not valid JSON ({exc})", file=marker) from None
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise RawFormatError(f"unsupported format {meta.get('format')!r} version {meta.get('version')!r} "
                                 f"(this reader reads {FORMAT_NAME} v{FORMAT_VERSION})", file=marker)

    # paths
    def _dir(self, *parts: str, subject=None, sample=None, view=None) -> Path:
        try:
            return safe_join(self.root, *parts)
        except UnsafeIdError as exc:
            raise RawFormatError(str(exc), subject=subject, sample=sample, view=view) from None

    def _json(self, path: Path, **where) -> dict:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RawFormatError("missing file", file=path, **where) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RawFormatError(f"unreadable ({exc})", file=path, **where) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RawFormatError(f"not valid JSON ({exc.msg} at line {exc.lineno})", file=path, **where) from None
        if not isinstance(obj, dict):
            raise RawFormatError("expected a JSON object", file=path, **where)
        return obj

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
        """Sorted sample ids of ``subject``."""
        check_id(subject, "subject")
        d = self._dir(subject, subject=subject)
        if not d.is_dir():
            raise RawFormatError("no such subject folder", subject=subject, file=d)
        out = []
        for p in sorted(d.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            try:
                check_id(p.name, "sample")
            except UnsafeIdError as exc:
                raise RawFormatError(str(exc), subject=subject, file=p) from None
            out.append(p.name)
        return out

    # metadata
    def subject(self, subject: str) -> SubjectMeta:
        """Read and validate ``subject.json``."""
        check_id(subject, "subject")
        path = self._dir(subject, "subject.json", subject=subject)
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
        if age is not None and (not isinstance(age, int) or isinstance(age, bool) or not 0 < age < 130):
            raise RawFormatError(f"age {age!r} is not an integer in 1..129 or null", **where)
        if d["split"] not in SPLITS:
            raise RawFormatError(f"split {d['split']!r} not in {SPLITS}", **where)
        return SubjectMeta(subject, d["gender"], age, d["split"])

    def sample(self, subject: str, sample: str, expressions: Iterable[str] | None = None) -> SampleMeta:
        """Read and validate ``sample.json``; ``expressions`` restricts the allowed names."""
        check_id(subject, "subject")
        check_id(sample, "sample")
        path = self._dir(subject, sample, "sample.json", subject=subject, sample=sample)
        d = self._json(path, subject=subject, sample=sample)
        where = dict(subject=subject, sample=sample, file=path)
        for k in ("subject_id", "sample_id", "expression", "category", "views", "fringe", "image"):
            if k not in d:
                raise RawFormatError(f"missing field {k!r}", **where)
        if d["subject_id"] != subject or d["sample_id"] != sample:
            raise RawFormatError("subject_id/sample_id do not match the folders", **where)
        if expressions is not None and d["expression"] not in set(expressions):
            raise RawFormatError(f"unknown expression {d['expression']!r}", **where)
        if d["category"] not in CATEGORIES:
            raise RawFormatError(f"category {d['category']!r} not in {CATEGORIES}", **where)
        views = d["views"]
        if not isinstance(views, list) or not views or len(set(views)) != len(views):
            raise RawFormatError(f"views must be a non-empty list of distinct ids, got {views!r}", **where)
        for v in views:
            try:
                check_id(v, "view")
            except UnsafeIdError as exc:
                raise RawFormatError(str(exc), **where) from None
        f = d["fringe"]
        try:
            steps, freqs, pw = int(f["steps"]), tuple(int(x) for x in f["frequencies"]), int(f["projector_width"])
            width, height = int(d["image"]["width"]), int(d["image"]["height"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RawFormatError(f"malformed fringe/image block ({exc!r})", **where) from None
        if steps < 3 or not freqs or freqs[0] != 1 or any(b <= a for a, b in zip(freqs, freqs[1:])) or pw <= 0:
            raise RawFormatError(f"invalid fringe settings steps={steps} frequencies={freqs} "
                                 f"projector_width={pw}", **where)
        if not (0 < width <= 16384 and 0 < height <= 16384):
            raise RawFormatError(f"invalid image size {width}x{height}", **where)
        return SampleMeta(subject, sample, d["expression"], d["category"], tuple(views),
                          FringeSpec(steps, freqs, pw, int(f.get("phase_model", 1))), width, height)

    def calibration(self, subject: str, sample: str, view: str) -> ViewCalibration:
        """Read and validate ``calibration.json`` of a view."""
        where = dict(subject=subject, sample=sample, view=view)
        path = self._dir(subject, sample, view, "calibration.json", **where)
        d = self._json(path, **where)
        cams = {}
        for k in ("ir", "projector", "rgb"):
            if k not in d or not isinstance(d[k], dict):
                raise RawFormatError(f"missing camera {k!r}", file=path, **where)
            try:
                cams[k] = Camera.from_dict(d[k])
            except (ValueError, TypeError, KeyError) as exc:
                raise RawFormatError(f"camera {k!r}: {exc}", file=path, **where) from None
        if cams["projector"].has_distortion:
            raise RawFormatError("projector must have zero distortion (image model v1)", file=path, **where)
        return ViewCalibration(str(d.get("group", view)), cams["ir"], cams["projector"], cams["rgb"])

    def _image(self, path: Path, shape: tuple[int, int], mode: str, **where) -> np.ndarray:
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > self.max_pixels or (h, w) != shape:
                    raise RawFormatError(f"image is {w}x{h}, expected {shape[1]}x{shape[0]}", file=path, **where)
                if im.mode != mode:
                    raise RawFormatError(f"image mode {im.mode!r}, expected {mode!r}", file=path, **where)
                arr = np.asarray(im)
        except RawFormatError:
            raise
        except FileNotFoundError:
            raise RawFormatError("missing file", file=path, **where) from None
        except Exception as exc:  # PIL raises many types for corrupt files
            raise RawFormatError(f"not a readable image ({type(exc).__name__}: {exc})", file=path, **where) from None
        if arr.dtype != np.uint8:
            raise RawFormatError(f"image dtype {arr.dtype}, expected uint8", file=path, **where)
        return arr

    def landmarks(self, subject: str, sample: str, view: str, width: int, height: int
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Read ``landmarks.csv``: (106, 2) pixel coordinates (NaN where not visible) and (106,) bool."""
        where = dict(subject=subject, sample=sample, view=view)
        path = self._dir(subject, sample, view, "landmarks.csv", **where)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RawFormatError("missing file", file=path, **where) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RawFormatError(f"unreadable ({exc})", file=path, **where) from None
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or [c.strip() for c in rows[0]] != ["index", "x", "y", "visible"]:
            raise RawFormatError("header must be 'index,x,y,visible'", file=path, **where)
        body = [r for r in rows[1:] if r]
        if len(body) != N_LANDMARKS:
            raise RawFormatError(f"expected {N_LANDMARKS} landmark rows, got {len(body)}", file=path, **where)
        pts = np.full((N_LANDMARKS, 2), np.nan)
        vis = np.zeros(N_LANDMARKS, bool)
        for k, r in enumerate(body):
            try:
                idx, x, y, v = int(r[0]), float(r[1]), float(r[2]), int(r[3])
            except (ValueError, IndexError):
                raise RawFormatError(f"row {k + 1}: malformed {r!r}", file=path, **where) from None
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
            raise RawFormatError("missing view folder", file=vdir, **where)
        calib = self.calibration(subject, sample, view)
        if (calib.ir.width, calib.ir.height) != (meta.width, meta.height):
            raise RawFormatError(f"IR camera is {calib.ir.width}x{calib.ir.height} but sample.json says "
                                 f"{meta.width}x{meta.height}", file=vdir / "calibration.json", **where)
        if calib.projector.width != meta.fringe.projector_width:
            raise RawFormatError("projector width differs from sample.json", file=vdir / "calibration.json", **where)
        L, N = len(meta.fringe.frequencies), meta.fringe.steps
        fringe = np.empty((L, N, meta.height, meta.width), np.uint8)
        files: dict[str, Path] = {}
        names = meta.fringe.file_names()
        for k, name in enumerate(names):
            p = self._dir(subject, sample, view, name, **where)
            fringe[k // N, k % N] = self._image(p, (meta.height, meta.width), "L", **where)
            files[name] = p
        expected = set(names) | {"rgb.png", "calibration.json", "landmarks.csv"}
        extra = sorted(p.name for p in vdir.iterdir() if p.name not in expected and not p.name.startswith("."))
        if extra:
            raise RawFormatError(f"unexpected file(s) {extra}", file=vdir / extra[0], **where)
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
