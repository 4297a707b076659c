"""Out-of-core exact PCA of a ``dask.array`` (glue around :mod:`kernels.pca`).

:func:`exact_pca_dask` runs :func:`kernels.pca.pca_from_blocks` (the snapshot method) on a
matrix that is never materialised whole (e.g. ``da.from_zarr`` of the stacked registrations,
chunks of all rows x a few thousand columns), under whatever Dask scheduler is active
(threads, synchronous, processes or a ``distributed.Client``). Each pass streams the column
blocks (consecutive column chunks merged up to ``block_mb`` of float64): a block is computed
with the active scheduler (``x[:, j0:j1].compute()``), ``prefetch`` blocks ahead in a
background thread, and handed to the kernel, which adds it into its accumulators in place:

1. **Gram pass**: the (n, n) Gram matrix (BLAS ``dsyrk``, or ``ssyrk`` for ``precision =
   "mixed"``) and the column means (each block holds every row);
2. **eigenpairs** of the Gram matrix on this process (block Krylov or ``eigh``);
3. **components pass**: ``(x - mean).T @ U / sqrt(lam)`` block by block (``"mixed"``: ``W`` and
   ``G @ U`` for the float64 Rayleigh-Ritz step, see :func:`kernels.pca.rayleigh_ritz`).

Why one accumulator on this process rather than per-block Gram matrices reduced on the workers:
a block's Gram contribution (n x n float64, 288 MB at n = 6000) is six times the block itself
(n x 2000 float32, 48 MB), so shipping blocks to one accumulator moves and holds far less; the
workers read and decompress the blocks.

Peak memory of this process: the Gram matrix (``8 n^2`` bytes; ``4 n^2`` for ``"mixed"``) + the
Krylov basis (``2 * 8 * n * min(n/2, 7.5 k)``) + ``(2 + prefetch)`` blocks during passes 1-2,
then ``2 * 8 * d * k`` (components and their signed copy): ~0.7 GB measured for 6000 x 90000
float32 (2.16 GB) with k = 199 (``benchmarks/pca.py``).

:func:`project_dask` gives the coefficients of rows (lazy), e.g. of held-out rows for the
generalisation curve.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import dask.array as da
import numpy as np

from kernels.pca import PCAResult, pca_from_blocks

__all__ = ["exact_pca_dask", "project_dask", "column_groups"]


def _as_dask(x, name: str = "x") -> da.Array:
    if not isinstance(x, da.Array):
        x = da.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n_samples, n_features) array, got shape {x.shape}")
    if any(np.isnan(c) for c in x.shape):
        raise ValueError(f"{name}: unknown (NaN) dimensions {x.shape}; call compute_chunk_sizes() first")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {x.dtype}")
    return x


def column_groups(chunks: tuple[int, ...], n_rows: int, block_mb: float) -> list[tuple[int, int]]:
    """Consecutive column chunks merged into ``(start, stop)`` blocks of <= ``block_mb`` MB as float64.

    A single chunk wider than the budget stays one block (chunks are never split).
    """
    budget = max(1, int(block_mb * 1e6 // (8 * max(n_rows, 1))))
    out, start, width = [], 0, 0
    for c in chunks:
        if width and width + c > budget:
            out.append((start, start + width))
            start, width = start + width, 0
        width += c
    if width:
        out.append((start, start + width))
    return out


def _fetch(x: da.Array, j0: int, j1: int) -> np.ndarray:
    return np.asarray(x[:, j0:j1].compute())


def _streamer(x: da.Array, groups: list[tuple[int, int]], prefetch: int):
    """``read_blocks`` for :func:`kernels.pca.pca_from_blocks`: one pass over the column groups.

    Each group is computed with the active Dask scheduler; ``prefetch`` groups are computed
    ahead in a background thread while the caller works on the current one.
    """

    def read_blocks():
        if prefetch == 0:
            for j0, j1 in groups:
                yield j0, j1, _fetch(x, j0, j1)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = [pool.submit(_fetch, x, *groups[i]) for i in range(min(prefetch, len(groups)))]
            try:
                for i, (j0, j1) in enumerate(groups):
                    blk = pending.pop(0).result()
                    nxt = i + len(pending) + 1
                    if nxt < len(groups):
                        pending.append(pool.submit(_fetch, x, *groups[nxt]))
                    yield j0, j1, blk
                    del blk
            finally:
                for f in pending:
                    f.cancel()

    return read_blocks


def exact_pca_dask(x, n_components: int, *, precision: str = "double", center: bool = True,
                   block_mb: float = 96.0, prefetch: int = 1, solver: str = "auto", rng=0) -> PCAResult:
    """Exact PCA of the rows of a dask array, streaming it in column blocks (never whole).

    Parameters
    ----------
    x : (n, d) dask.array.Array (or array_like)
        One sample per row (e.g. a flattened mesh, mm); any float dtype (accumulated in
        float64). Chunks of all rows x some columns read best; row chunks are merged per
        column block.
    n_components : int
        Components wanted (>= 1); fewer when the data's rank is lower (``truncated_reason``).
    precision : {"double", "mixed"}
        See :func:`kernels.pca.pca_from_blocks` (default ``"double"``: float64 Gram matrix).
    center : bool
        Subtract the column means (default); ``False``: PCA about zero (expression residuals).
    block_mb : float
        Column chunks are merged into blocks of at most this many MB as float64 (default 96).
    prefetch : int
        Blocks being computed ahead of the one being used (default 1; 0 = sequential).
    solver, rng
        See :func:`kernels.pca.pca_from_gram`.

    Returns
    -------
    PCAResult
        Same as :func:`kernels.pca.exact_pca` on the in-memory matrix (to rounding).

    Raises
    ------
    ValueError
        Not 2-D, unknown chunk sizes, fewer than 2 rows, NaN/inf in a block (naming its
        columns), bad ``n_components`` / ``precision`` / ``block_mb`` / ``prefetch`` / ``solver``.
    """
    x = _as_dask(x)
    n, d = (int(s) for s in x.shape)
    if n < 2:
        raise ValueError(f"x: a PCA needs at least 2 samples (rows), got {n}")
    if d < 1:
        raise ValueError(f"x: needs at least 1 feature (column), got shape {x.shape}")
    if not (isinstance(block_mb, (int, float)) and not isinstance(block_mb, bool) and np.isfinite(block_mb)
            and block_mb > 0):
        raise ValueError(f"block_mb: must be a finite number > 0, got {block_mb!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
        raise ValueError(f"prefetch: must be an integer >= 0, got {prefetch!r}")
    groups = column_groups(x.chunks[1], n, block_mb)
    return pca_from_blocks(_streamer(x, groups, int(prefetch)), n, d, n_components, precision=precision,
                           center=center, solver=solver, rng=rng)


def _project_block(xb: np.ndarray, mub: np.ndarray, vb: np.ndarray) -> np.ndarray:
    return (np.subtract(xb, mub, dtype=np.float64) @ vb)[..., None]


def project_dask(x, result: PCAResult, n_components: int | None = None) -> da.Array:
    """Lazy coefficients ``(x - mean) @ components[:, :k]`` of the rows of ``x``.

    Parameters
    ----------
    x : (m, d) dask.array.Array (or array_like)
    result : PCAResult
    n_components : int or None
        ``k`` (default: all components).

    Returns
    -------
    (m, k) dask.array.Array of float64
        Partial products per column chunk, summed by a tree reduction (call ``.compute()``).

    Raises
    ------
    ValueError
        ``x`` with a column count other than ``result``'s, bad ``n_components``.
    """
    if not isinstance(result, PCAResult):
        raise ValueError(f"result: expected a PCAResult, got {type(result).__name__}")
    x = _as_dask(x)
    if int(x.shape[1]) != result.n_features:
        raise ValueError(f"x: expected {result.n_features} columns (as the model), got {x.shape[1]}")
    k = result.n_components if n_components is None else n_components
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= result.n_components:
        raise ValueError(f"n_components: expected an integer in [0, {result.n_components}], got {n_components!r}")
    if k == 0:
        return da.zeros((x.shape[0], 0), chunks=(x.chunks[0], 0), dtype=np.float64)
    mu_da = da.from_array(np.asarray(result.mean), chunks=(x.chunks[1],))
    V_da = da.from_array(np.asarray(result.components[:, :k]), chunks=(x.chunks[1], k))
    parts = da.blockwise(_project_block, "ikj", x, "ij", mu_da, "j", V_da, "jk",
                         adjust_chunks={"j": 1}, dtype=np.float64)
    return parts.sum(axis=2)
