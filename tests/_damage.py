"""The bad-input corpus: defect declarations and the generators that apply them to a raw root.

Every :class:`Defect` says what is damaged, at which level it is detected, and what the
user must see (a message fragment, the subject / sample / view / file it must name, and the
outcome). ``tests/test_bad_input.py`` applies the raw defects to copies of one clean
synthetic sample, runs one ``pixelface build`` over the damaged dataset and checks each
declaration; ``docs/bad-input.md`` is rendered from these declarations (:func:`render_doc`).

Levels and their outcome in ``pixelface build``:

* ``view``: the ``decode`` stage of that view fails (it reads and validates every file of
  the view), the view's other stages and the sample's ``fusion`` / ``surface`` are
  ``upstream_failed``, the sample's other views complete; exit status 1.
* ``sample``: planning refuses the sample (a ``plan`` row ``failed`` in ``stage_runs``, the
  ``samples`` row ``failed``); no stage of it runs; exit status 1.
* ``subject``: planning refuses the subject (``subject.json`` or the subject folder); its
  flow run fails with the message (and a failed `plan` row), every other subject completes; exit status 1.
* ``dataset``: nothing can be read; ``pixelface build`` stops at once, exit status 2.
* ``build-cli`` / ``scan-cli``: bad command-line input; exit status 2, nothing written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

SOURCE = ("S0000", "neutral")
"""The clean synthetic sample every damaged sample is copied from."""
DAMAGED_SUBJECT = "S0001"
"""The subject holding the damaged samples (and a clean copy of the source sample)."""
VIEWS = ("left", "middle", "right")

OUTCOMES = {
    "view": "`decode` of the view fails; its other stages and the sample's `fusion`/`surface`/`registration` "
            "are `upstream_failed`; the other views complete; exit 1",
    "sample": "planning refuses the sample: `plan` row failed, `samples` row failed, no stage runs; exit 1",
    "subject": "planning refuses the subject: its flow run fails with the message (stderr `FAILED <subject>: "
               "...`), a failed `plan` row (sample id empty) and a failed `subjects` row say why; other "
               "subjects complete; exit 1",
    "dataset": "`pixelface build` stops before any work: `error: ...` on stderr, exit 2",
    "build-cli": "`pixelface build` refuses the arguments: `error: ...` on stderr, exit 2",
    "scan-cli": "`pixelface scan` refuses the input: one-line `error: ...`, exit 2, nothing written",
}


@dataclass
class Site:
    """Where a raw defect is applied: the raw root, a folder outside it, and the damaged ids."""

    raw: Path
    outside: Path
    subject: str
    sample: str | None = None

    @property
    def sdir(self) -> Path:
        return self.raw / self.subject / self.sample

    def vdir(self, view: str) -> Path:
        return self.sdir / view


@dataclass(frozen=True)
class Defect:
    """One entry of the corpus.

    ``key`` is the id of the damaged sample (levels ``view``/``sample``), subject (``subject``)
    or simply a name (other levels). ``names`` are the extra ids the message must carry
    (e.g. a case twin), ``file`` the file (or folder) name it must name.
    """

    key: str
    level: str
    what: str
    needle: str
    damage: Callable = field(repr=False)
    view: str | None = None
    file: str | None = None
    extra_samples: tuple[str, ...] = ()

    def where(self) -> str:
        """The location the message must start with (as rendered in the doc)."""
        if self.level == "view":
            return f"subject {DAMAGED_SUBJECT} / sample {self.key} / view {self.view} / file .../{self.file}"
        if self.level == "sample":
            return f"subject {DAMAGED_SUBJECT} / sample {self.key} / file .../{self.file}"
        if self.level == "subject":
            return f"subject {self.key} / file .../{self.file}"
        return f"file .../{self.file}" if self.file else "(the option)"


# -- small tools -------------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, colour_type: int = 0) -> bytes:
    """A tiny PNG whose header claims ``width x height`` 8-bit pixels (a decompression bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def save_image(path: Path, arr: np.ndarray, fmt: str = "PNG") -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(buf.getvalue())


def read_grey(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    """Rewrite the JSON object at ``path`` after ``fn`` changed it in place (its return value is ignored)."""
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d, indent=1))


def edit_landmark_row(path: Path, index: int, row: str) -> None:
    lines = path.read_text().splitlines()
    lines[1 + index] = row
    path.write_text("\n".join(lines) + "\n")


def first_visible_landmark(path: Path) -> int:
    for line in path.read_text().splitlines()[1:]:
        i, _, _, v = line.split(",")
        if v == "1":
            return int(i)
    raise AssertionError(f"{path}: no visible landmark")


def copy_sample(raw: Path, subject: str, sample: str, src: tuple[str, str] = SOURCE) -> Path:
    """Copy the source sample to ``raw/subject/sample`` with its ``sample.json`` ids rewritten."""
    dst = raw / subject / sample
    shutil.copytree(raw / src[0] / src[1], dst, symlinks=True)
    edit_json(dst / "sample.json", lambda d: d.update(subject_id=subject, sample_id=sample))
    return dst


def copy_subject(raw: Path, subject: str, src: str = SOURCE[0]) -> Path:
    """Copy the source subject to ``raw/subject`` with every id rewritten."""
    dst = raw / subject
    shutil.copytree(raw / src, dst, symlinks=True)
    edit_json(dst / "subject.json", lambda d: d.update(subject_id=subject))
    for p in dst.glob("*/sample.json"):
        edit_json(p, lambda d: d.update(subject_id=subject))
    return dst


def _cal(view: str, fn: Callable[[dict], object]) -> Callable[[Site], None]:
    return lambda s: edit_json(s.vdir(view) / "calibration.json", fn)


def _sample_json(fn: Callable[[dict], object]) -> Callable[[Site], None]:
    return lambda s: edit_json(s.sdir / "sample.json", fn)


def _set_k(d: dict, cam: str, i: int, j: int, value: float) -> None:
    d[cam]["K"][i][j] = value


def _landmark(kind: str) -> Callable[[Site], None]:
    def apply(s: Site) -> None:
        p = s.vdir("left") / "landmarks.csv"
        k = first_visible_landmark(p)
        row = {"nan": f"{k},nan,nan,1", "outside": f"{k},9999.0,3.0,1", "type": f"{k},left_eye,3.0,1"}[kind]
        edit_landmark_row(p, k, row)
    return apply


def _truncate(s: Site) -> None:
    p = s.vdir("left") / "fringe_f1_n2.png"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _wrong_size(s: Site) -> None:
    p = s.vdir("left") / "fringe_f0_n3.png"
    a = read_grey(p)
    save_image(p, np.vstack([a, a[-1:]]))


def _sixteen_bit(s: Site) -> None:
    p = s.vdir("left") / "fringe_f1_n0.png"
    save_image(p, read_grey(p).astype(np.uint16) * 257)


def _colour_fringe(s: Site) -> None:
    p = s.vdir("left") / "fringe_f1_n1.png"
    save_image(p, np.repeat(read_grey(p)[..., None], 3, axis=2))


def _jpeg(s: Site) -> None:
    p = s.vdir("left") / "fringe_f0_n2.png"
    save_image(p, read_grey(p), fmt="JPEG")


def _grey_rgb(s: Site) -> None:
    p = s.vdir("left") / "rgb.png"
    with Image.open(p) as im:
        grey = np.asarray(im.convert("L"))
    save_image(p, grey)


def _symlink_file_outside(s: Site) -> None:
    p = s.vdir("left") / "fringe_f0_n2.png"
    target = s.outside / f"{s.sample}-fringe.png"
    shutil.copyfile(p, target)
    p.unlink()
    p.symlink_to(target)


def _symlink_view_outside(s: Site) -> None:
    v = s.vdir("right")
    target = s.outside / f"{s.sample}-right"
    shutil.move(str(v), str(target))
    v.symlink_to(target, target_is_directory=True)


def _symlink_loop(s: Site) -> None:
    p = s.vdir("left") / "fringe_f2_n2.png"
    p.unlink()
    p.symlink_to(p.name)  # points at itself


def _fifo(s: Site) -> None:
    p = s.vdir("left") / "fringe_f2_n1.png"
    p.unlink()
    os.mkfifo(p)
    threading.Thread(target=_unblock_readers, args=(p,), daemon=True).start()


def _unblock_readers(fifo: Path) -> None:
    """Watchdog: a reader that opens the FIFO (a regression) gets EOF at once instead of hanging the test.

    Opening for writing blocks until a reader opens it, so this never touches a correct reader.
    """
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY)
        except OSError:  # the FIFO is gone (temporary folder removed)
            return
        os.close(fd)
        time.sleep(0.05)


def _extra_view_folder(s: Site) -> None:
    shutil.copytree(s.vdir("left"), s.sdir / "top")


def _drop_view(s: Site) -> None:
    shutil.rmtree(s.vdir("right"))


def _too_deep(s: Site) -> None:
    (s.sdir / "sample.json").write_text("[" * 100_000)


def _too_big(s: Site) -> None:
    p = s.sdir / "sample.json"
    p.write_text(p.read_text() + " " * (2 << 20))


def _category(d: dict) -> None:
    d.update(expression="smile", category="negative")


# -- the corpus --------------------------------------------------------------------------------

RAW_DEFECTS: tuple[Defect, ...] = (
    # fringe images
    Defect("fringe-truncated", "view", "fringe PNG cut to half its bytes", "not a readable image", _truncate,
           "left", "fringe_f1_n2.png"),
    Defect("fringe-zero-bytes", "view", "zero-byte fringe PNG", "not a PNG file: empty file",
           lambda s: (s.vdir("left") / "fringe_f0_n1.png").write_bytes(b""), "left", "fringe_f0_n1.png"),
    Defect("fringe-not-an-image", "view", "fringe file holding text", "not a PNG file",
           lambda s: (s.vdir("left") / "fringe_f2_n0.png").write_text("this is not an image\n"), "left",
           "fringe_f2_n0.png"),
    Defect("fringe-jpeg", "view", "fringe image in another format (JPEG bytes, right size and mode)",
           "not a PNG file", _jpeg, "left", "fringe_f0_n2.png"),
    Defect("fringe-wrong-size", "view", "fringe image one row taller than sample.json says",
           "image is 96x81, expected 96x80", _wrong_size, "left", "fringe_f0_n3.png"),
    Defect("fringe-16-bit", "view", "16-bit fringe image (wrong dtype)", "image mode: 16-bit grey, expected 8-bit grey",
           _sixteen_bit, "left", "fringe_f1_n0.png"),
    Defect("fringe-colour", "view", "RGB image where a grey fringe image belongs", "image mode: 8-bit RGB, expected "
           "8-bit grey", _colour_fringe, "left", "fringe_f1_n1.png"),
    Defect("fringe-missing-step", "view", "one phase step missing", "missing file",
           lambda s: (s.vdir("left") / "fringe_f1_n3.png").unlink(), "left", "fringe_f1_n3.png"),
    Defect("fringe-bomb", "view", "PNG header claiming 100000x100000 pixels (decompression bomb)",
           "image header claims 100000x100000 pixels", lambda s: (s.vdir("left") / "fringe_f0_n0.png").write_bytes(
               png_claiming(100_000, 100_000)), "left", "fringe_f0_n0.png"),
    Defect("fringe-fifo", "view", "a FIFO in place of a fringe image (would block a reader)",
           "not a regular file (a FIFO)", _fifo, "left", "fringe_f2_n1.png"),
    Defect("fringe-symlink-outside", "view", "fringe image is a symlink to a file outside the raw root",
           "leaves its root", _symlink_file_outside, "left", "fringe_f0_n2.png"),
    Defect("fringe-symlink-loop", "view", "fringe image is a symlink pointing at itself", "cannot be resolved",
           _symlink_loop, "left", "fringe_f2_n2.png"),
    Defect("extra-file", "view", "unexpected extra file in a view folder", "unexpected file(s) ['notes.txt']",
           lambda s: (s.vdir("left") / "notes.txt").write_text("operator notes\n"), "left", "notes.txt"),
    Defect("rgb-grey", "view", "grey rgb.png", "image mode: 8-bit grey, expected 8-bit RGB", _grey_rgb, "left",
           "rgb.png"),
    # calibration
    Defect("calibration-nan", "view", "NaN in the IR camera matrix", "camera 'ir': camera 'left/ir' K: contains 1 NaN",
           _cal("left", lambda d: _set_k(d, "ir", 0, 2, float("nan"))), "left", "calibration.json"),
    Defect("calibration-singular", "view", "singular IR camera matrix (fx = 0)", "not invertible",
           _cal("left", lambda d: _set_k(d, "ir", 0, 0, 0.0)), "left", "calibration.json"),
    Defect("calibration-not-json", "view", "calibration.json that is not valid JSON", "not valid JSON",
           lambda s: (s.vdir("left") / "calibration.json").write_text('{"ir": {"K": [[1, 0'), "left",
           "calibration.json"),
    Defect("calibration-missing-field", "view", "IR camera without its K matrix", "misses field(s) ['K']",
           _cal("left", lambda d: d["ir"].pop("K")), "left", "calibration.json"),
    Defect("calibration-wrong-group", "view", "the right group's calibration in the left folder",
           "calibration of group 'right' in the folder of view 'left'",
           lambda s: shutil.copyfile(s.vdir("right") / "calibration.json", s.vdir("left") / "calibration.json"),
           "left", "calibration.json"),
    Defect("calibration-huge-camera", "view", "RGB camera claiming 100000x100000 pixels",
           "camera 'rgb' claims 100000x100000 pixels", _cal("left", lambda d: d["rgb"].update(width=100_000,
                                                                                               height=100_000)),
           "left", "calibration.json"),
    # landmarks
    Defect("landmarks-row-count", "view", "landmarks.csv with 103 of 106 rows", "expected 106 landmark rows, got 103",
           lambda s: (s.vdir("left") / "landmarks.csv").write_text(
               "\n".join((s.vdir("left") / "landmarks.csv").read_text().splitlines()[:-3]) + "\n"),
           "left", "landmarks.csv"),
    Defect("landmarks-nan", "view", "visible landmark with NaN coordinates", "visible but x/y is NaN",
           _landmark("nan"), "left", "landmarks.csv"),
    Defect("landmarks-outside", "view", "landmark outside the image", "outside the 96x80 image", _landmark("outside"),
           "left", "landmarks.csv"),
    Defect("landmarks-wrong-type", "view", "landmark coordinate that is not a number", "malformed",
           _landmark("type"), "left", "landmarks.csv"),
    # views
    Defect("view-missing", "view", "sample.json lists 3 views, 2 folders exist (mismatched view count)",
           "missing view folder", _drop_view, "right", "right"),
    Defect("view-symlink-outside", "view", "view folder is a symlink to a folder outside the raw root",
           "leaves its root", _symlink_view_outside, "right", "right"),
    # sample.json and the sample folder
    Defect("unknown-expression", "sample", "unknown expression name", "unknown expression 'yawn'",
           _sample_json(lambda d: d.update(expression="yawn")), file="sample.json"),
    Defect("category-mismatch", "sample", "category contradicting the expression",
           "category 'negative' does not match expression 'smile'", _sample_json(_category), file="sample.json"),
    Defect("sample-json-not-json", "sample", "sample.json cut short (invalid JSON)", "not valid JSON",
           lambda s: (s.sdir / "sample.json").write_text((s.sdir / "sample.json").read_text()[:40]),
           file="sample.json"),
    Defect("sample-json-too-deep", "sample", "sample.json nested 100000 levels deep", "nested too deeply",
           _too_deep, file="sample.json"),
    Defect("sample-json-too-big", "sample", "2 MiB sample.json", "more than the 1048576 allowed", _too_big,
           file="sample.json"),
    Defect("sample-id-duplicate", "sample", "sample.json claiming another sample's id (a copied folder)",
           "'S0001'/'neutral' do not match the folders", _sample_json(lambda d: d.update(sample_id="neutral")),
           file="sample.json"),
    Defect("view-id-traversal", "sample", "view id with a path separator and '..'",
           "view id '../neutral/middle' is not allowed",
           _sample_json(lambda d: d.update(views=["left", "../neutral/middle", "right"])), file="sample.json"),
    Defect("view-id-absolute", "sample", "view id that is an absolute path", "view id '/tmp/left' is not allowed",
           _sample_json(lambda d: d.update(views=["/tmp/left", "middle", "right"])), file="sample.json"),
    Defect("view-duplicate", "sample", "the same view listed twice", "non-empty list of distinct ids",
           _sample_json(lambda d: d.update(views=["left", "left", "right"])), file="sample.json"),
    Defect("view-extra-folder", "sample", "a 4th view folder not listed in sample.json (mismatched view count)",
           "view folder(s) ['top'] not listed in sample.json", _extra_view_folder, file="top"),
    Defect("fringe-steps-invalid", "sample", "2 phase steps", "invalid fringe settings steps=2",
           _sample_json(lambda d: d["fringe"].update(steps=2)), file="sample.json"),
    Defect("fringe-steps-float", "sample", "phase steps given as 4.5", "expected integers, got {'fringe.steps': 4.5}",
           _sample_json(lambda d: d["fringe"].update(steps=4.5)), file="sample.json"),
    Defect("image-size-huge", "sample", "sample.json claiming 100000x100000 images", "invalid image size "
           "100000x100000", _sample_json(lambda d: d["image"].update(width=100_000, height=100_000)),
           file="sample.json"),
    Defect("x..y", "sample", "sample folder whose name is not an id ('..' inside)", "sample id 'x..y' is not allowed",
           lambda s: None, file="x..y"),
    Defect("sample-symlink-outside", "sample", "sample folder is a symlink to a folder outside the raw root",
           "leaves its root", lambda s: None, file="sample-symlink-outside"),
    Defect("twin", "sample", "two sample folders whose ids differ only in case ('twin', 'Twin')",
           "differs only in letter case from ['Twin']", lambda s: None, file="twin", extra_samples=("Twin",)),
    # subjects
    Defect("subject-missing-id", "subject", "subject.json without subject_id", "missing field 'subject_id'",
           lambda s: edit_json(s.raw / s.subject / "subject.json", lambda d: d.pop("subject_id")),
           file="subject.json"),
    Defect("subject-duplicate-id", "subject", "subject.json claiming another subject's id (a copied folder)",
           "subject_id 'S0000' does not match its folder",
           lambda s: edit_json(s.raw / s.subject / "subject.json", lambda d: d.update(subject_id="S0000")),
           file="subject.json"),
    Defect("subject-bad-age", "subject", "age 500", "age 500 is not an integer in 1..129",
           lambda s: edit_json(s.raw / s.subject / "subject.json", lambda d: d.update(age=500)), file="subject.json"),
    Defect("subject-twin", "subject", "two subject folders whose ids differ only in case",
           "differs only in letter case from ['Subject-twin']", lambda s: copy_subject(s.raw, "Subject-twin"),
           file="subject-twin"),
    Defect("subject-symlink-outside", "subject", "subject folder is a symlink to a folder outside the raw root",
           "leaves its root", lambda s: None, file="subject.json"),
)
"""Defects applied to one damaged raw root and checked through one ``pixelface build``."""


def apply_raw_defects(raw: Path, outside: Path) -> None:
    """Damage ``raw`` (a copy of the clean synthetic root): one sample or subject per defect."""
    outside.mkdir(exist_ok=True)
    copy_subject(raw, DAMAGED_SUBJECT)  # keeps a clean copy of the source sample: it must complete
    for d in RAW_DEFECTS:
        if d.level in ("view", "sample"):
            site = Site(raw, outside, DAMAGED_SUBJECT, d.key)
            if d.key == "sample-symlink-outside":
                target = copy_sample(raw, DAMAGED_SUBJECT, d.key)
                shutil.move(str(target), str(outside / d.key))
                target.symlink_to(outside / d.key, target_is_directory=True)
                continue
            copy_sample(raw, DAMAGED_SUBJECT, d.key)
            for extra in d.extra_samples:
                copy_sample(raw, DAMAGED_SUBJECT, extra)
            d.damage(site)
        else:
            if d.key == "subject-symlink-outside":
                copy_subject(raw, d.key)
                shutil.move(str(raw / d.key), str(outside / d.key))
                (raw / d.key).symlink_to(outside / d.key, target_is_directory=True)
                continue
            copy_subject(raw, d.key)
            d.damage(Site(raw, outside, d.key))


# -- defects of the whole dataset and of the command line -----------------------------------------

@dataclass(frozen=True)
class CliDefect:
    """A defect checked by one command.

    ``setup`` damages a copy of the raw root (level ``dataset``: ``setup(raw)``) or returns the
    command's arguments (``build-cli``: ``setup(raw, store)``; ``scan-cli``: ``setup(files, out)``
    with ``files`` a folder holding ``mesh.ply``, ``lm.txt`` and the broken variants).
    """

    key: str
    level: str
    what: str
    needle: str
    setup: Callable = field(repr=False)
    file: str | None = None


DATASET_DEFECTS: tuple[CliDefect, ...] = (
    CliDefect("raw-format-not-json", "dataset", "raw-format.json that is not valid JSON", "not valid JSON",
              lambda raw: (raw / "raw-format.json").write_text("{"), "raw-format.json"),
    CliDefect("raw-format-version", "dataset", "raw-format.json of another version",
              "unsupported format 'pixelface-raw' version 2",
              lambda raw: edit_json(raw / "raw-format.json", lambda d: d.update(version=2)), "raw-format.json"),
    CliDefect("raw-format-missing", "dataset", "no raw-format.json (not a raw folder)", "missing raw-format.json",
              lambda raw: (raw / "raw-format.json").unlink(), "raw-format.json"),
    CliDefect("subject-folder-bad-id", "dataset", "a subject folder whose name is not an id ('S0000 copy')",
              "subject id 'S0000 copy' is not allowed",
              lambda raw: shutil.copytree(raw / "S0000", raw / "S0000 copy"), "S0000 copy"),
)
"""Defects of the raw root itself: the build cannot list the dataset and stops with exit 2."""


BUILD_CLI_DEFECTS: tuple[CliDefect, ...] = (
    CliDefect("subjects-traversal", "build-cli", "`--subjects ../S0000` (path separator and '..')",
              "subject id '../S0000' is not allowed", lambda raw, store: ["--subjects", "../S0000"]),
    CliDefect("subjects-absolute", "build-cli", "`--subjects /etc` (absolute path)", "subject id '/etc' is not allowed",
              lambda raw, store: ["--subjects", "/etc"]),
    CliDefect("subjects-unknown", "build-cli", "`--subjects S9999` (no such subject)",
              "subject(s) ['S9999'] not found", lambda raw, store: ["--subjects", "S9999"]),
    CliDefect("raw-missing", "build-cli", "`--raw` naming no folder", "no such folder",
              lambda raw, store: ["--raw", str(raw.parent / "no-such-raw")]),
    CliDefect("workers-zero", "build-cli", "`--workers 0`", "workers: Input should be greater than or equal to 1",
              lambda raw, store: ["--workers", "0"]),
)
"""Bad ``pixelface build`` arguments (exit 2, before any work)."""


def tiny_mesh_files(d: Path) -> Path:
    """``mesh.ply`` (a tetrahedron, mm), ``lm.txt`` (106 unknown landmarks) and broken variants in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    head = ["ply", "format ascii 1.0", "element vertex 4", "property float x", "property float y", "property float z",
            "element face 4", "property list uchar int vertex_indices", "end_header"]
    faces = ["3 0 2 1", "3 0 1 3", "3 0 3 2", "3 1 2 3"]
    verts = ["0 0 100", "50 0 100", "0 50 100", "0 0 150"]
    (d / "mesh.ply").write_text("\n".join(head + verts + faces) + "\n")
    (d / "nan.ply").write_text("\n".join(head + ["0 0 100", "nan 0 100", "0 50 100", "0 0 150"] + faces) + "\n")
    bomb = [ln.replace("element vertex 4", "element vertex 100000000") for ln in head]
    (d / "bomb.ply").write_text("\n".join(bomb + verts + faces) + "\n")
    (d / "text.ply").write_text("solid tetrahedron\n")
    (d / "lm.txt").write_text("nan nan nan\n" * 106)
    (d / "lm-partly-nan.txt").write_text("1 nan 3\n" + "nan nan nan\n" * 105)
    return d


def _scan(files: Path, out: Path, *extra: str, mesh: str = "mesh.ply", lm: str = "lm.txt") -> list[str]:
    opts = dict(zip(extra[::2], extra[1::2]))
    return ["--mesh", str(files / mesh), "--landmarks", str(files / lm), "--out", str(out),
            "--subject", opts.pop("--subject", "U1"), "--sample", opts.pop("--sample", "neutral"),
            *[x for kv in opts.items() for x in kv]]


SCAN_CLI_DEFECTS: tuple[CliDefect, ...] = (
    CliDefect("mesh-nan", "scan-cli", "mesh with a NaN vertex", "1 vertices have NaN/inf coordinates",
              lambda f, out: _scan(f, out, mesh="nan.ply"), "nan.ply"),
    CliDefect("mesh-bomb", "scan-cli", "PLY header claiming 10^8 vertices in a 200-byte file",
              "header claims 100000000 vertex", lambda f, out: _scan(f, out, mesh="bomb.ply"), "bomb.ply"),
    CliDefect("mesh-not-a-mesh", "scan-cli", "a .ply file that is not PLY", "not a PLY file",
              lambda f, out: _scan(f, out, mesh="text.ply"), "text.ply"),
    CliDefect("landmarks-partly-nan", "scan-cli", "3D landmark row with one NaN coordinate", "row 0 is partly NaN",
              lambda f, out: _scan(f, out, lm="lm-partly-nan.txt"), "lm-partly-nan.txt"),
    CliDefect("scan-subject-traversal", "scan-cli", "`--subject ../evil`", "subject id '../evil' is not allowed",
              lambda f, out: _scan(f, out, "--subject", "../evil")),
    CliDefect("scan-sample-absolute", "scan-cli", "`--sample /tmp/x`", "sample id '/tmp/x' is not allowed",
              lambda f, out: _scan(f, out, "--sample", "/tmp/x")),
    CliDefect("scan-unknown-expression", "scan-cli", "`--expression yawn`", "expression: unknown 'yawn'",
              lambda f, out: _scan(f, out, "--expression", "yawn")),
    CliDefect("scan-age", "scan-cli", "`--age 500`", "age: expected an integer in 1..129 or None, got 500",
              lambda f, out: _scan(f, out, "--age", "500")),
    CliDefect("scan-gt-inside-raw", "scan-cli", "`--gt` inside `--out` (ground truth in the raw tree)",
              "must be a separate tree", lambda f, out: _scan(f, out, "--gt", str(out / "gt"))),
)
"""Bad ``pixelface scan`` input (exit 2, nothing written)."""


# -- the document ------------------------------------------------------------------------------

DOC_HEADER = """\
# Bad-input corpus

<!-- Generated by tests/test_bad_input.py from tests/_damage.py; do not edit by hand.
     Regenerate: PIXELFACE_WRITE_CORPUS_DOC=1 .venv/bin/pytest tests/test_bad_input.py -->

Every row is a defect the test builds (from one clean `pixelface synth` sample plus
deliberate damage) and checks. The `view`, `sample` and `subject` rows are applied together to
one damaged raw root (one sample or subject per defect, next to clean copies) and checked through
**one** `pixelface build` over it: the build exits **1**, every clean sample completes, and each
defect is reported where the table says, with a message starting with its location
(`subject S / sample X / view V / file F: defect`) in the `stage_runs` table and the Prefect logs.
The `dataset`, `build-cli` and `scan-cli` rows are each one command that must exit **2** with a
one-line `error: ...`. The `view` and `sample` rows are also checked directly against
`storage.raw.RawDataset`.

## Outcomes by level
| level | outcome |
|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_doc() -> str:
    """``docs/bad-input.md``: the corpus table, from the declarations above."""
    lines = [DOC_HEADER.rstrip("\n")]
    lines += [f"| `{k}` | {_cell(v)} |" for k, v in OUTCOMES.items()]
    lines += ["", "## Corpus", "| # | level | defect | case | message names | message contains |",
              "|---|---|---|---|---|---|"]
    n = 0
    for d in RAW_DEFECTS:
        n += 1
        lines.append(f"| {n} | {d.level} | {_cell(d.what)} | `{d.key}` | `{_cell(d.where())}` | "
                     f"`{_cell(d.needle)}` |")
    for d in DATASET_DEFECTS + BUILD_CLI_DEFECTS + SCAN_CLI_DEFECTS:
        n += 1
        where = f"file .../{d.file}" if d.file else "(the option)"
        lines.append(f"| {n} | {d.level} | {_cell(d.what)} | `{d.key}` | `{_cell(where)}` | `{_cell(d.needle)}` |")
    lines += ["", f"{n} defects.", "",
              "## Not refused",
              "- Stray files in the raw root and in subject folders (next to `subject.json`) are ignored;",
              "  in sample and view folders they fail that sample or view.",
              "- Hidden entries (`.name`) are ignored everywhere (leftovers of interrupted writes).", ""]
    return "\n".join(lines)
