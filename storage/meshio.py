"""Reading user-supplied meshes and 3D landmark files (for ``pixelface scan``)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

N_LANDMARKS = 106
UNITS_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}


def read_mesh(path: str | Path, units: str = "mm") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read a PLY or OBJ triangle mesh.

    Parameters
    ----------
    path : path
        ``.ply`` or ``.obj`` file.
    units : {"mm", "cm", "m"}
        Units of the file's coordinates; the result is in mm.

    Returns
    -------
    vertices : (n, 3) float64 mm
    faces : (m, 3) int32
    colors : (n, 3) float32 in [0, 1] or None when the file has no vertex colours

    Raises
    ------
    ValueError
        Unknown units or suffix, unreadable file, no faces, non-finite vertices,
        face indices out of range.
    """
    import open3d as o3d

    p = Path(path)
    if units not in UNITS_TO_MM:
        raise ValueError(f"units: expected one of {sorted(UNITS_TO_MM)}, got {units!r}")
    if p.suffix.lower() not in (".ply", ".obj"):
        raise ValueError(f"mesh file {p}: expected a .ply or .obj file")
    if not p.is_file():
        raise ValueError(f"mesh file {p}: no such file")
    mesh = o3d.io.read_triangle_mesh(str(p))
    v = np.asarray(mesh.vertices, dtype=np.float64) * UNITS_TO_MM[units]
    f = np.asarray(mesh.triangles, dtype=np.int64)
    if len(f) == 0:
        raise ValueError(f"mesh file {p}: has no faces (a triangle mesh is required)")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"mesh file {p}: {int(np.sum(~np.isfinite(v).all(1)))} vertices have NaN/inf coordinates")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"mesh file {p}: face indices out of range 0..{len(v) - 1}")
    colors = np.asarray(mesh.vertex_colors, dtype=np.float32) if mesh.has_vertex_colors() else None
    return v, f.astype(np.int32), colors


def read_landmarks_3d(path: str | Path, units: str = "mm") -> np.ndarray:
    """Read 106 rows of ``x y z`` (whitespace or comma separated; ``nan`` for unknown).

    Returns
    -------
    (106, 3) float64 mm, NaN rows for unknown landmarks.

    Raises
    ------
    ValueError
        Wrong row count, a row without 3 numbers, or a partly-NaN row.
    """
    p = Path(path)
    if units not in UNITS_TO_MM:
        raise ValueError(f"units: expected one of {sorted(UNITS_TO_MM)}, got {units!r}")
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"landmark file {p}: cannot read ({exc.strerror})") from None
    rows = [ln.replace(",", " ").split() for ln in io.StringIO(text) if ln.strip() and not ln.lstrip().startswith("#")]
    if rows and not _is_number(rows[0][0]):
        rows = rows[1:]  # a header line
    if len(rows) != N_LANDMARKS:
        raise ValueError(f"landmark file {p}: expected {N_LANDMARKS} rows of x y z, got {len(rows)}")
    out = np.empty((N_LANDMARKS, 3))
    for i, r in enumerate(rows):
        if len(r) != 3 or not all(_is_number(x) for x in r):
            raise ValueError(f"landmark file {p}: row {i} must hold 3 numbers, got {' '.join(r)!r}")
        out[i] = [float(x) for x in r]
        nan = np.isnan(out[i])
        if nan.any() and not nan.all():
            raise ValueError(f"landmark file {p}: row {i} is partly NaN; use NaN for all of x y z of an unknown landmark")
        if np.isinf(out[i]).any():
            raise ValueError(f"landmark file {p}: row {i} is infinite")
    return out * UNITS_TO_MM[units]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
