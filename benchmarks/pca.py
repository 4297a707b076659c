"""Benchmark of the out-of-core exact PCA (:func:`tasks.pca.exact_pca_dask`) against scikit-learn.

Usage::

    python -m benchmarks.pca --json out.json                      # 6000 x 90000 float32 (2.16 GB)
    python -m benchmarks.pca --rows 2000 --cols 20000 --json small.json

Data: ``X = mu + (Z * s) @ W.T + sigma * N`` of known rank ``--rank`` (default 300) plus noise:
``Z`` (n, r) and ``N`` (n, d) standard normal, ``W`` (d, r) orthonormal columns, ``s`` geometric
from 10 to 1 (so the population variances of the signal are ``s**2``, 100 .. 1), ``mu``
uniform in [-100, 100] (mesh-like coordinates in mm), ``sigma = --noise`` (0.05). It is written
column chunk by column chunk (``--chunk-cols``, default 2000; all rows per chunk; zarr's default
codec) to a Zarr array (zarr 3) in a temporary directory and never held whole by this process.

Contenders, each in its **own subprocess** (so each peak memory is its own; the peak is the
child's ``VmHWM`` from ``/proc/self/status``, which, unlike ``ru_maxrss``, does not inherit
the parent's high-water mark through fork/exec):

* ``ours``: :func:`tasks.pca.exact_pca_dask` on ``da.from_zarr`` (threaded scheduler); its
  time **includes reading and decompressing the Zarr array** (twice);
* ``sklearn_full``: ``PCA(k, svd_solver="full")`` on the array loaded into memory;
* ``sklearn_randomized``: ``PCA(k, svd_solver="randomized", random_state=0)`` (sklearn's
  defaults: 10 oversamples, ``n_iter="auto"`` = 7 power iterations at this size);
* ``sklearn_randomized_it<N>`` (``--randomized-iters N,M,..``): the same with ``iterated_power=N``,
  to find what randomized PCA costs **at the accuracy the exact method gives**: the result's
  ``randomized_matched`` names the fewest tested iterations whose eigenvalues are within 1e-5 of
  the full SVD's (the exactness target), with its time and ``ours_mixed_over_matched``.

The sklearn times are of ``fit`` only, with the data already in memory (their load time is
reported separately as ``*_load_s``), which favours them. **Thread policy: every contender uses
all cores of the machine** (BLAS threads and Dask threads at their defaults = ``os.cpu_count()``;
nothing is pinned), the same for all; the machine may be shared, so ``load_avg`` is recorded.

Reported: ``ours_s``, ``sklearn_full_s``, ``sklearn_randomized_s`` (wall-clock, one run each),
``max_rel_eigval_err`` = max over the top ``k`` of ``|var_ours / var_full - 1|`` and
``max_subspace_angle_deg`` = largest principal angle between the two top-``k`` subspaces (the
same two numbers for randomized vs full), ``*_peak_rss_gb``, ``data_gb``. Targets (issue 7):
``max_rel_eigval_err <= 1e-5``, ``ours_s <= sklearn_randomized_s``, ``ours_peak_rss_gb <= 0.5 *
data_gb``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks._report import format_table

CONTENDERS = ("ours", "ours_mixed", "sklearn_randomized", "sklearn_full")
_ITERS_PREFIX = "sklearn_randomized_it"
EXACT_TOL = 1e-5  # issue 7: max relative eigenvalue error against the full SVD
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _valid_contender(name: str) -> bool:
    if name in CONTENDERS:
        return True
    return name.startswith(_ITERS_PREFIX) and name[len(_ITERS_PREFIX):].isdigit() and int(name[len(_ITERS_PREFIX):]) > 0


def _peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("VmHWM not found in /proc/self/status")


def write_data(path: str, rows: int, cols: int, rank: int, chunk_cols: int, noise: float, seed: int = 0) -> dict:
    """Write the known-rank + noise float32 matrix to a Zarr array at ``path``; return its description."""
    import zarr

    g = np.random.default_rng(seed)
    r = min(rank, rows, cols)
    s = np.geomspace(10.0, 1.0, r)
    ZS = g.standard_normal((rows, r)) * s
    W = np.linalg.qr(g.standard_normal((cols, r)))[0]
    mu = g.uniform(-100.0, 100.0, cols)
    arr = zarr.create_array(store=path, shape=(rows, cols), chunks=(rows, chunk_cols), dtype="float32",
                            overwrite=True)
    for j0 in range(0, cols, chunk_cols):
        j1 = min(j0 + chunk_cols, cols)
        blk = mu[j0:j1] + ZS @ W[j0:j1].T + noise * g.standard_normal((rows, j1 - j0))
        arr[:, j0:j1] = blk.astype(np.float32)
    return {"rows": rows, "cols": cols, "rank": r, "chunk_cols": chunk_cols, "noise": noise,
            "signal_sd_max": float(s[0]), "signal_sd_min": float(s[-1]),
            "codec": str(getattr(arr, "compressors", "")), "data_gb": rows * cols * 4 / 1e9}


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pin_one_core() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def _child(which: str, zpath: str, k: int, out: str, threads: str) -> None:
    """Run one contender, save (variances, components) to ``out`` and print a JSON line."""
    import zarr

    res = {"contender": which, "threads": threads}
    if threads == "one":
        res["cpu"] = _pin_one_core()
    n_workers = 1 if threads == "one" else os.cpu_count()
    if which.startswith("ours"):
        import dask
        import dask.array as da

        from tasks.pca import exact_pca_dask

        precision = "mixed" if which == "ours_mixed" else "double"
        with dask.config.set(scheduler="threads", num_workers=n_workers):
            t0, c0 = time.perf_counter(), _cpu_s()
            r = exact_pca_dask(da.from_zarr(zpath), k, precision=precision)
            res["fit_s"], res["fit_cpu_s"] = time.perf_counter() - t0, _cpu_s() - c0
        var, comp = np.asarray(r.variances), np.asarray(r.components)
        res.update(solver=r.solver, n_components=r.n_components, truncated_reason=r.truncated_reason)
    else:
        from sklearn.decomposition import PCA

        t0 = time.perf_counter()
        X = zarr.open_array(zpath, mode="r")[:]
        res["load_s"] = time.perf_counter() - t0
        if which.startswith(_ITERS_PREFIX):
            pca = PCA(n_components=k, svd_solver="randomized", iterated_power=int(which[len(_ITERS_PREFIX):]),
                      random_state=0)
        else:
            pca = PCA(n_components=k, svd_solver=which.removeprefix("sklearn_"), random_state=0)
        t0, c0 = time.perf_counter(), _cpu_s()
        pca.fit(X)
        res["fit_s"], res["fit_cpu_s"] = time.perf_counter() - t0, _cpu_s() - c0
        var, comp = pca.explained_variance_.astype(np.float64), pca.components_.T.astype(np.float64)
        del X, pca
    res["peak_rss_gb"] = _peak_rss_gb()
    np.savez(out, variances=var, components=comp)
    print("RESULT " + json.dumps(res), flush=True)


def _run_child(which: str, zpath: str, k: int, out: str, threads: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.pca", "--child", which, "--zarr", zpath, "--k", str(k), "--out", out,
           "--threads", threads]
    env = dict(os.environ)
    if threads == "one":  # before numpy is imported in the child: BLAS / OpenMP must not spawn threads
        env.update({v: "1" for v in _THREAD_VARS})
    else:
        for v in _THREAD_VARS:
            env.pop(v, None)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{which} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line.removeprefix("RESULT "))
    res["process_s"] = wall
    return res


def _compare(a: str, b: str, k: int) -> tuple[float, float]:
    from scipy.linalg import subspace_angles

    A, B = np.load(a), np.load(b)
    va, vb = A["variances"][:k], B["variances"][:k]
    m = min(len(va), len(vb))
    err = float(np.max(np.abs(va[:m] / vb[:m] - 1.0)))
    ang = float(np.degrees(subspace_angles(A["components"][:, :m], B["components"][:, :m]).max()))
    return err, ang


def run(rows: int = 6000, cols: int = 90_000, rank: int = 300, k: int = 199, chunk_cols: int = 2000,
        noise: float = 0.05, workdir: str | None = None, keep: bool = False, threads: str = "one",
        contenders: tuple[str, ...] = CONTENDERS, zarr_path: str | None = None) -> dict:
    tmp = tempfile.mkdtemp(prefix="pca_bench_", dir=workdir)
    try:
        if zarr_path:  # reuse an array written by an earlier run (--keep); its shape wins
            import zarr

            zpath = zarr_path
            rows, cols = zarr.open_array(zpath, mode="r").shape
            desc, gen_s = {"rank": rank, "codec": "reused", "data_gb": rows * cols * 4 / 1e9}, 0.0
        else:
            zpath = os.path.join(tmp, "X.zarr")
            t0 = time.perf_counter()
            desc = write_data(zpath, rows, cols, rank, chunk_cols, noise)
            gen_s = time.perf_counter() - t0
        print(f"data ready in {gen_s:.1f} s: {rows} x {cols} float32 ({desc['data_gb']:.2f} GB) at {zpath}", flush=True)
        load0 = os.getloadavg()
        out = {}
        for which in contenders:
            out[which] = _run_child(which, zpath, k, os.path.join(tmp, f"{which}.npz"), threads)
            print(f"{which}: {out[which]}", flush=True)
        res = {"rows": rows, "cols": cols, "rank": desc["rank"], "k": k, "chunk_cols": chunk_cols, "noise": noise,
               "data_gb": desc["data_gb"]}
        for which in contenders:
            res[f"{which}_s"] = out[which]["fit_s"]
            res[f"{which}_cpu_s"] = out[which]["fit_cpu_s"]
            res[f"{which}_peak_rss_gb"] = out[which]["peak_rss_gb"]
            if "load_s" in out[which]:
                res[f"{which}_load_s"] = out[which]["load_s"]
                res[f"{which}_load_plus_fit_s"] = out[which]["load_s"] + out[which]["fit_s"]
            if "solver" in out[which]:
                res[f"{which}_solver"] = out[which]["solver"]
                res[f"{which}_n_components"] = out[which]["n_components"]
                res[f"{which}_peak_over_data"] = out[which]["peak_rss_gb"] / desc["data_gb"]
        npz = {w: os.path.join(tmp, f"{w}.npz") for w in contenders}
        pairs = [("ours", ""), ("ours_mixed", "ours_mixed_"), ("sklearn_randomized", "randomized_")]
        pairs += [(w, w.removeprefix("sklearn_") + "_") for w in contenders if w.startswith(_ITERS_PREFIX)]
        for which, tag in pairs:
            if which in out and "sklearn_full" in out:
                res[f"{tag}max_rel_eigval_err"], res[f"{tag}max_subspace_angle_deg"] = _compare(
                    npz[which], npz["sklearn_full"], k)
                res[f"{tag or 'ours_'}speedup_vs_full"] = out["sklearn_full"]["fit_s"] / out[which]["fit_s"]
        matched = sorted((int(w[len(_ITERS_PREFIX):]), w) for w in contenders if w.startswith(_ITERS_PREFIX)
                         and res.get(w.removeprefix("sklearn_") + "_max_rel_eigval_err", np.inf) <= EXACT_TOL)
        if matched:
            it, w = matched[0]
            res["randomized_matched"] = {"iterated_power": it, "s": out[w]["fit_s"], "cpu_s": out[w]["fit_cpu_s"],
                                         "max_rel_eigval_err": res[w.removeprefix("sklearn_") + "_max_rel_eigval_err"]}
            for mine in ("ours", "ours_mixed"):
                if mine in out:
                    res[f"{mine}_over_matched"] = out[mine]["fit_s"] / out[w]["fit_s"]
        if "ours" in out and "ours_mixed" in out:
            res["mixed_vs_double_max_rel_eigval_err"], res["mixed_vs_double_max_subspace_angle_deg"] = _compare(
                npz["ours_mixed"], npz["ours"], k)
        for which in ("ours", "ours_mixed"):
            if which in out and "sklearn_randomized" in out:
                res[f"{which}_over_randomized"] = out[which]["fit_s"] / out["sklearn_randomized"]["fit_s"]
                res[f"{which}_over_randomized_cpu"] = out[which]["fit_cpu_s"] / out["sklearn_randomized"]["fit_cpu_s"]
        res.update({
            "thread_policy": ("every contender pinned to one core (sched_setaffinity; OPENBLAS/OMP/MKL_NUM_THREADS=1; "
                              "Dask 1 worker thread)" if threads == "one" else
                              f"all cores for every contender (os.cpu_count() = {os.cpu_count()}; BLAS and Dask "
                              "threads at their defaults)"),
            "timing_note": "ours_s includes reading the Zarr array (twice); sklearn *_s is fit() on data in memory",
            "peak_rss_source": "VmHWM of each contender's own subprocess",
            "codec": desc["codec"], "data_gen_s": gen_s,
            "load_avg_before": list(load0), "load_avg_after": list(os.getloadavg()),
        })
        targets = {}
        for which, tag in (("ours", ""), ("ours_mixed", "ours_mixed_")):
            if which not in out:
                continue
            if f"{tag}max_rel_eigval_err" in res:
                targets[f"{which}: max_rel_eigval_err<=1e-5"] = res[f"{tag}max_rel_eigval_err"] <= 1e-5
            if f"{which}_over_randomized" in res:
                targets[f"{which}: s<=sklearn_randomized_s"] = res[f"{which}_over_randomized"] <= 1.0
            targets[f"{which}: peak_rss_gb<=0.5*data_gb"] = out[which]["peak_rss_gb"] <= 0.5 * desc["data_gb"]
        res["targets_met"] = targets
        return res
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _table(res: dict) -> str:
    rows = [("ours_s", "s"), ("ours_mixed_s", "s"), ("sklearn_randomized_s", "s"),
            ("sklearn_randomized_load_plus_fit_s", "s"), ("sklearn_full_s", "s"), ("ours_over_randomized", ""),
            ("ours_mixed_over_randomized", ""), ("ours_speedup_vs_full", "x"), ("max_rel_eigval_err", ""),
            ("max_subspace_angle_deg", "deg"), ("ours_mixed_max_rel_eigval_err", ""),
            ("ours_mixed_max_subspace_angle_deg", "deg"), ("mixed_vs_double_max_rel_eigval_err", ""),
            ("randomized_max_rel_eigval_err", ""), ("randomized_max_subspace_angle_deg", "deg"),
            ("ours_peak_rss_gb", "GB"), ("ours_mixed_peak_rss_gb", "GB"), ("sklearn_randomized_peak_rss_gb", "GB"),
            ("sklearn_full_peak_rss_gb", "GB"), ("data_gb", "GB"), ("ours_peak_over_data", ""),
            ("ours_mixed_peak_over_data", ""), ("ours_mixed_over_matched", ""), ("ours_over_matched", "")]
    for key in sorted(k for k in res if k.startswith(_ITERS_PREFIX) and k.endswith("_s") and "load" not in k
                      and not k.endswith("_cpu_s")):
        tag = key.removeprefix("sklearn_").removesuffix("_s")
        rows += [(key, "s"), (f"{tag}_max_rel_eigval_err", ""), (f"{tag}_max_subspace_angle_deg", "deg")]
    return format_table(f"exact PCA, {res['rows']} x {res['cols']} float32, rank {res['rank']} + noise, k = {res['k']}",
                        res, [r for r in rows if r[0] in res])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--cols", type=int, default=90_000)
    ap.add_argument("--rank", type=int, default=300)
    ap.add_argument("--k", type=int, default=199)
    ap.add_argument("--chunk-cols", type=int, default=2000)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--workdir", default=None, help="parent of the temporary directory holding the Zarr array")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--threads", choices=("one", "all"), default="one",
                    help="one: every contender pinned to one core (default); all: every contender uses all cores")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " + ",".join(CONTENDERS))
    ap.add_argument("--randomized-iters", default="",
                    help="also run randomized PCA with these iterated_power values (comma-separated), e.g. 15,30")
    ap.add_argument("--zarr-path", default=None, help="reuse an existing Zarr array instead of writing one")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--zarr", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        if not _valid_contender(a.child):
            ap.error(f"unknown contender {a.child!r}")
        _child(a.child, a.zarr, a.k, a.out, a.threads)
        return
    contenders = tuple(c for c in a.contenders.split(",") if c)
    contenders += tuple(f"{_ITERS_PREFIX}{i.strip()}" for i in a.randomized_iters.split(",") if i.strip())
    bad = [c for c in contenders if not _valid_contender(c)]
    if bad:
        ap.error(f"unknown contenders {bad}")
    res = run(a.rows, a.cols, a.rank, a.k, a.chunk_cols, a.noise, a.workdir, a.keep, a.threads, contenders,
              a.zarr_path)
    print(_table(res))
    print("targets met:", res["targets_met"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
