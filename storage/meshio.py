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
        Unknown units or suffix, unreadable file, a PLY header claiming more elements than
        the file can hold (checked before anything is allocated), no faces, non-finite
        vertices, face indices out of range.
    """
    import open3d as o3d

    p = Path(path)
    if units not in UNITS_TO_MM:
        raise ValueError(f"units: expected one of {sorted(UNITS_TO_MM)}, got {units!r}")
    if p.suffix.lower() not in (".ply", ".obj"):
        raise ValueError(f"mesh file {p}: expected a .ply or .obj file")
    if not p.is_file():
        raise ValueError(f"mesh file {p}: no such file")
    if p.suffix.lower() == ".ply":
        _check_ply_header(p)
    try:
        mesh = o3d.io.read_triangle_mesh(str(p))
    except (MemoryError, RuntimeError) as exc:
        raise ValueError(f"mesh file {p}: cannot be read ({type(exc).__name__}: {exc})") from None
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


_PLY_SIZES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
              "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}


def _check_ply_header(p: Path, max_header_bytes: int = 1 << 16) -> None:
    """Refuse a PLY file whose header claims more elements than its size can hold.

    Each element needs at least its fixed-size properties (binary) or two bytes per
    property (ASCII: a digit and a separator); a list property needs at least its count.
    A 1 kB file claiming 10^8 vertices (a memory bomb for the reader) is refused here.
    """
    with open(p, "rb") as f:
        head = f.read(max_header_bytes)
    end = head.find(b"end_header")
    if not head.startswith(b"ply") or end < 0:
        raise ValueError(f"mesh file {p}: not a PLY file (no 'ply' magic or no 'end_header' "
                         f"in the first {max_header_bytes} bytes)")
    lines = head[:end].decode("ascii", "replace").splitlines()
    fmt = next((ln.split()[1] for ln in lines if ln.startswith("format ") and len(ln.split()) > 1), "")
    elements: list[list] = []  # [name, count, min bytes per element]
    try:
        for ln in lines:
            w = ln.split()
            if not w:
                continue
            if w[0] == "element":
                elements.append([w[1], int(w[2]), 0])
            elif w[0] == "property" and elements:
                if fmt == "ascii":
                    elements[-1][2] += 2
                elif w[1] == "list":
                    elements[-1][2] += _PLY_SIZES.get(w[2], 1)
                else:
                    elements[-1][2] += _PLY_SIZES.get(w[1], 1)
    except (IndexError, ValueError):
        raise ValueError(f"mesh file {p}: malformed PLY header line {ln!r}") from None
    size = p.stat().st_size
    need = sum(n * max(b, 1) for _, n, b in elements)
    if any(n < 0 for _, n, _ in elements) or need > size:
        claims = ", ".join(f"{n} {name}" for name, n, _ in elements)
        raise ValueError(f"mesh file {p}: header claims {claims} (at least {need} bytes) but the file has "
                         f"{size} bytes (truncated, or a memory bomb)")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
