"""``pixelface build``: arguments and command (wired into ``flows/cli.py``).

Kept free of Prefect imports at module level: the environment (``PREFECT_HOME`` under the
work folder, analytics off) is set before Prefect is first imported.

Exit status: 0 when every stage of every sample completed, 1 when some failed (after all
others finished), 2 for bad arguments or input, or a store that cannot be written (read-only,
full): checked before anything starts (the CLI's ``error: ...`` convention).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_PARTIAL = 0, 1


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", type=Path, required=True, help="raw capture root")
    p.add_argument("--store", required=True, help="store root (local path; fsspec URLs untested)")
    p.add_argument("--subjects", nargs="+", help="subject ids (default: all)")
    p.add_argument("--dask-address", dest="dask_address", help="tcp://HOST:PORT of an existing Dask scheduler")
    p.add_argument("--workers", type=int, help="LocalCluster worker processes (default: CPU count)")
    p.add_argument("--config", type=Path, help="YAML/TOML/JSON file with a `build:` section")
    p.add_argument("--prefect-home", dest="prefect_home", type=Path,
                   help="PREFECT_HOME when the environment does not set it (default work/prefect)")
    p.add_argument("--register-from-neutral", dest="register_from_neutral", action=argparse.BooleanOptionalAction,
                   default=None, help="register each expression from the subject's neutral registration "
                                      "(docs/registration.md; default: on; --no-register-from-neutral: every "
                                      "sample from the template)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_config_from_args(args: argparse.Namespace):
    """The validated ``build`` section: defaults <- ``--config FILE`` <- command-line options."""
    from pixelface.config import load_config

    data: dict = {}
    for attr, key in (("raw", "raw"), ("store", "store"), ("subjects", "subjects"), ("dask_address", "dask_address"),
                      ("workers", "workers"), ("prefect_home", "prefect_home"),
                      ("register_from_neutral", "register_from_neutral")):
        v = getattr(args, attr, None)
        if v is not None:
            data[key] = str(v) if isinstance(v, Path) else v
    return load_config(getattr(args, "config", None), {"build": data}).build


def cmd_build(args: argparse.Namespace) -> int:
    from flows.prefect_env import configure_environment

    cfg = build_config_from_args(args)
    if not Path(cfg.raw).is_dir():
        raise FileNotFoundError(f"--raw {cfg.raw}: no such folder")
    from storage.store import open_store

    open_store(cfg.store)  # a store we cannot write (read-only, full, not a store) fails here, before any work
    configure_environment(Path(cfg.prefect_home))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.build import run_build
    from tasks.catalog import list_subjects

    n = len(list_subjects(cfg.raw, cfg.subjects))
    with Progress(TextColumn("build"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), disable=args.quiet, transient=False) as bar:
        task = bar.add_task("", total=n)

        def on_subject(s):
            state = "ok" if s.ok else f"{s.failed} failed"
            bar.update(task, advance=1, description=f"{s.subject}: {s.computed} computed, {s.cached} cached, {state}")

        summary = run_build(cfg, on_subject=on_subject)
    tot = summary.totals()
    bad = [s for s in summary.subjects if not s.ok]
    if args.json:
        print(json.dumps({"build_id": summary.build_id, "store": summary.store, "seconds": round(summary.seconds, 2),
                          **{k: (int(v) if k != "kernel_cpu_s" else round(v, 3)) for k, v in tot.items()},
                          "failed_subjects": [s.subject for s in bad]}))
    else:
        print(f"built {len(summary.subjects)} subjects into {summary.store} in {summary.seconds:.1f} s: "
              f"{int(tot['computed'])} computed, {int(tot['cached'])} cached, "
              f"{int(tot['failed'])} failed")
        for s in bad:
            for e in s.errors[:10]:
                print(f"  FAILED {s.subject}: {e}", file=sys.stderr)
    return EXIT_PARTIAL if bad else EXIT_OK
