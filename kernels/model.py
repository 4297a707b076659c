"""Linear 3D morphable model (paper section 4.2, Eq. 1): mean + shape basis + expression basis.

``x = mean + U a + E b`` with ``U`` (3n, ks) and ``E`` (3n, ke) having orthonormal
columns, rows ordered ``x0, y0, z0, x1, ...`` (vertex-major), so a coefficient is a
displacement in mm along a unit basis vector; the prior is ``a_k ~ N(0, shape_variance_k)``,
``b_k ~ N(0, expression_variance_k)`` (PCA eigenvalues, mm^2). Columns are ordered by
decreasing variance, so :func:`truncate` keeps the leading components.

The 106 landmarks are fixed barycentric points of template triangles
(``landmark_faces``, ``landmark_bary``): :func:`landmarks` evaluates them on any instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels._checks import as_array, check_int

__all__ = ["N_LANDMARKS", "MorphableModel", "instance", "landmarks", "truncate"]

N_LANDMARKS = 106


def _ro(a: np.ndarray) -> np.ndarray:
    """Read-only view (the caller's array keeps its own flags)."""
    v = a.view()
    v.setflags(write=False)
    return v


def _check_basis(basis, variance, n: int, name: str, vname: str, rng: np.random.Generator):
    B = as_array(basis, name, (3 * n, None), finite=True)
    k = B.shape[1]
    var = as_array(variance, vname, (k,), finite=True)
    if k and np.any(var <= 0):
        raise ValueError(f"{vname}: variances must be > 0, got min {var.min()!r}")
    if k:
        # orthonormal columns: B^T B v = v for random probes (O(n k), not O(n k^2))
        V = rng.standard_normal((k, 2))
        err = np.abs(B.T @ (B @ V) - V).max() / np.abs(V).max()
        if err > 1e-6:
            raise ValueError(f"{name}: columns are not orthonormal (|B^T B v - v| / |v| = {err:.2e})")
    return B, var


@dataclass(frozen=True)
class MorphableModel:
    """A linear 3DMM in template topology (all arrays stored as read-only views).

    Attributes
    ----------
    mean : (n, 3) float64
        Mean shape (mm).
    shape_basis : (3n, ks) float64
        Orthonormal identity directions, rows ``x0, y0, z0, x1, ...``; ``ks`` may be 0.
    shape_variance : (ks,) float64
        Variance of each shape coefficient (mm^2, > 0), decreasing.
    expression_basis : (3n, ke) float64
        Orthonormal expression directions (residuals to the same subject's neutral).
    expression_variance : (ke,) float64
        Variance of each expression coefficient (mm^2, > 0), decreasing.
    faces : (m, 3) int32
        Template triangles.
    landmark_faces : (106,) int64
        Triangle holding each landmark.
    landmark_bary : (106, 3) float64
        Barycentric weights of each landmark in its triangle (>= 0, sum 1).
    parts : (n,) uint8
        Face-part code of each vertex (index into ``part_names``).
    part_names : tuple of str

    Raises
    ------
    ValueError
        Inconsistent shapes, non-finite values, non-orthonormal bases, non-positive
        variances, ids out of range, bad barycentric weights.
    """

    mean: np.ndarray
    shape_basis: np.ndarray
    shape_variance: np.ndarray
    expression_basis: np.ndarray
    expression_variance: np.ndarray
    faces: np.ndarray
    landmark_faces: np.ndarray
    landmark_bary: np.ndarray
    parts: np.ndarray
    part_names: tuple

    def __post_init__(self):
        mean = as_array(self.mean, "mean", (None, 3), finite=True)
        n = mean.shape[0]
        if n < 3:
            raise ValueError(f"mean: need at least 3 vertices, got {n}")
        rng = np.random.default_rng(0)
        U, su = _check_basis(self.shape_basis, self.shape_variance, n, "shape_basis", "shape_variance", rng)
        E, se = _check_basis(self.expression_basis, self.expression_variance, n, "expression_basis",
                             "expression_variance", rng)
        faces = as_array(self.faces, "faces", (None, 3), dtype=None)
        if not np.issubdtype(faces.dtype, np.integer) or faces.shape[0] == 0:
            raise ValueError(f"faces: expected a non-empty (m, 3) integer array, got {faces.dtype} {faces.shape}")
        if faces.min() < 0 or faces.max() >= n:
            raise ValueError(f"faces: vertex ids must be in [0, {n}), got [{faces.min()}, {faces.max()}]")
        faces = faces.astype(np.int32, copy=False)
        lf = as_array(self.landmark_faces, "landmark_faces", (N_LANDMARKS,), dtype=None)
        if not np.issubdtype(lf.dtype, np.integer):
            raise ValueError(f"landmark_faces: expected integers, got {lf.dtype}")
        if lf.min() < 0 or lf.max() >= faces.shape[0]:
            raise ValueError(f"landmark_faces: triangle ids must be in [0, {faces.shape[0]}), "
                             f"got [{lf.min()}, {lf.max()}]")
        lf = lf.astype(np.int64, copy=False)
        lb = as_array(self.landmark_bary, "landmark_bary", (N_LANDMARKS, 3), finite=True)
        if np.any(lb < -1e-9) or np.abs(lb.sum(axis=1) - 1).max() > 1e-6:
            raise ValueError("landmark_bary: weights must be >= 0 and sum to 1 per row")
        names = tuple(self.part_names)
        if not names or not all(isinstance(s, str) for s in names):
            raise ValueError(f"part_names: expected a non-empty tuple of str, got {self.part_names!r}")
        parts = as_array(self.parts, "parts", (n,), dtype=None)
        if parts.dtype != np.uint8:
            raise ValueError(f"parts: expected uint8, got {parts.dtype}")
        if parts.size and int(parts.max()) >= len(names):
            raise ValueError(f"parts: codes must be < len(part_names) = {len(names)}, got {int(parts.max())}")
        for name, a in (("mean", mean), ("shape_basis", U), ("shape_variance", su), ("expression_basis", E),
                        ("expression_variance", se), ("faces", faces), ("landmark_faces", lf),
                        ("landmark_bary", lb), ("parts", parts)):
            object.__setattr__(self, name, _ro(a))
        object.__setattr__(self, "part_names", names)

    @property
    def n_vertices(self) -> int:
        """Number of template vertices."""
        return self.mean.shape[0]

    @property
    def n_shape(self) -> int:
        """Number of shape components ``ks``."""
        return self.shape_basis.shape[1]

    @property
    def n_expression(self) -> int:
        """Number of expression components ``ke``."""
        return self.expression_basis.shape[1]


def _check_model(model) -> MorphableModel:
    if not isinstance(model, MorphableModel):
        raise ValueError(f"model: expected a MorphableModel, got {type(model).__name__}")
    return model


def instance(model: MorphableModel, shape_coeffs=None, expr_coeffs=None) -> np.ndarray:
    """Vertices of a model instance ``mean + U a + E b``.

    Parameters
    ----------
    model : MorphableModel
    shape_coeffs : (ks,) float64, optional
        Shape coefficients ``a`` (mm along the unit basis vectors; prior
        ``N(0, shape_variance)``); zeros by default.
    expr_coeffs : (ke,) float64, optional
        Expression coefficients ``b`` (mm); zeros by default.

    Returns
    -------
    (n, 3) float64
        Vertices (mm, model frame).

    Raises
    ------
    ValueError
        Wrong lengths or non-finite coefficients.
    """
    model = _check_model(model)
    x = model.mean.reshape(-1).copy()
    if shape_coeffs is not None:
        a = as_array(shape_coeffs, "shape_coeffs", (model.n_shape,), finite=True)
        if a.size:
            x += model.shape_basis @ a
    if expr_coeffs is not None:
        b = as_array(expr_coeffs, "expr_coeffs", (model.n_expression,), finite=True)
        if b.size:
            x += model.expression_basis @ b
    return x.reshape(-1, 3)


def landmarks(model: MorphableModel, vertices) -> np.ndarray:
    """The 106 landmarks of a mesh in the model's topology.

    Parameters
    ----------
    model : MorphableModel
    vertices : (n, 3) float64
        Vertices in template topology (any frame, mm).

    Returns
    -------
    (106, 3) float64
        Barycentric interpolation in the landmark triangles.

    Raises
    ------
    ValueError
        ``vertices`` not (n, 3) or not finite.
    """
    model = _check_model(model)
    v = as_array(vertices, "vertices", (model.n_vertices, 3), finite=True)
    tri = model.faces[model.landmark_faces]
    return np.einsum("lj,ljc->lc", model.landmark_bary, v[tri])


def truncate(model: MorphableModel, ks: int, ke: int) -> MorphableModel:
    """The model with only its first ``ks`` shape and ``ke`` expression components.

    Parameters
    ----------
    model : MorphableModel
    ks : int
        Shape components kept, ``0 <= ks <= model.n_shape``.
    ke : int
        Expression components kept, ``0 <= ke <= model.n_expression``.

    Returns
    -------
    MorphableModel

    Raises
    ------
    ValueError
        Counts out of range.
    """
    model = _check_model(model)
    ks, ke = check_int(ks, "ks", 0), check_int(ke, "ke", 0)
    if ks > model.n_shape:
        raise ValueError(f"ks: the model has {model.n_shape} shape components, asked for {ks}")
    if ke > model.n_expression:
        raise ValueError(f"ke: the model has {model.n_expression} expression components, asked for {ke}")
    return MorphableModel(model.mean, np.ascontiguousarray(model.shape_basis[:, :ks]), model.shape_variance[:ks],
                          np.ascontiguousarray(model.expression_basis[:, :ke]), model.expression_variance[:ke],
                          model.faces, model.landmark_faces, model.landmark_bary, model.parts, model.part_names)
