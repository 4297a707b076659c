"""Pipeline benchmark: cold build, cached rerun, 1 vs 2 workers, orchestration overhead.

    python -m benchmarks.pipeline --json work/bench/pipeline.json [--size small|full] [--unit sample|view]

Synthesises a dataset (default 4 subjects x 3 samples at full-size views; ``--size small``
for a quick look), starts one Prefect API (timed separately: ``api_startup_s``) and runs
``build_dataset`` through every stage that exists:

* ``cold_s`` / ``two_worker_s``: fresh store, a 2-worker LocalCluster (with a build's Dask settings,
  ``flows.build.DASK_CONFIG``; already running, the
  pipeline already imported in its workers, as in a long-lived cluster: that one-off import CPU
  is reported as ``worker_warmup_cpu_s_<n>w``, like ``api_startup_s``, and not counted);
* ``cached_rerun_s``: the same build again (every stage a Prefect cache hit);
* ``one_worker_s``: fresh store, a 1-worker LocalCluster;
* ``kernel_cpu_s``: CPU time inside kernels (``thread_time`` around each kernel call, summed
  over the cold build's stage records);
* ``orchestration_overhead_ratio`` = (CPU of driver + workers + API server during the cold
  build - kernel CPU) / kernel CPU;
* where the CPU goes (cold build): ``cpu_driver_s``, ``cpu_workers_s``, ``cpu_api_s``; inside the
  unit tasks ``unit_cpu_s`` (thread CPU of the unit bodies) = kernels + ``load_cpu_s`` (raw PNG
  decoding, Zarr reads) + ``write_cpu_s`` (Zarr writes) + bookkeeping;
* per sample (the number that decides whether the targets are reachable once a sample has
  ~10 s of kernel CPU): ``overhead_cpu_per_sample_s`` = (total - kernel) / samples, split into
  ``orchestration_cpu_per_sample_s`` = (total - unit bodies) / samples (Prefect, Dask, API,
  flows, planning, catalog) and ``io_cpu_per_sample_s`` = (load + write) / samples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pids) -> float:
    import psutil

    tot = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            tot += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return tot


def _warm_worker() -> None:
    """What a long-lived worker has already done before its first task: import the pipeline."""
    import flows.build  # noqa: F401  (prefect, prefect_dask, tasks, kernels, storage)
    import zarr  # noqa: F401


def synth(work: Path, size: str, subjects: int, samples: int) -> Path:
    from benchmarks._raw import synthetic_raw
    from pixelface.config import load_config

    over = {"synth": {"subjects": subjects, "expressions": samples}}
    if size == "small":
        over["synth"].update({"mesh_vertices": 20000, "rig": {"width": 320, "height": 256}})
    return synthetic_raw(work, f"raw-{size}-{subjects}x{samples}", load_config(overrides=over).synth)


def timed_build(cfg, worker_pids, api_pid):
    from flows.build import build_dataset

    c0, w0, a0 = _cpu_self(), _proc_cpu(worker_pids), _proc_cpu([api_pid] if api_pid else [])
    t0 = time.perf_counter()
    summary = build_dataset(config=cfg)
    wall = time.perf_counter() - t0
    parts = {"driver": _cpu_self() - c0, "workers": _proc_cpu(worker_pids) - w0,
             "api": _proc_cpu([api_pid] if api_pid else []) - a0}
    if summary.failed:
        raise RuntimeError(f"benchmark build had failures: {[s.errors[:2] for s in summary.subjects if s.errors]}")
    return summary, wall, sum(parts.values()), parts


def run(args) -> dict:
    from flows.prefect_env import configure_environment

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    configure_environment(work / "prefect")
    raw = synth(work, args.size, args.subjects, args.samples)

    import flows.build

    flows.build.UNIT = args.unit

    import dask
    from distributed import Client, LocalCluster

    from flows.build import DASK_CONFIG

    from pixelface.config import BuildConfig
    from flows.prefect_env import prefect_api

    env = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    out: dict = {"size": args.size, "subjects": args.subjects, "samples": args.samples, "cpus": os.cpu_count(),
                 "unit": args.unit}
    n_samples = args.subjects * args.samples
    with prefect_api(work / "prefect") as api:
        out["api_startup_s"] = round(api.startup_s, 3)
        for n_workers in (2, 1):
            store = work / f"store-{args.size}-{n_workers}w"
            shutil.rmtree(store, ignore_errors=True)
            with dask.config.set(DASK_CONFIG), \
                    LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                 dashboard_address=None, local_directory=str(work / "dask"), env=env) as cluster, \
                    Client(cluster) as client:
                pids = list(client.run(os.getpid).values())
                w0 = _proc_cpu(pids)
                client.run(_warm_worker)
                out[f"worker_warmup_cpu_s_{n_workers}w"] = round(_proc_cpu(pids) - w0, 3)
                cfg = BuildConfig(raw=str(raw), store=str(store), dask_address=cluster.scheduler_address,
                                  workers=n_workers, prefect_home=str(work / "prefect"))
                summary, wall, cpu, parts = timed_build(cfg, pids, api.server_pid)
                if n_workers == 2:
                    tot = summary.totals()
                    kernel = tot["kernel_cpu_s"]
                    io = tot["load_cpu_s"] + tot["write_cpu_s"]
                    out.update(cold_s=round(wall, 3), two_worker_s=round(wall, 3), kernel_cpu_s=round(kernel, 3),
                               total_cpu_s=round(cpu, 3),
                               orchestration_overhead_ratio=round((cpu - kernel) / max(kernel, 1e-9), 3),
                               stage_runs=int(tot["stages"]), units=int(tot["units"]),
                               **{f"cpu_{k}_s": round(v, 3) for k, v in parts.items()},
                               unit_cpu_s=round(tot["unit_cpu_s"], 3), load_cpu_s=round(tot["load_cpu_s"], 3),
                               write_cpu_s=round(tot["write_cpu_s"], 3),
                               overhead_cpu_per_sample_s=round((cpu - kernel) / n_samples, 3),
                               orchestration_cpu_per_sample_s=round((cpu - tot["unit_cpu_s"]) / n_samples, 3),
                               io_cpu_per_sample_s=round(io / n_samples, 3),
                               overhead_cpu_per_unit_s=round((cpu - kernel) / max(1, tot["units"]), 3))
                    s2, wall2, cpu2, parts2 = timed_build(cfg, pids, api.server_pid)
                    assert s2.totals()["cached"] == s2.totals()["stages"], s2.totals()
                    out.update(cached_rerun_s=round(wall2, 3), cached_ratio=round(wall2 / wall, 3),
                               cached_rerun_cpu_s=round(cpu2, 3),
                               **{f"cached_cpu_{k}_s": round(v, 3) for k, v in parts2.items()})
                else:
                    out["one_worker_s"] = round(wall, 3)
                    out["one_worker_cpu_s"] = round(cpu, 3)
    out["two_worker_efficiency"] = round(out["one_worker_s"] / (2 * out["two_worker_s"]), 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--size", choices=("full", "small"), default="full")
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--samples", type=int, default=3, help="expressions per subject")
    p.add_argument("--work", default="work/bench/pipeline", help="scratch folder")
    p.add_argument("--unit", choices=("sample", "view"), default="sample",
                   help="granularity of the Prefect tasks (flows.build.UNIT)")
    args = p.parse_args(argv)
    res = run(args)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
