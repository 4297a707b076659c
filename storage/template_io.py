"""Reading and writing a registration template (mesh + landmark file + part-label file).

A user template is three files (``docs/registration.md``, "User templates"):

* the mesh: ``.ply`` or ``.obj`` (read by :func:`storage.meshio.read_mesh`; vertices in
  ``units``, faces wound counter-clockwise seen from outside);
* the landmarks, JSON, either 106 vertex ids::

      {"format": "pixelface-template-landmarks", "version": 1, "vertex_ids": [int x 106]}

  or 106 barycentric points on triangles::

      {"format": "pixelface-template-landmarks", "version": 1,
       "face_ids": [int x 106], "barycentric": [[b0, b1, b2] x 106]}

  (landmark order: the 106-point convention of ``docs/landmarks.md``);
* the part labels, JSON, one code per vertex into ``part_names``::

      {"format": "pixelface-template-parts", "version": 1,
       "part_names": ["outer", "forehead", ...], "labels": [int x n_vertices]}

* optionally the jaw rig, JSON (:class:`kernels.template.JawRig`; without it the
  registration's jaw stage is skipped)::

      {"format": "pixelface-template-jaw", "version": 1,
       "pivot": [x, y, z], "axis": [x, y, z] or [[x, y, z] x n_vertices],
       "weights": [float in [0, 1] x n_vertices]}

  ``pivot`` in the mesh's ``units``; a positive angle about ``axis`` (right-handed)
  opens the mouth.

Every error names the offending file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kernels.template import N_LANDMARKS, Template, make_jaw_rig, make_template
from storage.meshio import UNITS_TO_MM, read_mesh

LANDMARKS_FORMAT = "pixelface-template-landmarks"
PARTS_FORMAT = "pixelface-template-parts"
JAW_FORMAT = "pixelface-template-jaw"
VERSION = 1

__all__ = ["read_template", "write_template", "LANDMARKS_FORMAT", "PARTS_FORMAT", "JAW_FORMAT"]


def _load_json(path: Path, what: str, fmt: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{what} file {path}: no such file")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} file {path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} file {path}: expected a JSON object")
    if obj.get("format", fmt) != fmt:
        raise ValueError(f"{what} file {path}: format {obj.get('format')!r}, expected {fmt!r}")
    if obj.get("version", VERSION) != VERSION:
        raise ValueError(f"{what} file {path}: unsupported version {obj.get('version')!r}")
    return obj


def _int_list(obj: dict, key: str, n: int | None, path: Path, what: str) -> np.ndarray:
    v = obj.get(key)
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ValueError(f"{what} file {path}: {key!r} must be a list of integers")
    if n is not None and len(v) != n:
        raise ValueError(f"{what} file {path}: {key!r} has {len(v)} entries, expected {n}")
    return np.asarray(v, dtype=np.int64)


def _float_array(obj: dict, key: str, shape: tuple, path: Path, what: str) -> np.ndarray:
    v = obj.get(key)
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} file {path}: {key!r} must be numbers of shape {shape}") from None
    if v is None or isinstance(v, (str, bool)) or a.shape not in shape:
        raise ValueError(f"{what} file {path}: {key!r} must have shape {' or '.join(map(str, shape))}, "
                         f"got {a.shape if v is not None else 'nothing'}")
    return a


def _read_jaw(jp: Path, n: int, units: str):
    obj = _load_json(jp, "jaw", JAW_FORMAT)
    weights = _float_array(obj, "weights", ((n,),), jp, "jaw")
    pivot = _float_array(obj, "pivot", ((3,),), jp, "jaw") * UNITS_TO_MM[units]
    axis = _float_array(obj, "axis", ((3,), (n, 3)), jp, "jaw")
    try:
        return make_jaw_rig(weights, pivot, axis, n)
    except ValueError as exc:
        raise ValueError(f"jaw file {jp}: {exc}") from None


def read_template(mesh_path, landmarks_path, parts_path, units: str = "mm", jaw_path=None) -> Template:
    """Read a user template from a mesh file, a landmark JSON file, a part-label JSON file
    and optionally a jaw-rig JSON file.

    Parameters
    ----------
    mesh_path : path
        ``.ply`` / ``.obj`` triangle mesh.
    landmarks_path : path
        Landmark JSON (vertex ids or face ids + barycentric coordinates, see the module
        docstring).
    parts_path : path
        Part-label JSON.
    units : {"mm", "cm", "m"}
        Units of the mesh file (and of the jaw pivot).
    jaw_path : path, optional
        Jaw-rig JSON (pivot, axis, per-vertex weights; see the module docstring). None
        (default): the template has no jaw and the registration skips its jaw stage.

    Returns
    -------
    Template
        Validated by :func:`kernels.template.make_template`.

    Raises
    ------
    ValueError
        Naming the file: missing or unreadable files, bad JSON, wrong format marker or
        version, wrong counts, landmark vertex / face ids out of range, bad barycentric
        rows, part codes out of range, jaw weights outside [0, 1] or a zero axis, and the
        mesh checks of :func:`read_mesh` and
        :func:`make_template` (non-manifold, inconsistent winding, ...).
    """
    mp, lp, pp = Path(mesh_path), Path(landmarks_path), Path(parts_path)
    V, F, _ = read_mesh(mp, units)
    n, m = len(V), len(F)
    lm = _load_json(lp, "landmark", LANDMARKS_FORMAT)
    if "vertex_ids" in lm:
        ids = _int_list(lm, "vertex_ids", N_LANDMARKS, lp, "landmark")
        bad = np.flatnonzero((ids < 0) | (ids >= n))
        if bad.size:
            raise ValueError(f"landmark file {lp}: {bad.size} vertex id(s) out of range [0, {n}) of mesh {mp.name} "
                             f"(landmark {int(bad[0])}: vertex {int(ids[bad[0]])})")
        landmarks = ids
    elif "face_ids" in lm:
        fid = _int_list(lm, "face_ids", N_LANDMARKS, lp, "landmark")
        bad = np.flatnonzero((fid < 0) | (fid >= m))
        if bad.size:
            raise ValueError(f"landmark file {lp}: {bad.size} face id(s) out of range [0, {m}) of mesh {mp.name} "
                             f"(landmark {int(bad[0])}: face {int(fid[bad[0]])})")
        try:
            bary = np.asarray(lm.get("barycentric"), dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"landmark file {lp}: 'barycentric' must be {N_LANDMARKS} rows of 3 numbers") from None
        if bary.shape != (N_LANDMARKS, 3):
            raise ValueError(f"landmark file {lp}: 'barycentric' must be {N_LANDMARKS} rows of 3 numbers, "
                             f"got shape {bary.shape}")
        landmarks = (fid, bary)
    else:
        raise ValueError(f"landmark file {lp}: expected 'vertex_ids' or 'face_ids' + 'barycentric'")
    pj = _load_json(pp, "part-label", PARTS_FORMAT)
    names = pj.get("part_names")
    if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
        raise ValueError(f"part-label file {pp}: 'part_names' must be a non-empty list of strings")
    labels = _int_list(pj, "labels", n, pp, "part-label")
    bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if bad.size:
        raise ValueError(f"part-label file {pp}: {bad.size} label(s) outside [0, {len(names)}) "
                         f"(vertex {int(bad[0])}: {int(labels[bad[0]])})")
    jaw = _read_jaw(Path(jaw_path), n, units) if jaw_path is not None else None
    try:
        return make_template(V, F, landmarks, labels, tuple(names), jaw=jaw)
    except ValueError as exc:
        src = lp if str(exc).startswith("landmarks") else (pp if str(exc).startswith("part") else mp)
        raise ValueError(f"template file {src}: {exc}") from None


def write_template(template: Template, mesh_path, landmarks_path, parts_path, jaw_path=None) -> None:
    """Write ``template`` as the files :func:`read_template` reads (mesh as PLY/OBJ, mm).

    Landmarks are written as face ids + barycentric coordinates. ``jaw_path`` (optional):
    write the template's jaw rig there (mm).

    Raises
    ------
    ValueError
        Not a Template, a mesh suffix other than ``.ply`` / ``.obj``, a ``jaw_path`` for a
        template without a jaw rig.
    """
    import open3d as o3d

    if not isinstance(template, Template):
        raise ValueError(f"template: expected a Template, got {type(template).__name__}")
    mp = Path(mesh_path)
    if mp.suffix.lower() not in (".ply", ".obj"):
        raise ValueError(f"mesh file {mp}: expected a .ply or .obj file")
    if jaw_path is not None and template.jaw is None:
        raise ValueError(f"jaw file {jaw_path}: the template has no jaw rig to write")
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(np.array(template.vertices, dtype=np.float64)),
                                     o3d.utility.Vector3iVector(np.array(template.faces, dtype=np.int32)))
    if not o3d.io.write_triangle_mesh(str(mp), mesh, write_ascii=False):
        raise ValueError(f"mesh file {mp}: cannot write")
    Path(landmarks_path).write_text(json.dumps({
        "format": LANDMARKS_FORMAT, "version": VERSION,
        "face_ids": [int(x) for x in template.landmark_faces],
        "barycentric": [[float(v) for v in row] for row in template.landmark_bary],
    }) + "\n")
    Path(parts_path).write_text(json.dumps({
        "format": PARTS_FORMAT, "version": VERSION, "part_names": list(template.part_names),
        "labels": [int(x) for x in template.parts],
    }) + "\n")
    if jaw_path is not None:
        rig = template.jaw
        Path(jaw_path).write_text(json.dumps({
            "format": JAW_FORMAT, "version": VERSION, "pivot": [float(x) for x in rig.pivot],
            "axis": np.asarray(rig.axis, float).tolist(), "weights": [float(x) for x in rig.weights],
        }) + "\n")


def template_files_sha256(mesh_path, landmarks_path, parts_path, jaw_path=None) -> str:
    """SHA-256 over the template files' bytes (names not included): the template's content key.

    ``jaw_path`` (optional jaw-rig file) is hashed after the three others when given.

    Raises
    ------
    FileNotFoundError
        Naming the missing file.
    """
    import hashlib

    h = hashlib.sha256()
    for p in (mesh_path, landmarks_path, parts_path) + ((jaw_path,) if jaw_path is not None else ()):
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"template file {p}: not found")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()
