"""Fused loop of :meth:`kernels.photometric.ScanTexture.sample` on a dense cell index (numba).

The same float64 operations as the numpy path, point by point (the sums over the 8 cells
run in the same order), so the results agree to round-off; ``tests/test_photometric.py``
compares them. Compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")
def sample_dense(Q, h, origin, dense, cells, detail, s2, max_d2, out):
    """``out[i]`` = Gaussian-weighted detail of the 3x3x3 cells around ``Q[i]``'s (NaN: none near)."""
    nx, ny, nz = dense.shape
    for i in range(Q.shape[0]):
        num = 0.0
        den = 0.0
        dmin = np.inf
        b0 = np.int64(np.floor(Q[i, 0] / h)) - origin[0] - 1
        b1 = np.int64(np.floor(Q[i, 1] / h)) - origin[1] - 1
        b2 = np.int64(np.floor(Q[i, 2] / h)) - origin[2] - 1
        for a in range(3):
            for b in range(3):
                for c in range(3):
                    x, y, z = b0 + a, b1 + b, b2 + c
                    if x < 0 or y < 0 or z < 0 or x >= nx or y >= ny or z >= nz:
                        continue
                    r = dense[x, y, z]
                    if r < 0:
                        continue
                    v = detail[r]
                    if v != v:
                        continue
                    d0 = Q[i, 0] - cells[r, 0]
                    d1 = Q[i, 1] - cells[r, 1]
                    d2 = Q[i, 2] - cells[r, 2]
                    dd = d0 * d0 + d1 * d1 + d2 * d2
                    w = np.exp(-dd / s2)
                    num += w * v
                    den += w
                    if dd < dmin:
                        dmin = dd
        if dmin <= max_d2 and den > 0:
            out[i] = num / den
        else:
            out[i] = np.nan
