"""Orchestration at scale: a build of many tiny subjects; the driver's memory and the time per subject.

    python -m benchmarks.orchestration_scale --json work/bench/orchestration_scale.json [--subjects 200]

Synthesises ``--subjects`` subjects with one expression each at ``--width`` x ``--height``
(default 80x64: at 64x48 the fused cloud has 550-770 points, below the 1000 the surface
kernel needs, so the stages cannot all run there) and runs the real entry point
(:func:`flows.build.run_build`: one temporary Prefect API, a LocalCluster of ``--workers``
processes, every stage of the chain) into a fresh store. Stage parameters for tiny views:
``surface.target_vertices`` 1000, ``registration.template.n_vertices`` 1000,
``fusion.min_view_points`` 100.

Measured (this process is the build's driver):

* the driver's RSS when each subject finishes (``on_subject``), and every 0.5 s by a sampling
  thread (with the API server's and the workers' RSS); ``driver_rss_growth_mb`` = RSS at the
  last subject - RSS at subject 20 (target <= 100 MB), and the least-squares slope over that
  range (MB per 100 subjects);
* time per subject: the build's throughput after the first 20 subjects (warm-up: worker
  imports, template preparation), in quarters of the remaining subjects
  (``time_per_subject_spread_quarters`` = max / min - 1, target <= 0.20) and in windows of 20
  (noisier: the machine is shared); the driver's CPU per subject by quarter (insensitive to
  other load on the machine).

The process is not pinned to one core: the build needs the cluster's workers and the API
server beside the driver (2 workers on this 2-core machine). Prints a table
(:func:`benchmarks._report.format_table`) and writes the JSON.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks._report import format_table  # noqa: E402

WARMUP = 20
WINDOW = 20
STAGES = {"surface": {"target_vertices": 1000}, "registration": {"template": {"n_vertices": 1000}},
          "fusion": {"min_view_points": 100}}


def _mb(n: int) -> float:
    return n / 2**20


class Sampler(threading.Thread):
    """RSS of this process and of its child processes (API server, workers) every ``period`` s."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True, name="rss-sampler")
        import psutil

        self.me = psutil.Process()
        self.period = period
        self.samples: list[tuple[float, float, float, float]] = []  # t, driver, api, workers (MB)
        self.stop_event = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> tuple[float, float, float, float]:
        import psutil

        api = workers = 0
        for c in self.me.children(recursive=True):
            try:
                rss = c.memory_info().rss
                if "uvicorn" in " ".join(c.cmdline()):
                    api += rss
                else:
                    workers += rss
            except psutil.NoSuchProcess:
                pass
        return (time.perf_counter() - self.t0, _mb(self.me.memory_info().rss), _mb(api), _mb(workers))

    def run(self):
        while not self.stop_event.wait(self.period):
            self.samples.append(self.sample())


def synth(work: Path, subjects: int, width: int, height: int) -> Path:
    from benchmarks._raw import synthetic_raw
    from pixelface.config import load_config

    cfg = load_config(overrides={"synth": {"subjects": subjects, "expressions": 1, "mesh_vertices": 20000,
                                           "rig": {"width": width, "height": height}}})
    raw = synthetic_raw(work, f"raw-{subjects}x1-{width}x{height}", cfg.synth)
    return raw


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def run(args) -> dict:
    from flows.prefect_env import configure_environment

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    configure_environment(work / "prefect")
    raw = synth(work, args.subjects, args.width, args.height)
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)

    from flows.build import run_build
    from pixelface.config import load_config

    cfg = load_config(overrides={"build": {"raw": str(raw), "store": str(store), "workers": args.workers,
                                           "prefect_home": str(work / "prefect"),
                                           "dask_local_directory": str(work / "dask"), "stages": STAGES}}).build
    sampler = Sampler()
    done: list[tuple[float, float, float]] = []  # (seconds since start, driver RSS MB, driver CPU s) per subject
    failed: list[str] = []

    def on_subject(s):
        cpu = sampler.me.cpu_times()
        done.append((time.perf_counter() - sampler.t0, _mb(sampler.me.memory_info().rss), cpu.user + cpu.system))
        if not s.ok:
            failed.append(f"{s.subject}: {s.errors[:1]}")

    sampler.start()
    summary = run_build(cfg, on_subject=on_subject)
    sampler.stop_event.set()
    sampler.join()
    n = len(done)
    if n <= WARMUP + WINDOW:
        raise SystemExit(f"--subjects must be > {WARMUP + WINDOW} to measure past the warm-up, got {n}")
    t = [d[0] for d in done]
    rss = [d[1] for d in done]
    cpu = [d[2] for d in done]
    windows = [(t[i + WINDOW - 1] - t[i - 1]) / WINDOW for i in range(WARMUP, n - WINDOW + 1, WINDOW)]
    q = (n - WARMUP) // 4  # quarters of the subjects after the warm-up
    quarters = [(t[WARMUP - 1 + (k + 1) * q] - t[WARMUP - 1 + k * q]) / q for k in range(4)] if q else windows
    cpu_quarters = [(cpu[WARMUP - 1 + (k + 1) * q] - cpu[WARMUP - 1 + k * q]) / q for k in range(4)] if q else []
    tot = summary.totals()
    xs = list(range(WARMUP, n + 1))
    out = {
        "subjects": n, "width": args.width, "height": args.height, "workers": args.workers,
        "stages_per_subject": round(tot["stages"] / n, 2), "failed_subjects": len(failed), "failures": failed[:5],
        "build_s": round(summary.seconds, 2), "kernel_cpu_s": round(tot["kernel_cpu_s"], 2),
        "driver_rss_mb_at_subject": {str(k): round(rss[k - 1], 1) for k in (1, WARMUP, n // 2, n) if k <= n},
        "driver_rss_growth_mb": round(rss[-1] - rss[WARMUP - 1], 1),
        "driver_rss_slope_mb_per_100_subjects": round(100 * _slope(xs, rss[WARMUP - 1:]), 2),
        "driver_peak_rss_mb": round(max([s[1] for s in sampler.samples] + rss), 1),
        "api_rss_mb_first_last": [round(sampler.samples[0][2], 1), round(sampler.samples[-1][2], 1)]
        if sampler.samples else None,
        "workers_rss_mb_peak": round(max((s[3] for s in sampler.samples), default=0.0), 1),
        "time_per_subject_s_windows": [round(w, 3) for w in windows],
        "time_per_subject_s": round((t[-1] - t[WARMUP - 1]) / (n - WARMUP), 3),
        "time_per_subject_spread": round(max(windows) / min(windows) - 1, 3),
        "time_per_subject_s_quarters": [round(w, 3) for w in quarters],
        "time_per_subject_spread_quarters": round(max(quarters) / min(quarters) - 1, 3),
        "time_per_subject_last_over_first_quarter": round(quarters[-1] / quarters[0], 3),
        "driver_cpu_per_subject_s_quarters": [round(c, 3) for c in cpu_quarters],
        "rss_trace": [[round(a, 1), round(b, 1), round(c, 1), round(d, 1)] for a, b, c, d in sampler.samples[::4]],
    }
    out["targets_met"] = bool(out["driver_rss_growth_mb"] <= 100 and out["time_per_subject_spread_quarters"] <= 0.20
                              and not failed)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.orchestration_scale", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--subjects", type=int, default=200)
    p.add_argument("--width", type=int, default=80)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default="work/bench/orchestration_scale", help="scratch folder")
    args = p.parse_args(argv)
    res = run(args)
    rows = [("subjects", ""), ("workers", ""), ("stages_per_subject", ""), ("failed_subjects", ""),
            ("build_s", "s"), ("kernel_cpu_s", "s"), ("driver_rss_growth_mb", f"MB (subject {WARMUP} -> last)"),
            ("driver_rss_slope_mb_per_100_subjects", "MB"), ("driver_peak_rss_mb", "MB"),
            ("workers_rss_mb_peak", "MB"), ("time_per_subject_s", "s (after warm-up)"),
            ("time_per_subject_spread", f"max/min of {WINDOW}-subject windows - 1"),
            ("time_per_subject_spread_quarters", "max/min of quarters - 1 (target <= 0.2)"),
            ("time_per_subject_last_over_first_quarter", ""), ("targets_met", "")]
    print(format_table("orchestration at scale", res, rows))
    print("time per subject by window (s):", res["time_per_subject_s_windows"])
    print("time per subject by quarter (s):", res["time_per_subject_s_quarters"],
          "driver CPU per subject by quarter (s):", res["driver_cpu_per_subject_s_quarters"])
    print("driver RSS at subject (MB):", res["driver_rss_mb_at_subject"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
