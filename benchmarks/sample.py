"""Whole-sample cost: one sample through every stage of the per-sample chain, on one core.

Usage::

    python -m benchmarks.sample --size full --json work/bench/sample.json   # 3 x 1280x1024, 100k mesh
    python -m benchmarks.sample --size small                                 # 3 x 320x256, quick check
    python -m benchmarks.sample --size full --profile surface                # + cProfile of one kernel

**Data** (not timed): one subject, one expression (``neutral``) of the project's simulator
(:func:`flows.synthesize.synthesize` with ``load_config(overrides=...)``, seed ``--seed``),
written to a temporary folder (or ``--work DIR``, where an existing raw sample of the same
size, seed and simulator code is reused: :func:`benchmarks._raw.synthetic_raw`). ``full`` is the default configuration: 3 camera groups at
1280x1024, a 150k-vertex ground-truth face, the CVT surface at its default 100k vertices and
the default 25k-vertex template. ``small``: 320x256 views, a 20k-vertex ground-truth face,
a 20k-vertex surface and a 3k-vertex template.

**What runs**: the sample's chain unit exactly as a pipeline worker runs it, minus Prefect
and Dask: :func:`tasks.catalog.plan_subject` (reads the sample's metadata and hashes its raw
views, as the build's planner does), then :func:`tasks.stage.run_chain` on
:data:`tasks.view_stages.SAMPLE_CHAIN` (the body of the Prefect task): for each of the 3 views
decode, depth, texture, mesh, landmarks, then fusion, surface, registration, each stage
loading its inputs (raw PNGs once per unit, upstream arrays from memory), running its kernel
and writing its artifact to a fresh Zarr store. Every stage must be ``computed``.

**Runs**: a worker of a dataset build runs thousands of samples; its first one also pays
one-off costs (numba loading its compiled kernels from the on-disk cache, or compiling them when
that cache is cold: ~12 s on a fresh checkout; lazy imports). So the child first runs the sample
once as a **warm-up** (``first_sample_cpu_s``, ``first_sample_extra_cpu_s``; ``--no-warmup``
skips it), then forgets every calibration table (:func:`kernels.camera.clear_caches`: the ray
tables of :func:`kernels.triangulate.ray_table` and the IR->RGB rays of :mod:`kernels.texture`,
cached per camera calibration, and the undistorted pixel grids, cached per lens: a worker of a
large build mostly sees calibrations of other sessions), and
runs the **measured** sample into a fresh store: that is ``sample_cpu_s`` and every per-stage
number. A third run with those tables still cached (the next sample of the same session on the
same worker) gives ``calibration_cached_sample_cpu_s`` and ``calibration_tables_cpu_s`` (the
difference); ``--no-cached-run`` skips it.

**Process**: the measurement runs in a child process started with
``OMP/OPENBLAS/MKL_NUM_THREADS=1`` (set before numpy is imported), pinned to one core
(``sched_setaffinity``; ``--no-pin`` to leave it), with :func:`flows.build.limit_kernel_threads`
(Open3D's TBB pool and BLAS on one thread) as every Dask worker does; so CPU seconds are core
seconds. Zarr's codec threads still exist, but share the one core.

**Reported** (CPU = user + system):

* ``stage_cpu_s``: per stage, summed over views: kernel + load + write thread CPU
  (``StageRecord.kernel_cpu_s + load_cpu_s + write_cpu_s``); ``stage_cpu_s_per_view`` the same
  per view (``_sample`` for the sample-level stages); ``stage_kernel_cpu_s`` (kernel only),
  ``io_cpu_s`` (load + write), ``stage_wall_s``;
* ``sample_cpu_s``: the whole process's CPU (``resource.getrusage``, every thread) from the
  start of planning to the end of the unit: >= ``sum_stage_cpu_s``; the difference is
  ``plan_cpu_s`` (metadata + raw hashing), ``other_threads_cpu_s`` (CPU of threads other than
  the one running the unit: Zarr's codec pool) and ``bookkeeping_cpu_s`` (the rest: keys,
  manifests, records);
* one-off costs of a worker process, **not** in ``sample_cpu_s``: ``import_cpu_s`` (the
  pipeline's modules), ``template_prep_cpu_s`` (:func:`tasks.sample_stages.prepared_template`:
  template + NICP operators, built once per worker and parameters), ``startup_cpu_s``
  (interpreter start);
* ``peak_rss_gb``: ``VmHWM`` of the child (``/proc/self/status``: imports, template and the
  sample together, as a worker would hold them);
* ``samples_per_hour_per_core = 3600 / sample_cpu_s``,
  ``hours_for_24525_samples_on_64_cores = 24525 * sample_cpu_s / 64 / 3600``;
* ``targets_met``: ``sample_cpu_s <= 15`` and ``peak_rss_gb <= 4`` (issue 8, item 9).

``--profile STAGE`` wraps that stage's kernel in the measured run (every view of a view-level
stage) in cProfile timed by thread CPU and prints its top functions to stderr; the profiler
slows that stage down a little, so that run's numbers are not the headline ones.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one core: BLAS / OpenMP must not spawn threads (the parent synthesises)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SUBJECT, SAMPLE = "S0000", "neutral"
N_SAMPLES, N_CORES = 24_525, 64
TARGET_SAMPLE_CPU_S, TARGET_PEAK_RSS_GB = 15.0, 4.0

SIZES: dict[str, dict] = {
    # None: the configuration's default (full size is the default configuration)
    "full": {"width": None, "height": None, "mesh_vertices": None, "surface_vertices": None,
             "template_vertices": None},
    "small": {"width": 320, "height": 256, "mesh_vertices": 20_000, "surface_vertices": 20_000,
              "template_vertices": 3_000},
}


def overrides(size: str, seed: int) -> dict:
    """``load_config`` overrides of one size: one subject, one expression, the size's rig and meshes."""
    s = SIZES[size]
    synth: dict = {"subjects": 1, "expressions": 1, "seed": seed}
    stages: dict = {}
    if s["width"] is not None:
        synth["rig"] = {"width": s["width"], "height": s["height"]}
    if s["mesh_vertices"] is not None:
        synth["mesh_vertices"] = s["mesh_vertices"]
    if s["surface_vertices"] is not None:
        stages["surface"] = {"target_vertices": s["surface_vertices"]}
    if s["template_vertices"] is not None:
        stages["registration"] = {"template": {"n_vertices": s["template_vertices"]}}
    return {"synth": synth, "build": {"stages": stages}}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _status_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _pin_one_core() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


# -- data (parent, not timed) ---------------------------------------------------------------------

def make_raw(work: Path, size: str, seed: int) -> tuple[Path, float]:
    """The raw root of one synthetic sample (reused while the configuration and the simulator's
    code are the same, :func:`benchmarks._raw.synthetic_raw`); returns (root, seconds spent)."""
    from benchmarks._raw import synthetic_raw
    from pixelface.config import load_config

    t0 = time.perf_counter()
    raw = synthetic_raw(work, f"raw-{size}-seed{seed}", load_config(overrides=overrides(size, seed)).synth)
    return raw, time.perf_counter() - t0


# -- the measured child ---------------------------------------------------------------------------

def _profiled_chain(chain, stage: str, prof):
    """``chain`` with ``stage``'s kernel run under the profiler ``prof`` (same names and versions: same keys)."""
    from dataclasses import replace

    from tasks.stage import Chain, Step

    if stage not in chain.stage_names:
        raise ValueError(f"--profile: unknown stage {stage!r}; expected one of {list(chain.stage_names)}")

    def wrap(kernel):
        def run(params, **kwargs):
            prof.enable()
            try:
                return kernel(params, **kwargs)
            finally:
                prof.disable()
        return run

    return Chain(chain.name, tuple(Step(replace(s.spec, kernel=wrap(s.spec.kernel)), s.deps)
                                   if s.spec.name == stage else s for s in chain.steps))


def _one_run(chain, raw: str, store_path: str, stages) -> dict:
    """Plan + run the sample's unit into a fresh store; the CPU, wall and per-stage numbers of that run."""
    from storage.store import open_store
    from tasks.catalog import plan_subject
    from tasks.sample_stages import prepared_template
    from tasks.stage import Target, run_chain

    store = open_store(store_path, create=True)          # not timed: a worker opens its store once
    hits0 = prepared_template.cache_info().hits
    c0, t0, w0 = _cpu(), time.thread_time(), time.perf_counter()
    plan = plan_subject.fn(raw, SUBJECT)                 # the planner's body: metadata + raw view hashes
    c_plan = _cpu() - c0
    s = next((p for p in plan.samples if p.sample == SAMPLE), None)
    if plan.error or s is None or s.error:
        raise RuntimeError(f"planning failed: {plan.error or (s.error if s else f'no sample {SAMPLE}')}")
    target = Target(raw=raw, store=store_path, subject=SUBJECT, sample=SAMPLE, views=s.views, raw_keys=s.raw_keys)
    rec = run_chain(chain, target, stages, store=store)
    sample_cpu = _cpu() - c0
    main_thread_cpu = time.thread_time() - t0
    sample_wall = time.perf_counter() - w0
    if prepared_template.cache_info().hits <= hits0:
        raise RuntimeError("the registration stage did not use the prepared template (cache miss)")
    bad = [f"{r.stage}/{r.view or '_sample'}: {r.outcome} {r.error}" for r in rec.stages if r.outcome != "computed"]
    if bad:
        raise RuntimeError(f"every stage must be computed: {bad}")

    per_view: dict[str, dict[str, float]] = {}
    kernel: dict[str, float] = {}
    io: dict[str, float] = {}
    wall: dict[str, float] = {}
    for r in rec.stages:
        per_view.setdefault(r.stage, {})[r.view or "_sample"] = r.kernel_cpu_s + r.load_cpu_s + r.write_cpu_s
        kernel[r.stage] = kernel.get(r.stage, 0.0) + r.kernel_cpu_s
        io[r.stage] = io.get(r.stage, 0.0) + r.load_cpu_s + r.write_cpu_s
        wall[r.stage] = wall.get(r.stage, 0.0) + (r.finished_at - r.started_at).total_seconds()
    stage_cpu = {k: sum(v.values()) for k, v in per_view.items()}
    total_stage = sum(stage_cpu.values())
    biggest = max(stage_cpu, key=stage_cpu.get)
    qc = {(r.stage, r.view): r.qc for r in rec.stages}
    views = list(s.views)
    return {
        "views": views, "stages": list(stage_cpu),
        "stage_cpu_s": stage_cpu, "stage_cpu_s_per_view": per_view, "stage_kernel_cpu_s": kernel, "io_cpu_s": io,
        "stage_wall_s": wall,
        "load_cpu_s": sum(r.load_cpu_s for r in rec.stages), "write_cpu_s": sum(r.write_cpu_s for r in rec.stages),
        "sum_stage_cpu_s": total_stage, "sum_stage_kernel_cpu_s": sum(kernel.values()),
        "sum_io_cpu_s": sum(io.values()),
        "sample_cpu_s": sample_cpu, "sample_wall_s": sample_wall, "plan_cpu_s": c_plan,
        "unit_thread_cpu_s": rec.cpu_s, "other_threads_cpu_s": sample_cpu - main_thread_cpu,
        "bookkeeping_cpu_s": main_thread_cpu - c_plan - total_stage,
        "biggest_stage": biggest, "biggest_stage_cpu_s": stage_cpu[biggest],
        "biggest_stage_share": stage_cpu[biggest] / sample_cpu,
        "samples_per_hour_per_core": 3600.0 / sample_cpu,
        "hours_for_24525_samples_on_64_cores": N_SAMPLES * sample_cpu / N_CORES / 3600.0,
        "image_size": [int(s.width), int(s.height)],
        "decode_points": {v: int(qc[("decode", v)].get("n_points", 0)) for v in views},
        "fused_points": int(qc[("fusion", None)].get("n_points", 0)),
        "surface_vertices": int(qc[("surface", None)].get("n_vertices", 0)),
    }


def _forget_calibrations() -> int:
    """Empty the kernels' calibration caches (as before a sample of an unseen session and lens); returns entries dropped.

    :func:`kernels.camera.clear_caches` with ``keep_intrinsics=False``: the per-pose tables and the
    per-intrinsics undistorted pixel grids, the conservative case (a new session of the same rig
    would keep the grids: about 0.3 s less per sample).
    """
    import kernels.texture  # noqa: F401  (registers its cache with kernels.camera)
    import kernels.triangulate  # noqa: F401
    from kernels.camera import clear_caches

    return clear_caches()


def child(raw: str, store_path: str, size: str, seed: int, pin: bool, profile: str | None, warmup: bool,
          cached_run: bool) -> dict:
    """Warm-up run, measured run (per-calibration caches emptied), calibration-cached run; each into a
    fresh store. Returns the measured run's numbers with the others' totals (see the module doc)."""
    startup_cpu = _cpu()
    out: dict = {"cpu_affinity": [_pin_one_core()] if pin else sorted(os.sched_getaffinity(0))}

    c0 = _cpu()
    import numpy  # noqa: F401  (its import is part of the one-off cost)

    from flows.build import limit_kernel_threads  # what every Dask worker of a build runs first
    from pixelface.config import load_config
    from tasks.sample_stages import prepared_template
    from tasks.stage import run_chain  # noqa: F401
    from tasks.view_stages import SAMPLE_CHAIN

    limit_kernel_threads(1)
    out["import_cpu_s"] = _cpu() - c0
    out["startup_cpu_s"] = startup_cpu

    stages = load_config(overrides=overrides(size, seed)).build.stages
    c0, w0 = _cpu(), time.perf_counter()
    prep = prepared_template(stages.registration)        # once per worker process (lru cache)
    out["template_prep_cpu_s"] = _cpu() - c0
    out["template_prep_wall_s"] = time.perf_counter() - w0
    out["template_vertices"] = int(len(prep.template.vertices))

    if warmup:
        first = _one_run(SAMPLE_CHAIN, raw, os.path.join(store_path, "warmup"), stages)
    out["calibration_entries_forgotten"] = _forget_calibrations()
    chain, prof = SAMPLE_CHAIN, None
    if profile:
        import cProfile

        prof = cProfile.Profile(time.thread_time)   # CPU of the stage's thread, as the stage records
        chain = _profiled_chain(SAMPLE_CHAIN, profile, prof)
    out.update(_one_run(chain, raw, os.path.join(store_path, "measured"), stages))
    if warmup:
        out["first_sample_cpu_s"] = first["sample_cpu_s"]
        out["first_sample_stage_cpu_s"] = first["stage_cpu_s"]
        out["first_sample_extra_cpu_s"] = first["sample_cpu_s"] - out["sample_cpu_s"]
    if cached_run:
        again = _one_run(SAMPLE_CHAIN, raw, os.path.join(store_path, "cached"), stages)
        out["calibration_cached_sample_cpu_s"] = again["sample_cpu_s"]
        out["calibration_cached_stage_cpu_s"] = again["stage_cpu_s"]
        out["calibration_tables_cpu_s"] = out["sample_cpu_s"] - again["sample_cpu_s"]
        out["calibration_cached_hours_for_24525_samples_on_64_cores"] = again["hours_for_24525_samples_on_64_cores"]
    out["peak_rss_gb"], out["rss_end_gb"] = _status_gb("VmHWM"), _status_gb("VmRSS")
    out["targets_met"] = {f"sample_cpu_s<={TARGET_SAMPLE_CPU_S:g}": out["sample_cpu_s"] <= TARGET_SAMPLE_CPU_S,
                          f"peak_rss_gb<={TARGET_PEAK_RSS_GB:g}": out["peak_rss_gb"] <= TARGET_PEAK_RSS_GB}
    if prof is not None:
        import io as _io
        import pstats

        for order in ("cumulative", "tottime"):
            buf = _io.StringIO()
            pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(order).print_stats(35)
            print(f"PROFILE {profile} (sorted by {order}; thread CPU s, profiler overhead included)\n{buf.getvalue()}",
                  file=sys.stderr, flush=True)
        out["profiled_stage"] = profile
    return out


def _run_child(raw: Path, store: Path, size: str, seed: int, pin: bool, profile: str | None, warmup: bool,
               cached_run: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.sample", "--child", "--raw", str(raw), "--store", str(store),
           "--size", size, "--seed", str(seed)] + ([] if warmup else ["--no-warmup"]) + (
               [] if cached_run else ["--no-cached-run"]) + ([] if pin else ["--no-pin"]) + (
               ["--profile", profile] if profile else [])
    env = dict(os.environ, **{v: "1" for v in _THREAD_VARS})  # before numpy is imported in the child
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if profile else subprocess.PIPE, text=True,
                       env=env, cwd=root)
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({p.returncode}):\n{(p.stderr or '')[-4000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def run(size: str = "full", seed: int = 0, work: str | None = None, pin: bool = True,
        profile: str | None = None, warmup: bool = True, cached_run: bool = True) -> dict:
    """Synthesise (or reuse) the sample, measure it in a single-threaded child, return the results."""
    tmp = None if work else tempfile.mkdtemp(prefix="pixelface_sample_bench_")
    base = Path(work or tmp).resolve()
    base.mkdir(parents=True, exist_ok=True)
    try:
        raw, synth_s = make_raw(base, size, seed)
        store = base / f"store-{size}-seed{seed}"
        shutil.rmtree(store, ignore_errors=True)  # fresh: every stage computed
        load0 = os.getloadavg()
        res = {"size": size, "seed": seed, "subject": SUBJECT, "sample": SAMPLE, "synth_s": synth_s}
        res.update(_run_child(raw, store, size, seed, pin, profile, warmup, cached_run))
        res["load_avg_before"], res["load_avg_after"] = list(load0), list(os.getloadavg())
        shutil.rmtree(store, ignore_errors=True)
        return res
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def table(res: dict) -> str:
    """Readable summary: stages by cost (kernel, IO, total, share), then the totals."""
    from benchmarks._report import format_table

    order = sorted(res["stage_cpu_s"], key=res["stage_cpu_s"].get, reverse=True)
    w = max(len(s) for s in order) + 2
    lines = [f"one {res['size']} sample ({len(res['views'])} views at {res['image_size'][0]}x{res['image_size'][1]}, "
             f"surface {res['surface_vertices']} vertices, template {res['template_vertices']} vertices), "
             f"CPU s on one core (cpu {res['cpu_affinity']})",
             f"  {'stage':<{w}} {'kernel':>8} {'io':>8} {'total':>8} {'share':>7}   per view"]
    for s in order:
        pv = res["stage_cpu_s_per_view"][s]
        pvs = " ".join(f"{v}={t:.2f}" for v, t in pv.items()) if len(pv) > 1 else ""
        lines.append(f"  {s:<{w}} {res['stage_kernel_cpu_s'][s]:>8.3f} {res['io_cpu_s'][s]:>8.3f} "
                     f"{res['stage_cpu_s'][s]:>8.3f} {res['stage_cpu_s'][s] / res['sample_cpu_s']:>7.1%}   {pvs}")
    lines.append(f"  biggest stage: {res['biggest_stage']} ({res['biggest_stage_share']:.1%} of the sample)")
    rows = [("sum_stage_cpu_s", "s"), ("plan_cpu_s", "s"), ("other_threads_cpu_s", "s"), ("bookkeeping_cpu_s", "s"),
            ("sample_cpu_s", "s"), ("sample_wall_s", "s"), ("peak_rss_gb", "GB"),
            ("samples_per_hour_per_core", ""), ("hours_for_24525_samples_on_64_cores", "h"),
            ("template_prep_cpu_s", "s (once per worker)"), ("import_cpu_s", "s (once per worker)"),
            ("first_sample_extra_cpu_s", "s (once per worker)"),
            ("calibration_tables_cpu_s", "s (per new calibration)"), ("calibration_cached_sample_cpu_s", "s"),
            ("calibration_cached_hours_for_24525_samples_on_64_cores", "h")]
    rows = [r for r in rows if r[0] in res]
    return "\n".join(lines) + "\n" + format_table("totals", res, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sample", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--seed", type=int, default=0, help="simulator seed of the sample")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--work", default=None, help="keep the synthetic raw sample here (default: a temp dir)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the child to one core")
    p.add_argument("--profile", default=None, metavar="STAGE", help="cProfile this stage's kernel (stderr)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="measure the worker's first sample (numba kernels not loaded yet)")
    p.add_argument("--no-cached-run", dest="cached_run", action="store_false",
                   help="skip the run with the calibration tables cached")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        res = child(a.raw, a.store, a.size, a.seed, a.pin, a.profile, a.warmup, a.cached_run)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    res = run(a.size, a.seed, a.work, a.pin, a.profile, a.warmup, a.cached_run)
    print(table(res))
    print("targets met:", res["targets_met"])
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
