"""Small rigid-geometry helpers shared by the kernels (private: validated by their callers)."""

from __future__ import annotations

import numpy as np

__all__ = ["apply_transform", "axis_angle_matrix", "unit_face_normals"]


def apply_transform(T: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Points ``x`` (n, 3) mapped by the affine part of the 4x4 (or 3x4) matrix ``T``: ``x @ A.T + t``."""
    return x @ T[:3, :3].T + T[:3, 3]


def axis_angle_matrix(omega: np.ndarray) -> np.ndarray:
    """Rotation matrix of the rotation vector ``omega`` (3,) (axis * angle in radians; Rodrigues)."""
    th = float(np.linalg.norm(omega))
    if th < 1e-300:
        return np.eye(3)
    k = omega / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * (K @ K)


def unit_face_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Unit normals (m, 3) of the triangles ``f`` (m, 3) of vertices ``v`` (right-hand winding); 0 for degenerate ones."""
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    ln = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, ln, out=np.zeros_like(n), where=ln > 0)
